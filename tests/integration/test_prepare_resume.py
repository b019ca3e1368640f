"""Kill -9 mid-run (the driver, or a Ray worker), run the same command again: the result has
no clip missing, none duplicated, and is byte-identical to an uninterrupted run."""

from __future__ import annotations

import glob
import hashlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import ROOT
from tests.integration.conftest import clipvip


def args_for(sample, root):
    sets = [f"data.root={root}", f"data.metadata={sample.metadata_path}", f"data.video_root={sample.video_root}",
            f"data.subtitles={sample.subtitles_table}", "data.clips_per_shard=1", "frames.short_side_px=64",
            "caption.model=builtin:tiny-blip", "ray.num_cpus=2", "ray.progress_bars=false"]
    return ["prepare"] + [a for s in sets for a in ("--set", s)]


def digests(root):
    """Relative path -> sha256 for every data file (sidecars hold timings, so compare parquet)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True)):
        out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def no_temp_files(root):
    return not [p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True) if ".tmp-" in p]


@pytest.fixture(scope="module")
def reference(sample_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ref") / "root")
    proc = clipvip(*args_for(sample_data, root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, digests(root)


def _start(sample, root):
    env = dict(os.environ)
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *args_for(sample, root)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_for(pred, proc, timeout_s=300.0):
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def _kill_tree(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def test_kill_driver_then_resume(sample_data, reference, tmp_path):
    ref_root, ref = reference
    root = str(tmp_path / "root")
    proc = _start(sample_data, root)
    started = _wait_for(lambda: glob.glob(os.path.join(root, "frames", "*.json")), proc)
    assert started, "the run never finished a shard"
    n_done = len(glob.glob(os.path.join(root, "captions", "default", "part-*.json")))
    proc.send_signal(signal.SIGKILL)  # the driver only; Ray's own reaper ends its local cluster
    proc.wait()
    _kill_tree(proc)
    assert n_done < len([k for k in ref if k.startswith("frames/")]), "killed too late to test resume"

    again = clipvip(*args_for(sample_data, root))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already done before this run" in again.stdout
    assert digests(root) == ref
    assert no_temp_files(root)


def test_kill_worker_then_finish(sample_data, reference, tmp_path):
    _, ref = reference
    root = str(tmp_path / "root")
    proc = _start(sample_data, root)
    me = psutil.Process(proc.pid)
    killed = []

    def kill_a_decode_worker():
        for child in me.children(recursive=True):
            try:
                cmd = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if cmd.startswith("ray::") and "Map(decode)" in cmd:
                child.kill()
                killed.append(cmd)
                return True
        return False

    _wait_for(kill_a_decode_worker, proc, timeout_s=120)
    proc.wait(timeout=600)
    if proc.returncode != 0:  # a task whose retries ran out: the rerun must still finish exactly
        again = clipvip(*args_for(sample_data, root))
        assert again.returncode == 0, again.stderr[-3000:]
    assert killed, "no decode worker was seen to kill"
    assert digests(root) == ref
    assert no_temp_files(root)
