"""Training-side data loading: a training view (`clipvip pack`) -> this rank's micro batches.

Plan of one rank's stream (cardinalities in brackets):
    driver   ViewIndex.open: view.json + the view index (2 reads, whatever the view's size)
    stage 1  ray.data.from_items(num_tasks): one row per task of `steps_per_task` steps    [1 per task]
    stage 2  map_batches task, on the rank's node when it can: for each step, the rank's slice
             of the global batch (`view_order.py`), whole row groups read with one ranged GET
             each (plus one footer GET per view shard a worker process first touches), frames
             sampled and decoded, texts tokenised                                           [1 : steps_per_task]
    trainer  iter_torch_batches(batch_size=m), preserve_order                                [1 batch per step]

Global batch b is the same G samples at any world size; rank r of W takes the r-th of its W
slices of m = G / W. Row groups of c rows are read whole and every row of them is used when c
divides m: bytes read per byte used is 1.0 plus the footers.

Bad rows: a view holds only rows whose frames decoded at pack time (and a caption), so a bad row
is rare (a view packed with image_size_px 0 keeps stored frames unchecked). A row whose needed
JPEGs do not decode takes a copy of the next good slot of the same micro batch (cyclic,
`sampling.substitute_slots`) or, if the whole micro batch is bad, of the next good samples at the
global positions after it (cyclic over the epoch). Batch content is a pure function of (view,
seed, epoch, position), so a stream resumed at step s equals the uninterrupted one. A
substituted slot has `skipped = 1` and the donor's `clip_id`, so the loss's duplicate mask makes
the copy a positive, not a negative.

Where GPU JPEG decoding would go (not built): what a loader task spends its CPU on is decoding the
T + 1 sampled JPEGs of 224 px a clip (~0.23 ms each on one core, bench/ingest.py). `_transform` is the one
place that turns stored bytes into pixels; on GPU nodes a loader that ships the sampled frames'
JPEG bytes and a decode on the trainer's device (nvJPEG, e.g. `torchvision.io.decode_jpeg` with a
CUDA device) would replace it, leaving the CPUs sampling and tokenising.

Batch layout (B = micro batch m, T = num_frames, H = W = image_size_px, L = max_text_len):
    frames [B, T, H, W, 3] uint8, middle_frame [B, H, W, 3] uint8, channels-last as decoded (the
    trainer's `normalize_clip` makes them float channels-first on its device), subtitle_ids / subtitle_mask / caption_ids / caption_mask [B, L] int64,
    clip_id [B] int64 (stable hash), position [B] int64 (global sample index of the slot),
    step [B] int64 (same value in a batch), skipped [B] int64 (0/1).
"""

from __future__ import annotations

import io
import math
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import LoaderConfig
from pipeline.data import view as views
from pipeline.data.root import DatasetRoot
from pipeline.data.sampling import BadSample, clip_hash, jitter_rng, substitute_slots, transform_clip
from pipeline.data.view_order import ViewLayout, order_entries, rank_positions
from pipeline.utils import fs

if TYPE_CHECKING:
    import ray.data
    import torch

TokenizeFn = Callable[[list[str], int], "tuple[torch.Tensor, torch.Tensor]"]

COLUMNS = ["clip_id", "subtitle", "caption", "frames", "middle_frame"]


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchSpec:
    """What one micro batch holds (from the model and train sections of the job config)."""

    global_batch: int
    """G: samples of one optimizer step over all ranks (the InfoNCE batch)."""
    num_frames: int = 12
    image_size_px: int = 224
    max_text_len: int = 70
    train_sampling: bool = True
    """Jittered frame sampling (post-pretraining); False = uniform."""


