"""Pure cores of the training loader: epoch order, rank plans, frame sampling, decode, substitution.

No Ray and no I/O here; `loader.py` wraps these in a Ray Data pipeline. Everything is a pure
function of its arguments so a resumed run rebuilds exactly the batches it would have seen.

Epoch order (a pure function of seed, epoch, world size W, micro batch m, window size w):
1. Shards are permuted by 64-bit hash keys of (seed, epoch, shard index).
2. Consecutive runs of `w` permuted shards form windows; the valid rows of a window are permuted
   jointly by hash keys of (seed, epoch, shard, row). Concatenating the windows gives the block
   sequence S (N entries). Keys come from a bijective 64-bit mix (splitmix64), so there are no
   ties and the order does not depend on numpy's RNG implementation.
3. With G = m * W and steps = N // G (drop_last), rank r owns the contiguous chunk
   S[r*L, (r+1)*L), L = steps * m. Global batch k, i.e. order positions [k*G, (k+1)*G), is the
   concatenation over r of rank r's k-th micro slice S[r*L + k*m, r*L + (k+1)*m). The N - steps*G
   entries left, S[W*L:], fill the order positions after steps*G and are dropped this epoch.
   Why contiguous chunks rather than the plain S[k*G + r*m ...] split: each rank then reads its
   own run of windows (a shard is read by at most two ranks instead of all W), and a global batch
   mixes W distant windows instead of one, which reduces same-video negatives.

Frame sampling follows CLIP-ViP `get_sample_idx` (clipvip_spec.md 3.2); the jitter's randomness
comes from a generator seeded by (seed, epoch, order position), so no RNG state is checkpointed.

Shape legend: B batch, T frames, C = 3 channels, H x W pixels, N rows, E plan entries.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_STREAM_SHARDS = 1
_STREAM_ROWS = 2
_STREAM_JITTER = 3

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# What PIL raises on undecodable bytes (UnidentifiedImageError and truncation are OSErrors).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class BadSample(ValueError):
    """A row whose stored frames cannot be decoded (or that has no caption)."""


# ---------------------------------------------------------------------------------------------
# Hash keys


def _mix64_int(x: int) -> int:
    x &= MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def stream_key(seed: int, epoch: int, stream: int) -> int:
    """64-bit key of one random stream (shard order, row order, ...) of one epoch."""
    h = 0
    for v in (seed, epoch, stream):
        h = _mix64_int(h ^ ((v & MASK64) + _GOLDEN))
    return h


def hash_keys(ids: np.ndarray, key: int) -> np.ndarray:
    """splitmix64(key + id * golden) for each id: a bijection of the uint64 ids, so no ties.

    Args:
        ids: [N] non-negative integer ids.
        key: stream key from `stream_key`.

    Returns:
        [N] uint64 keys.
    """
    x = ids.astype(np.uint64, copy=False)
    with np.errstate(over="ignore"):
        x = np.uint64(key) + x * np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def clip_hash(clip_id: str) -> int:
    """Stable signed int64 of a clip id (process- and platform-independent, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(clip_id.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


# ---------------------------------------------------------------------------------------------
# Epoch order and rank plans


@dataclass(frozen=True)
class ShardLayout:
    """Which rows exist: shard indices, their row counts, and rows excluded up front.

    Attributes:
        shard_ids: [S] shard (unit) indices, as in `part-NNNNN`.
        num_rows: [S] rows in each shard.
        excluded: shard index -> sorted rows never scheduled (e.g. null caption).
    """

    shard_ids: np.ndarray
    num_rows: np.ndarray
    excluded: dict[int, np.ndarray] = field(default_factory=dict)

    def valid_rows(self, i: int) -> np.ndarray:
        """Rows of the i-th shard (position in `shard_ids`) that take part in the order."""
        rows = np.arange(int(self.num_rows[i]), dtype=np.int64)
        bad = self.excluded.get(int(self.shard_ids[i]))
        return rows if bad is None or len(bad) == 0 else np.setdiff1d(rows, bad, assume_unique=True)

    def num_valid(self, i: int) -> int:
        bad = self.excluded.get(int(self.shard_ids[i]))
        return int(self.num_rows[i]) - (0 if bad is None else len(bad))

    @property
    def total(self) -> int:
        """N: rows taking part in the order."""
        return sum(self.num_valid(i) for i in range(len(self.shard_ids)))


def _layout(index: Any) -> ShardLayout:
    return index if isinstance(index, ShardLayout) else index.layout


def steps_per_epoch(index: Any, world_size: int, micro_batch: int) -> int:
    """floor(N / G), G = micro_batch * world_size (drop_last: every batch has exactly G rows)."""
    if world_size < 1 or micro_batch < 1:
        raise ValueError(f"world_size and micro_batch must be >= 1, got {world_size}, {micro_batch}")
    return _layout(index).total // (micro_batch * world_size)


def block_sequence(index: Any, seed: int, epoch: int, window_shards: int, lo: int = 0,
                   hi: int | None = None) -> np.ndarray:
    """Entries S[lo:hi] of the block-shuffled sequence (module docstring, steps 1-2).

    Only the windows that overlap [lo, hi) are permuted, so a rank pays for its chunk only.

    Returns:
        [hi - lo, 2] int64 (shard index, row).
    """
    lay = _layout(index)
    if window_shards < 1:
        raise ValueError(f"window_shards must be >= 1, got {window_shards}")
    perm = np.argsort(hash_keys(lay.shard_ids, stream_key(seed, epoch, _STREAM_SHARDS)), kind="stable")
    sizes = np.array([lay.num_valid(int(i)) for i in perm], dtype=np.int64)
    n = int(sizes.sum())
    hi = n if hi is None else min(hi, n)
    if lo >= hi:
        return np.zeros((0, 2), dtype=np.int64)
    row_key = stream_key(seed, epoch, _STREAM_ROWS)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    parts = []
    for w0 in range(0, len(perm), window_shards):
        w1 = min(w0 + window_shards, len(perm))
        a, b = int(starts[w0]), int(starts[w1])
        if b <= lo or a >= hi or a == b:
            continue
        shards = np.concatenate([np.full(lay.num_valid(int(i)), lay.shard_ids[i], dtype=np.int64)
                                 for i in perm[w0:w1]])
        rows = np.concatenate([lay.valid_rows(int(i)) for i in perm[w0:w1]])
        uid = (shards << np.int64(32)) | rows  # a row's identity does not depend on other shards
        within = np.argsort(hash_keys(uid, row_key), kind="stable")
        win = np.stack([shards[within], rows[within]], axis=1)
        parts.append(win[max(lo - a, 0):min(hi, b) - a])
    return np.concatenate(parts, axis=0)


def epoch_order(index: Any, seed: int, epoch: int, world_size: int, micro_batch: int,
                window_shards: int = 4) -> np.ndarray:
    """The full epoch order (module docstring, step 3): order[p] is the entry at position p.

    Returns:
        [N, 2] int64 (shard index, row); a permutation of all valid rows.
    """
    seq = block_sequence(index, seed, epoch, window_shards)
    steps = steps_per_epoch(index, world_size, micro_batch)
    per_rank = steps * micro_batch
    head = seq[:world_size * per_rank].reshape(world_size, steps, micro_batch, 2)
    # head[r, k] is rank r's k-th micro slice; global batch k lists them rank after rank.
    return np.concatenate([head.transpose(1, 0, 2, 3).reshape(-1, 2), seq[world_size * per_rank:]], axis=0)


def rank_plan(index: Any, seed: int, epoch: int, rank: int, world_size: int, micro_batch: int,
              start_step: int = 0, window_shards: int = 4) -> np.ndarray:
    """The entries rank `rank` consumes from step `start_step` to the end of the epoch.

    Entry i is the sample at order position `plan_positions(...)[i]`; step k's micro batch is
    entries [(k - start_step) * m, (k - start_step + 1) * m).

    Returns:
        [(steps - start_step) * m, 2] int64 (shard index, row).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    steps = steps_per_epoch(index, world_size, micro_batch)
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} not in [0, {steps}] (steps per epoch)")
    per_rank = steps * micro_batch
    return block_sequence(index, seed, epoch, window_shards,
                          rank * per_rank + start_step * micro_batch, (rank + 1) * per_rank)


def plan_positions(rank: int, world_size: int, micro_batch: int, start_step: int, num_entries: int) -> np.ndarray:
    """Order positions of a rank plan's entries: k*G + rank*m + j for step k, slot j.

    Returns:
        [num_entries] int64.
    """
    i = np.arange(num_entries, dtype=np.int64)
    k = start_step + i // micro_batch
    return k * micro_batch * world_size + rank * micro_batch + i % micro_batch


# ---------------------------------------------------------------------------------------------
# Frames


def jitter_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The generator behind one sample's frame jitter: reproducible from its order position."""
    return np.random.default_rng([seed & MASK64, epoch, position, _STREAM_JITTER])


def sample_frame_indices(num_available: int, num_frames: int, train: bool,
                         rng: np.random.Generator | None = None) -> np.ndarray:
    """CLIP-ViP `get_sample_idx` with sample_rate 0 (clipvip_spec.md 3.2).

    Train: interval = int(F / (T - 1)); start ~ U{0..interval}; end ~ U{F-1-interval..F-1};
    linspace(start, end, T) truncated. Eval: linspace(0, F-1, T) truncated. Indices are clipped
    into [0, F-1]: for T = 2 the official bounds reach F and -1; for F < T indices repeat.

    Args:
        num_available: F, stored frames of the clip (>= 1).
        num_frames: T, frames to return (>= 1).
        train: jittered (True) or uniform (False).
        rng: required when train; draws start then end.

    Returns:
        [T] int64 indices into the stored frames, non-decreasing.
    """
    if num_available < 1:
        raise BadSample("clip has no frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    last = num_available - 1
    if not train or num_frames == 1:
        if num_frames == 1:
            return np.array([last // 2], dtype=np.int64)
        return np.linspace(0, last, num_frames).astype(int).astype(np.int64)
    if rng is None:
        raise ValueError("train sampling needs an rng (jitter_rng)")
    interval = int(num_available / (num_frames - 1))
    start = int(rng.integers(0, interval + 1))
    end = int(rng.integers(last - interval, last + 1))
    idx = np.linspace(start, end, num_frames).astype(int)
    return np.clip(idx, 0, last).astype(np.int64)


def decode_resize(jpeg: bytes, size_px: int) -> np.ndarray:
    """Decode one JPEG and squash-resize it (bicubic, no aspect-preserving crop), as CLIP-ViP.

    Returns:
        [C, size_px, size_px] uint8.

    Raises:
        BadSample: the bytes do not decode.
    """
    try:
        with Image.open(io.BytesIO(jpeg)) as img:
            rgb = img.convert("RGB").resize((size_px, size_px), Image.Resampling.BICUBIC)
    except DECODE_ERRORS as e:
        raise BadSample(f"undecodable frame: {type(e).__name__}: {e}") from e
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()


def transform_clip(frames: Sequence[bytes], middle_frame: bytes, num_frames: int, size_px: int,
                   train: bool, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """One clip's model inputs: T sampled frames and the middle frame, uint8 (normalise later).

    Only the sampled frames are decoded.

    Returns:
        frames_TCHW: [T, C, H, W] uint8.
        middle_CHW: [C, H, W] uint8.

    Raises:
        BadSample: no frames, or a needed JPEG does not decode.
    """
    idx = sample_frame_indices(len(frames), num_frames, train, rng)
    decoded: dict[int, np.ndarray] = {}
    for i in idx.tolist():
        if i not in decoded:  # F < T repeats indices; decode each once
            decoded[i] = decode_resize(frames[i], size_px)
    frames_TCHW = np.stack([decoded[i] for i in idx.tolist()], axis=0)
    return frames_TCHW, decode_resize(middle_frame, size_px)


def normalize_clip(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> CLIP-normalised float32, on whatever device x lives (run on the trainer).

    Args:
        x_uint8: [..., C, H, W] uint8, C = 3 (e.g. frames [B, T, C, H, W]).

    Returns:
        Same shape, float32: (x / 255 - mean) / std per channel.
    """
    mean = torch.tensor(CLIP_MEAN, device=x_uint8.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x_uint8.device).view(3, 1, 1)
    return (x_uint8.float() / 255.0 - mean) / std


# ---------------------------------------------------------------------------------------------
# Bad rows


def substitute_slots(good: np.ndarray) -> np.ndarray:
    """Donor slot for each slot of one micro batch: itself if good, else the next good slot.

    "Next" is cyclic in slot order (j+1, ..., m-1, 0, ..., j-1). The result depends only on
    which slots are good, so a batch is the same whether the stream started at its step or
    earlier (exact resume), and the batch keeps its fixed size.

    Args:
        good: [m] bool.

    Returns:
        [m] int64 donor slot per slot; all -1 when no slot is good (caller falls back).
    """
    m = len(good)
    good_slots = np.flatnonzero(good)
    if len(good_slots) == 0:
        return np.full(m, -1, dtype=np.int64)
    slots = np.arange(m)
    nxt = np.searchsorted(good_slots, slots)  # first good slot >= j
    return np.where(nxt < len(good_slots), good_slots[np.minimum(nxt, len(good_slots) - 1)],
                    good_slots[0]).astype(np.int64)
