"""Pure core of the training order over a view: which view row sits at each global sample index.

A view (`pack.py`) stores rows in row groups of c rows (`rows_per_group`), each row group holding
clips of c different videos. The order of one epoch is a pure function of (seed, epoch) and the
view's layout, never of the number of ranks:

1. The F full row groups of the view (all but the last group of a view shard, when that one has
   fewer than c rows) are permuted by a keyed bijection of [0, F) (`permute`: a Feistel network
   with cycle walking), so the permutation costs O(1) memory however large the view; positions
   [0, F*c) walk the permuted row groups, c rows each, in stored order.
2. The short row groups (at most one per view shard) follow, permuted by hash keys of
   (seed, epoch, shard), filling positions [F*c, N).
3. Global batch b is positions [b*G, (b+1)*G) (G the global batch, `steps = N // G`, the rest
   dropped this epoch); with W ranks of micro batch m = G / W, rank r takes [b*G + r*m, b*G + (r+1)*m).
   So global batch b holds the same samples at any W; the data position of a run is a global
   sample index, and a run can resume on another number of GPUs.

Why row groups as the unit of shuffling: a row group is one contiguous read, fully used when c
divides m (bytes read per byte used 1.0); its c clips come from c different videos, and row
groups land in batches uniformly at random, so the chance that two clips of one video meet in a
global batch is the uniform sampler's (the paper samples clips uniformly, Sec. 4.1).

Shape legend: N view rows in the order, F full row groups, S view shards, E entries asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data.sampling import hash_keys, stream_key

_STREAM_GROUPS = 11
_STREAM_TAILS = 12
_ROUNDS = 4


def permute(i: np.ndarray, n: int, key: int) -> np.ndarray:
    """A keyed bijection of [0, n), applied to the indices i (O(1) memory in n).

    A balanced Feistel network over the smallest even bit width 2h with 4**h >= n, iterated
    ("cycle walking") on values that land outside [0, n); every iterate of a value in range is a
    bijection of [0, 4**h), so the walk ends and the result is a permutation of [0, n).

    Args:
        i: [E] int64 indices in [0, n).
        n: domain size (>= 1).
        key: 64-bit key (`stream_key`).

    Returns:
        [E] int64 images of i.
    """
    if n < 1:
        raise ValueError(f"permute: domain size must be >= 1, got {n}")
    i = np.asarray(i, dtype=np.int64)
    if i.size and (int(i.min()) < 0 or int(i.max()) >= n):
        raise ValueError(f"permute: indices must lie in [0, {n})")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    round_keys = [stream_key(key, r, 0x5EED) for r in range(_ROUNDS)]

    def once(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for rk in round_keys:
            left, right = right, left ^ (hash_keys(right, rk) & mask)
        return (left << np.uint64(half)) | right

    x = once(i.astype(np.uint64))
    out = x.copy()
    todo = np.flatnonzero(out >= np.uint64(n))
    while todo.size:
        out[todo] = once(out[todo])
        todo = todo[out[todo] >= np.uint64(n)]
    return out.astype(np.int64)


@dataclass(frozen=True)
class ViewLayout:
    """What the order needs to know about a view: its shards' row counts and its group size.

    Attributes:
        shard_rows: [S] rows of each view shard, in the view's shard order.
        rows_per_group: c, rows of every row group but a shard's last.
    """

    shard_rows: np.ndarray
    rows_per_group: int

    def __post_init__(self) -> None:
        if self.rows_per_group < 1:
            raise ValueError(f"rows_per_group must be >= 1, got {self.rows_per_group}")

    @property
    def full_groups(self) -> np.ndarray:
        """[S] full row groups of each shard."""
        return np.asarray(self.shard_rows, dtype=np.int64) // self.rows_per_group

    @property
    def num_rows(self) -> int:
        """N: rows that take part in every epoch's order."""
        return int(np.sum(self.shard_rows))

    def steps(self, global_batch: int) -> int:
        """Global batches per epoch: floor(N / G) (drop_last, so every batch has exactly G rows)."""
        if global_batch < 1:
            raise ValueError(f"global batch must be >= 1, got {global_batch}")
        return self.num_rows // global_batch


def order_entries(layout: ViewLayout, seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    """The view rows at global sample indices `positions` of epoch `epoch`.

    Args:
        layout: the view's shards.
        positions: [E] int64 in [0, N).

    Returns:
        [E, 3] int64 (view shard, row group in the shard, row in the row group).
    """
    pos = np.asarray(positions, dtype=np.int64)
    n, c = layout.num_rows, layout.rows_per_group
    if pos.size and (int(pos.min()) < 0 or int(pos.max()) >= n):
        raise ValueError(f"positions must lie in [0, {n})")
    full = layout.full_groups
    starts = np.concatenate([[0], np.cumsum(full)])
    num_full = int(starts[-1])
    out = np.zeros((len(pos), 3), dtype=np.int64)
    head = pos < num_full * c
    if head.any():
        g = permute(pos[head] // c, num_full, stream_key(seed, epoch, _STREAM_GROUPS))
        shard = np.searchsorted(starts, g, side="right") - 1
        out[head] = np.stack([shard, g - starts[shard], pos[head] % c], axis=1)
    if (~head).any():
        tails = np.flatnonzero(np.asarray(layout.shard_rows) % c)
        tails = tails[np.argsort(hash_keys(tails, stream_key(seed, epoch, _STREAM_TAILS)), kind="stable")]
        sizes = np.asarray(layout.shard_rows, dtype=np.int64)[tails] % c
        tail_starts = num_full * c + np.concatenate([[0], np.cumsum(sizes)])
        k = np.searchsorted(tail_starts, pos[~head], side="right") - 1
        out[~head] = np.stack([tails[k], full[tails[k]], pos[~head] - tail_starts[k]], axis=1)
    return out


def rank_positions(step: int, rank: int, world_size: int, global_batch: int) -> np.ndarray:
    """Global sample indices of rank `rank`'s micro batch at step `step`: [b*G + r*m, b*G + (r+1)*m).

    Raises:
        ValueError: G is not a multiple of the world size.
    """
    if world_size < 1 or global_batch % world_size:
        raise ValueError(f"global batch {global_batch} must be a multiple of the world size {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    m = global_batch // world_size
    start = step * global_batch + rank * m
    return np.arange(start, start + m, dtype=np.int64)