@dataclass(frozen=True)
class ViewIndex:
    """What the loader knows about a view before reading any frames (plain data, ships to Ray).

    Attributes:
        root: dataset root (local path or s3://).
        view: the view's name.
        opts: how to reach S3.
        layout: rows of each view shard and the row-group size (view_order.ViewLayout).
        shards: [S] view shard names, in the order `layout` counts them.
        shard_bytes / footer_bytes: [S] object size and footer length of each shard.
        meta: view.json.
        token: unique per open(); keys worker-side caches so they never outlive this index.
    """

    root: str
    view: str
    opts: fs.S3Options
    layout: ViewLayout
    shards: tuple[str, ...]
    shard_bytes: np.ndarray
    footer_bytes: np.ndarray
    meta: dict[str, Any]
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def num_rows(self) -> int:
        return self.layout.num_rows

    @property
    def caption_set(self) -> str:
        return str(self.meta["settings"]["caption_set"])

    @classmethod
    def open(cls, root: str, view: str, opts: fs.S3Options | None = None) -> ViewIndex:
        """Read view.json and the view index (two requests).

        Raises:
            ValueError: no such view (the message lists the existing ones) or an unfinished one.
        """
        droot = DatasetRoot(root, opts)
        meta = views.open_complete_view(droot, view)
        table = views.read_view_index(droot, view)
        return cls(root=root, view=view, opts=droot.opts,
                   layout=ViewLayout(shard_rows=np.array(table.column("rows").to_pylist(), dtype=np.int64),
                                     rows_per_group=int(meta["settings"]["rows_per_group"])),
                   shards=tuple(table.column("shard").to_pylist()),
                   shard_bytes=np.array(table.column("bytes").to_pylist(), dtype=np.int64),
                   footer_bytes=np.array(table.column("footer_bytes").to_pylist(), dtype=np.int64), meta=meta)

    def check_size(self, image_size_px: int) -> None:
        """Raises ValueError when the view's frames were resized to another training size."""
        size = int(self.meta["settings"]["image_size_px"])
        if size not in (0, image_size_px):
            raise ValueError(f"view {self.view!r} holds frames resized to {size} px but train.image_size_px is "
                             f"{image_size_px}; pack a view at {image_size_px} px (view.image_size_px)")


# ---------------------------------------------------------------------------------------------
# Reading row groups (runs in Ray workers; no Ray import)


class _Window(io.RawIOBase):
    """A file of `size` bytes of which only [start, start + len(data)) is present (one GET)."""

    def __init__(self, size: int, start: int, data: bytes) -> None:
        super().__init__()
        self._size, self.start, self.data, self.pos = size, start, memoryview(data), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else (self.pos + offset if whence == 1 else self._size + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf: Any) -> int:
        lo = self.pos - self.start
        n = min(len(buf), self._size - self.pos)
        if lo < 0 or lo + n > len(self.data):
            raise OSError(f"read of [{self.pos}, {self.pos + n}) outside the fetched row group")
        buf[:n] = self.data[lo:lo + n]
        self.pos += n
        return n


class ViewReader:
    """Reads whole row groups of a view: one ranged GET each, footers cached per process.

    Counts what the network sees: `requests`, `bytes_fetched` (footers included; `footer_requests`
    and `footer_bytes` apart), and `bytes_used` (each row's share of its row group's bytes, per row taken).
    """

    def __init__(self, index: ViewIndex, max_footers: int = 256, max_groups: int = 4) -> None:
        self.index = index
        self.max_footers, self.max_groups = max_footers, max_groups
        self._footers: OrderedDict[int, pq.FileMetaData] = OrderedDict()
        self._groups: OrderedDict[tuple[int, int], tuple[list[dict[str, Any]], int]] = OrderedDict()
        self.requests = self.bytes_fetched = self.footer_requests = self.footer_bytes = 0
        self.bytes_used = 0.0
        self.root = DatasetRoot(index.root, index.opts)

    def _uri(self, shard: int) -> str:
        return self.root.view_shard_uri(self.index.view, self.index.shards[shard])

    def _footer(self, shard: int) -> pq.FileMetaData:
        if shard in self._footers:
            self._footers.move_to_end(shard)
            return self._footers[shard]
        size, n = int(self.index.shard_bytes[shard]), int(self.index.footer_bytes[shard])
        tail = fs.read_bytes(self._uri(shard), self.index.opts, size - n, size)
        self.requests += 1
        self.bytes_fetched += len(tail)
        self.footer_requests += 1
        self.footer_bytes += len(tail)
        meta = pq.read_metadata(pa.BufferReader(b"PAR1" + tail))
        self._footers[shard] = meta
        while len(self._footers) > self.max_footers:
            self._footers.popitem(last=False)
        return meta

    def _group(self, shard: int, group: int) -> tuple[list[dict[str, Any]], int]:
        key = (shard, group)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        meta = self._footer(shard)
        rg = meta.row_group(group)
        chunks = [rg.column(i) for i in range(rg.num_columns)]
        start = min(c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in chunks)
        end = max((c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset)
                  + c.total_compressed_size for c in chunks)
        data = fs.read_bytes(self._uri(shard), self.index.opts, start, end)
        self.requests += 1
        self.bytes_fetched += len(data)
        window = _Window(int(self.index.shard_bytes[shard]), start, data)
        table = pq.ParquetFile(window, metadata=meta).read_row_group(group, columns=COLUMNS, use_threads=False)
        out = (table.to_pylist(), end - start)
        self._groups[key] = out
        while len(self._groups) > self.max_groups:
            self._groups.popitem(last=False)
        return out

    def rows(self, entries: np.ndarray) -> list[dict[str, Any]]:
        """The rows at (view shard, row group, row) entries, each row group read once."""
        out = []
        for shard, group, row in entries.tolist():
            rows, nbytes = self._group(shard, group)
            self.bytes_used += nbytes / len(rows)
            out.append(rows[row])
        return out


