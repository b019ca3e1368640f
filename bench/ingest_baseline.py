"""The shard loader before training views (the baseline `bench/ingest.py` compares against): its
epoch order (shards permuted, rows shuffled jointly inside windows of `window_shards` shards, each
rank reading a contiguous chunk of the resulting sequence) and its transform (PIL decode + resize
of every sampled frame, channels-first copies, stacked). Kept only for that comparison.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.sampling import ShardLayout, decode_resize, hash_keys, sample_frame_indices, stream_key

_STREAM_SHARDS = 1
_STREAM_ROWS = 2


def steps_per_epoch(lay: ShardLayout, world_size: int, micro_batch: int) -> int:
    return lay.total // (micro_batch * world_size)


def block_sequence(index: ShardLayout, seed: int, epoch: int, window_shards: int, lo: int = 0,
                   hi: int | None = None) -> np.ndarray:
    """Entries S[lo:hi] of the block-shuffled sequence (module docstring, steps 1-2).

    Only the windows that overlap [lo, hi) are permuted, so a rank pays for its chunk only.

    Returns:
        [hi - lo, 2] int64 (shard index, row).
    """
    lay = index
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


def epoch_order(index: ShardLayout, seed: int, epoch: int, world_size: int, micro_batch: int,
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


def rank_plan(index: ShardLayout, seed: int, epoch: int, rank: int, world_size: int, micro_batch: int,
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




def transform_clip(frames: list[bytes], middle_frame: bytes, num_frames: int, size_px: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The transform before views: ([T, C, H, W], [C, H, W]) uint8, each frame PIL-decoded and resized."""
    idx = sample_frame_indices(len(frames), num_frames, True, rng).tolist()
    decoded = {i: decode_resize(frames[i], size_px).transpose(2, 0, 1).copy() for i in set(idx)}
    return np.stack([decoded[i] for i in idx]), decode_resize(middle_frame, size_px).transpose(2, 0, 1).copy()
