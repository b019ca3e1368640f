"""`prepare` reading videos/metadata/subtitles from S3 and writing the root to S3, against a
real S3 server on loopback (moto server), then reading the shards back."""

from __future__ import annotations

import json
import os

import boto3
import pyarrow.parquet as pq

from pipeline.config import PrepareJobConfig, load_config
from pipeline.data.build import run_prepare
from pipeline.data.index import FRAMES, read_index
from pipeline.data.root import DatasetRoot, Shard
from pipeline.utils import fs


def upload_dir(s3, bucket, local, prefix):
    for dirpath, _, files in os.walk(local):
        for f in files:
            path = os.path.join(dirpath, f)
            s3.upload_file(path, bucket, prefix + "/" + os.path.relpath(path, local))


def test_prepare_s3_round_trip(ray_local, s3_server, sample_data):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="hdvila")
    upload_dir(s3, "hdvila", sample_data.video_root, "raw/videos")
    s3.upload_file(sample_data.metadata_path, "hdvila", "raw/meta.jsonl")
    s3.upload_file(sample_data.subtitles_table, "hdvila", "raw/subs.jsonl")

    cfg = load_config(PrepareJobConfig, None, [
        "root=s3://hdvila/prepared/v1", "data.metadata=s3://hdvila/raw/meta.jsonl",
        "data.video_root=s3://hdvila/raw/videos", "data.subtitles=s3://hdvila/raw/subs.jsonl",
        "data.clips_per_shard=6", "frames.short_side_px=64", "caption.model=builtin:tiny-blip",
        f"storage.s3_endpoint_url={s3_server}", "ray.progress_bars=false"])
    summary = run_prepare(cfg, log=lambda *_: None)
    assert summary.clips_ok > 0 and summary.clips_quarantined == 0

    opts = fs.S3Options(endpoint_url=s3_server)
    man = fs.read_json("s3://hdvila/prepared/v1/manifest.json", opts)
    assert man["status"] == "complete" and man["counts"]["clips_ok"] == summary.clips_ok
    n_meta = sum(len(json.loads(line)["clip"]) for line in open(sample_data.metadata_path))
    # Readers find the shards through the index, never by listing.
    root = DatasetRoot("s3://hdvila/prepared/v1", opts)
    index = read_index(root, FRAMES, root.parts(man), pending=False)
    shards = [Shard(p, u) for p, u in zip(index.column("part").to_pylist(), index.column("unit").to_pylist())]
    filesystem, _ = fs.resolve(root.uri, opts)
    frames = pq.read_table([root.frames_uri(s)[len("s3://"):] for s in shards], filesystem=filesystem)
    assert frames.num_rows == n_meta == len(set(frames.column("clip_id").to_pylist()))
    assert frames.column("source_uri")[0].as_py().startswith("s3://hdvila/raw/videos/")
    for s in shards:
        assert fs.exists(root.caption_uri("default", s), opts)
    assert len(shards) == man["counts"]["shards"]
    # A second run over S3 resumes: everything is already done.
    again = run_prepare(cfg, log=lambda *_: None)
    assert again.units_skipped == again.units