_READERS: OrderedDict[str, ViewReader] = OrderedDict()


def _shared_reader(index: ViewIndex) -> ViewReader:
    # One reader per worker process and opened index, so consecutive tasks share its footers.
    if index.token not in _READERS:
        _READERS[index.token] = ViewReader(index)
        while len(_READERS) > 2:
            _READERS.popitem(last=False)
    return _READERS[index.token]


# ---------------------------------------------------------------------------------------------
# One micro batch (pure given the rows; runs in Ray workers)


def _transform(row: dict[str, Any], spec: BatchSpec, seed: int, epoch: int, position: int,
               out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(frames, middle) of one row, written into `out` when given, or None when a needed JPEG does
    not decode."""
    rng = jitter_rng(seed, epoch, position) if spec.train_sampling else None
    try:
        return transform_clip(row["frames"], row["middle_frame"], spec.num_frames, spec.image_size_px,
                              spec.train_sampling, rng, *(out or (None, None)))
    except BadSample:
        return None


def _fallback_donors(reader: ViewReader, spec: BatchSpec, seed: int, epoch: int, after: int,
                     m: int) -> list[tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]]:
    """Up to m good samples at the global positions after `after` (cyclic over the epoch).

    Raises:
        RuntimeError: no row of the epoch decodes.
    """
    n = reader.index.num_rows
    found: list[tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]] = []
    for i in range(1, n):
        p = (after + i) % n
        (row,) = reader.rows(order_entries(reader.index.layout, seed, epoch, np.array([p])))
        out = _transform(row, spec, seed, epoch, p)
        if out is not None:
            found.append((row, out))
            if len(found) == m:
                break
    if not found:
        raise RuntimeError(f"no row of view {reader.index.view!r} decodes; the view under {reader.index.root} "
                           "looks corrupt")
    return found


def build_micro_batch(reader: ViewReader, spec: BatchSpec, seed: int, epoch: int, step: int, rank: int,
                      world_size: int, tokenize_fn: TokenizeFn) -> dict[str, np.ndarray]:
    """Rank `rank`'s micro batch of global batch `step` (bad rows per the module docstring).

    Returns:
        Numpy columns of the batch layout in the module docstring, B = G / world_size rows.
    """
    positions = rank_positions(step, rank, world_size, spec.global_batch)
    rows = reader.rows(order_entries(reader.index.layout, seed, epoch, positions))
    m, px = len(positions), spec.image_size_px
    # Each slot is decoded straight into the batch's arrays: no per-clip arrays, no stacking copy.
    frames = np.empty((m, spec.num_frames, px, px, 3), np.uint8)
    middle = np.empty((m, px, px, 3), np.uint8)
    good = np.array([_transform(r, spec, seed, epoch, int(p), (frames[j], middle[j])) is not None
                     for j, (r, p) in enumerate(zip(rows, positions, strict=True))])
    donors = substitute_slots(good)
    if donors[0] < 0:
        found = _fallback_donors(reader, spec, seed, epoch, int(positions[-1]), m)
        samples = [found[j % len(found)][0] for j in range(m)]
        for j in range(m):
            frames[j], middle[j] = found[j % len(found)][1]
    else:
        samples = [rows[d] for d in donors.tolist()]
        for j in np.flatnonzero(~good).tolist():
            frames[j], middle[j] = frames[donors[j]], middle[donors[j]]
    sub_ids, sub_mask = tokenize_fn([r["subtitle"] for r in samples], spec.max_text_len)
    cap_ids, cap_mask = tokenize_fn([r["caption"] for r in samples], spec.max_text_len)
    return {
        "frames": frames,
        "middle_frame": middle,
        "subtitle_ids": sub_ids.numpy(), "subtitle_mask": sub_mask.numpy(),
        "caption_ids": cap_ids.numpy(), "caption_mask": cap_mask.numpy(),
        "clip_id": np.array([clip_hash(r["clip_id"]) for r in samples], dtype=np.int64),
        "position": positions.astype(np.int64),
        "step": np.full(m, step, dtype=np.int64),
        "skipped": (~good).astype(np.int64),
    }


def _default_tokenize(texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    from pipeline.model.tokenizer import tokenize  # noqa: PLC0415  transformers only on workers

    return tokenize(texts, max_len)


# ---------------------------------------------------------------------------------------------
# Ray Data wrapper


def make_rank_dataset(index: ViewIndex, spec: BatchSpec, loader: LoaderConfig, seed: int, epoch: int, rank: int,
                      world_size: int, start_step: int = 0, tokenize_fn: TokenizeFn | None = None) -> ray.data.Dataset:
    """This rank's stream from `start_step` to the end of `epoch`, one micro batch per step, in order.

    Works on a plain driver and inside a Ray Train worker; loader tasks prefer this process's
    node (`loader.node_local`), so micro batches do not cross the network.

    Raises:
        ValueError: fewer rows than one global batch, G not a multiple of the world size, or
            start_step past the epoch.
    """
    import ray  # noqa: PLC0415
    import ray.data  # noqa: PLC0415

    steps = index.layout.steps(spec.global_batch)
    if steps == 0:
        raise ValueError(f"view {index.view!r}: {index.num_rows} rows < one global batch of {spec.global_batch}; "
                         "lower train.micro_batch_size")
    rank_positions(0, rank, world_size, spec.global_batch)  # validates the split
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} not in [0, {steps}]")
    spt = loader.steps_per_task
    num_tasks = math.ceil((steps - start_step) / spt)
    tok = tokenize_fn or _default_tokenize

    def run_task(batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        reader = _shared_reader(index)
        for t in batch["id"].tolist():
            k0 = start_step + int(t) * spt
            for k in range(k0, min(k0 + spt, steps)):
                yield build_micro_batch(reader, spec, seed, epoch, k, rank, world_size, tok)

    # from_items, not ray.data.range: a read task would need a CPU of its own, and inside a Ray
    # Train worker on a small node every CPU may already be held by the training workers.
    ds = ray.data.from_items([{"id": i} for i in range(max(num_tasks, 1))], override_num_blocks=max(num_tasks, 1))
    if num_tasks == 0:  # resumed exactly at the end of the epoch
        ds = ds.limit(0)
    extra: dict[str, Any] = {}
    if loader.max_tasks_in_flight is not None:
        extra["compute"] = ray.data.TaskPoolStrategy(size=loader.max_tasks_in_flight)
    if loader.node_local and ray.is_initialized():
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: PLC0415

        extra["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                      soft=True)
    ds = ds.map_batches(run_task, batch_size=1, num_cpus=loader.cpus_per_task, **extra)
    # Batches must come out in order: the step number is the checkpointed data position.
    ds.context.execution_options.preserve_order = True
    return ds


def iter_rank_batches(index: ViewIndex, spec: BatchSpec, loader: LoaderConfig, seed: int, epoch: int, rank: int,
                      world_size: int, start_step: int = 0, tokenize_fn: TokenizeFn | None = None,
                      device: str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """Torch micro batches of this rank from `start_step` (layout in the module docstring).

    Each batch's `step` column tells the trainer which global batch it is; after a checkpoint
    taken once step s is consumed, resume with start_step = s + 1.
    """
    ds = make_rank_dataset(index, spec, loader, seed, epoch, rank, world_size, start_step, tokenize_fn)
    m = spec.global_batch // world_size
    expect = start_step
    for batch in ds.iter_torch_batches(batch_size=m, drop_last=True, device=device,
                                       prefetch_batches=loader.prefetch_batches):
        step = batch["step"]
        # Every task yields whole micro batches in order, so a batch is exactly one step.
        assert bool((step == expect).all()), f"batch misaligned: expected step {expect}, got {step.tolist()}"
        expect += 1
        yield batch
