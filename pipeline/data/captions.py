"""Caption sets: `captions/<set>/part-NNNNN.parquet`, aligned row for row with the frame shard of
the same index, plus a per-part sidecar (done marker) and `caption_set.json`.

Captioning reads only the `clip_id` and `middle_frame` columns of a frame shard, so a set can be
(re)generated without touching frames. A set's fingerprint covers the captioner identity and the
frames it was made from; a complete set is never rewritten, and a set of the same name with a
different fingerprint is refused. No Ray in here: `build.py` runs `caption_shard` in an actor.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Protocol, Sequence

import pyarrow as pa

from pipeline import schema
from pipeline.config import CaptionConfig, fingerprint
from pipeline.data.shards import frames_part_uri, read_table, write_table_atomic
from pipeline.utils import fs


class Captioner(Protocol):
    """What caption_shard needs from a captioner (FrameCaptioner satisfies it)."""

    def caption(self, images: Sequence[bytes]) -> list[Any]: ...

    def identity(self) -> dict[str, Any]: ...


class CaptionSetConflict(ValueError):
    """A caption set of this name exists with a different fingerprint."""


def set_dir(root: str, name: str) -> str:
    return fs.join(root, "captions", name)


def caption_part_uri(root: str, name: str, index: int) -> str:
    return fs.join(set_dir(root, name), schema.part_name(index) + ".parquet")


def caption_sidecar_uri(root: str, name: str, index: int) -> str:
    return fs.join(set_dir(root, name), schema.part_name(index) + ".json")


def caption_quarantine_uri(root: str, name: str, index: int) -> str:
    return fs.join(root, "quarantine", "captions", name, schema.part_name(index) + ".parquet")


def caption_set_uri(root: str, name: str) -> str:
    return fs.join(set_dir(root, name), "caption_set.json")


def set_fingerprint(cfg: CaptionConfig, frames_fingerprint: str) -> str:
    """Identity of a caption set: which captioner, how it was run, on which frames."""
    return fingerprint({"captioner": cfg.identity(), "frames": frames_fingerprint})


def open_caption_set(root: str, cfg: CaptionConfig, frames_fingerprint: str, opts: fs.S3Options,
                     force: bool = False) -> dict[str, Any]:
    """Create `caption_set.json` (status in_progress) or check an existing one matches.

    Raises:
        CaptionSetConflict: the set exists with another fingerprint and `force` is False.
    """
    uri = caption_set_uri(root, cfg.set_name)
    want = set_fingerprint(cfg, frames_fingerprint)
    if fs.exists(uri, opts):
        meta = fs.read_json(uri, opts)
        if meta.get("fingerprint") == want:
            return meta
        if not force:
            raise CaptionSetConflict(
                f"caption set {cfg.set_name!r} at {set_dir(root, cfg.set_name)} was made with a different "
                f"captioner/config (fingerprint {meta.get('fingerprint')} != {want}; existing captioner "
                f"{meta.get('config', {}).get('model')!r}). Choose another caption.set_name, or set "
                f"data.force=true to delete and rebuild it.")
        fs.delete_dir(set_dir(root, cfg.set_name), opts)
        fs.delete_dir(fs.join(root, "quarantine", "captions", cfg.set_name), opts)
    meta = {
        "schema_version": schema.SCHEMA_VERSION,
        "name": cfg.set_name,
        "fingerprint": want,
        "frames_fingerprint": frames_fingerprint,
        "config": cfg.identity(),
        "status": "in_progress",
    }
    fs.write_json_atomic(uri, meta, opts)
    return meta


def caption_shard(root: str, name: str, index: int, captioner: Captioner, set_fp: str,
                  opts: fs.S3Options) -> dict[str, Any]:
    """Caption the middle frames of frame shard `index` unless its caption sidecar exists."""
    sidecar_uri = caption_sidecar_uri(root, name, index)
    if fs.exists(sidecar_uri, opts):
        sidecar = fs.read_json(sidecar_uri, opts)
        sidecar["skipped"] = True
        return sidecar

    t0 = time.perf_counter()
    frames_uri = frames_part_uri(root, index)
    table = read_table(frames_uri, opts, columns=["clip_id", "middle_frame", "video_id", "source_uri"])
    bytes_read = sum(table.column(c).nbytes for c in ("clip_id", "middle_frame"))
    read_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    clip_ids = table.column("clip_id").to_pylist()
    images = table.column("middle_frame").to_pylist()
    results = captioner.caption(images) if images else []
    caption_s = time.perf_counter() - t1

    captions, bad = [], []
    video_ids = table.column("video_id").to_pylist()
    sources = table.column("source_uri").to_pylist()
    for clip_id, video_id, src, res in zip(clip_ids, video_ids, sources, results, strict=True):
        captions.append(res.caption)
        if res.caption is None:
            bad.append({"clip_id": clip_id, "video_id": video_id, "stage": schema.STAGE_CAPTION,
                        "error": res.error or "captioner returned nothing", "source_uri": src})
    out = pa.table({"clip_id": clip_ids, "caption": captions}, schema=schema.CAPTION_SCHEMA)
    nbytes, sha = write_table_atomic(caption_part_uri(root, name, index), out, opts)
    if bad:
        write_table_atomic(caption_quarantine_uri(root, name, index),
                           pa.Table.from_pylist(bad, schema=schema.QUARANTINE_SCHEMA), opts)
    sidecar = {
        "schema_version": schema.SCHEMA_VERSION,
        "unit": index,
        "set": name,
        "fingerprint": set_fp,
        "rows": out.num_rows,
        "captioned": out.num_rows - len(bad),
        "failed": len(bad),
        "bytes": nbytes,
        "sha256": sha,
        "bytes_read": int(bytes_read),
        "clip_ids_sha256": hashlib.sha256("\n".join(clip_ids).encode("utf-8")).hexdigest(),
        "captioner": captioner.identity(),
        "timings_s": {"read": round(read_s, 4), "caption": round(caption_s, 4)},
    }
    fs.write_json_atomic(sidecar_uri, sidecar, opts)
    sidecar["skipped"] = False
    return sidecar
