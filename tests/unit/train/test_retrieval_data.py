"""Fine-tuning batches: order is a pure function of (seed, epoch), ranks are disjoint, a resumed
epoch reads the same batches, one caption per visit, bad videos replaced and counted."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.data.sampling import clip_hash
from pipeline.data.synthetic_render import encode_video
from pipeline.eval.formats import RetrievalItem
from pipeline.train.retrieval_data import (
    FrameCache,
    RankBatches,
    RetrievalLoaderSpec,
    epoch_order,
    holdout_split,
    resolve_groups,
    steps_per_epoch,
)

NUM = 10


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> list[RetrievalItem]:
    root = tmp_path_factory.mktemp("videos")
    out = []
    for k in range(NUM):
        # Frame i of video k has brightness 10 * k + i: a batch says exactly which frames it holds.
        frames = [np.full((120, 160, 3), 10 * k + i, np.uint8) for i in range(8)]
        path = os.path.join(root, f"video{k}.mp4")
        encode_video(path, frames, 8.0)
        out.append(RetrievalItem(clip_id=f"video{k}", video_path=path, texts=(f"text {k} a", f"text {k} b")))
    return out


def cfg(**kw) -> RetrievalLoaderSpec:
    base = dict(video_format="video", num_frames=3, size_px=16, max_text_len=8, micro_batch=2, seed=5)
    return RetrievalLoaderSpec(**{**base, **kw})


def ids(batches) -> list[list[int]]:
    return [b["clip_id"].tolist() for b in batches]


def test_ranks_are_disjoint_and_cover_full_batches(items):
    spe = steps_per_epoch(NUM, 2, 2)
    assert spe == 2  # 10 videos, global batch 4: the partial last batch is dropped
    r0 = list(RankBatches(items, cfg(), 0, 0, 2)())
    r1 = list(RankBatches(items, cfg(), 0, 1, 2)())
    assert len(r0) == len(r1) == spe
    seen = [c for b in ids(r0) + ids(r1) for c in b]
    assert len(set(seen)) == len(seen) == 8
    assert tuple(r0[0]["frames"].shape) == (2, 3, 16, 16, 3) and r0[0]["frames"].dtype == torch.uint8
    assert tuple(r0[0]["text_ids"].shape) == (2, 8)


def test_order_is_a_pure_function_and_resume_reads_the_same_batches(items):
    full = list(RankBatches(items, cfg(), 1, 0, 1)())
    again = list(RankBatches(items, cfg(), 1, 0, 1)())
    resumed = list(RankBatches(items, cfg(), 1, 0, 1)(start_step=3))
    assert ids(full) == ids(again)
    assert ids(full)[3:] == ids(resumed)
    for a, b in zip(full[3:], resumed, strict=True):
        assert np.array_equal(a["frames"].numpy(), b["frames"].numpy())  # same jitter, same caption
        assert np.array_equal(a["text_ids"].numpy(), b["text_ids"].numpy())
    assert not np.array_equal(epoch_order(NUM, 5, 0), epoch_order(NUM, 5, 1))


def test_cache_gives_the_same_frames_as_decoding(items):
    plain = list(RankBatches(items, cfg(), 0, 0, 1)())
    cache = FrameCache(64 * 2**20)
    cached = list(RankBatches(items, cfg(), 0, 0, 1, cache)())
    assert len(cache.frames) == 10
    for a, b in zip(plain, cached, strict=True):
        assert np.abs(a["frames"].numpy().astype(int) - b["frames"].numpy()).max() <= 1
    tiny = FrameCache(1)
    list(RankBatches(items, cfg(), 0, 0, 1, tiny)())
    assert len(tiny.frames) == 0  # over budget: nothing kept, batches still produced


def test_bad_video_is_replaced_and_counted(items, tmp_path):
    bad_path = tmp_path / "video99.mp4"
    bad_path.write_bytes(b"not a video")
    mixed = [RetrievalItem(clip_id="video99", video_path=str(bad_path), texts=("broken",)), *items[:5]]
    batches = list(RankBatches(mixed, cfg(micro_batch=3), 0, 0, 1)())
    assert sum(int(b["skipped"].sum()) for b in batches) == 1
    assert all(h != 0 for b in batches for h in b["clip_id"].tolist())


def test_holdout_is_stable_and_disjoint(items):
    train, val = holdout_split(items, 3, seed=1)
    assert len(val) == 3 and len(train) == 7
    assert {i.clip_id for i in train}.isdisjoint(i.clip_id for i in val)
    train2, val2 = holdout_split(list(reversed(items)), 3, seed=1)
    assert {i.clip_id for i in val} == {i.clip_id for i in val2}  # file order does not matter
    with pytest.raises(ValueError, match="no training videos"):
        holdout_split(items, NUM, seed=1)


def test_batch_groups_share_a_global_batch(items):
    groups, missing = resolve_groups(items, [["video0", "video5"], ["video3", "video8"], ["video9", "absent"]])
    assert groups == [[0, 5], [3, 8]] and missing == 1  # a group left with one member is no group
    assert np.array_equal(epoch_order(NUM, 5, 3), epoch_order(NUM, 5, 3, ()))  # no groups: order unchanged
    for epoch in range(20):
        order = epoch_order(NUM, 5, epoch, groups).tolist()
        assert sorted(order) == list(range(NUM))
        for a, b in groups:
            assert abs(order.index(a) - order.index(b)) == 1
    # Every video in a pair, global batch 4 (2 ranks x 2): each pair lands in one step.
    pairs, _ = resolve_groups(items, [[f"video{k}", f"video{k + 5}"] for k in range(5)])
    steps = [sorted(a + b) for a, b in zip(ids(RankBatches(items, cfg(), 1, 0, 2, groups=pairs)()),
                                           ids(RankBatches(items, cfg(), 1, 1, 2, groups=pairs)()), strict=True)]
    assert len(steps) == steps_per_epoch(NUM, 2, 2) == 2
    hash_of = {clip_hash(f"video{k}"): k for k in range(NUM)}
    for step in steps:
        videos = {hash_of[h] for h in step}
        assert all((k + 5 in videos) == (k in videos) for k in range(5)), step
    with pytest.raises(ValueError, match="shares a video"):
        resolve_groups(items, [["video0", "video1"], ["video1", "video2"]])
