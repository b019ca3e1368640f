"""How much memory one decode task needs, from the unit it decodes (pure arithmetic, shared by
`prepare`'s reservation and `clipvip plan`'s report).

A decode task holds every JPEG of its unit until the shard is written (the shard is one Parquet
file, written once), plus the video it is decoding and the decoder's working set. Measured: one
512-clip unit of 25 KB frames peaked at 1.72 GiB, i.e. ~0.35 GiB + 2.8x the unit's JPEG bytes
(Arrow builders and the encoded copies double-buffer them).
"""

from __future__ import annotations

import math

from pipeline.config import PrepareJobConfig

DECODE_BASE_GIB, DECODE_PER_JPEG_BYTE = 0.35, 2.8
FRAME_BYTES_240P = 25_000
"""A 240p JPEG (q90) of real video; synthetic frames compress better (bench/caption.py)."""
GIB = 2**30


def frame_bytes(short_side_px: int) -> float:
    """A stored frame's bytes: 25 KB at 240p, scaling with the pixel count (0 = source, ~720p)."""
    side = short_side_px or 720
    return FRAME_BYTES_240P * (side / 240) ** 2


def decode_task_bytes(unit_clips: int, frames_per_clip: int, short_side_px: int, video_buffer_bytes: int = 0) -> int:
    """Peak memory of a decode task for a unit of `unit_clips` clips of up to `frames_per_clip`
    stored frames each, holding up to `video_buffer_bytes` of the video being decoded; rounded up
    to a quarter GiB (what the task reserves)."""
    jpeg = unit_clips * frames_per_clip * frame_bytes(short_side_px)
    need = DECODE_BASE_GIB * GIB + DECODE_PER_JPEG_BYTE * jpeg + video_buffer_bytes
    return math.ceil(need / (GIB / 4)) * (GIB // 4)


def decode_reservation(cfg: PrepareJobConfig, largest_unit_clips: int) -> int:
    """Bytes each decode task of `cfg` reserves: `ray.decode_memory_gb`, or sized from the
    largest unit to decode (frames.max_frames + the middle frame a clip)."""
    if cfg.ray.decode_memory_gb is not None:
        return int(cfg.ray.decode_memory_gb * GIB)
    st = cfg.storage
    # An S3 video is held whole up to whole_read_max_mb, else as a block plus its read-ahead; a
    # local file is read through the page cache.
    on_s3 = cfg.data.video_root.startswith("s3://")
    buffer = max(st.whole_read_max_mb, 2 * st.read_block_mb) * 2**20 if on_s3 else 0
    return decode_task_bytes(largest_unit_clips, cfg.frames.max_frames + 1, cfg.frames.short_side_px, int(buffer))
