"""`prepare` and `recaption` on a network that fails: a real proxy on loopback in front of the S3
server answers 503 SlowDown or resets the connection for 10% of all requests (seeded: tiny
reads, listings and uploads included). Each run must finish with every Parquet file
byte-identical to a fault-free run and no extra quarantine row. A video that fails on every
request is quarantined at stage `read` after the retry budget and the job goes on."""

from __future__ import annotations

import hashlib
import os

import boto3
import pytest

from pipeline.config import PrepareJobConfig, RecaptionJobConfig, load_config
from pipeline.data.build import run_prepare
from pipeline.data.recaption import run_recaption
from pipeline.utils import fs
from tests.conftest import kill_job
from tests.faultproxy import FaultProxy
from tests.integration.conftest import parquet_tables

BUCKET = "faulty"
FAST = ["storage.retry_base_s=0.005", "storage.retry_max_s=0.05"]


def quiet(*_):
    return None


@pytest.fixture(scope="module")
def inputs(s3_server, sample_data):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket=BUCKET)
    for name in os.listdir(sample_data.video_root):
        s3.upload_file(os.path.join(sample_data.video_root, name), BUCKET, f"raw/videos/{name}")
    s3.upload_file(sample_data.metadata_path, BUCKET, "raw/meta/part0.jsonl")
    s3.upload_file(sample_data.subtitles_table, BUCKET, "raw/subs.jsonl")
    return s3_server


def prepare_cfg(endpoint: str, root: str, *extra: str):
    return load_config(PrepareJobConfig, None, [
        f"root=s3://{BUCKET}/{root}", f"data.metadata=s3://{BUCKET}/raw/meta/part0.jsonl",
        f"data.video_root=s3://{BUCKET}/raw/videos", f"data.subtitles=s3://{BUCKET}/raw/subs.jsonl",
        "data.clips_per_shard=6", "frames.short_side_px=64", "frames.max_frames=8",
        "caption.model=builtin:tiny-blip", f"storage.s3_endpoint_url={endpoint}", "ray.progress_bars=false",
        *FAST, *extra])


def local_copy(endpoint: str, root: str, dest) -> str:
    fs.download_dir(f"s3://{BUCKET}/{root}", str(dest), fs.S3Options(endpoint_url=endpoint))
    return str(dest)


def digests(local: str) -> dict[str, str]:
    out = {}
    for d, _, names in os.walk(local):
        for n in names:
            if n.endswith(".parquet"):
                path = os.path.join(d, n)
                out[os.path.relpath(path, local)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def reference(ray_local, inputs, tmp_path_factory):
    run_prepare(prepare_cfg(inputs, "ref"), log=quiet)
    run_recaption(load_config(RecaptionJobConfig, None, [
        f"root=s3://{BUCKET}/ref", "caption.set_name=git", "caption.model=builtin:tiny-git",
        f"storage.s3_endpoint_url={inputs}", "ray.progress_bars=false"]), log=quiet)
    return digests(local_copy(inputs, "ref", tmp_path_factory.mktemp("ref")))


@pytest.mark.parametrize("seed", [1, 2])
def test_prepare_and_recaption_through_faults_give_the_same_bytes(ray_local, inputs, reference, seed, tmp_path):
    with FaultProxy(inputs, seed=seed, rate=0.1) as proxy:
        s = run_prepare(prepare_cfg(proxy.endpoint, f"seed{seed}"), log=quiet)
        r = run_recaption(load_config(RecaptionJobConfig, None, [
            f"root=s3://{BUCKET}/seed{seed}", "caption.set_name=git", "caption.model=builtin:tiny-git",
            f"storage.s3_endpoint_url={proxy.endpoint}", "ray.progress_bars=false", *FAST]), log=quiet)
    print(f"[faults] seed {seed}: {proxy.requests} requests, faults {dict(proxy.faults)}")
    assert proxy.faults["503"] > 0 and proxy.faults["reset"] > 0, proxy.faults
    assert s.clips_quarantined == 0 and r.failed == 0
    assert digests(local_copy(inputs, f"seed{seed}", tmp_path / "got")) == reference, \
        f"{proxy.requests} requests, faults {proxy.faults}"


@pytest.fixture(scope="module")
def down(ray_local, inputs, sample_data, tmp_path_factory):
    """A root prepared while one video failed on every request."""
    victim = sorted(os.listdir(sample_data.video_root))[0]
    with FaultProxy(inputs, fail_paths=(f"/{BUCKET}/raw/videos/{victim}",)) as proxy:
        summary = run_prepare(prepare_cfg(proxy.endpoint, "down", "storage.retry_attempts=3"), log=quiet)
    return victim, summary


def test_a_video_that_keeps_failing_is_quarantined_at_read(inputs, down, tmp_path):
    victim, s = down
    assert s.quarantined_by_stage == {"read": s.clips_quarantined} and s.clips_quarantined == s.retryable > 0
    assert "data.retry_quarantined=true" in s.render()
    local = local_copy(inputs, "down", tmp_path / "down")
    rows = [r for t in parquet_tables(local, "quarantine").values() for r in t.to_pylist()]
    assert {r["video_id"] for r in rows} == {victim.rsplit(".", 1)[0]}
    assert all(r["stage"] == "read" and "gave up after 3 attempts" in r["error"] for r in rows), rows


def copy_prefix(endpoint: str, src: str, dst: str) -> None:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=src + "/"):
        for obj in page.get("Contents", []):
            s3.copy_object(Bucket=BUCKET, Key=dst + obj["Key"][len(src):], CopySource={"Bucket": BUCKET, "Key": obj["Key"]})


