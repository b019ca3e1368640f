"""`prepare` on a real multi-node Ray cluster on loopback whose nodes come and go mid-job.

The head has no CPU for tasks and no GPU; one node decodes. The caption pool asks for a GPU per
actor (`caption.num_gpus_per_actor=1`; logical GPUs, the captioner itself runs on the CPU with
`caption.device=cpu`), so no caption can happen until a GPU node joins. Once the first shard is
decoded the decode node is killed outright (every process of it, as a spot reclaim does), with
units in flight; then a node with CPUs and one GPU joins, receives the caption actor and the rest
of the decoding, and the job finishes. The root must equal one made by a clean run, byte for byte.
"""

from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys

import pytest

from pipeline.config import PrepareJobConfig, load_config
from pipeline.data.build import run_prepare
from tests.conftest import ROOT
from tests.raycluster import TIMEOUT_S, LocalCluster, wait_for

# Node deaths detected in seconds, not the default ~30 s (GCS health checks of each raylet).
FAST_HEALTH = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4",
               "RAY_health_check_initial_delay_ms": "500"}


def settings(root: str, sample_data, gpus: int = 1) -> list[str]:
    return [f"root={root}", f"data.metadata={sample_data.metadata_path}",
            f"data.video_root={sample_data.video_root}", f"data.subtitles={sample_data.subtitles_table}",
            "data.clips_per_shard=2", "frames.short_side_px=64", "frames.max_frames=8",
            "caption.model=builtin:tiny-blip", "caption.device=cpu", f"caption.num_gpus_per_actor={gpus}",
            "caption.max_actors=2", "ray.progress_bars=false"]


def digests(root: str) -> dict[str, str]:
    return {os.path.relpath(p, root): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True)
            if os.sep + "index" + os.sep not in p and os.sep + "plan" + os.sep not in p}


@pytest.fixture(scope="module")
def cluster():
    lc = LocalCluster(extra_env=FAST_HEALTH)
    try:
        lc.start(head_cpus=0, workers=(("decode", 2, 0),))
        yield lc
    finally:
        lc.close()


def test_gpu_node_joins_late_and_a_decode_node_is_lost(cluster, ray_local, sample_data, tmp_path):
    ref = str(tmp_path / "ref")
    run_prepare(load_config(PrepareJobConfig, None, settings(ref, sample_data, gpus=0)), log=lambda *_: None)
    want = digests(ref)
    units = len([k for k in want if k.startswith("frames")])
    assert units >= 4 and len([k for k in want if k.startswith("captions")]) == units

    root = str(tmp_path / "root")
    log = open(tmp_path / "prepare.log", "w")
    args = [a for kv in settings(root, sample_data) + [f"ray.address={cluster.gcs_address}"] for a in ("--set", kv)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # set by this process's own Ray
    # The driver stays on loopback too (tests/raycluster.py: Ray would dial the routable address).
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "prepare", *args], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT,
                            env=dict(env, RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"))
    try:
        def sidecars(kind: str) -> list[str]:
            assert proc.poll() is None, open(tmp_path / "prepare.log").read()[-4000:]
            return glob.glob(os.path.join(root, kind, "**", "part-*.json"), recursive=True)

        first = wait_for(lambda: sidecars("frames"), TIMEOUT_S, "the first decoded shard")
        assert not sidecars("captions"), "a caption before any node offers a GPU"
        killed = cluster.kill_node("decode")
        left = units - len(sidecars("frames"))
        print(f"[test] decode node killed ({killed} processes) after {len(first)} shard(s); {left} still to decode")
        assert left > 0
        cluster.add_node("gpu", num_cpus=2, num_gpus=1)
        assert proc.wait(timeout=TIMEOUT_S * 2) == 0, open(tmp_path / "prepare.log").read()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    out = open(tmp_path / "prepare.log").read()
    assert "captioner on cpu, 1 GPU per actor, 1-2 actors" in out
    assert "has constructor arguments" not in out  # Ray's false alarm, dropped by the CLI
    assert digests(root) == want

    # A GPU recipe whose actor lands where no CUDA device is visible (the GPU node's GPU is only
    # logical) stops at once and says so, instead of captioning on the CPU.
    cuda = subprocess.run([sys.executable, "-m", "jobs.cli", "recaption", "--config", "jobs/configs/tiny_recaption.yaml",
                           "--set", f"root={root}", "--set", "caption.device=cuda", "--set", "ray.progress_bars=false",
                           "--set", f"ray.address={cluster.gcs_address}"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"), timeout=TIMEOUT_S)
    assert cuda.returncode == 1, cuda.stderr[-4000:]
    # Ray Data logs the actor's traceback; the job's last word is the sentence that says what to fix.
    assert cuda.stderr.strip().splitlines()[-1].startswith(
        "recaption failed: caption.device=cuda: no CUDA device is visible to the captioner on Ray node 127.0.0.1 "
        "(CUDA_VISIBLE_DEVICES='0'"), cuda.stderr[-4000:]
