"""Training loader on real Ray over a root made by the real prepare job: shapes, rank split,
exact resume, refusal of unusable roots, corrupt and null-caption rows, S3."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import PrepareJobConfig, load_config
from pipeline.data.build import run_prepare
from pipeline.data.loader import DatasetIndex, LoaderConfig, iter_rank_batches
from pipeline.data.root import DatasetRoot
from pipeline.data.sampling import clip_hash, plan_positions, rank_plan, steps_per_epoch
from pipeline.data.shards import write_table_atomic
from pipeline.model.tokenizer import tokenize
from pipeline.utils import fs

SEED = 11
CFG = LoaderConfig(micro_batch=2, num_frames=6, image_size_px=32, steps_per_task=2, window_shards=2)


@pytest.fixture(scope="module")
def root(ray_local, sample_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("loader") / "root")
    cfg = load_config(PrepareJobConfig, None, [
        f"data.root={out}", f"data.metadata={sample_data.metadata_path}", f"data.video_root={sample_data.video_root}",
        f"data.subtitles={sample_data.subtitles_table}", "data.clips_per_shard=4", "frames.short_side_px=48",
        "frames.max_frames=8", "caption.model=builtin:tiny-blip", "caption.batch_size=4", "ray.progress_bars=false"])
    run_prepare(cfg, log=lambda *_: None)
    return out


def clip_ids(root, caption_set="default"):
    """(shard ordinal, row) -> (clip_id, subtitle, caption) straight from the Parquet files."""
    out = {}
    index = DatasetIndex.open(root, caption_set)
    droot = DatasetRoot(root)
    for ordinal in range(len(index.shard_unit)):
        shard = index.shard(ordinal)
        f = pq.read_table(droot.frames_uri(shard), columns=["clip_id", "subtitle"]).to_pylist()
        c = pq.read_table(droot.caption_uri(caption_set, shard)).to_pylist()
        for r, (fr, cr) in enumerate(zip(f, c, strict=True)):
            out[(ordinal, r)] = (fr["clip_id"], fr["subtitle"], cr["caption"])
    return out


def rewrite_index(root, kind, change):
    """Test setup: edit rows of a compacted shard index (a reader trusts it, never the sidecars)."""
    path = DatasetRoot(root).index_uri(kind)
    table = pq.read_table(path)
    rows = [change(i, r) for i, r in enumerate(table.to_pylist())]
    pq.write_table(pa.Table.from_pylist([r for r in rows if r is not None], schema=table.schema), path)


def collect(index, rank=0, world_size=1, start_step=0, cfg=CFG, epoch=0):
    return list(iter_rank_batches(index, cfg, SEED, epoch, rank, world_size, start_step))


def test_batches_have_documented_layout(root):
    index = DatasetIndex.open(root, "default")
    rows = clip_ids(root)
    assert index.num_rows == len(rows) >= 12 and index.num_null_captions == 0
    batches = collect(index, rank=1, world_size=2)
    steps = steps_per_epoch(index, 2, CFG.micro_batch)
    assert len(batches) == steps > 1
    plan = rank_plan(index, SEED, 0, 1, 2, CFG.micro_batch, 0, CFG.window_shards)
    pos = plan_positions(1, 2, CFG.micro_batch, 0, len(plan))
    for k, b in enumerate(batches):
        assert b["frames"].shape == (2, 6, 3, 32, 32) and b["frames"].dtype == torch.uint8
        assert b["middle_frame"].shape == (2, 3, 32, 32) and b["middle_frame"].dtype == torch.uint8
        for key in ("subtitle_ids", "subtitle_mask", "caption_ids", "caption_mask"):
            assert b[key].shape == (2, 70) and b[key].dtype == torch.int64
        for key in ("clip_id", "position", "step", "skipped"):
            assert b[key].shape == (2,) and b[key].dtype == torch.int64
        assert b["step"].tolist() == [k, k] and b["skipped"].tolist() == [0, 0]
        assert b["position"].tolist() == pos[2 * k:2 * k + 2].tolist()
        for j, (s, r) in enumerate(plan[2 * k:2 * k + 2].tolist()):
            cid, sub, cap = rows[(s, r)]
            assert b["clip_id"][j] == clip_hash(cid)
            want_ids, want_mask = tokenize([sub, cap], 70)
            assert torch.equal(b["subtitle_ids"][j], want_ids[0]) and torch.equal(b["caption_mask"][j], want_mask[1])
        assert b["frames"].float().std() > 1.0, "real pixels, not zeros"


def test_two_ranks_see_disjoint_clips(root):
    index = DatasetIndex.open(root, "default")
    seen = [set(), set()]
    for r in (0, 1):
        for b in collect(index, rank=r, world_size=2):
            seen[r] |= set(b["clip_id"].tolist())
    steps = steps_per_epoch(index, 2, CFG.micro_batch)
    assert not seen[0] & seen[1]
    assert len(seen[0]) == len(seen[1]) == steps * CFG.micro_batch


def test_resumed_stream_equals_uninterrupted_tail(root):
    index = DatasetIndex.open(root, "default")
    full = collect(index, epoch=1)
    s = 3  # not a task boundary of the uninterrupted run (steps_per_task=2)
    resumed = collect(index, start_step=s, epoch=1)
    assert len(resumed) == len(full) - s > 1
    for a, b in zip(full[s:], resumed, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert collect(index, start_step=len(full), epoch=1) == []


def test_unusable_roots_fail_at_open(root, tmp_path):
    with pytest.raises(ValueError, match=r"caption set 'ofa' not found.*existing sets: \['default'\]"):
        DatasetIndex.open(root, "ofa")
    for change, match in [
        (lambda i, r: dict(r, rows=r["rows"] + 1) if i == 1 else r, "part-00001 has .* rows"),
        (lambda i, r: dict(r, clip_ids_sha256="0" * 64) if i == 2 else r, "part-00002 lists other clip ids"),
        (lambda i, r: None if i == 0 else r, "incomplete: no part for 1 frame shards"),
    ]:
        bad = shutil.copytree(root, str(tmp_path / f"bad{len(match)}"))
        rewrite_index(bad, "captions-default", change)
        with pytest.raises(ValueError, match=match):
            DatasetIndex.open(bad, "default")
    half = shutil.copytree(root, str(tmp_path / "half"))
    manifest = json.load(open(os.path.join(half, "manifest.json")))
    json.dump(dict(manifest, status="in_progress"), open(os.path.join(half, "manifest.json"), "w"))
    with pytest.raises(ValueError, match="prepare is not finished"):
        DatasetIndex.open(half, "default")


def test_corrupt_rows_skipped_and_null_captions_excluded(root, tmp_path):
    bad_root = shutil.copytree(root, str(tmp_path / "corrupt"))
    index = DatasetIndex.open(bad_root, "default")
    plan = rank_plan(index, SEED, 0, 0, 1, CFG.micro_batch, 0, CFG.window_shards)
    # step 1: slot 0 garbled (donor = slot 1); step 2: both slots garbled (donors from step 3)
    garble = [tuple(plan[2]), tuple(plan[4]), tuple(plan[5])]
    droot = DatasetRoot(bad_root)
    for shard in {s for s, _ in garble}:
        uri = droot.frames_uri(index.shard(shard))
        table = pq.read_table(uri)
        rows = table.to_pylist()
        for s, r in garble:
            if s == shard:
                rows[r]["middle_frame"] = b"\xff\xd8" + bytes(range(200))
                rows[r]["frames"] = [b"not a jpeg"] * len(rows[r]["frames"])
        write_table_atomic(uri, pa.Table.from_pylist(rows, schema=table.schema), fs.S3Options())
    batches = collect(DatasetIndex.open(bad_root, "default"))
    assert sum(int(b["skipped"].sum()) for b in batches) == 3
    assert batches[1]["skipped"].tolist() == [1, 0] and batches[2]["skipped"].tolist() == [1, 1]
    assert torch.equal(batches[1]["frames"][0], batches[1]["frames"][1])
    assert batches[1]["clip_id"][0] == batches[1]["clip_id"][1]
    assert batches[2]["clip_id"].tolist() == batches[3]["clip_id"].tolist()
    assert all(b["frames"].shape[0] == 2 for b in batches)

    # A null caption (captioner failed) is excluded when the index opens, never scheduled.
    s, r = (int(v) for v in plan[0])
    cap_uri = droot.caption_uri("default", index.shard(s))
    caps = pq.read_table(cap_uri).to_pylist()
    caps[r]["caption"] = None
    write_table_atomic(cap_uri, pa.Table.from_pylist(caps, schema=pq.read_schema(cap_uri)), fs.S3Options())
    rewrite_index(bad_root, "captions-default", lambda i, row: dict(row, failed=1, null_rows=[r]) if i == s else row)
    index2 = DatasetIndex.open(bad_root, "default")
    assert index2.num_null_captions == 1 and index2.num_rows == index.num_rows - 1
    excluded = clip_hash(clip_ids(bad_root)[(s, r)][0])
    assert all(excluded not in b["clip_id"].tolist() for b in collect(index2))


def test_reads_from_s3(root, s3_server):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="train")
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            s3.upload_file(path, "train", "roots/v1/" + os.path.relpath(path, root))
    index = DatasetIndex.open("s3://train/roots/v1", "default", fs.S3Options(endpoint_url=s3_server))
    local = collect(DatasetIndex.open(root, "default"), world_size=2)
    remote = collect(index, world_size=2)
    assert len(remote) == len(local)
    for a, b in zip(local, remote, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(index.layout.num_rows, DatasetIndex.open(root, "default").layout.num_rows)
