"""Fine-tuning batches from a downstream retrieval split, per rank (pure; no Ray).

Order is a pure function of (seed, epoch): a permutation of the split's videos cut into global
batches of `micro_batch x world_size`, rank r taking its slice, the last partial batch dropped
(as the official DistributedSampler + drop_last). So a run resumed at step k reads exactly the
batches it would have read. Each visit draws ONE caption of the video and the official frame
jitter (spec 3.2/3.3: MSR-VTT 9k, "one random caption per video per visit"), both from a
generator keyed by (seed, epoch, position), so they do not depend on threads or restarts.

Videos are decoded on the fly with PyAV (as the official code reads with decord each step), a
few at a time in threads (the decoder releases the GIL); the next batch is decoded while the
current one trains. With a FrameCache (`data.cache_decoded_mb`) a worker keeps every resized
frame of the clips it has decoded, until the budget is spent, and samples later visits from
memory: small splits (the synthetic one, or low-resolution frames) then decode once per run
instead of once per epoch; large ones fall back to decoding only the sampled frames. A video that fails to decode
(an S3 read that failed through our retries included) is replaced by the next good one in the epoch's order, and
counted. s3:// videos are read with `RetrievalLoaderSpec.opts` (the job's `storage`).

Shape legend: B micro batch, T frames, H = W = size, N text length.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.sampling import BadSample, clip_hash, sample_frame_indices
from pipeline.eval.formats import RetrievalItem
from pipeline.eval.video import decode_all, load_clip
from pipeline.model.tokenizer import tokenize
from pipeline.utils.fs import S3Options

_STREAM = 0x5EED_F17E


@dataclass(frozen=True, slots=True)
class RetrievalLoaderSpec:
    """What a fine-tuning worker's loader needs, derived from the job's config (train, model and
    data sections; `pipeline.config.FinetuneJobConfig`) so the loader never reads the config."""

    video_format: str
    num_frames: int
    size_px: int
    max_text_len: int
    micro_batch: int
    seed: int
    decode_threads: int = 2
    opts: S3Options | None = None
    """How to reach S3 for s3:// videos (`S3Options.of(job.storage)`); None: defaults."""


