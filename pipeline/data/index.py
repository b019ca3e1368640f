"""The shard index: one Parquet row per shard, so a root opens in a constant number of reads.

`index/frames.parquet` has a row per frame shard and `index/captions-<set>.parquet` a row per
caption part: what a reader needs to know about a shard without opening it (rows, bytes, sha256,
the sha256 of its clip ids for alignment checks, clip-id range, quarantine counts, caption rows
that are null). Rows come from the sidecars a job's stages return, so writing the index costs no
extra read. While a job runs, its driver writes rows as fragments under `index/pending/<kind>/`
(atomically, every few hundred shards or seconds); when the job ends they are merged into the
compacted file, sorted by (part registration order, unit), and removed. A killed job loses at
most its last unflushed rows: those shards have sidecars, so the next run takes their rows from
the sidecars. Readers of a finished root read the compacted file only (one request).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.root import DatasetRoot
from pipeline.utils import fs

FRAMES = "frames"

FRAMES_INDEX_SCHEMA = pa.schema([
    pa.field("part", pa.string(), nullable=False),
    pa.field("unit", pa.int32(), nullable=False),
    pa.field("videos", pa.int32(), nullable=False),
    pa.field("clips", pa.int32(), nullable=False),
    pa.field("rows", pa.int32(), nullable=False),
    pa.field("quarantined", pa.int32(), nullable=False),
    pa.field("quarantined_by_stage", pa.string(), nullable=False),  # JSON {stage: count}
    pa.field("frames", pa.int64(), nullable=False),
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),
    pa.field("clip_ids_sha256", pa.string(), nullable=False),
    pa.field("min_clip_id", pa.string(), nullable=True),  # null for a shard without rows
    pa.field("max_clip_id", pa.string(), nullable=True),
])

CAPTIONS_INDEX_SCHEMA = pa.schema([
    pa.field("part", pa.string(), nullable=False),
    pa.field("unit", pa.int32(), nullable=False),
    pa.field("rows", pa.int32(), nullable=False),
    pa.field("captioned", pa.int32(), nullable=False),
    pa.field("failed", pa.int32(), nullable=False),
    pa.field("null_rows", pa.list_(pa.int32()), nullable=False),  # rows whose caption is null
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),
    pa.field("clip_ids_sha256", pa.string(), nullable=False),
    pa.field("images", pa.int64(), nullable=False),
    pa.field("bytes_read", pa.int64(), nullable=False),
    pa.field("frame_captions", pa.int64(), nullable=False),
    pa.field("frame_captions_failed", pa.int64(), nullable=False),
    pa.field("captioner", pa.string(), nullable=False),  # JSON identity of the captioner that made it
])


def captions_kind(set_name: str) -> str:
    return f"captions-{set_name}"


def schema_of(kind: str) -> pa.Schema:
    return FRAMES_INDEX_SCHEMA if kind == FRAMES else CAPTIONS_INDEX_SCHEMA


def frames_row(side: dict[str, Any]) -> dict[str, Any]:
    """The index row of a frame shard, from its sidecar."""
    return {"part": side["part"], "unit": int(side["unit"]), "videos": int(side["videos"]), "clips": int(side["clips"]),
            "rows": int(side["rows"]), "quarantined": int(side["quarantined"]),
            "quarantined_by_stage": json.dumps(side.get("quarantined_by_stage", {}), sort_keys=True),
            "frames": int(side["frames"]), "bytes": int(side["bytes"]), "sha256": side["sha256"],
            "clip_ids_sha256": side["clip_ids_sha256"], "min_clip_id": side.get("min_clip_id"),
            "max_clip_id": side.get("max_clip_id")}


def captions_row(side: dict[str, Any]) -> dict[str, Any]:
    """The index row of a caption part, from its sidecar."""
    return {"part": side["part"], "unit": int(side["unit"]), "rows": int(side["rows"]),
            "captioned": int(side["captioned"]), "failed": int(side["failed"]),
            "null_rows": [int(r) for r in side.get("null_rows", [])], "bytes": int(side["bytes"]),
            "sha256": side["sha256"], "clip_ids_sha256": side["clip_ids_sha256"], "images": int(side.get("images", 0)),
            "bytes_read": int(side.get("bytes_read", 0)), "frame_captions": int(side.get("frame_captions", 0)),
            "frame_captions_failed": int(side.get("frame_captions_failed", 0)),
            "captioner": json.dumps(side.get("captioner", {}), sort_keys=True)}


def _to_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=1 << 16)
    return sink.getvalue().to_pybytes()


def _from_bytes(data: bytes) -> pa.Table:
    return fs.parquet_from_bytes(data)


class IndexWriter:
    """Collects a job's index rows and writes them as fragments as it goes (driver side).

    Args:
        root: the dataset root.
        kind: "frames" or `captions_kind(set)`.
        flush_rows / flush_s: write a fragment once this many rows wait, or this long has passed.
    """

    def __init__(self, root: DatasetRoot, kind: str, flush_rows: int = 256, flush_s: float = 30.0) -> None:
        self.root, self.kind, self.schema = root, kind, schema_of(kind)
        self.flush_rows, self.flush_s = flush_rows, flush_s
        self._token = uuid.uuid4().hex[:12]
        self._seq = 0
        self._rows: list[dict[str, Any]] = []
        self._last = time.monotonic()

    def add(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.flush_rows or time.monotonic() - self._last >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        if not self._rows:
            return
        table = pa.Table.from_pylist(self._rows, schema=self.schema)
        uri = fs.join(self.root.index_pending_dir(self.kind), f"{self._token}-{self._seq:06d}.parquet")
        fs.write_bytes_atomic(uri, _to_bytes(table), self.root.opts)
        self._seq += 1
        self._rows = []


def read_index(root: DatasetRoot, kind: str, part_order: list[str], pending: bool = True) -> pa.Table:
    """The index of `kind`: the compacted file, plus the pending fragments when asked.

    One request for the compacted file; `pending` adds a listing and one read per fragment (a
    finished job leaves none). A shard listed twice (a fragment written again after a kill)
    keeps its first row; rows are sorted by (position of their part in `part_order`, unit).

    Raises:
        ValueError: a row names a part that `part_order` does not hold (index and manifest disagree).
    """
    pieces = []
    data = fs.read_bytes_or_none(root.index_uri(kind), root.opts)
    if data is not None:
        pieces.append(_from_bytes(data))
    if pending:
        for uri in fs.list_files(root.index_pending_dir(kind), root.opts, suffix=".parquet"):
            pieces.append(_from_bytes(fs.read_bytes(uri, root.opts)))
    schema = schema_of(kind)
    if not pieces:
        return schema.empty_table()
    table = pa.concat_tables([p.select(schema.names).cast(schema) for p in pieces])
    rank = {name: i for i, name in enumerate(part_order)}
    parts, units = table.column("part").to_pylist(), table.column("unit").to_pylist()
    unknown = sorted(set(parts) - set(rank))
    if unknown:
        raise ValueError(f"{root.uri}: index/{kind} lists parts {unknown} that the manifest does not register")
    first: dict[tuple[str, int], int] = {}
    for i, key in enumerate(zip(parts, units)):
        first.setdefault(key, i)
    keep = sorted(first.values(), key=lambda i: (rank[parts[i]], units[i]))
    return table.take(pa.array(keep, type=pa.int64()))


def compact_index(root: DatasetRoot, kind: str, part_order: list[str]) -> pa.Table:
    """Merge the pending fragments into `index/<kind>.parquet` and remove them; returns the index.

    Safe to interrupt anywhere: the compacted file is written atomically before any fragment is
    deleted, and readers drop the duplicate rows a half-finished compaction leaves.
    """
    fragments = fs.list_files(root.index_pending_dir(kind), root.opts, suffix=".parquet")
    table = read_index(root, kind, part_order, pending=True)
    if fragments or fs.read_bytes_or_none(root.index_uri(kind), root.opts) is None:
        fs.write_bytes_atomic(root.index_uri(kind), _to_bytes(table), root.opts)
    for uri in fragments:
        fs.delete_file(uri, root.opts)
    return table


def delete_index(root: DatasetRoot, kind: str) -> None:
    fs.delete_file(root.index_uri(kind), root.opts)
    fs.delete_dir(root.index_pending_dir(kind), root.opts)
