"""Training-side data loading: a dataset root + one caption set -> this rank's micro batches.

Plan of one rank's stream (cardinalities in brackets):
    driver   DatasetIndex.open: manifest, caption set, shard indexes (4 reads); null-caption rows excluded
    driver   rank_plan (sampling.py): this rank's (shard, row) entries of the epoch    [steps * m]
    stage 1  ray.data.range(num_tasks): one row per task of `steps_per_task` steps      [1 per task]
    stage 2  map_batches task on a Ray worker: read the row groups holding its entries
             (projected columns), decode + sample frames, tokenise                   [1 : steps_per_task]
    trainer  iter_torch_batches(batch_size=m, drop_last), preserve_order              [1 batch per step]
Rows read per row used is about window rows / (steps_per_task * m) when that exceeds 1 (row
groups hold 32 rows and a window's rows are interleaved), so a task should cover about a window.

Bad rows: a null caption is known up front, so the index excludes the row from the order. A row
whose needed JPEGs do not decode is found at decode time; its slot takes a copy of the next good
slot of the same micro batch (cyclic, `sampling.substitute_slots`) or, if the whole micro batch is
bad, of the next good samples of this rank's plan after that step (cyclic). Batches keep their
size, their content is a pure function of data + seed and never depends on earlier batches, so a
stream resumed at step s equals the uninterrupted one. A substituted slot has `skipped = 1`
(metric `skipped_rows` = the sum) and the donor's `clip_id`, so the loss's duplicate mask makes
the copy a positive, not a negative.

Batch layout (B = micro_batch, T = num_frames, H = W = image_size_px, L = max_text_len):
    frames [B, T, 3, H, W] uint8, middle_frame [B, 3, H, W] uint8 (normalise on the trainer with
    `normalize_clip`), subtitle_ids / subtitle_mask / caption_ids / caption_mask [B, L] int64,
    clip_id [B] int64 (stable hash), position [B] int64 (order position of the slot),
    step [B] int64 (same value in a batch), skipped [B] int64 (0/1).
"""

from __future__ import annotations

import math
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.data.index import FRAMES, captions_kind, read_index
from pipeline.data.root import DatasetRoot, Shard
from pipeline.data.sampling import (BadSample, ShardLayout, clip_hash, jitter_rng, plan_positions, rank_plan,
                                    substitute_slots, transform_clip)
from pipeline.utils import fs

if TYPE_CHECKING:
    import ray.data
    import torch

TokenizeFn = Callable[[list[str], int], "tuple[torch.Tensor, torch.Tensor]"]

# Columns the loader reads (projection) and the Arrow types it accepts for them.
FRAME_COLUMNS = ("clip_id", "subtitle", "frames", "middle_frame")
CAPTION_COLUMNS = ("clip_id", "caption")


