"""Shared bits of the job entrypoints: the frozen CLI and connecting to Ray."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import sys
from typing import Any

from pipeline.config import ConfigError, RayConfig, load_config


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML recipe (see jobs/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set frames.fps=2 (repeatable)")
    return parser


def load_or_exit(cls: type, args: argparse.Namespace) -> Any:
    """Build the job config; a bad config ends the process with the key and the reason."""
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def init_ray(cfg: RayConfig) -> None:
    """Connect to `ray.address` / RAY_ADDRESS, or start a private local instance."""
    import ray  # noqa: PLC0415

    from jobs import stderr_filter  # noqa: PLC0415

    stderr_filter.install()  # before Ray starts: its false alarms go to fd 2 from C++
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # workers inherit it: no per-actor bars
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # No dashboard on a laptop-sized instance (it costs ~20 s of start-up and a process on 2
        # cores). Without it Ray Train V2's PlacementGroupCleaner cannot reach the State API and
        # warns every second for as long as Ray is up; worker-side Python logging at ERROR drops
        # that (and Ray Train's INFO chatter). Our own progress lines are prints and still show.
        with _own_address():
            ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True,
                     logging_config=ray.LoggingConfig(encoding="TEXT", log_level="ERROR"),
                     _node_ip_address="127.0.0.1")


@contextlib.contextmanager
def _own_address():
    """Start the local instance at a GCS port chosen here, with RAY_ADDRESS naming it in the
    environment its processes inherit (the raylet, and every worker it starts).

    Ray Train V2's PlacementGroupCleaner, a detached actor, finds its cluster through Ray's address
    auto-detection, which raises "Found multiple active Ray instances" when another local Ray is
    up: a traceback at the end of the job. With RAY_ADDRESS set it looks no further. The driver's
    own environment is restored afterwards, so a later `ray.init()` in this process starts afresh.

    Workers run at the driver's priority (RAY_worker_niceness=0, unless set): Ray starts them at
    nice 15 to keep a cluster node's daemons responsive, but on a local instance the workers are
    the job, and beside any other busy process they starve (measured: ~3% of a core each beside
    two busy loops on 2 cores; `clipvip demo --quick` past 900 s against ~120 s).
    """
    with socket.socket() as s:  # a free port; the GCS binds it a moment later
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = {k: os.environ.get(k) for k in ("RAY_GCS_SERVER_PORT", "RAY_ADDRESS", "RAY_worker_niceness")}
    os.environ.update(RAY_GCS_SERVER_PORT=str(port), RAY_ADDRESS=f"127.0.0.1:{port}",
                      RAY_worker_niceness=saved["RAY_worker_niceness"] or "0")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# Failures raised inside a Ray actor reach the driver wrapped in Ray's own errors (an
# ActorDiedError carrying the actor's traceback as text); these are ours, meant to be read.
_PLAIN_FAILURES = re.compile(r"(caption\.device=cuda: no CUDA device is visible[^\n]*)")


def plain_failure(error: BaseException) -> str | None:
    """The one sentence of ours inside a Ray failure that says what to fix, if there is one."""
    found = _PLAIN_FAILURES.search(str(error))
    return found.group(1) if found else None
