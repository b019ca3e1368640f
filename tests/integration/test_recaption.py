"""`recaption` end to end on local Ray: a second caption set for a prepared root, frames untouched;
k frames per clip; refusal and no-op through the real CLI; kill -9 and resume; S3; the loader
and `clipvip inspect` see the new set."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import PrepareJobConfig, RecaptionJobConfig, load_config
from pipeline.data.build import run_prepare
from pipeline.data.captions import spread_indices
from pipeline.data.dataset_index import DatasetIndex
from pipeline.data.recaption import run_recaption
from pipeline.utils import fs
from tests.conftest import ROOT
from tests.integration.conftest import clipvip

# Three frames per clip, with beams: slow enough per shard that a kill after the first part lands
# mid-run, and the set made with it in-process is the kill test's uninterrupted reference.
K3_SETS = ["frames_per_clip=3", "caption.batch_size=2", "caption.num_beams=3", "caption.max_new_tokens=20"]


def recaption_sets(root, name, *extra):
    return [f"root={root}", f"caption.set_name={name}", "caption.model=builtin:tiny-git", "caption.batch_size=4",
            "ray.progress_bars=false", "ray.num_cpus=2", *extra]


def recaption_cfg(root, name, *extra):
    return load_config(RecaptionJobConfig, None, recaption_sets(root, name, *extra))


def cli_args(root, name, *extra):
    return ["recaption"] + [a for s in recaption_sets(root, name, *extra) for a in ("--set", s)]


def frames_state(root):
    """<part>/<file> -> (sha256, mtime_ns) of every file under frames/: must never change."""
    out = {}
    for path in sorted(glob.glob(os.path.join(root, "frames", "*", "*"))):
        out[os.path.relpath(path, os.path.join(root, "frames"))] = (
            hashlib.sha256(open(path, "rb").read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


def _part_files(root, name):
    return sorted(glob.glob(os.path.join(root, "captions", name, "*", "part-*.parquet")))


def parts(root, name):
    return {os.path.relpath(f, os.path.join(root, "captions", name)): pq.read_table(f) for f in _part_files(root, name)}


def part_digests(root, name):
    return {os.path.relpath(f, os.path.join(root, "captions", name)): hashlib.sha256(open(f, "rb").read()).hexdigest()
            for f in _part_files(root, name)}


def quiet(*_):
    return None


@pytest.fixture(scope="module")
def prepared(ray_local, sample_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("recaption") / "root")
    cfg = load_config(PrepareJobConfig, None, [
        f"root={root}", f"data.metadata={sample_data.metadata_path}",
        f"data.video_root={sample_data.video_root}", f"data.subtitles={sample_data.subtitles_table}",
        "data.clips_per_shard=1", "frames.short_side_px=64", "frames.max_frames=8",
        "caption.model=builtin:tiny-blip", "caption.batch_size=4", "ray.progress_bars=false"])
    run_prepare(cfg, log=quiet)
    return root, frames_state(root)


@pytest.fixture(scope="module")
def git_set(prepared):
    root, _ = prepared
    return run_recaption(recaption_cfg(root, "git"), log=quiet)


def test_new_set_aligned_and_frames_untouched(prepared, git_set):
    root, frames_before = prepared
    frames = {os.path.relpath(f, os.path.join(root, "frames")): pq.read_table(f, columns=["clip_id"])
              for f in sorted(glob.glob(os.path.join(root, "frames", "*", "*.parquet")))}
    new, old = parts(root, "git"), parts(root, "default")
    assert len(frames) >= 3 and set(new) == set(frames) == set(old)
    differ = 0
    for name, table in frames.items():
        assert new[name].column("clip_id").to_pylist() == table.column("clip_id").to_pylist()
        caps = new[name].column("caption").to_pylist()
        assert all(isinstance(c, str) and c for c in caps)
        differ += sum(a != b for a, b in zip(caps, old[name].column("caption").to_pylist()))
    assert differ >= git_set.rows // 2, "tiny-git should caption differently from tiny-blip"
    assert frames_state(root) == frames_before, "frame shards and sidecars must be untouched"

    meta = json.load(open(os.path.join(root, "captions", "git", "caption_set.json")))
    assert meta["status"] == "complete" and meta["config"]["model"] == "builtin:tiny-git"
    (ident,) = meta["captioner"]
    assert ident["model_class"] == "GitForCausalLM" and ident["revision"].startswith("sha256:")
    assert meta["counts"]["captioned"] == meta["counts"]["rows"] == git_set.rows == git_set.captioned
    assert meta["frames_fingerprint"] == json.load(open(os.path.join(root, "manifest.json")))["fingerprint"]
    assert meta["timings_s"]["wall_last_run"] > 0 and meta["fingerprint"]
    assert 0 < git_set.bytes_read < sum(os.path.getsize(os.path.join(root, "frames", f)) for f in frames)
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    assert {"default", "git"} <= set(manifest["caption_sets"])


def test_loader_accepts_recaptioned_set(prepared, git_set):
    root, _ = prepared
    idx = DatasetIndex.open(root, "git")
    assert idx.caption_set == "git" and idx.num_rows == git_set.rows and idx.num_null_captions == 0


@pytest.fixture(scope="module")
def k3_set(prepared):
    root, _ = prepared
    return run_recaption(recaption_cfg(root, "git3", *K3_SETS), log=quiet)


def test_frames_per_clip_lists(prepared, k3_set):
    root, frames_before = prepared
    s = k3_set
    assert s.frame_captions == 3 * s.rows and s.frame_captions_failed == 0
    for name, table in parts(root, "git3").items():
        assert table.schema.field("frame_captions").type == pa.list_(pa.string())
        stored = pq.read_table(os.path.join(root, "frames", name), columns=["frames"]).column(0).to_pylist()
        assert len(stored) == table.num_rows
        for row, fr in zip(table.to_pylist(), stored):
            assert isinstance(row["caption"], str) and row["caption"]
            assert len(row["frame_captions"]) == 3 and all(isinstance(c, str) and c for c in row["frame_captions"])
            assert row["frame_caption_indices"] == spread_indices(len(fr), 3)
    meta = json.load(open(os.path.join(root, "captions", "git3", "caption_set.json")))
    assert meta["frames_per_clip"] == 3 and meta["counts"]["frame_captions"] == 3 * s.rows
    assert DatasetIndex.open(root, "git3").num_rows == s.rows
    assert frames_state(root) == frames_before


def test_conflict_refused_and_rerun_is_noop_via_cli(prepared, git_set):
    root, frames_before = prepared
    set_files = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(root, "captions", "git", "*"))}
    for change in ("caption.model=builtin:tiny-blip", "caption.prompt=a picture of"):
        out = clipvip(*cli_args(root, "git", change), timeout=300)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "recaption refused" in out.stderr and "'git'" in out.stderr and "different" in out.stderr
    same = clipvip(*cli_args(root, "git"), timeout=300)
    assert same.returncode == 0, same.stderr[-2000:]
    assert "already complete" in same.stdout and "nothing to do" in same.stdout
    assert {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(root, "captions", "git", "*"))} == set_files
    assert frames_state(root) == frames_before


def test_not_a_prepare_root_refused(tmp_path):
    out = clipvip(*cli_args(str(tmp_path / "nope"), "x"), timeout=300)
    assert out.returncode == 2 and "no manifest.json" in out.stderr and "prepare" in out.stderr
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "manifest.json").write_text(json.dumps({"status": "in_progress", "schema_version": 2}))
    out = clipvip(*cli_args(str(tmp_path / "half"), "x"), timeout=300)
    assert out.returncode == 2 and "prepare is not finished" in out.stderr
    assert not (tmp_path / "half" / "captions").exists()


def _rewrite_column(path, column, fn):
    table = pq.read_table(path)
    values = [fn(i, v) for i, v in enumerate(table.column(column).to_pylist())]
    idx = table.schema.get_field_index(column)
    table = table.set_column(idx, table.schema.field(idx), pa.array(values, table.schema.field(idx).type))
    pq.write_table(table, path, compression="zstd")


def test_bad_frames_are_quarantined_not_fatal(prepared, tmp_path):
    src, _ = prepared
    root = str(tmp_path / "root")
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("git*", "killed*", "captions-git*", "captions-killed*"))
    part = os.path.join(root, "frames", "metadata", "part-00000.parquet")
    # Test setup only (the job never writes frames): row 0's middle frame and row 1's frames break.
    _rewrite_column(part, "middle_frame", lambda i, v: b"\xff\xd8 not a jpeg" if i == 0 else v)
    _rewrite_column(part, "frames", lambda i, v: [b"junk"] * len(v) if i == 1 else v)
    s = run_recaption(recaption_cfg(root, "bad", "frames_per_clip=2"), log=quiet)
    assert (s.failed, s.frame_captions_failed) == (1, 2)
    rows = pq.read_table(os.path.join(root, "captions", "bad", "metadata", "part-00000.parquet")).to_pylist()
    assert rows[0]["caption"] is None and all(rows[0]["frame_captions"])
    assert rows[1]["caption"] and rows[1]["frame_captions"] == [None, None]
    (q,) = pq.read_table(os.path.join(root, "quarantine", "captions", "bad", "metadata",
                                      "part-00000.parquet")).to_pylist()
    assert q["clip_id"] == rows[0]["clip_id"] and q["stage"] == "caption" and "decode" in q["error"]
    assert q["video_id"] and q["source_uri"]
    assert DatasetIndex.open(root, "bad").num_null_captions == 1


def _wait_for(pred, proc, timeout_s=300.0):
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def test_kill_driver_then_resume_is_exact(prepared, k3_set):
    root, frames_before = prepared
    ref = part_digests(root, "git3")  # same config, uninterrupted
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *cli_args(root, "killed", *K3_SETS)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    sidecars = os.path.join(root, "captions", "killed", "*", "part-*.json")
    started = _wait_for(lambda: glob.glob(sidecars), proc)
    proc.send_signal(signal.SIGKILL)  # the driver only; Ray's reaper ends its local cluster
    proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    assert started, "the run never finished a part"
    assert json.load(open(os.path.join(root, "captions", "killed", "caption_set.json")))["status"] == "in_progress"

    again = clipvip(*cli_args(root, "killed", *K3_SETS), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    # Ray's workers may finish the part in hand after the driver dies, so count what the rerun
    # found done rather than what was on disk at the kill.
    skipped = int(re.search(r"\((\d+) already done before this run\)", again.stdout).group(1))
    assert 1 <= skipped < len(ref), f"killed too late to test resume ({skipped} of {len(ref)} parts done)"
    assert part_digests(root, "killed") == ref, "every clip captioned exactly once, same bytes"
    assert not glob.glob(os.path.join(root, "captions", "killed", "*", "*.tmp-*"))
    assert frames_state(root) == frames_before


def test_s3_round_trip(prepared, git_set, s3_server, tmp_path):
    import boto3

    root, _ = prepared
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="recap")
    opts = fs.S3Options(endpoint_url=s3_server)
    uri = "s3://recap/root"
    fs.upload_dir(root, uri, opts)
    s = run_recaption(recaption_cfg(uri, "git_s3", f"storage.s3_endpoint_url={s3_server}"), log=quiet)
    assert s.captioned == git_set.rows and not s.noop
    local = str(tmp_path / "down")
    fs.download_dir(uri, local, opts)
    assert part_digests(local, "git_s3") == part_digests(root, "git"), "same captioner, same bytes on S3"
    assert frames_state(local).keys() == frames_state(root).keys()
    assert all(open(os.path.join(local, "frames", f), "rb").read() == open(os.path.join(root, "frames", f), "rb").read()
               for f in frames_state(root))
    assert "git_s3" in json.load(open(os.path.join(local, "manifest.json")))["caption_sets"]
    assert DatasetIndex.open(uri, "git_s3", opts).num_rows == s.rows
    out = clipvip("inspect", uri, "--set", f"storage.s3_endpoint_url={s3_server}", timeout=120)
    assert out.returncode == 0 and "git_s3" in out.stdout, out.stderr[-2000:]


def test_inspect_lists_sets_and_counts(prepared, git_set):
    root, _ = prepared
    out = clipvip("inspect", root, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    set_lines = {ln.split()[0]: ln for ln in lines if ln.strip().startswith(("default ", "git "))}
    assert "builtin:tiny-blip" in set_lines["default"] and "builtin:tiny-git" in set_lines["git"]
    assert all("complete" in ln for ln in set_lines.values())
    assert f"{git_set.rows} ok" in out.stdout and "part-00000" in out.stdout
    bad = clipvip("inspect", os.path.join(root, "nope"), timeout=120)
    assert bad.returncode == 2 and "no manifest.json" in bad.stderr


def _job_run(job: str, root: str):
    """The one MLflow run a data job logged for `root` (the session's default tracking URI)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("clipvip")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`clipvip.job` = '{job}' and "
                                                                 f"tags.`clipvip.root` = '{root}'")
    return client, runs


