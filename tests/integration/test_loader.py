"""`clipvip pack` and the training loader on real Ray over a root made by the real prepare job:
what a view holds, batch layout, global batches independent of the world size, exact resume,
refusals, bad and null-caption rows, a pack killed with kill -9, S3 request counts."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.config import LoaderConfig, PrepareJobConfig, load_config
from pipeline.data.build import run_prepare
from pipeline.data.dataset_index import DatasetIndex
from pipeline.data.loader import BatchSpec, ViewIndex, ViewReader, build_micro_batch, iter_rank_batches
from pipeline.data.root import DatasetRoot
from pipeline.data.sampling import clip_hash
from pipeline.data.shards import write_table_atomic
from pipeline.data.view import ViewConflict
from pipeline.data.view_order import order_entries
from pipeline.model.tokenizer import tokenize
from pipeline.utils import fs
from tests.conftest import ROOT, kill_job
from tests.integration.conftest import pack_view

SEED = 11
SPEC = BatchSpec(global_batch=4, num_frames=6, image_size_px=32)
LOADER = LoaderConfig(steps_per_task=2)


@pytest.fixture(scope="module")
def root(ray_local, sample_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("loader") / "root")
    cfg = load_config(PrepareJobConfig, None, [
        f"root={out}", f"data.metadata={sample_data.metadata_path}", f"data.video_root={sample_data.video_root}",
        f"data.subtitles={sample_data.subtitles_table}", "data.clips_per_shard=2", "frames.short_side_px=48",
        "frames.max_frames=8", "caption.model=builtin:tiny-blip", "caption.batch_size=4", "ray.progress_bars=false"])
    run_prepare(cfg, log=lambda *_: None)
    pack_view(out, "default", "v")
    return out


def view_rows(root, view="v"):
    """[(shard, row group, row) -> row] straight from the view's Parquet files."""
    index = ViewIndex.open(root, view)
    out = {}
    for s, name in enumerate(index.shards):
        pf = pq.ParquetFile(DatasetRoot(root).view_shard_uri(view, name))
        for g in range(pf.metadata.num_row_groups):
            for r, row in enumerate(pf.read_row_group(g).to_pylist()):
                out[(s, g, r)] = row
    return out


def collect(index, rank=0, world_size=1, start_step=0, epoch=0):
    return list(iter_rank_batches(index, SPEC, LOADER, SEED, epoch, rank, world_size, start_step))


def test_a_view_holds_every_captioned_row_resized_in_mixed_row_groups(root):
    source = DatasetIndex.open(root, "default")
    index = ViewIndex.open(root, "v")
    rows = view_rows(root)
    assert index.num_rows == source.num_rows == len(rows) >= 12 and index.caption_set == "default"
    droot = DatasetRoot(root)
    frames = {}
    for o in range(len(source.shard_unit)):
        for r in pq.read_table(droot.frames_uri(source.shard(o)), columns=["clip_id", "subtitle", "video_id"]).to_pylist():
            frames[r["clip_id"]] = (o, r)
    assert sorted(r["clip_id"] for r in rows.values()) == sorted(frames)
    for row in rows.values():
        _, src = frames[row["clip_id"]]
        assert (row["subtitle"], row["video_id"]) == (src["subtitle"], src["video_id"]) and row["caption"]
        with Image.open(io.BytesIO(row["frames"][0])) as img:
            assert img.size == (32, 32)
    # Row group t of a task holds row t of each of its 2 shards: 2 different shards, never one.
    groups = {}
    for (s, g, _), row in rows.items():
        groups.setdefault((s, g), []).append(frames[row["clip_id"]][0])
    full = [g for g in groups.values() if len(g) == 2]
    assert full and sum(len(set(g)) == 2 for g in full) >= len(full) - 1
    meta = json.load(open(droot.view_uri("v")))
    assert meta["status"] == "complete" and meta["counts"]["rows"] == len(rows)
    assert json.load(open(droot.manifest_uri))["views"] == ["v"]


def test_batches_have_documented_layout(root):
    index = ViewIndex.open(root, "v")
    rows = view_rows(root)
    batches = collect(index, rank=1, world_size=2)
    steps = index.layout.steps(SPEC.global_batch)
    assert len(batches) == steps > 1
    for k, b in enumerate(batches):
        assert b["frames"].shape == (2, 6, 32, 32, 3) and b["frames"].dtype == torch.uint8
        assert b["middle_frame"].shape == (2, 32, 32, 3) and b["middle_frame"].dtype == torch.uint8
        for key in ("subtitle_ids", "subtitle_mask", "caption_ids", "caption_mask"):
            assert b[key].shape == (2, 70) and b[key].dtype == torch.int64
        for key in ("clip_id", "position", "step", "skipped"):
            assert b[key].shape == (2,) and b[key].dtype == torch.int64
        assert b["step"].tolist() == [k, k] and b["skipped"].tolist() == [0, 0]
        assert b["position"].tolist() == [4 * k + 2, 4 * k + 3]
        for j, entry in enumerate(order_entries(index.layout, SEED, 0, b["position"].numpy()).tolist()):
            row = rows[tuple(entry)]
            assert b["clip_id"][j] == clip_hash(row["clip_id"])
            want_ids, want_mask = tokenize([row["subtitle"], row["caption"]], 70)
            assert torch.equal(b["subtitle_ids"][j], want_ids[0]) and torch.equal(b["caption_mask"][j], want_mask[1])
        assert b["frames"].float().std() > 1.0, "real pixels, not zeros"


