"""One work unit -> one frame shard: decode every video of the unit once, write
`frames/<part>/part-NNNNN.parquet`, its quarantine rows, then the sidecar (the unit's done marker).

Exactly-once without a database: shard names are a pure function of (part, unit), each file is
written atomically (temp + rename locally, one PUT on S3) and the sidecar goes last. A unit
interrupted anywhere before its sidecar is simply redone on the next run and rewrites the same
bytes (decode, resize and JPEG encode are deterministic); a unit with a sidecar is never
touched again. The unit's clips are read back from its metadata lines (`metadata.read_unit`),
its subtitles from the table rows joined to it at planning or from per-video cue files. No Ray
in here: `build.py` wraps these functions in Ray Data stages.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.config import FramesConfig
from pipeline.data.frames import ClipFailure, ClipFrames, SpanRequest, extract_clips
from pipeline.data.metadata import ClipSpec, UnitSpec, VideoEntry, read_unit
from pipeline.data.root import DatasetRoot, Shard
from pipeline.data.subtitles import NO_SUBTITLE, SubtitleError, find_cue_file, read_cue_file, subtitle_for_span
from pipeline.utils import fs, s3
from pipeline.utils.s3 import TransientS3Error

# Small row groups let training readers stream a shard without holding all of it.
ROW_GROUP_ROWS = 32


@dataclass(frozen=True, slots=True)
class UnitContext:
    """Everything a decode task needs besides the unit itself (plain data, ships across Ray)."""

    root: str
    video_root: str
    video_extensions: tuple[str, ...]
    subtitles: str | None
    """"table" (rows joined to units at planning), "dir" (per-video cue files) or None."""
    subtitles_dir: str | None
    frames: FramesConfig
    s3: fs.S3Options
    fingerprint: str

    @property
    def dataset(self) -> DatasetRoot:
        return DatasetRoot(self.root, self.s3)


# ---------------------------------------------------------------------------------------------
# Parquet helpers


def table_bytes(table: pa.Table, row_group_rows: int = ROW_GROUP_ROWS) -> bytes:
    """Serialize a table to Parquet bytes (zstd); deterministic for the same table."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=max(1, row_group_rows))
    return sink.getvalue()


def write_table_atomic(uri: str, table: pa.Table, opts: fs.S3Options) -> tuple[int, str]:
    """Write a Parquet file atomically; returns (bytes, sha256)."""
    data = table_bytes(table)
    fs.write_bytes_atomic(uri, data, opts)
    return len(data), hashlib.sha256(data).hexdigest()


def read_table(uri: str, opts: fs.S3Options, columns: list[str] | None = None) -> pa.Table:
    filesystem, path = fs.resolve(uri, opts)
    return pq.read_table(path, filesystem=filesystem, columns=columns, use_threads=False)


def quarantine_row(clip_id: str, video_id: str, stage: str, error: str, source_uri: str) -> dict[str, str]:
    return {"clip_id": clip_id, "video_id": video_id, "stage": stage, "error": error, "source_uri": source_uri}


# ---------------------------------------------------------------------------------------------
# Decoding one video's clips


def find_video(ctx: UnitContext, video_id: str) -> tuple[str, int] | None:
    """(uri, size) of the first existing <video_root>/<video_id>.<ext>, in the configured extension
    order (one HEAD an extension tried on S3)."""
    for ext in ctx.video_extensions:
        uri = fs.join(ctx.video_root, f"{video_id}.{ext}")
        try:
            return uri, fs.stat(uri, ctx.s3).size
        except FileNotFoundError:
            continue
    return None


def _open_source(uri: str, size: int, opts: fs.S3Options) -> Any:
    """Local path as is; an S3 object read whole when small, else in 8 MiB blocks with read-ahead
    (`s3.open_read`), so the decoder's small reads and seeks never reach the network."""
    if not fs.is_s3(uri):
        return uri
    return s3.open_read(uri, opts, size)


