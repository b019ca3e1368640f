"""Caption sets: `captions/<set>/<part>/part-NNNNN.parquet`, aligned row for row with the frame
shard of the same name, plus a per-part sidecar (done marker), a row per part in the set's shard
index (`index/captions-<set>.parquet`) and `caption_set.json`.

Captioning reads only the `clip_id` and `middle_frame` columns of a frame shard (and `frames`
when more than the middle frame is captioned), so a set can be (re)generated without touching
frames. A set's fingerprint covers the captioner identity and the frames it was made from; a
complete set is never rewritten, and a set of the same name with a different fingerprint is
refused. No Ray in here: `build.py` runs `caption_shard` in an actor (for prepare and recaption).
"""

from __future__ import annotations

import io
import json
import time
from typing import Any, Protocol
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute  # registers pa.compute
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.config import CaptionConfig, fingerprint
from pipeline.data.index import captions_kind, read_index
from pipeline.data.root import DatasetRoot, Shard
from pipeline.data.shards import clip_ids_digest, write_table_atomic
from pipeline.utils import fs

CAPTION_SET_FILE = "caption_set.json"


class Captioner(Protocol):
    """What caption_shard needs from a captioner (FrameCaptioner satisfies it)."""

    def caption(self, images: Sequence[bytes]) -> list[Any]: ...

    def identity(self) -> dict[str, Any]: ...


class CaptionSetConflict(ValueError):
    """A caption set of this name exists with a different fingerprint."""


# ---------------------------------------------------------------------------------------------
# Pure helpers


