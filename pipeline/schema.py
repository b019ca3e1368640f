"""The Parquet contract of a dataset root: column names, Arrow schemas, file naming.

Layout (see DESIGN.md; `data/root.py` computes every path). <part> is a metadata part's name
(its file name without .jsonl), so a root grows part by part without renaming anything:
    <root>/manifest.json                              schema version, settings, registered parts, counts
    <root>/index/frames.parquet                       one row per frame shard (data/index.py)
    <root>/index/captions-<set>.parquet               one row per caption part of a set
    <root>/frames/<part>/part-00000.parquet           one row per clip
    <root>/frames/<part>/part-00000.json              shard sidecar, written last (the unit's done marker)
    <root>/captions/<set>/caption_set.json
    <root>/captions/<set>/<part>/part-00000.parquet   clip_id + caption, same rows/order as the frame shard
    <root>/captions/<set>/<part>/part-00000.json      caption part sidecar (done marker)
    (a recaption with frames_per_clip > 1 adds frame_captions / frame_caption_indices columns)
    <root>/quarantine/<part>/part-00000.parquet       clips that failed in prepare (decode/span/subtitle)
    <root>/quarantine/<part>/metadata.parquet         malformed metadata lines (file:line in `error`)
    <root>/quarantine/subtitles/*.parquet             unusable or duplicate rows of a subtitle table
    <root>/quarantine/captions/<set>/<part>/part-00000.parquet   clips whose caption failed
    <root>/plan/<part>/{part.json,units.parquet}      the part's units (byte ranges of its lines)
    <root>/plan/<part>/subtitles/part-00000.parquet   a unit's subtitle-table rows (table subtitles)
    <root>/views/<view>/view.json                     a training view (`clipvip pack`): settings, status
    <root>/views/<view>/t00000-000.parquet            view shard: task 0's first piece, VIEW_SCHEMA
    <root>/views/<view>/t00000-000.json               its sidecar (done marker)
    <root>/index/view-<view>.parquet                  one row per view shard (VIEW_INDEX_SCHEMA)
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 2  # 2: one root per corpus (parts, shard index); 1 had one flat frames/

FRAME_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("subtitle", pa.string(), nullable=False),
        pa.field("frames", pa.list_(pa.binary()), nullable=False),
        pa.field("frame_times_s", pa.list_(pa.float64()), nullable=False),
        pa.field("middle_frame", pa.binary(), nullable=False),
        pa.field("middle_frame_time_s", pa.float64(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("source_fps", pa.float64(), nullable=False),
    ]
)

CAPTION_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),
        # Null when the captioner failed on this clip (a quarantine row says why); the row
        # stays so caption parts remain aligned with frame parts row for row.
        pa.field("caption", pa.string(), nullable=True),
    ]
)

# A training view's rows: what pretrain reads, joined and resized once (data/pack.py).
VIEW_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("subtitle", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("frames", pa.list_(pa.binary()), nullable=False),
        pa.field("middle_frame", pa.binary(), nullable=False),
    ]
)

VIEW_INDEX_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),  # t<task>-<piece>
        pa.field("rows", pa.int32(), nullable=False),
        pa.field("row_groups", pa.int32(), nullable=False),
        pa.field("videos", pa.int32(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("footer_bytes", pa.int64(), nullable=False),  # Parquet footer + 8-byte tail: one ranged GET
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("clip_ids_sha256", pa.string(), nullable=False),
    ]
)

# Extra columns of a caption part made with frames_per_clip = k > 1 (recaption): captions of k
# frames spread uniformly over the clip's stored `frames`, and which frames they are. Items are
# null where a frame failed to decode; `caption` stays the middle-frame caption training uses.
FRAME_CAPTION_FIELDS = (
    pa.field("frame_captions", pa.list_(pa.string()), nullable=False),
    pa.field("frame_caption_indices", pa.list_(pa.int32()), nullable=False),
)


def caption_schema(frames_per_clip: int = 1) -> pa.Schema:
    """Schema of a caption part: CAPTION_SCHEMA, plus the per-frame lists when k > 1.

    Args:
        frames_per_clip: frames captioned per clip besides the middle frame (1 = middle only).

    Returns:
        The Arrow schema; k = 1 gives exactly CAPTION_SCHEMA, so such parts stay byte-compatible
        with the ones prepare writes.
    """
    if frames_per_clip < 1:
        raise ValueError(f"frames_per_clip must be >= 1, got {frames_per_clip}")
    if frames_per_clip == 1:
        return CAPTION_SCHEMA
    return pa.schema(list(CAPTION_SCHEMA) + list(FRAME_CAPTION_FIELDS))


QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
    ]
)

# Stages a quarantine row can name.
STAGE_METADATA = "metadata"
STAGE_SUBTITLE = "subtitle"
STAGE_READ = "read"  # storage kept failing transiently through the retry budget: retryable
STAGE_OPEN = "open"
STAGE_SPAN = "span"
STAGE_DECODE = "decode"
STAGE_CAPTION = "caption"


def part_name(index: int) -> str:
    """Deterministic shard stem for work unit `index` (same index in frames/ and captions/)."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"part-{index:05d}"