def clip_rows(local: str) -> dict[str, dict]:
    out = {}
    for t in parquet_tables(local, "frames").values():
        for row in t.to_pylist():
            assert row["clip_id"] not in out, "a clip in two shards"
            out[row["clip_id"]] = row
    return out


def test_retry_quarantined_recovers_the_clips_exactly_once(inputs, down, reference, tmp_path):
    import subprocess
    import sys
    import time

    from pipeline import viz
    from tests.conftest import ROOT

    copy_prefix(inputs, "down", "down2")
    s = run_prepare(prepare_cfg(inputs, "down", "data.retry_quarantined=true"), log=quiet)
    assert s.clips_quarantined == 0 and s.retryable == 0 and s.clips_ok == s.clips
    assert s.clips_this_run == down[1].retryable and s.units_skipped == down[1].units  # nothing else redone
    # Clip for clip equal to the fault-free root: the recovered clips live in the retry shards.
    ref = clip_rows(local_copy(inputs, "ref", tmp_path / "ref"))
    got = clip_rows(local_copy(inputs, "down", tmp_path / "got"))
    assert got.keys() == ref.keys() and all(got[c] == ref[c] for c in ref)
    assert viz.quarantine_table(f"s3://{BUCKET}/down", fs.S3Options(endpoint_url=inputs)).num_rows == 0
    assert any("~r1" in k for k in digests(str(tmp_path / "got")))
    # The same retry killed with kill -9 once its retry shard exists, then run again: same bytes.
    args = ["prepare"] + [a for kv in [
        f"root=s3://{BUCKET}/down2", f"data.metadata=s3://{BUCKET}/raw/meta/part0.jsonl",
        f"data.video_root=s3://{BUCKET}/raw/videos", f"data.subtitles=s3://{BUCKET}/raw/subs.jsonl",
        "data.clips_per_shard=6", "frames.short_side_px=64", "frames.max_frames=8", "caption.model=builtin:tiny-blip",
        f"storage.s3_endpoint_url={inputs}", "ray.progress_bars=false", "data.retry_quarantined=true",
        "ray.num_cpus=2"] for a in ("--set", kv)]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    opts = fs.S3Options(endpoint_url=inputs)
    deadline = time.time() + 800  # an event wait; the bound is for a retry that never starts
    while time.time() < deadline and proc.poll() is None and not [
            u for d in fs.list_dirs(f"s3://{BUCKET}/down2/frames", opts) if "~r1" in d
            for u in fs.list_files(f"s3://{BUCKET}/down2/frames/{d}", opts, ".json")]:
        time.sleep(0.05)
    assert proc.poll() is None, "the retry finished before it could be killed"
    kill_job(proc)
    again = run_prepare(prepare_cfg(inputs, "down2", "data.retry_quarantined=true"), log=quiet)
    assert again.clips_quarantined == 0
    assert digests(local_copy(inputs, "down2", tmp_path / "again")) == digests(str(tmp_path / "got"))
