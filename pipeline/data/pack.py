"""`clipvip pack`: a training view of a dataset root and one caption set.

    driver   open the root and the caption set (4 reads, `DatasetIndex`); open or check view.json
             (complete with the same settings -> nothing to do; other settings -> refused); cut
             the frame shards, in index order, into tasks of c = rows_per_group consecutive shards
    Stage 1  pack (Ray task per task, 1 task -> its view shards): read the c shards' training
             columns and captions, interleave their valid rows round-robin, resize the frames to
             the training size once, write view shards of rows_per_shard rows in row groups of c
             rows, each shard then its sidecar (done marker)
    driver   progress line per task; the view index, then view.json (complete, written last) and
             the manifest's list of views

Why round-robin over c shards: a shard holds whole videos, so row t of each of c different
shards are clips of c different videos. Row group t of a task is exactly that, which is all
the training order needs (`view_order.py`): it deals whole row groups into global batches
uniformly at random, so clips of one video meet in a batch as rarely as under uniform sampling
(the paper samples clips uniformly, Sec. 4.1), while every read is a whole row group. No global
shuffle of the corpus's bytes is needed. Where shards run out at different lengths, or fewer than
c shards are left for the last task, a row group can hold two rows of one shard.

Frames are squash-resized to `image_size_px` as the training transform does (CLIP-ViP resizes
the whole frame to 224 x 224) and re-encoded as JPEG: the training transform then decodes small
JPEGs and never resizes. This adds one JPEG encode the paper's pipeline did not have
(`jpeg_quality` 95 by default keeps the loss small); `image_size_px: 0` keeps the bytes as stored.

Resume is "run the same command again": a task skips the view shards whose sidecars exist and
writes the missing ones with the same bytes (every step is deterministic).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import schema
from pipeline.config import ViewConfig
from pipeline.data.dataset_index import DatasetIndex
from pipeline.data.root import DatasetRoot, Shard
from pipeline.utils import fs

SOURCE_COLUMNS = ["clip_id", "video_id", "subtitle", "frames", "middle_frame"]


@dataclass(frozen=True, slots=True)
class PackTask:
    """One task: `shards` (consecutive in index order) -> view shards `t<task>-<piece>`."""

    task: int
    shards: list[tuple[str, int]]
    excluded: list[list[int]]
    """Rows of each shard left out (null caption)."""
    valid: list[int]
    """Rows of each shard that go into the view."""

    @property
    def rows(self) -> int:
        return sum(self.valid)

    def pieces(self, rows_per_shard: int) -> int:
        return math.ceil(self.rows / rows_per_shard)


def shard_name(task: int, piece: int) -> str:
    return f"t{task:05d}-{piece:03d}"


def plan_tasks(index: DatasetIndex, cfg: ViewConfig) -> list[PackTask]:
    """Tasks of c consecutive frame shards (the last may have fewer); shards with no valid row skipped."""
    lay = index.layout
    keep = [i for i in range(len(lay.shard_ids)) if lay.num_valid(i) > 0]
    c = cfg.rows_per_group
    tasks = []
    for t, start in enumerate(range(0, len(keep), c)):
        ords = keep[start:start + c]
        shards = [index.shard(o) for o in ords]
        tasks.append(PackTask(task=t, shards=[(s.part, s.unit) for s in shards],
                              excluded=[lay.excluded.get(o, np.zeros(0, np.int64)).tolist() for o in ords],
                              valid=[lay.num_valid(o) for o in ords]))
    return tasks


def interleave(valid: list[int]) -> np.ndarray:
    """Round-robin order over sources of these sizes: row 0 of each source, then row 1, ...

    Returns:
        [sum(valid), 2] int64 (source, i-th valid row of that source).
    """
    src = np.concatenate([np.full(n, k, dtype=np.int64) for k, n in enumerate(valid)] or [np.zeros(0, np.int64)])
    row = np.concatenate([np.arange(n, dtype=np.int64) for n in valid] or [np.zeros(0, np.int64)])
    order = np.lexsort((src, row))
    return np.stack([src[order], row[order]], axis=1)


def resize_jpeg(jpeg: bytes, size_px: int, quality: int) -> bytes:
    """Squash-resize one JPEG to size x size (bicubic, as the training transform) and re-encode.

    Raises:
        ValueError: the bytes do not decode.
    """
    try:
        with Image.open(io.BytesIO(jpeg)) as img:
            rgb = img.convert("RGB").resize((size_px, size_px), Image.Resampling.BICUBIC)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ...
        raise ValueError(f"undecodable frame: {type(e).__name__}: {e}") from e
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# One task (runs in a Ray worker; no Ray import)


class _Source:
    """The valid rows of one frame shard, read row group by row group, joined to their captions."""

    def __init__(self, root: DatasetRoot, caption_set: str, shard: Shard, excluded: list[int]) -> None:
        self.uri = root.frames_uri(shard)
        caps = fs.parquet_from_bytes(fs.read_bytes(root.caption_uri(caption_set, shard), root.opts),
                                     columns=["clip_id", "caption"])
        self.cap_ids = caps.column("clip_id").to_pylist()
        self.captions = caps.column("caption").to_pylist()
        self.skip = set(excluded)
        self.file = fs.open_ranges(self.uri, root.opts)
        self.pf = pq.ParquetFile(self.file, pre_buffer=True)
        self.group, self.next_row, self.rows = 0, 0, []  # rows of the current row group, from next_row on
        self.bytes_read = self.pf.metadata.serialized_size

    def _fill(self) -> None:
        while not self.rows:
            if self.group >= self.pf.metadata.num_row_groups:
                raise ValueError(f"{self.uri}: fewer valid rows than its index says")
            table = self.pf.read_row_group(self.group, columns=SOURCE_COLUMNS, use_threads=False)
            rg = self.pf.metadata.row_group(self.group)
            self.bytes_read += sum(rg.column(i).total_compressed_size for i in range(rg.num_columns)
                                   if rg.column(i).path_in_schema.split(".")[0] in SOURCE_COLUMNS)
            self.group += 1
            start, self.next_row = self.next_row, self.next_row + table.num_rows
            self.rows = [dict(r, row=start + i) for i, r in enumerate(table.to_pylist()) if start + i not in self.skip]

    def take(self) -> dict[str, Any]:
        """The next valid row, with its caption; checks the caption part is aligned."""
        self._fill()
        row = self.rows.pop(0)
        i = row.pop("row")
        if self.cap_ids[i] != row["clip_id"]:
            raise ValueError(f"caption part misaligned with {self.uri} at row {i}: {self.cap_ids[i]!r} != "
                             f"{row['clip_id']!r}; recaption this root")
        row["caption"] = self.captions[i]
        return row

    def close(self) -> None:
        self.file.close()


def _view_row(row: dict[str, Any], cfg: ViewConfig) -> dict[str, Any]:
    """The row as the view stores it.

    Raises:
        ValueError: a frame does not decode (the caller leaves the row out and records it).
    """
    if not row["frames"]:
        raise ValueError("no frames")
    if cfg.image_size_px:
        size, q = cfg.image_size_px, cfg.jpeg_quality
        row = dict(row, frames=[resize_jpeg(f, size, q) for f in row["frames"]],
                   middle_frame=resize_jpeg(row["middle_frame"], size, q))
    return {k: row[k] for k in schema.VIEW_SCHEMA.names}


def piece_bytes(rows: list[dict[str, Any]], cfg: ViewConfig) -> bytes:
    table = pa.Table.from_pylist(rows, schema=schema.VIEW_SCHEMA)
    sink = pa.BufferOutputStream()
    # JPEG bytes do not compress: storing them plain keeps reads cheap; the text columns are zstd.
    pq.write_table(table, sink, row_group_size=cfg.rows_per_group, use_dictionary=["video_id"],
                   compression={"clip_id": "zstd", "video_id": "zstd", "subtitle": "zstd", "caption": "zstd",
                                "frames": "none", "middle_frame": "none"},
                   write_statistics=["clip_id", "video_id"])
    return sink.getvalue().to_pybytes()


def pack_task(task: PackTask, root_uri: str, opts: fs.S3Options, cfg: ViewConfig) -> list[dict[str, Any]]:
    """Write the task's view shards that are not done yet; return every piece's sidecar.

    Raises:
        ValueError: an input shard or caption part disagrees with the index (rerun prepare/recaption).
    """
    root = DatasetRoot(root_uri, opts)
    pieces = task.pieces(cfg.rows_per_shard)
    sides = [fs.read_json_or_none(root.view_sidecar_uri(cfg.name, shard_name(task.task, j)), opts)
             for j in range(pieces)]
    if all(s is not None for s in sides):
        return [dict(s, skipped=True) for s in sides]
    t0 = time.perf_counter()
    order = interleave(task.valid)
    sources = [_Source(root, cfg.caption_set, Shard(p, u), ex) for (p, u), ex in zip(task.shards, task.excluded,
                                                                                    strict=True)]
    last = max(j for j in range(pieces) if sides[j] is None)  # rows after this piece are never read
    transform_s = 0.0
    try:
        for j in range(last + 1):
            lo, hi = j * cfg.rows_per_shard, min((j + 1) * cfg.rows_per_shard, len(order))
            raw = [sources[int(k)].take() for k in order[lo:hi, 0]]
            if sides[j] is not None:
                sides[j] = dict(sides[j], skipped=True)
                continue
            t1 = time.perf_counter()
            rows, dropped = [], []
            for r in raw:
                try:
                    rows.append(_view_row(r, cfg))
                except ValueError as e:  # the view leaves the row out; the sidecar says which and why
                    dropped.append({"clip_id": r["clip_id"], "error": str(e)})
            transform_s += time.perf_counter() - t1
            data = piece_bytes(rows, cfg)
            name = shard_name(task.task, j)
            fs.write_bytes_atomic(root.view_shard_uri(cfg.name, name), data, opts)
            ids = [r["clip_id"] for r in rows]
            side = {"shard": name, "task": task.task, "piece": j, "rows": len(rows),
                    "row_groups": math.ceil(len(rows) / cfg.rows_per_group),
                    "videos": len({r["video_id"] for r in rows}), "bytes": len(data),
                    "group_videos": sum(len({r["video_id"] for r in rows[i:i + cfg.rows_per_group]})
                                        for i in range(0, len(rows), cfg.rows_per_group)),
                    "footer_bytes": int.from_bytes(data[-8:-4], "little") + 8,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "clip_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
                    "inputs": [f"{p}/{schema.part_name(u)}" for p, u in task.shards], "dropped": dropped}
            fs.write_json_atomic(root.view_sidecar_uri(cfg.name, name), side, opts)
            sides[j] = side
    finally:
        for s in sources:
            s.close()
    sides[0] = dict(sides[0], bytes_read=sum(s.bytes_read for s in sources), transform_s=round(transform_s, 3),
                    wall_s=round(time.perf_counter() - t0, 3))
    return sides


def task_memory_bytes(frames_index: pa.Table, cfg: ViewConfig) -> int:
    """What one pack task holds at most: a row group of each of its c input shards, and one view
    shard being written (sized from the largest input row, an upper bound on a resized one), x 1.5."""
    rows = np.maximum(np.asarray(frames_index.column("rows").to_pylist(), dtype=np.float64), 1)
    row_bytes = float(np.max(np.asarray(frames_index.column("bytes").to_pylist()) / rows)) if len(rows) else 0.0
    from pipeline.data.shards import ROW_GROUP_ROWS  # noqa: PLC0415

    held = cfg.rows_per_group * ROW_GROUP_ROWS + 2 * cfg.rows_per_shard
    return int(1.5 * held * row_bytes) + (512 << 20)


def task_item(task: PackTask) -> dict[str, str]:
    return {"task": json.dumps(asdict(task))}


def task_of(item: dict[str, Any]) -> PackTask:
    raw = json.loads(item["task"])
    return PackTask(task=raw["task"], shards=[tuple(s) for s in raw["shards"]], excluded=raw["excluded"],
                    valid=raw["valid"])
