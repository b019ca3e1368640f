"""Training views of a dataset root: `view.json`, the view index, the manifest's list of views.

A view (`clipvip pack`, `pack.py`) is what pretrain reads: the rows of one caption set, joined
to their frames, resized once, in row groups of clips from different videos. Like a caption set
it is named, immutable once complete, and refused on conflict: the same name with other
settings, another caption set, or a root that has grown since (a view covers the frame shards
the root had when it was packed; a grown root gets a view of a new name).

Opening a complete view costs two object reads (view.json and `index/view-<name>.parquet`)
whatever its size; the shards' sidecars are the pack's done markers and no reader reads them.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.config import ViewConfig
from pipeline.data.root import DatasetRoot
from pipeline.utils import fs


class ViewConflict(ValueError):
    """A view of this name exists with other settings, or covers another state of the root."""


def view_kind(name: str) -> str:
    """The view's index kind: `index/view-<name>.parquet`."""
    return f"view-{name}"


def view_settings(cfg: ViewConfig, capset: dict[str, Any], frames_fingerprint: str, frame_shards: int) -> dict[str, Any]:
    """What the view's bytes depend on: the settings, the caption set and the frames it was made from."""
    return {"caption_set": cfg.caption_set, "caption_set_fingerprint": capset.get("fingerprint"),
            "frames_fingerprint": frames_fingerprint, "frame_shards": frame_shards,
            "image_size_px": cfg.image_size_px, "jpeg_quality": cfg.jpeg_quality,
            "rows_per_group": cfg.rows_per_group, "rows_per_shard": cfg.rows_per_shard}


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def open_view(root: DatasetRoot, name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Create `view.json` (status in_progress) or check that the existing one has these settings.

    Returns:
        The view's metadata (status "complete" when there is nothing left to do).

    Raises:
        ViewConflict: the name is taken by a view with other settings; the message names each.
    """
    meta = fs.read_json_or_none(root.view_uri(name), root.opts)
    if meta is not None:
        if meta.get("settings") != settings:
            old = meta.get("settings", {})
            diffs = [f"{k}: {old.get(k)} -> {settings.get(k)}" for k in sorted(set(old) | set(settings))
                     if old.get(k) != settings.get(k)]
            raise ViewConflict(f"view {name!r} at {root.path('views', name)} was packed with other settings or "
                               f"from another state of the root ({'; '.join(diffs)}); a view never changes: pack a new "
                               f"view.name")
        return meta
    meta = {"name": name, "status": "in_progress", "settings": settings, "fingerprint": fingerprint(settings),
            "created_unix": int(time.time())}
    fs.write_json_atomic(root.view_uri(name), meta, root.opts)
    return meta


def index_row(side: dict[str, Any]) -> dict[str, Any]:
    """A view shard's index row, from its sidecar."""
    return {k: side[k] for k in schema.VIEW_INDEX_SCHEMA.names}


def finish_view(root: DatasetRoot, meta: dict[str, Any], sidecars: list[dict[str, Any]],
                expected_shards: int, wall_s: float) -> dict[str, Any]:
    """Write the view index (shards in name order) and then `view.json` as complete.

    Raises:
        RuntimeError: shards are missing (a task failed): rerun the same pack to finish.
    """
    rows = sorted((index_row(s) for s in sidecars), key=lambda r: r["shard"])
    if len({r["shard"] for r in rows}) != expected_shards:
        raise RuntimeError(f"view {meta['name']!r}: {len({r['shard'] for r in rows})} of {expected_shards} shards "
                           "written; rerun the same pack command to finish it")
    table = pa.Table.from_pylist(rows, schema=schema.VIEW_INDEX_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=1 << 16)
    fs.write_bytes_atomic(root.index_uri(view_kind(meta["name"])), sink.getvalue().to_pybytes(), root.opts)
    counts = {"shards": table.num_rows, "rows": int(sum(r["rows"] for r in rows)),
              "row_groups": int(sum(r["row_groups"] for r in rows)), "bytes": int(sum(r["bytes"] for r in rows))}
    final = dict(meta, status="complete", counts=counts, pack_wall_s=round(wall_s, 1))
    fs.write_json_atomic(root.view_uri(meta["name"]), final, root.opts)
    refresh_manifest_views(root)
    return final


def read_view_index(root: DatasetRoot, name: str) -> pa.Table:
    """The complete view's index (one request), shards in name order."""
    data = fs.read_bytes(root.index_uri(view_kind(name)), root.opts)
    return fs.parquet_from_bytes(data).select(schema.VIEW_INDEX_SCHEMA.names).cast(schema.VIEW_INDEX_SCHEMA)


def open_complete_view(root: DatasetRoot, name: str) -> dict[str, Any]:
    """view.json of a complete view (one request).

    Raises:
        RootNotReady: no view and no root there.
        ValueError: no such view (the message lists the views there are), or it is unfinished.
    """
    meta = fs.read_json_or_none(root.view_uri(name), root.opts)
    if meta is None:
        root.open(require_complete=False)  # only on this error path: not a root at all says so first
        raise ValueError(f"view {name!r} not found under {root.path('views')}; existing views: "
                         f"{', '.join(view_names(root)) or 'none'} (make one with `clipvip pack`)")
    if meta.get("status") != "complete":
        raise ValueError(f"view {name!r} is not finished (status {meta.get('status')!r}); rerun the same "
                         "`clipvip pack` command to finish it")
    return meta


def view_names(root: DatasetRoot) -> list[str]:
    """Names of the directories under <root>/views (one listing)."""
    return fs.list_dirs(root.path("views"), root.opts)


def describe_views(root: DatasetRoot) -> list[dict[str, Any]]:
    """Every view's metadata (one listing + one read a view; views are few)."""
    return [m for name in view_names(root) if (m := fs.read_json_or_none(root.view_uri(name), root.opts))]


def refresh_manifest_views(root: DatasetRoot) -> list[str]:
    """Rewrite manifest.json's `views` from the complete views on disk (as caption sets)."""
    manifest = root.read_manifest() or {}
    names = [m["name"] for m in describe_views(root) if m.get("status") == "complete"]
    if manifest.get("views") != names:
        root.write_manifest(dict(manifest, views=names))
    return names