def test_prepare_and_recaption_each_log_one_run(prepared, git_set):
    """A week of captioning leaves curves: the prepare and the recaption of this root each have one
    MLflow run, with their params, a row per shard (clips/s, images/s, quarantine) and the totals;
    the summary names the run."""
    root, _ = prepared
    for job, rate_keys, totals in (
            ("prepare", ("prepare/clips_per_s", "prepare/images_per_s", "prepare/quarantined"),
             {"prepare/total/clips_ok", "prepare/total/captions", "prepare/total/clips_quarantined"}),
            ("recaption", ("recaption/clips_per_s", "recaption/images_per_s", "recaption/captions_failed"),
             {"recaption/total/captioned", "recaption/total/failed", "recaption/total/rows"})):
        client, runs = _job_run(job, root)
        runs = [r for r in runs if job == "prepare" or r.data.params.get("caption.set_name") == "git"]
        assert len(runs) == 1, (job, [r.info.run_id for r in runs])
        run = runs[0]
        assert run.info.status == "FINISHED" and run.data.params["root"] == root
        shards = len(glob.glob(os.path.join(root, "frames", "*", "*.parquet")))
        steps = [m.step for m in client.get_metric_history(run.info.run_id, f"{job}/shards_done")]
        assert steps == list(range(1, shards + 1)), (job, steps)
        for key in rate_keys:
            history = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in history] == steps and all(m.value >= 0 for m in history), key
        assert totals <= set(run.data.metrics), (job, sorted(run.data.metrics))
        assert all(len(client.get_metric_history(run.info.run_id, k)) == 1 for k in totals)
    assert run.data.metrics["recaption/total/captioned"] == git_set.captioned
    assert git_set.mlflow_run and git_set.mlflow_run.startswith(run.info.run_id)
    assert f"MLflow run      {git_set.mlflow_run}" in git_set.render()