@dataclass(frozen=True, kw_only=True, slots=True)
class LoaderConfig:
    """Training loader settings (to move into pipeline/config.py as `LoaderConfig`)."""

    caption_set: str = "default"
    micro_batch: int = 32
    """Clips per rank per step; G = micro_batch * world_size is the InfoNCE batch."""
    num_frames: int = 12
    image_size_px: int = 224
    max_text_len: int = 70
    train_sampling: bool = True
    """Jittered frame sampling (pre-training); False = uniform (eval)."""
    window_shards: int = 4
    """Shards whose rows are shuffled jointly; larger mixes more videos per micro batch."""
    steps_per_task: int = 16
    """Micro batches per Ray task; aim for steps_per_task * micro_batch ~ rows of a window."""
    num_cpus_per_task: float = 1.0
    max_tasks_in_flight: int | None = None
    prefetch_batches: int = 2
    row_group_cache: int = 32
    """Row groups (32 rows each) a worker process keeps read (LRU); ~ one window."""

    def __post_init__(self) -> None:
        for name in ("micro_batch", "num_frames", "image_size_px", "window_shards", "steps_per_task",
                     "prefetch_batches", "row_group_cache"):
            if getattr(self, name) < 1:
                raise ValueError(f"loader.{name} must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.max_text_len <= 77:
            raise ValueError(f"loader.max_text_len must be in [2, 77], got {self.max_text_len}")


# ---------------------------------------------------------------------------------------------
# Index


@dataclass(frozen=True)
class DatasetIndex:
    """What the loader knows about a root before reading any frames (plain data, ships to Ray).

    Built from the root's manifest, the caption set's `caption_set.json` and the two shard
    indexes: four object reads whatever the number of shards, on the driver and on every rank.

    Attributes:
        root: dataset root (local path or s3://).
        caption_set: caption set joined to the frames by shard position.
        opts: how to reach S3.
        layout: shard ordinals (index order), rows per shard and excluded (null-caption) rows.
        part_names: metadata parts in registration order.
        shard_part / shard_unit: [S] part (position in part_names) and unit of each ordinal.
        num_null_captions: rows excluded because their caption is null.
        fingerprint: the root's frames fingerprint (from manifest.json).
        token: unique per open(); keys worker-side caches so they never outlive this index.
    """

    root: str
    caption_set: str
    opts: fs.S3Options
    layout: ShardLayout
    part_names: tuple[str, ...]
    shard_part: np.ndarray
    shard_unit: np.ndarray
    num_null_captions: int
    fingerprint: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def num_rows(self) -> int:
        """N: rows that take part in the epoch order."""
        return self.layout.total

    def shard(self, ordinal: int) -> Shard:
        return Shard(self.part_names[int(self.shard_part[ordinal])], int(self.shard_unit[ordinal]))

    @classmethod
    def open(cls, root: str, caption_set: str, opts: fs.S3Options | None = None) -> DatasetIndex:
        """Read manifest, caption set and both shard indexes; fail fast on anything unusable.

        Raises:
            ValueError: root not prepared or incomplete; caption set missing (the message lists
                the sets that exist), incomplete, or made from other frames; a part missing, with
                another row count or other clip ids than its frame shard.
        """
        droot = DatasetRoot(root, opts)
        manifest = droot.open()
        _open_caption_set(droot, caption_set, manifest)
        order = droot.parts(manifest)
        frames = read_index(droot, FRAMES, order, pending=False)
        caps = read_index(droot, captions_kind(caption_set), order, pending=False)
        f_keys = list(zip(frames.column("part").to_pylist(), frames.column("unit").to_pylist()))
        c_rows = {k: i for i, k in enumerate(zip(caps.column("part").to_pylist(), caps.column("unit").to_pylist()))}
        missing = [f"{p}/{schema.part_name(u)}" for p, u in f_keys if (p, u) not in c_rows]
        if missing:
            raise ValueError(f"caption set {caption_set!r} is incomplete: no part for {len(missing)} frame shards "
                             f"(first: {missing[:3]}) under {droot.caption_set_dir(caption_set)}; run recaption")
        rows = frames.column("rows").to_pylist()
        f_sha = frames.column("clip_ids_sha256").to_pylist()
        c_rows_col, c_sha, nulls = (caps.column(c).to_pylist() for c in ("rows", "clip_ids_sha256", "null_rows"))
        excluded: dict[int, np.ndarray] = {}
        for ordinal, key in enumerate(f_keys):
            c = c_rows[key]
            name = f"{key[0]}/{schema.part_name(key[1])}"
            if c_rows_col[c] != rows[ordinal]:
                raise ValueError(f"caption set {caption_set!r} part {name} has {c_rows_col[c]} rows but the frame "
                                 f"shard has {rows[ordinal]}")
            if c_sha[c] != f_sha[ordinal]:
                raise ValueError(f"caption set {caption_set!r} part {name} lists other clip ids (or another order) "
                                 f"than its frame shard; the set is misaligned, recaption it")
            if nulls[c]:
                excluded[ordinal] = np.array(nulls[c], dtype=np.int64)
        part_pos = {p: i for i, p in enumerate(order)}
        layout = ShardLayout(shard_ids=np.arange(len(f_keys), dtype=np.int64),
                             num_rows=np.array(rows, dtype=np.int64), excluded=excluded)
        return cls(root=root, caption_set=caption_set, opts=droot.opts, layout=layout, part_names=tuple(order),
                   shard_part=np.array([part_pos[p] for p, _ in f_keys], dtype=np.int32),
                   shard_unit=np.array([u for _, u in f_keys], dtype=np.int32),
                   num_null_captions=sum(len(r) for r in excluded.values()),
                   fingerprint=str(manifest.get("fingerprint", "")))


def _open_caption_set(root: DatasetRoot, name: str, manifest: dict[str, Any]) -> dict[str, Any]:
    meta = fs.read_json_or_none(root.caption_set_uri(name), root.opts)
    if meta is None:
        from pipeline.data.captions import caption_set_names  # noqa: PLC0415

        raise ValueError(f"caption set {name!r} not found under {root.path('captions')}; "
                         f"existing sets: {caption_set_names(root) or 'none'}")
    if meta.get("status") != "complete":
        raise ValueError(f"caption set {name!r} is incomplete (status {meta.get('status')!r}); "
                         "finish it with prepare/recaption before training")
    want = manifest.get("fingerprint")
    if meta.get("frames_fingerprint") not in (None, want):
        raise ValueError(f"caption set {name!r} was made from other frames "
                         f"({meta.get('frames_fingerprint')} != {want}); recaption this root")
    return meta


# ---------------------------------------------------------------------------------------------
# Reading rows (runs in Ray workers; no Ray import)


class ShardReader:
    """Reads single rows by (shard, row): only the row groups that hold them, projected columns.

    Keeps the open Parquet files of the last few shards and an LRU of row groups, so the next
    task on the same window (block shuffle) reuses them. Counts rows read vs rows asked for.
    """

    def __init__(self, index: DatasetIndex, max_row_groups: int = 64, max_files: int = 16) -> None:
        self.index = index
        self.max_row_groups, self.max_files = max_row_groups, max_files
        self._files: OrderedDict[str, tuple[pq.ParquetFile, np.ndarray]] = OrderedDict()
        self._groups: OrderedDict[tuple[str, int], dict[str, list[Any]]] = OrderedDict()
        self.rows_read = 0
        self.rows_asked = 0

    def _file(self, uri: str) -> tuple[pq.ParquetFile, np.ndarray]:
        if uri in self._files:
            self._files.move_to_end(uri)
            return self._files[uri]
        filesystem, path = fs.resolve(uri, self.index.opts)
        pf = pq.ParquetFile(filesystem.open_input_file(path))
        meta = pf.metadata
        starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
        self._files[uri] = (pf, starts)
        while len(self._files) > self.max_files:
            self._files.popitem(last=False)
        return pf, starts

    def _cell(self, uri: str, columns: tuple[str, ...], row: int) -> dict[str, Any]:
        pf, starts = self._file(uri)
        rg = int(np.searchsorted(starts, row, side="right")) - 1
        key = (uri, rg)
        if key not in self._groups:
            table = pf.read_row_group(rg, columns=list(columns), use_threads=False)
            self._groups[key] = {c: table.column(c).to_pylist() for c in columns}
            self.rows_read += table.num_rows
            while len(self._groups) > self.max_row_groups:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        group = self._groups[key]
        return {c: group[c][row - int(starts[rg])] for c in columns}

    def read(self, shard: int, row: int) -> dict[str, Any]:
        """One sample's raw fields: clip_id, subtitle, frames (list of JPEG bytes), middle_frame, caption.

        Raises:
            ValueError: the caption part's row is another clip than the frame row (misaligned set).
        """
        idx = self.index
        self.rows_asked += 1
        droot = DatasetRoot(idx.root, idx.opts)
        out = self._cell(droot.frames_uri(idx.shard(shard)), FRAME_COLUMNS, row)
        cap = self._cell(droot.caption_uri(idx.caption_set, idx.shard(shard)), CAPTION_COLUMNS, row)
        if cap["clip_id"] != out["clip_id"]:
            raise ValueError(f"caption set {idx.caption_set!r} misaligned at {idx.shard(shard).stem} row {row}: "
                             f"{cap['clip_id']!r} != {out['clip_id']!r}")
        out["caption"] = cap["caption"]
        return out


_READERS: OrderedDict[tuple[str, int], ShardReader] = OrderedDict()


def _shared_reader(index: DatasetIndex, max_row_groups: int) -> ShardReader:
    # One reader per worker process and opened index, so consecutive tasks share its cache.
    key = (index.token, max_row_groups)
    if key not in _READERS:
        _READERS[key] = ShardReader(index, max_row_groups=max_row_groups)
        while len(_READERS) > 2:
            _READERS.popitem(last=False)
    return _READERS[key]


# ---------------------------------------------------------------------------------------------
# One micro batch (pure given the rows; runs in Ray workers)


def _transform_row(row: dict[str, Any], cfg: LoaderConfig, seed: int, epoch: int,
                   position: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(frames, middle) of one row, or None for a bad row (null caption, undecodable JPEG)."""
    if row["caption"] is None or not row["frames"]:
        return None
    rng = jitter_rng(seed, epoch, position) if cfg.train_sampling else None
    try:
        return transform_clip(row["frames"], row["middle_frame"], cfg.num_frames, cfg.image_size_px,
                              cfg.train_sampling, rng)
    except BadSample:
        return None


def _fallback_donors(reader: ShardReader, plan: np.ndarray, step: int, cfg: LoaderConfig, seed: int,
                     epoch: int, positions: np.ndarray) -> list[tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]]:
    """Up to m good samples scanning this rank's plan forward from step + 1 (cyclic over the epoch).

    Only used when every row of a micro batch is bad. Each donor keeps its own plan position's
    jitter, so the scan result is the same wherever the stream started.

    Raises:
        RuntimeError: no row of this rank's whole epoch plan decodes.
    """
    m = cfg.micro_batch
    found: list[tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]] = []
    start = (step + 1) * m
    for i in range(len(plan) - m):
        e = (start + i) % len(plan)
        row = reader.read(int(plan[e, 0]), int(plan[e, 1]))
        out = _transform_row(row, cfg, seed, epoch, int(positions[e]))
        if out is not None:
            found.append((row, out))
            if len(found) == m:
                break
    if not found:
        raise RuntimeError(f"no row of this rank's epoch plan decodes ({len(plan)} rows tried); "
                           f"the shards under {reader.index.root} look corrupt")
    return found


def build_micro_batch(reader: ShardReader, plan: np.ndarray, positions: np.ndarray, step: int,
                      cfg: LoaderConfig, seed: int, epoch: int, tokenize_fn: TokenizeFn) -> dict[str, np.ndarray]:
    """Read, decode and tokenise step `step` of a rank plan (bad rows handled per module docstring).

    Args:
        reader: row source.
        plan: [steps * m, 2] the rank's whole epoch plan (from step 0).
        positions: [steps * m] order positions of `plan`.
        step: which micro batch.

    Returns:
        Numpy columns of the batch layout in the module docstring, B = m rows.
    """
    m = cfg.micro_batch
    sl = slice(step * m, (step + 1) * m)
    rows = [reader.read(int(s), int(r)) for s, r in plan[sl]]
    outs = [_transform_row(row, cfg, seed, epoch, int(p)) for row, p in zip(rows, positions[sl], strict=True)]
    good = np.array([o is not None for o in outs])
    donors = substitute_slots(good)
    if donors[0] < 0:
        found = _fallback_donors(reader, plan, step, cfg, seed, epoch, positions)
        samples = [found[j % len(found)] for j in range(m)]
    else:
        samples = [(rows[d], outs[d]) for d in donors.tolist()]
    sub_ids, sub_mask = tokenize_fn([r["subtitle"] for r, _ in samples], cfg.max_text_len)
    cap_ids, cap_mask = tokenize_fn([r["caption"] for r, _ in samples], cfg.max_text_len)
    return {
        "frames": np.stack([o[0] for _, o in samples]),
        "middle_frame": np.stack([o[1] for _, o in samples]),
        "subtitle_ids": sub_ids.numpy(), "subtitle_mask": sub_mask.numpy(),
        "caption_ids": cap_ids.numpy(), "caption_mask": cap_mask.numpy(),
        "clip_id": np.array([clip_hash(r["clip_id"]) for r, _ in samples], dtype=np.int64),
        "position": positions[sl].astype(np.int64),
        "step": np.full(m, step, dtype=np.int64),
        "skipped": (~good).astype(np.int64),
    }


def _default_tokenize(texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    from pipeline.model.tokenizer import tokenize  # noqa: PLC0415  transformers only on workers

    return tokenize(texts, max_len)


# ---------------------------------------------------------------------------------------------
# Ray Data wrapper


def make_rank_dataset(index: DatasetIndex, loader_cfg: LoaderConfig, seed: int, epoch: int, rank: int,
                      world_size: int, start_step: int = 0,
                      tokenize_fn: TokenizeFn | None = None) -> ray.data.Dataset:
    """This rank's stream from `start_step` to the end of `epoch`, one micro batch per step, in order.

    Works on a plain driver and inside a Ray Train worker (the pipeline runs on the connected
    cluster either way). Consume it with `iter_rank_batches` or `iter_torch_batches(batch_size=m)`.

    Args:
        tokenize_fn: (texts, max_len) -> (ids [B, L], mask [B, L]); default the CLIP tokenizer.
            Must be picklable (it runs on Ray workers).

    Raises:
        ValueError: fewer rows than one global batch, or start_step past the epoch.
    """
    import ray.data  # noqa: PLC0415  keeps `import pipeline.data.loader` light for the pure helpers

    m = loader_cfg.micro_batch
    plan = rank_plan(index, seed, epoch, rank, world_size, m, 0, loader_cfg.window_shards)
    steps = len(plan) // m
    if steps == 0:
        raise ValueError(f"{index.root}: {index.num_rows} usable rows < one global batch "
                         f"({m} x {world_size} ranks); lower loader.micro_batch")
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} not in [0, {steps}]")
    positions = plan_positions(rank, world_size, m, 0, len(plan))
    spt = loader_cfg.steps_per_task
    num_tasks = math.ceil((steps - start_step) / spt)
    tok = tokenize_fn or _default_tokenize

    def run_task(batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        reader = _shared_reader(index, loader_cfg.row_group_cache)
        for t in batch["id"].tolist():
            k0 = start_step + int(t) * spt
            for k in range(k0, min(k0 + spt, steps)):
                yield build_micro_batch(reader, plan, positions, k, loader_cfg, seed, epoch, tok)

    # from_items, not ray.data.range: a read task would need a CPU of its own, and inside a Ray
    # Train worker on a small node every CPU may already be held by the training workers.
    ds = ray.data.from_items([{"id": i} for i in range(max(num_tasks, 1))], override_num_blocks=max(num_tasks, 1))
    if num_tasks == 0:  # resumed exactly at the end of the epoch
        ds = ds.limit(0)
    extra: dict[str, Any] = {}
    if loader_cfg.max_tasks_in_flight is not None:
        extra["compute"] = ray.data.TaskPoolStrategy(size=loader_cfg.max_tasks_in_flight)
    ds = ds.map_batches(run_task, batch_size=1, num_cpus=loader_cfg.num_cpus_per_task, **extra)
    # Batches must come out in plan order: the step number is the checkpointed data position.
    ds.context.execution_options.preserve_order = True
    return ds


def iter_rank_batches(index: DatasetIndex, loader_cfg: LoaderConfig, seed: int, epoch: int, rank: int,
                      world_size: int, start_step: int = 0, tokenize_fn: TokenizeFn | None = None,
                      device: str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """Torch micro batches of this rank from `start_step` (layout in the module docstring).

    Each batch's `step` column tells the trainer which step it is; after a checkpoint taken
    once step s is consumed, resume with start_step = s + 1.

    Yields:
        dict of tensors, B = loader_cfg.micro_batch rows; frames stay uint8 (see normalize_clip).
    """
    ds = make_rank_dataset(index, loader_cfg, seed, epoch, rank, world_size, start_step, tokenize_fn)
    expect = start_step
    for batch in ds.iter_torch_batches(batch_size=loader_cfg.micro_batch, drop_last=True, device=device,
                                       prefetch_batches=loader_cfg.prefetch_batches):
        step = batch["step"]
        # Every task yields whole micro batches in order, so a batch is exactly one step.
        assert bool((step == expect).all()), f"batch misaligned: expected step {expect}, got {step.tolist()}"
        expect += 1
        yield batch
