"""Opening a dataset root costs a constant number of object reads, whatever its size: a root of
2,000 shards on S3 (tiny ones, written with the project's own writers) is opened for training
(`clipvip pack` calls `DatasetIndex.open`) and by `clipvip inspect`, counting
the requests a real S3 endpoint on loopback answers; a 20-shard root costs the same."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.config import CaptionConfig
from pipeline.data.captions import set_fingerprint
from pipeline.data.index import FRAMES, IndexWriter, captions_kind, captions_row, compact_index, frames_row
from pipeline.data.dataset_index import DatasetIndex
from pipeline.data.root import DatasetRoot, Shard
from pipeline.data.shards import clip_ids_digest, table_bytes
from pipeline.utils import fs

MAX_REQUESTS = 10
JPEG = b"\xff\xd8 tiny"  # never decoded here


def build_root(endpoint: str, uri: str, units_per_part: dict[str, int], clips_per_shard: int = 2) -> DatasetRoot:
    """A complete root: frame shards, caption parts, both shard indexes, caption_set.json, manifest."""
    opts = fs.S3Options(endpoint_url=endpoint or None)
    root = DatasetRoot(uri, opts)
    shards = [Shard(p, u) for p, n in units_per_part.items() for u in range(n)]
    cap = CaptionConfig(set_name="default", model="builtin:tiny-blip")

    def write(shard: Shard) -> tuple[dict, dict]:
        ids = [f"{shard.part}-{shard.unit}.{r}.mp4" for r in range(clips_per_shard)]
        frames = pa.Table.from_pylist([{
            "clip_id": c, "video_id": c.split(".")[0], "source_uri": "s3://v/x.mp4", "start_s": 0.0, "end_s": 1.0,
            "subtitle": "s", "frames": [JPEG], "frame_times_s": [0.5], "middle_frame": JPEG,
            "middle_frame_time_s": 0.5, "height": 8, "width": 8, "source_fps": 30.0} for c in ids],
            schema=schema.FRAME_SCHEMA)
        data = table_bytes(frames)
        fs.write_bytes_atomic(root.frames_uri(shard), data, opts)
        caps = pa.Table.from_pylist([{"clip_id": c, "caption": f"cap {c}"} for c in ids], schema=schema.CAPTION_SCHEMA)
        fs.write_bytes_atomic(root.caption_uri("default", shard), table_bytes(caps), opts)
        common = {"part": shard.part, "unit": shard.unit, "rows": len(ids), "bytes": len(data), "sha256": "x",
                  "clip_ids_sha256": clip_ids_digest(ids)}
        return (frames_row(dict(common, videos=1, clips=len(ids), quarantined=0, frames=len(ids),
                                min_clip_id=min(ids), max_clip_id=max(ids))),
                captions_row(dict(common, captioned=len(ids), failed=0)))

    with ThreadPoolExecutor(16) as pool:
        rows = list(pool.map(write, shards))
    order = list(units_per_part)
    for kind, i in ((FRAMES, 0), (captions_kind("default"), 1)):
        writer = IndexWriter(root, kind, flush_rows=500)
        for r in rows:
            writer.add(r[i])
        writer.flush()
        compact_index(root, kind, order)
    fs.write_json_atomic(root.caption_set_uri("default"), {
        "schema_version": schema.SCHEMA_VERSION, "name": "default", "status": "complete", "frames_per_clip": 1,
        "fingerprint": set_fingerprint(cap, "F"), "frames_fingerprint": "F", "config": cap.identity(),
        "counts": {"shards": len(shards), "captioned": len(shards) * clips_per_shard, "failed": 0}},
        opts)
    root.write_manifest({"schema_version": schema.SCHEMA_VERSION, "status": "complete", "fingerprint": "F",
                         "settings": {}, "caption_sets": ["default"],
                         "parts": [{"name": p, "uri": f"s3://meta/{p}.jsonl", "units": n, "videos": n,
                                    "clips": n * clips_per_shard, "issues": 0} for p, n in units_per_part.items()],
                         "counts": {"shards": len(shards), "metadata_issues": 0}})
    return root


@pytest.fixture(scope="module")
def roots(s3_counting):
    import boto3

    endpoint, _ = s3_counting
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="corpus")
    big = build_root(endpoint, "s3://corpus/big", {"hdvila_part0": 1200, "hdvila_part1": 800})
    small = build_root(endpoint, "s3://corpus/small", {"hdvila_part0": 20})
    return big, small


def counted(log, fn):
    mark = log.mark()
    result = fn()
    return result, log.since(mark)


def test_opening_for_training_costs_a_constant_number_of_requests(roots, s3_counting):
    _, log = s3_counting
    big, small = roots
    index, reqs = counted(log, lambda: DatasetIndex.open(big.uri, "default", big.opts))
    assert len(index.shard_unit) == 2000 and index.num_rows == 4000
    assert len(reqs) <= MAX_REQUESTS, reqs
    assert all(method == "GET" for method, _, _ in reqs), reqs  # whole-object reads, no HEAD before each
    _, small_reqs = counted(log, lambda: DatasetIndex.open(small.uri, "default", small.opts))
    assert len(small_reqs) == len(reqs), "the cost does not grow with the shard count"
    # The ordinals map to the right shards: the last one is the last unit of the second part.
    assert index.shard(1999) == Shard("hdvila_part1", 799) and index.shard(1200) == Shard("hdvila_part1", 0)


def test_inspect_costs_a_constant_number_of_requests(roots, s3_counting, capsys):
    from jobs.inspect_root import render

    _, log = s3_counting
    big, small = roots
    text, reqs = counted(log, lambda: render(big.uri, big.opts))
    assert "shards (2000/2000 done)" in text and "1200/1200" in text and "800/800" in text
    assert len(reqs) <= MAX_REQUESTS, reqs
    _, small_reqs = counted(log, lambda: render(small.uri, small.opts))
    assert len(small_reqs) == len(reqs)


def test_index_is_one_small_object(roots):
    big, _ = roots
    data = fs.read_bytes(big.index_uri(FRAMES), big.opts)
    table = pq.read_table(io.BytesIO(data))
    assert table.num_rows == 2000 and len(data) < 2_000_000
    assert table.column("part").to_pylist()[1199:1201] == ["hdvila_part0", "hdvila_part1"]
