"""Shared bits of the job entrypoints: the frozen CLI and connecting to Ray."""

from __future__ import annotations

import argparse
import os
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

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # workers inherit it: no per-actor bars
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True)