def spread_indices(num_frames: int, k: int) -> list[int]:
    """k frame indices spread uniformly over `num_frames` stored frames (segment centres).

    The clip is cut into k equal segments and the frame at each segment's centre is taken, as
    CLIP-ViP's uniform (eval) sampling does. With fewer frames than k, frames repeat, so every
    clip gets exactly k entries (a list column of fixed length is simpler to consume).

    Args:
        num_frames: frames stored for the clip (length of its `frames` list).
        k: how many to pick (>= 1).

    Returns:
        k non-decreasing indices in [0, num_frames), or [] when the clip has no frames.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if num_frames <= 0:
        return []
    return [min(num_frames - 1, int((i + 0.5) * num_frames / k)) for i in range(k)]


def set_fingerprint(cfg: CaptionConfig, frames_fingerprint: str, frames_per_clip: int = 1) -> str:
    """Identity of a caption set: which captioner, how it was run, on which frames.

    `frames_per_clip` joins the fingerprint only when > 1, so a middle-frame-only recaption with
    prepare's captioner config has prepare's fingerprint (and is recognised as the same set).
    """
    ident: dict[str, Any] = {"captioner": cfg.identity(), "frames": frames_fingerprint}
    if frames_per_clip != 1:
        ident["frames_per_clip"] = frames_per_clip
    return fingerprint(ident)


# ---------------------------------------------------------------------------------------------
# caption_set.json


def open_caption_set(root: DatasetRoot, cfg: CaptionConfig, frames_fingerprint: str, force: bool = False,
                     frames_per_clip: int = 1) -> dict[str, Any]:
    """Create `caption_set.json` (status in_progress) or check an existing one matches.

    Returns:
        The set's metadata; `status` is "complete" when an identical set already covers the
        shards it was finished with (a grown root may hold more: the caller extends it).

    Raises:
        CaptionSetConflict: the set exists with another fingerprint and `force` is False.
    """
    uri = root.caption_set_uri(cfg.set_name)
    want = set_fingerprint(cfg, frames_fingerprint, frames_per_clip)
    meta = fs.read_json_or_none(uri, root.opts)
    if meta is not None:
        if meta.get("fingerprint") == want:
            return meta
        if not force:
            old = meta.get("config", {})
            raise CaptionSetConflict(
                f"caption set {cfg.set_name!r} at {root.caption_set_dir(cfg.set_name)} was made with a different "
                f"captioner/config (fingerprint {meta.get('fingerprint')} != {want}; existing: model "
                f"{old.get('model')!r}, prompt {old.get('prompt')!r}, frames_per_clip "
                f"{meta.get('frames_per_clip', 1)}, status {meta.get('status')!r}). A caption set is never "
                f"overwritten: choose another caption.set_name (or, for prepare, set data.force=true to "
                f"delete and rebuild it).")
        delete_caption_set(root, cfg.set_name)
    meta = {
        "schema_version": schema.SCHEMA_VERSION,
        "name": cfg.set_name,
        "fingerprint": want,
        "frames_fingerprint": frames_fingerprint,
        "frames_per_clip": frames_per_clip,
        "config": cfg.identity(),
        "status": "in_progress",
    }
    fs.write_json_atomic(uri, meta, root.opts)
    return meta


def delete_caption_set(root: DatasetRoot, name: str) -> None:
    from pipeline.data.index import delete_index  # noqa: PLC0415

    fs.delete_dir(root.caption_set_dir(name), root.opts)
    fs.delete_dir(root.path("quarantine", "captions", name), root.opts)
    delete_index(root, captions_kind(name))


def covers(meta: dict[str, Any], num_shards: int) -> bool:
    """A complete set that covers a root of `num_shards` frame shards (nothing to caption)."""
    return meta.get("status") == "complete" and int(meta.get("counts", {}).get("shards", -1)) == num_shards


def finish_caption_set(root: DatasetRoot, meta: dict[str, Any], frames: pa.Table, part_order: list[str],
                       wall_s: float | None = None) -> dict[str, Any]:
    """Compact the set's index, check it covers every frame shard, then write `caption_set.json`
    with status complete (last), aggregated from the index rows (no sidecar is read).

    Args:
        frames: the root's frames index (one row per frame shard).

    Raises:
        RuntimeError: a frame shard has no caption part (the job was not finished; rerun it).
    """
    from pipeline.data.index import compact_index  # noqa: PLC0415

    name = meta["name"]
    if covers(meta, frames.num_rows):
        return meta  # immutable: a rerun of a finished job leaves it byte for byte as it is
    index = compact_index(root, captions_kind(name), part_order)
    have = set(zip(index.column("part").to_pylist(), index.column("unit").to_pylist()))
    missing = [f"{p}/{schema.part_name(u)}" for p, u in zip(frames.column("part").to_pylist(),
                                                             frames.column("unit").to_pylist()) if (p, u) not in have]
    if missing:
        raise RuntimeError(f"caption set {name!r}: {len(missing)} parts not done (first: {missing[:5]}); "
                           "run the same command again to resume")
    keys = ("rows", "captioned", "failed", "frame_captions", "frame_captions_failed", "images", "bytes",
            "bytes_read")
    counts = {k: int(pa.compute.sum(index.column(k)).as_py() or 0) for k in keys}
    counts["shards"] = index.num_rows
    identities = sorted(set(index.column("captioner").to_pylist()))
    out = dict(meta, status="complete", captioner=[json.loads(i) for i in identities], counts=counts)
    if wall_s is not None:
        out["timings_s"] = {"wall_last_run": round(wall_s, 3)}
    fs.write_json_atomic(root.caption_set_uri(name), out, root.opts)
    return out


def caption_set_names(root: DatasetRoot) -> list[str]:
    """Names of the directories under <root>/captions (one listing)."""
    return fs.list_dirs(root.path("captions"), root.opts)


def describe_caption_sets(root: DatasetRoot, part_order: list[str]) -> list[dict[str, Any]]:
    """Every caption set of a root with its parts-done count (from its index, pending included).

    Returns:
        One dict per set, sorted by name: the set's metadata plus `parts_done`.
    """
    out = []
    for name in caption_set_names(root):
        meta = fs.read_json_or_none(root.caption_set_uri(name), root.opts)
        if meta is None:
            continue
        pending = meta.get("status") != "complete"  # a finished set has no fragments left
        meta["parts_done"] = read_index(root, captions_kind(name), part_order, pending=pending).num_rows
        out.append(meta)
    return out


def complete_caption_sets(root: DatasetRoot) -> list[str]:
    """Names of the caption sets whose caption_set.json says complete (what manifest.json lists)."""
    names = []
    for name in caption_set_names(root):
        meta = fs.read_json_or_none(root.caption_set_uri(name), root.opts)
        if meta is not None and meta.get("status") == "complete":
            names.append(name)
    return names


def refresh_manifest_caption_sets(root: DatasetRoot) -> list[str]:
    """Rewrite manifest.json's `caption_sets` from the complete sets on disk (atomically).

    The list is derived from the caption_set.json files at write time, so whichever job writes
    last records every set finished so far.
    """
    manifest = root.read_manifest() or {}
    sets = complete_caption_sets(root)
    if manifest.get("caption_sets") != sets:
        root.write_manifest(dict(manifest, caption_sets=sets))
    return sets


# ---------------------------------------------------------------------------------------------
# Reading frame shards: projected columns, counting the bytes that come off storage


class _CountingFile(io.RawIOBase):
    """A read-only file that counts the bytes read through it (wraps a pyarrow NativeFile)."""

    def __init__(self, f: Any) -> None:
        super().__init__()
        self._f = f
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n if n is not None and n >= 0 else None)
        self.bytes_read += len(data)
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)


def read_columns(uri: str, opts: fs.S3Options | None, columns: list[str]) -> tuple[pa.Table, int]:
    """Read some columns of a Parquet file; returns (table, bytes read from storage).

    The footer is read exactly (8-byte tail, then the footer) instead of pyarrow's 64 KiB
    speculative tail read, which on small shards would cost more than the middle frames do.

    Args:
        uri: local path or s3:// URI of a Parquet file.
        opts: how to reach S3.
        columns: columns to read (projection; other column chunks are never fetched).
    """
    with fs.open_ranges(uri, opts) as native:
        f = _CountingFile(native)
        size = native.seek(0, 2)
        f.seek(size - 8)
        tail = f.read(8)
        if len(tail) != 8 or tail[4:] != b"PAR1":
            raise ValueError(f"{uri}: not a Parquet file")
        footer_len = int.from_bytes(tail[:4], "little")
        f.seek(size - 8 - footer_len)
        footer = f.read(footer_len)
        metadata = pq.read_metadata(pa.BufferReader(b"PAR1" + footer + tail))
        # pre_buffer coalesces nearby column chunks into fewer (S3) requests.
        table = pq.ParquetFile(f, metadata=metadata, pre_buffer=True).read(columns=columns, use_threads=False)
        return table, f.bytes_read


# ---------------------------------------------------------------------------------------------
# Captioning one shard


def caption_shard(root: DatasetRoot, name: str, shard: Shard, captioner: Captioner, set_fp: str,
                  frames_per_clip: int = 1) -> dict[str, Any]:
    """Caption frame shard `shard` into the same part of set `name`, unless its sidecar exists.

    Reads `clip_id` + `middle_frame` (+ `frames` when frames_per_clip > 1). A middle frame that
    fails becomes a null caption plus a quarantine row (stage caption); a failed extra frame a
    null list item. Files are written atomically and the sidecar last, so a killed run redoes
    at most the parts without sidecars, with the same bytes.

    Returns:
        The part's sidecar, with `skipped` True when it was already done.
    """
    opts = root.opts
    sidecar_uri = root.caption_sidecar_uri(name, shard)
    sidecar = fs.read_json_or_none(sidecar_uri, opts)
    if sidecar is not None:
        sidecar["skipped"] = True
        return sidecar

    t0 = time.perf_counter()
    frames_uri = root.frames_uri(shard)
    columns = ["clip_id", "middle_frame"] + (["frames"] if frames_per_clip > 1 else [])
    table, bytes_read = read_columns(frames_uri, opts, columns)
    clip_ids = table.column("clip_id").to_pylist()
    images = table.column("middle_frame").to_pylist()
    picks: list[list[int]] = []
    if frames_per_clip > 1:
        # Each distinct (row, frame) is captioned once, even when a short clip repeats frames.
        slots: dict[tuple[int, int], int] = {}
        for row, frames in enumerate(table.column("frames").to_pylist()):
            picks.append(spread_indices(len(frames), frames_per_clip))
            for i in picks[-1]:
                if (row, i) not in slots:
                    slots[(row, i)] = len(images)
                    images.append(frames[i])
    read_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    results = captioner.caption(images) if images else []
    caption_s = time.perf_counter() - t1

    t2 = time.perf_counter()
    captions = [r.caption for r in results[:len(clip_ids)]]
    data: dict[str, Any] = {"clip_id": clip_ids, "caption": captions}
    extra_failed = 0
    if frames_per_clip > 1:
        data["frame_captions"] = [[results[slots[(row, i)]].caption for i in p] for row, p in enumerate(picks)]
        data["frame_caption_indices"] = picks
        extra_failed = sum(c is None for lst in data["frame_captions"] for c in lst)
    out = pa.table(data, schema=schema.caption_schema(frames_per_clip))
    nbytes, sha = write_table_atomic(root.caption_uri(name, shard), out, opts)
    bad_rows = [i for i, c in enumerate(captions) if c is None]
    if bad_rows:
        _write_caption_quarantine(root, name, shard, bad_rows, clip_ids, results)
    write_s = time.perf_counter() - t2

    sidecar = {
        "schema_version": schema.SCHEMA_VERSION,
        "part": shard.part,
        "unit": shard.unit,
        "set": name,
        "fingerprint": set_fp,
        "rows": out.num_rows,
        "captioned": out.num_rows - len(bad_rows),
        "failed": len(bad_rows),
        "null_rows": bad_rows,
        "bytes": nbytes,
        "sha256": sha,
        "bytes_read": int(bytes_read),
        "images": len(images),
        "clip_ids_sha256": clip_ids_digest(clip_ids),
        "captioner": captioner.identity(),
        "timings_s": {"read": round(read_s, 4), "caption": round(caption_s, 4), "write": round(write_s, 4)},
    }
    if frames_per_clip > 1:
        sidecar.update(frames_per_clip=frames_per_clip, frame_captions=sum(len(p) for p in picks) - extra_failed,
                       frame_captions_failed=extra_failed)
    fs.write_json_atomic(sidecar_uri, sidecar, opts)
    sidecar["skipped"] = False
    return sidecar


def _write_caption_quarantine(root: DatasetRoot, name: str, shard: Shard, bad_rows: list[int], clip_ids: list[str],
                              results: list[Any]) -> None:
    # video_id/source_uri are only needed for quarantine rows, so they are read only when a
    # shard has one (rare), keeping the common read path to clip_id + middle_frame.
    meta, _ = read_columns(root.frames_uri(shard), root.opts, ["video_id", "source_uri"])
    video_ids, sources = meta.column("video_id").to_pylist(), meta.column("source_uri").to_pylist()
    rows = [{"clip_id": clip_ids[i], "video_id": video_ids[i], "stage": schema.STAGE_CAPTION,
             "error": results[i].error or "captioner returned nothing", "source_uri": sources[i]}
            for i in bad_rows]
    write_table_atomic(root.caption_quarantine_uri(name, shard),
                       pa.Table.from_pylist(rows, schema=schema.QUARANTINE_SCHEMA), root.opts)
