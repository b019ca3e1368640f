"""Videos are read from S3 in large blocks, whatever the decoder does: the real decode path of
`prepare` (`decode_video`) over the sample's videos and one of over 20 MB, against a moto server
that counts requests and response bytes. Target: GETs per video <= ceil(size / 8 MiB) + 2 and
bytes read <= 1.1x the video's size."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import boto3
import numpy as np

from pipeline.config import FramesConfig
from pipeline.data.metadata import ClipSpec, VideoEntry
from pipeline.data.shards import UnitContext, decode_video
from pipeline.data.synthetic_render import encode_video
from pipeline.utils import fs


def test_videos_are_read_in_large_blocks(s3_counting, sample_data, tmp_path):
    endpoint, log = s3_counting
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="reads")
    big = tmp_path / "bigvideo001.mp4"
    rng = np.random.default_rng(0)  # noise does not compress: ~1 MB a 720p frame
    encode_video(str(big), (rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8) for _ in range(30)), fps=30.0,
                 crf=16, preset="ultrafast")
    assert os.path.getsize(big) > 20e6
    videos = [(json.loads(line)["video_id"], [(c["clip_id"], c["span"]) for c in json.loads(line)["clip"]])
              for line in open(sample_data.metadata_path)]
    videos.append(("bigvideo001", [("bigvideo001.0.mp4", [0.1, 0.5]), ("bigvideo001.1.mp4", [0.5, 0.95])]))
    for vid, _ in videos:
        path = big if vid == "bigvideo001" else os.path.join(sample_data.video_root, f"{vid}.mp4")
        s3.upload_file(str(path), "reads", f"videos/{vid}.mp4")
    opts = fs.S3Options(endpoint_url=endpoint)
    ctx = UnitContext(root=str(tmp_path / "root"), video_root="s3://reads/videos", video_extensions=("mp4",),
                      subtitles=None, subtitles_dir=None, frames=FramesConfig(short_side_px=64), s3=opts,
                      fingerprint="")
    from pipeline.data.metadata import parse_timestamp

    # The big one twice: read whole (under storage.whole_read_max_mb), then in 8 MiB blocks.
    blocks = dataclasses.replace(ctx, s3=dataclasses.replace(opts, whole_read_max_bytes=4 << 20))
    frames = {}
    for vid, clips in videos + videos[-1:]:
        c = blocks if vid in frames else ctx
        size = fs.stat(f"s3://reads/videos/{vid}.mp4", opts).size
        mark = log.mark()
        specs = tuple(ClipSpec(cid, parse_timestamp(a), parse_timestamp(b)) for cid, (a, b) in clips)
        rows, bad = decode_video(c, VideoEntry(vid, "", specs))
        assert rows and not bad, bad
        gets, nbytes = log.bytes_since(mark, f"/reads/videos/{vid}.mp4")
        print(f"[reads] {vid} {'blocks' if c is blocks else 'whole'}: {size / 2**20:.2f} MiB, {gets} GETs, "
              f"{nbytes / size:.3f}x its size")
        assert gets <= math.ceil(size / (8 << 20)) + 2, (vid, size, gets)
        assert nbytes <= 1.1 * size, (vid, size, nbytes)
        if vid in frames:
            assert [r["frames"] for r in rows] == frames[vid], "the same pixels whichever way it was read"
        frames[vid] = [r["frames"] for r in rows]