def unit_subtitles(ctx: UnitContext, shard: Shard) -> dict[str, tuple[str | None, str | None]]:
    """clip_id -> (text, error) of the table rows joined to this unit at planning (one read; no
    file means the table has no row for any clip of the unit)."""
    data = fs.read_bytes_or_none(ctx.dataset.subtitles_uri(shard), ctx.s3)
    if data is None:
        return {}
    table = fs.parquet_from_bytes(data)
    return {c: (t, e) for c, t, e in zip(table.column("clip_id").to_pylist(), table.column("text").to_pylist(),
                                          table.column("error").to_pylist())}


def _clip_texts(ctx: UnitContext, video: VideoEntry,
                table: dict[str, tuple[str | None, str | None]] | None) -> dict[str, tuple[str | None, str | None]]:
    """clip_id -> (subtitle, error) for every clip of the video, from the table or the cue file."""
    if ctx.subtitles is None:
        return {c.clip_id: ("", None) for c in video.clips}
    if ctx.subtitles == "table":
        assert table is not None
        return {c.clip_id: table.get(c.clip_id, (None, NO_SUBTITLE)) for c in video.clips}
    assert ctx.subtitles_dir is not None
    cue_uri = find_cue_file(ctx.subtitles_dir, video.video_id, ctx.s3)
    if cue_uri is None:
        error = f"no subtitle file for video {video.video_id} under {ctx.subtitles_dir}"
        return {c.clip_id: (None, error) for c in video.clips}
    try:
        cues = read_cue_file(cue_uri, ctx.s3)
    except SubtitleError as e:
        return {c.clip_id: (None, str(e)) for c in video.clips}
    out: dict[str, tuple[str | None, str | None]] = {}
    for c in video.clips:
        text = subtitle_for_span(cues, c.start_s, c.end_s)
        out[c.clip_id] = (text, None) if text.strip() else (None, "no subtitle cue overlaps the span")
    return out