def test_global_batches_are_the_same_at_any_world_size(root):
    """The concatenation of the ranks' micro batches of global batch b, at world 1, 2 and 4."""
    index = ViewIndex.open(root, "v")
    reader = ViewReader(index)

    def tok(texts, n):
        return tokenize(texts, n)

    for step in range(index.layout.steps(SPEC.global_batch)):
        by_world = {}
        for world in (1, 2, 4):
            parts = [build_micro_batch(reader, SPEC, SEED, 3, step, r, world, tok) for r in range(world)]
            by_world[world] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        for world in (2, 4):
            for key, value in by_world[1].items():
                assert np.array_equal(by_world[world][key], value), (step, world, key)
    # Whole row groups, each read once: bytes fetched per byte used is 1 plus the footers.
    assert reader.bytes_fetched / reader.bytes_used < 1.3


def test_two_ranks_see_disjoint_clips_and_resume_equals_the_tail(root):
    index = ViewIndex.open(root, "v")
    seen = [set(), set()]
    for r in (0, 1):
        for b in collect(index, rank=r, world_size=2):
            seen[r] |= set(b["clip_id"].tolist())
    assert not seen[0] & seen[1]
    full = collect(index, epoch=1)
    s = 1  # not a task boundary of the uninterrupted run (steps_per_task=2)
    resumed = collect(index, start_step=s, epoch=1)
    assert len(resumed) == len(full) - s > 0
    for a, b in zip(full[s:], resumed, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert collect(index, start_step=len(full), epoch=1) == []


def test_refusals_name_what_to_do(root, tmp_path):
    with pytest.raises(ValueError, match=r"view 'nope' not found .*existing views: v .*clipvip pack"):
        ViewIndex.open(root, "nope")
    with pytest.raises(ValueError, match=r"frames resized to 32 px but train.image_size_px is 224"):
        ViewIndex.open(root, "v").check_size(224)
    with pytest.raises(ViewConflict, match=r"view 'v' .*image_size_px: 32 -> 48"):
        pack_view(root, "default", "v", "view.image_size_px=48")
    assert pack_view(root, "default", "v").noop
    half = shutil.copytree(root, str(tmp_path / "half"))
    meta_uri = DatasetRoot(half).view_uri("v")
    json.dump(dict(json.load(open(meta_uri)), status="in_progress"), open(meta_uri, "w"))
    with pytest.raises(ValueError, match="view 'v' is not finished.*rerun the same `clipvip pack`"):
        ViewIndex.open(half, "v")
    with pytest.raises(ValueError, match=r"caption set 'ofa' not found"):
        pack_view(root, "ofa", "w")


def _garble(root, clip_ids, caption_null=None):
    """Test setup: make the stored frames of these clips undecodable (and one caption null)."""
    index = DatasetIndex.open(root, "default")
    droot = DatasetRoot(root)
    for o in range(len(index.shard_unit)):
        uri = droot.frames_uri(index.shard(o))
        table = pq.read_table(uri)
        rows = table.to_pylist()
        hit = [r for r in rows if r["clip_id"] in clip_ids]
        for r in hit:
            r["middle_frame"] = b"\xff\xd8" + bytes(range(200))
            r["frames"] = [b"not a jpeg"] * len(r["frames"])
        if hit:
            write_table_atomic(uri, pa.Table.from_pylist(rows, schema=table.schema), fs.S3Options())
    return index


def test_bad_rows_are_left_out_at_pack_or_substituted_by_the_loader(root, tmp_path):
    index = ViewIndex.open(root, "v")
    rows = view_rows(root)
    order = order_entries(index.layout, SEED, 0, np.arange(index.num_rows))
    # step 0 (world 1, G 4): slot 1 garbled (donor = slot 2); step 1: all four (donors from step 2)
    bad = {rows[tuple(order[p])]["clip_id"] for p in (1, 4, 5, 6, 7)}
    garbled = shutil.copytree(root, str(tmp_path / "garbled"))
    _garble(garbled, bad)
    shutil.rmtree(os.path.join(garbled, "views"))
    # Resized at pack: the bad rows do not decode there, so the view leaves them out and says so.
    summary = pack_view(garbled, "default", "v")
    assert summary.dropped == 5 and summary.rows == index.num_rows - 5
    dropped = {d["clip_id"] for f in glob.glob(os.path.join(garbled, "views", "v", "*.json")) if "view.json" not in f
               for d in json.load(open(f)).get("dropped", [])}
    assert dropped == bad
    # Stored bytes kept (image_size_px 0): the same order as the clean view, bad rows substituted.
    pack_view(garbled, "default", "raw", "view.image_size_px=0")
    raw = ViewIndex.open(garbled, "raw")
    assert np.array_equal(raw.layout.shard_rows, index.layout.shard_rows)
    batches = list(iter_rank_batches(raw, SPEC, LOADER, SEED, 0, 0, 1))
    assert batches[0]["skipped"].tolist() == [0, 1, 0, 0] and batches[1]["skipped"].tolist() == [1, 1, 1, 1]
    assert batches[0]["clip_id"][1] == batches[0]["clip_id"][2]
    assert torch.equal(batches[0]["frames"][1], batches[0]["frames"][2])
    assert batches[1]["clip_id"].tolist() == batches[2]["clip_id"].tolist()
    assert sum(int(b["skipped"].sum()) for b in batches) == 5


def test_null_captions_are_not_packed(root, tmp_path):
    copy = shutil.copytree(root, str(tmp_path / "nullcap"))
    shutil.rmtree(os.path.join(copy, "views"))
    index = DatasetIndex.open(copy, "default")
    droot = DatasetRoot(copy)
    cap_uri = droot.caption_uri("default", index.shard(1))
    caps = pq.read_table(cap_uri).to_pylist()
    gone = caps[0]["clip_id"]
    caps[0]["caption"] = None
    write_table_atomic(cap_uri, pa.Table.from_pylist(caps, schema=pq.read_schema(cap_uri)), fs.S3Options())
    path = droot.index_uri("captions-default")
    table = pq.read_table(path)
    fixed = [dict(r, failed=1, null_rows=[0]) if i == 1 else r for i, r in enumerate(table.to_pylist())]
    pq.write_table(pa.Table.from_pylist(fixed, schema=table.schema), path)
    summary = pack_view(copy, "default", "v")
    assert summary.rows == index.num_rows - 1 == DatasetIndex.open(copy, "default").num_rows
    assert gone not in {r["clip_id"] for r in view_rows(copy).values()}


def _digests(root, view):
    out = {}
    for path in sorted(glob.glob(os.path.join(root, "views", view, "*.parquet"))) + [
            os.path.join(root, "index", f"view-{view}.parquet")]:
        out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_pack_killed_with_kill_9_resumes_to_the_same_bytes(root, tmp_path):
    """One shard a task and one row a view shard, so the kill lands between many small writes."""
    ref_root = shutil.copytree(root, str(tmp_path / "ref"))
    args = [sys.executable, "-m", "jobs.cli", "pack", "--config", "jobs/configs/tiny_pack.yaml", "--set",
            "view.name=k", "--set", "view.caption_set=default", "--set", "view.rows_per_group=1", "--set",
            "view.rows_per_shard=1", "--set", "ray.progress_bars=false", "--set", "ray.num_cpus=1"]
    ref = subprocess.run(args + ["--set", f"root={ref_root}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    work = shutil.copytree(root, str(tmp_path / "work"))
    proc = subprocess.Popen(args + ["--set", f"root={work}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    sidecars = os.path.join(work, "views", "k", "t*.json")
    while not glob.glob(sidecars) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    kill_job(proc)
    done = len(glob.glob(sidecars))
    total = len(glob.glob(os.path.join(ref_root, "views", "k", "t*.json")))
    assert 0 < done < total, f"killed too late to test resume ({done} of {total} shards done)"
    again = subprocess.run(args + ["--set", f"root={work}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done before this run" in again.stdout
    assert _digests(work, "k") == _digests(ref_root, "k")
    assert not glob.glob(os.path.join(work, "views", "k", "*.tmp*"))


def test_reads_from_s3_in_whole_row_groups(root, s3_counting):
    import boto3

    endpoint, log = s3_counting
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="train")
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            s3.upload_file(path, "train", "roots/v1/" + os.path.relpath(path, root))
    opts = fs.S3Options(endpoint_url=endpoint)
    mark = log.mark()
    index = ViewIndex.open("s3://train/roots/v1", "v", opts)
    assert [r[:2] for r in log.since(mark)] == [("GET", "/train/roots/v1/views/v/view.json"),
                                                ("GET", "/train/roots/v1/index/view-v.parquet")]
    local = ViewIndex.open(root, "v")
    reader = ViewReader(index)
    mark = log.mark()
    steps = index.layout.steps(SPEC.global_batch)
    for step in range(steps):
        for rank in (0, 1):
            got = build_micro_batch(reader, SPEC, SEED, 0, step, rank, 2, tokenize)
            want = build_micro_batch(ViewReader(local), SPEC, SEED, 0, step, rank, 2, tokenize)
            assert all(np.array_equal(got[k], want[k]) for k in want)
    requests = log.since(mark)
    groups = {tuple(e[:2]) for e in order_entries(index.layout, SEED, 0, np.arange(steps * 4)).tolist()}
    shards = {g[0] for g in groups}
    assert len(requests) == reader.requests == len(groups) + len(shards), requests  # a GET a row group + a footer a shard
    assert all(r[0] == "GET" for r in requests)
    assert reader.bytes_fetched / reader.bytes_used < 1.3
