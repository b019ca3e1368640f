"""The epoch order over a view: a permutation of its rows, row groups kept whole, the same global
batches at any world size, a pure function of (seed, epoch, position)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.view_order import ViewLayout, order_entries, permute, rank_positions


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permute_is_a_bijection(n):
    for key in (0, 1, 2**63 + 5):
        out = permute(np.arange(n), n, key)
        assert sorted(out.tolist()) == list(range(n))
    if n >= 64:
        assert not np.array_equal(permute(np.arange(n), n, 1), permute(np.arange(n), n, 2))
        assert not np.array_equal(permute(np.arange(n), n, 1), np.arange(n))


def test_permute_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        permute(np.array([5]), 5, 0)


def _all(layout, seed=0, epoch=0):
    return order_entries(layout, seed, epoch, np.arange(layout.num_rows))


def test_an_epoch_visits_every_row_once_in_whole_row_groups():
    layout = ViewLayout(shard_rows=np.array([10, 8, 3, 12]), rows_per_group=4)
    entries = _all(layout, seed=3, epoch=1)
    rows = {(s, g * 4 + r) for s, g, r in entries.tolist()}
    assert rows == {(s, i) for s, n in enumerate([10, 8, 3, 12]) for i in range(n)}
    full = int(layout.full_groups.sum())
    head = entries[: full * 4].reshape(full, 4, 3)
    # each block of c positions is one whole row group, rows in stored order
    assert (head[:, :, :2] == head[:, :1, :2]).all() and (head[:, :, 2] == np.arange(4)).all()
    # the short groups (shards 0 and 2, 2 and 3 rows) come after every full one
    assert {tuple(e) for e in entries[full * 4:, :2].tolist()} == {(0, 2), (2, 0)}


def test_the_order_depends_on_seed_and_epoch_only():
    layout = ViewLayout(shard_rows=np.full(50, 64), rows_per_group=8)
    a = _all(layout, 0, 0)
    assert np.array_equal(a, _all(layout, 0, 0))
    assert not np.array_equal(a, _all(layout, 0, 1)) and not np.array_equal(a, _all(layout, 1, 0))
    pos = np.array([5, 1000, 77, 3199])
    assert np.array_equal(order_entries(layout, 0, 0, pos), a[pos])  # any subset, any order


@pytest.mark.parametrize("global_batch", [8, 24])
def test_global_batches_are_the_same_at_any_world_size(global_batch):
    layout = ViewLayout(shard_rows=np.array([40, 37, 40, 19]), rows_per_group=4)
    steps = layout.steps(global_batch)
    batches = {}
    for world in (1, 2, 4):
        batches[world] = [np.concatenate([order_entries(layout, 7, 2, rank_positions(b, r, world, global_batch))
                                          for r in range(world)]) for b in range(steps)]
    for world in (2, 4):
        for b in range(steps):
            assert np.array_equal(batches[world][b], batches[1][b])


def test_rank_positions_split_a_global_batch():
    assert rank_positions(3, 1, 4, 16).tolist() == [52, 53, 54, 55]
    with pytest.raises(ValueError, match="multiple of the world size"):
        rank_positions(0, 0, 3, 16)


def test_row_groups_meet_in_batches_as_often_as_uniform_sampling_says():
    """Two given row groups share a global batch of k groups with probability (k-1)/(F-1)."""
    layout = ViewLayout(shard_rows=np.full(64, 32), rows_per_group=4)  # 512 groups
    k, together, epochs = 8, 0, 400
    for epoch in range(epochs):
        groups = order_entries(layout, 0, epoch, np.arange(0, layout.num_rows, 4))
        g = groups[:, 0] * 8 + groups[:, 1]
        batch_of = np.empty(512, dtype=np.int64)
        batch_of[g] = np.arange(512) // k
        together += int(batch_of[0] == batch_of[1])
    expected = epochs * (k - 1) / 511
    assert together <= expected + 4 * np.sqrt(expected) + 1