def decode_video(ctx: UnitContext, video: VideoEntry,
                 table: dict[str, tuple[str | None, str | None]] | None = None
                 ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Decode all clips of one video. Returns (frame rows, quarantine rows)."""
    rows: list[dict[str, Any]] = []
    bad: list[dict[str, str]] = []
    found = find_video(ctx, video.video_id)
    uri, size = found if found is not None else (None, 0)
    source_uri = uri or fs.join(ctx.video_root, f"{video.video_id}.*")
    texts = _clip_texts(ctx, video, table)

    todo: list[ClipSpec] = []
    for clip in video.clips:
        text, sub_error = texts[clip.clip_id]
        # A table's verdict is known from planning, a cue file's only once the video is found.
        if clip.error_stage is not None:
            bad.append(quarantine_row(clip.clip_id, video.video_id, clip.error_stage, clip.error or "", source_uri))
        elif sub_error is not None and ctx.subtitles == "table":
            bad.append(quarantine_row(clip.clip_id, video.video_id, schema.STAGE_SUBTITLE, sub_error, source_uri))
        elif uri is None:
            tried = ", ".join(ctx.video_extensions)
            bad.append(quarantine_row(clip.clip_id, video.video_id, schema.STAGE_OPEN,
                                      f"video file not found: {video.video_id}.{{{tried}}} under {ctx.video_root}",
                                      source_uri))
        elif sub_error is not None:
            bad.append(quarantine_row(clip.clip_id, video.video_id, schema.STAGE_SUBTITLE, sub_error, source_uri))
        else:
            todo.append(clip)
    if not todo:
        return rows, bad

    spans = [SpanRequest(c.clip_id, c.start_s, c.end_s) for c in todo]
    source = _open_source(uri, size, ctx.s3)
    try:
        result = extract_clips(source, spans, ctx.frames)
    finally:
        if not isinstance(source, str):
            source.close()
    # A network failure in the middle of a decode surfaces as the decoder's error: name it.
    read_error = getattr(source, "read_error", None)
    for clip, out in zip(todo, result.clips, strict=True):
        if isinstance(out, ClipFailure):
            stage, error = (schema.STAGE_READ, str(read_error)) if read_error else (out.stage, out.error)
            bad.append(quarantine_row(clip.clip_id, video.video_id, stage, error, uri))
            continue
        assert isinstance(out, ClipFrames)
        rows.append({
            "clip_id": clip.clip_id,
            "video_id": video.video_id,
            "source_uri": uri,
            "start_s": float(clip.start_s),
            "end_s": float(clip.end_s),
            "subtitle": texts[clip.clip_id][0],
            "frames": out.frames,
            "frame_times_s": [float(t) for t in out.frame_times_s],
            "middle_frame": out.middle_frame,
            "middle_frame_time_s": float(out.middle_frame_time_s),
            "height": int(out.height),
            "width": int(out.width),
            "source_fps": float(result.source_fps),
        })
    return rows, bad


# ---------------------------------------------------------------------------------------------
# One unit


def clip_ids_digest(clip_ids: list[str]) -> str:
    """sha256 of a shard's clip ids in row order (frame and caption parts must agree)."""
    return hashlib.sha256("\n".join(clip_ids).encode("utf-8")).hexdigest()


def process_unit(spec: UnitSpec, part_uri: str, ctx: UnitContext) -> dict[str, Any]:
    """Decode and write one unit unless its sidecar already exists; returns the sidecar dict."""
    root = ctx.dataset
    shard = Shard(spec.part, spec.unit)
    sidecar_uri = root.frames_sidecar_uri(shard)
    sidecar = fs.read_json_or_none(sidecar_uri, ctx.s3)
    if sidecar is not None:
        sidecar["skipped"] = True
        return sidecar

    t0 = time.perf_counter()
    videos = read_unit(part_uri, spec, ctx.s3)
    table = unit_subtitles(ctx, shard) if ctx.subtitles == "table" else None
    rows: list[dict[str, Any]] = []
    bad: list[dict[str, str]] = []
    for video in videos:
        try:
            v_rows, v_bad = decode_video(ctx, video, table)
        except Exception as e:  # noqa: BLE001  a bug or I/O error on one video must not cost the unit
            # Storage that kept failing (retry budget spent) is retryable later; anything else is not.
            stage = schema.STAGE_READ if isinstance(e, TransientS3Error) else schema.STAGE_DECODE
            v_rows = []
            v_bad = [quarantine_row(c.clip_id, video.video_id, stage, f"{type(e).__name__}: {e}",
                                    fs.join(ctx.video_root, video.video_id)) for c in video.clips]
        rows.extend(v_rows)
        bad.extend(v_bad)
    decode_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    table_out = pa.Table.from_pylist(rows, schema=schema.FRAME_SCHEMA)
    nbytes, sha = write_table_atomic(root.frames_uri(shard), table_out, ctx.s3)
    if bad:
        write_table_atomic(root.quarantine_uri(shard), pa.Table.from_pylist(bad, schema=schema.QUARANTINE_SCHEMA),
                           ctx.s3)
    write_s = time.perf_counter() - t1

    stages: dict[str, int] = {}
    for b in bad:
        stages[b["stage"]] = stages.get(b["stage"], 0) + 1
    clip_ids = [r["clip_id"] for r in rows]
    sidecar = {
        "schema_version": schema.SCHEMA_VERSION,
        "part": spec.part,
        "unit": spec.unit,
        "fingerprint": ctx.fingerprint,
        "videos": spec.videos,
        "clips": spec.clips,
        "rows": table_out.num_rows,
        "quarantined": len(bad),
        "quarantined_by_stage": stages,
        "frames": sum(len(r["frames"]) for r in rows),
        "bytes": nbytes,
        "sha256": sha,
        "clip_ids_sha256": clip_ids_digest(clip_ids),
        "min_clip_id": min(clip_ids) if clip_ids else None,
        "max_clip_id": max(clip_ids) if clip_ids else None,
        "timings_s": {"decode": round(decode_s, 4), "write": round(write_s, 4)},
    }
    # Every clip of the unit is accounted for exactly once: as a row or as a quarantine row.
    assert sidecar["rows"] + sidecar["quarantined"] == sidecar["clips"], sidecar
    fs.write_json_atomic(sidecar_uri, sidecar, ctx.s3)
    sidecar["skipped"] = False
    return sidecar
