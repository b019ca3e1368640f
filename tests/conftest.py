"""Test-wide environment: CPU only, offline, quiet, and fast Ray Train reports.

Set before anything imports ray, deepspeed or transformers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray starts workers at nice 15; beside other busy processes (a shared CI machine) they then get
# ~3% of a core each and every Ray test crawls. Tests' own instances and `ray start` nodes
# (tests/raycluster.py inherits this environment) run workers at normal priority.
os.environ.setdefault("RAY_worker_niceness", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))
# Jobs whose tests set no tracking URI (prepare, recaption, pack log their runs by default) log into
# one database for the session, never into the checkout's out/mlflow.db.
os.environ.setdefault("MLFLOW_TRACKING_URI",
                      "sqlite:///" + os.path.join(tempfile.mkdtemp(prefix="clipvip-tests-mlflow-"), "mlflow.db"))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for gloo, Ray or a server to bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(argv: Callable[[int], list[str]], world: int, timeout: float = 600, what: str = "ranks") -> list[str]:
    """Start `argv(rank)` for every rank as its own process (a gloo group of `world` on loopback),
    wait for all (the timeout is for a process that never ends), and return their outputs; a rank
    that fails fails the test with every rank's output tail."""
    procs = [subprocess.Popen(argv(r), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs: list[str] = []
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), f"{what}:\n" + "\n".join(x[-3000:] for x in logs)
    return logs


def _session_members(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # Fields after the parenthesised command name: state, ppid, pgrp, session, ...
                    fields = f.read().rsplit(")", 1)[1].split()
                # A zombie is dead already; whoever adopted it may never reap it.
                if int(fields[3]) == sid and fields[0] != "Z":
                    pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass  # the process ended while being read
    return pids


def kill_job(proc: subprocess.Popen, timeout: float = 120) -> None:
    """kill -9 a job started with `start_new_session=True` and everything it started, then wait
    until none of it is left. Ray puts its workers in process groups of their own, so killing the
    driver's group leaves them running for seconds (a Ray Train controller among them can still
    record a checkpoint); the whole session is what a lost machine loses. The timeout is for a
    process that never dies."""
    deadline = time.monotonic() + timeout
    while members := _session_members(proc.pid):
        assert time.monotonic() < deadline, f"processes {members} outlived kill -9"
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.wait()
        time.sleep(0.05)
    proc.wait()


DS_ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="session")
def _gloo_group():
    """One single-rank gloo process group for every in-process DeepSpeed test of the session:
    DeepSpeed caches its process groups globally, so a group destroyed and made again under it
    breaks the next engine."""
    import deepspeed.comm.torch  # noqa: F401
    import torch.distributed as dist

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # gloo does the allreduce
    port = free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield port
    dist.destroy_process_group()


@pytest.fixture
def gloo(_gloo_group, monkeypatch):
    """In-process DeepSpeed on CPU at world size 1 (the env it reads, for this test only)."""
    for key, value in zip(DS_ENV_KEYS, ("0", "0", "1", "127.0.0.1", str(_gloo_group)), strict=True):
        monkeypatch.setenv(key, value)