class FrameCache:
    """clip_id -> all resized frames [F, H, W, 3], filled until `budget_bytes` is spent (no eviction:
    a full cache stops growing instead of churning)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self.frames: dict[str, np.ndarray] = {}
        self.lock = threading.Lock()

    def clip(self, item: RetrievalItem, cfg: RetrievalLoaderSpec, rng: np.random.Generator) -> np.ndarray:
        with self.lock:
            cached = self.frames.get(item.clip_id)
            room = self.used < self.budget
        if cached is None and not room:
            return load_clip(item, cfg.video_format, cfg.num_frames, cfg.size_px, True, rng, opts=cfg.opts)
        if cached is None:
            cached = decode_all(item, cfg.video_format, cfg.size_px, opts=cfg.opts)
            with self.lock:
                if self.used + cached.nbytes <= self.budget:
                    self.frames[item.clip_id] = cached
                    self.used += cached.nbytes
                else:
                    self.used = self.budget  # full: later misses decode only the sampled frames
        return cached[sample_frame_indices(len(cached), cfg.num_frames, True, rng)]


def holdout_split(items: Sequence[RetrievalItem], num_val: int, seed: int) -> tuple[list[RetrievalItem],
                                                                                     list[RetrievalItem]]:
    """(train, val): `num_val` videos held out by a seeded hash of their clip id (stable when
    the file order changes or videos are added)."""
    if num_val >= len(items):
        raise ValueError(f"val_holdout {num_val} leaves no training videos out of {len(items)}")
    keys = sorted(range(len(items)), key=lambda i: zlib.crc32(f"{seed}:{items[i].clip_id}".encode()))
    held = set(keys[:num_val])
    return ([it for i, it in enumerate(items) if i not in held], [it for i, it in enumerate(items) if i in held])


def steps_per_epoch(num_items: int, world_size: int, micro_batch: int) -> int:
    return num_items // (world_size * micro_batch)


def epoch_order(num_items: int, seed: int, epoch: int, groups: Sequence[Sequence[int]] = ()) -> np.ndarray:
    """A permutation of the split's item indices; with `groups`, each group's members come next to
    each other (a random order of groups and single items), so a group lands in one global batch
    unless it straddles a batch boundary (never when every video is in a pair and the batch is even)."""
    rng = np.random.default_rng([seed, epoch, _STREAM])
    if not groups:
        return rng.permutation(num_items)
    grouped = {i for g in groups for i in g}
    units = [list(g) for g in groups] + [[i] for i in range(num_items) if i not in grouped]
    return np.array([i for u in rng.permutation(len(units)) for i in units[u]], dtype=np.int64)


def resolve_groups(items: Sequence[RetrievalItem], groups: Sequence[Sequence[str]]) -> tuple[list[list[int]], int]:
    """Clip-id groups -> index groups of `items` (ids not in the split, e.g. held out, drop out;
    groups left with one member are no groups); also the number of ids not found."""
    index = {it.clip_id: i for i, it in enumerate(items)}
    seen: set[int] = set()
    out, missing = [], 0
    for group in groups:
        members = [index[c] for c in group if c in index]
        missing += len(group) - len(members)
        if seen & set(members) or len(set(members)) != len(members):
            raise ValueError(f"batch group {list(group)} shares a video with another group or repeats one")
        seen.update(members)
        if len(members) > 1:
            out.append(members)
    return out, missing


class RankBatches:
    """This rank's micro batches of one epoch, from `start_step` on, decoded ahead in threads."""

    def __init__(self, items: Sequence[RetrievalItem], cfg: RetrievalLoaderSpec, epoch: int, rank: int,
                 world_size: int, cache: FrameCache | None = None, groups: Sequence[Sequence[int]] = ()) -> None:
        self.items = list(items)
        self.cache = cache
        self.cfg = cfg
        self.epoch = epoch
        self.rank = rank
        self.world = world_size
        self.order = epoch_order(len(self.items), cfg.seed, epoch, groups)
        self.spe = steps_per_epoch(len(self.items), world_size, cfg.micro_batch)

    def positions(self, step: int) -> np.ndarray:
        first = (step * self.world + self.rank) * self.cfg.micro_batch
        return np.arange(first, first + self.cfg.micro_batch)

    def _sample(self, position: int) -> tuple[np.ndarray, str, int, int]:
        """(frames, caption, clip hash, videos skipped) for one position of the epoch order."""
        rng = np.random.default_rng([self.cfg.seed, self.epoch, position, _STREAM + 1])
        for skipped in range(len(self.order)):
            item = self.items[self.order[(position + skipped) % len(self.order)]]
            try:
                if self.cache is not None:
                    frames = self.cache.clip(item, self.cfg, rng)
                else:
                    frames = load_clip(item, self.cfg.video_format, self.cfg.num_frames, self.cfg.size_px, True, rng,
                                       opts=self.cfg.opts)
            except BadSample as e:
                print(f"[finetune] skipping {item.clip_id}: {e}", flush=True)
                continue
            text = item.texts[int(rng.integers(len(item.texts)))]
            return frames, text, clip_hash(item.clip_id), skipped
        raise BadSample("no video of the split can be decoded")

    def _batch(self, pool: ThreadPoolExecutor, step: int) -> list[Future]:
        return [pool.submit(self._sample, int(p)) for p in self.positions(step)]

    def __call__(self, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        if start_step >= self.spe:
            return
        with ThreadPoolExecutor(self.cfg.decode_threads) as pool:
            pending = self._batch(pool, start_step)
            for step in range(start_step, self.spe):
                samples = [f.result() for f in pending]
                if step + 1 < self.spe:
                    pending = self._batch(pool, step + 1)
                frames_BTHWC = torch.from_numpy(np.stack([s[0] for s in samples]))
                ids_BN, mask_BN = tokenize([s[1] for s in samples], self.cfg.max_text_len)
                yield {"frames": frames_BTHWC, "text_ids": ids_BN,
                       "text_mask": mask_BN, "clip_id": torch.tensor([s[2] for s in samples], dtype=torch.int64),
                       "skipped": torch.tensor([s[3] for s in samples], dtype=torch.int64)}
