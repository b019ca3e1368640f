"""Retrieval validation during training, finetune's and pretrain's alike.

The same encoders and metrics as `clipvip evaluate` (pipeline/eval/encode.py, metrics.py) on a
held-out split: every rank encodes its share of the videos (so ZeRO-3's gathers stay collective),
features are gathered, rank 0 ranks them and logs t2v/v2t R@1/5/10, MdR and MnR as `val/`
metrics at the step. The run's best score and its step live in its TrainState (checkpointed), so a
resumed run keeps comparing against the best before the kill.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.eval.formats import RetrievalItem
from pipeline.eval.metrics import ORDER_KEY
from pipeline.train.checkpoint import TrainState
from pipeline.utils import fs


def validate(model, items: list[RetrievalItem], video_format: str, cfg: Any, rank: int, world: int,
             pairs: list[tuple[int, int]] = ()) -> dict[str, float] | None:
    """t2v/v2t metrics of `items` (rank 0; None elsewhere), at the run's frames, size and text
    length, and `order/aware` over `pairs` (indices into items: the split's `order_pairs`) when
    given. Every rank encodes items[rank::world] (padded to equal counts so collective forwards
    match), features are gathered."""
    from pipeline.data.sampling import BadSample  # noqa: PLC0415
    from pipeline.eval.encode import encode_clips, encode_texts  # noqa: PLC0415
    from pipeline.eval.formats import eval_texts  # noqa: PLC0415
    from pipeline.eval.metrics import order_awareness, t2v_v2t  # noqa: PLC0415
    from pipeline.eval.video import load_clip  # noqa: PLC0415

    t = cfg.train
    per_rank = -(-len(items) // world)
    mine = list(range(rank, len(items), world))
    mine += mine[:1] * (per_rank - len(mine))  # padding rows are dropped after the gather
    texts = eval_texts(items)
    opts = fs.S3Options.of(cfg.storage)
    was_training = model.training
    model.eval()
    rows: list[tuple[int, np.ndarray, np.ndarray]] = []
    for lo in range(0, per_rank, t.micro_batch_size):
        idx = mine[lo:lo + t.micro_batch_size]
        clips, ok = [], []
        for i in idx:
            try:
                clips.append(load_clip(items[i], video_format, t.num_frames, t.image_size_px,
                                       False, None, opts=opts))
                ok.append(True)
            except BadSample:
                clips.append(np.zeros((t.num_frames, t.image_size_px, t.image_size_px, 3), np.uint8))
                ok.append(False)
        video = encode_clips(model, np.stack(clips))
        text = encode_texts(model, [texts[i] for i in idx], cfg.model.max_text_len)
        rows += [(i, v, x) for i, v, x, good in zip(idx, video, text, ok, strict=True) if good]
    model.train(was_training)
    gathered: list[Any] = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, rows)
    else:
        gathered = [rows]
    if rank != 0:
        return None
    by_index = {i: (v, x) for part in gathered for i, v, x in part}
    order = sorted(by_index)
    video_NP = np.stack([by_index[i][0] for i in order]).astype(np.float64)
    text_NP = np.stack([by_index[i][1] for i in order]).astype(np.float64)
    sim_TV = text_NP @ video_NP.T
    out = t2v_v2t(sim_TV)
    position = {i: k for k, i in enumerate(order)}  # a video that failed to decode leaves its pair out
    kept = [(position[i], position[j]) for i, j in pairs if i in position and j in position]
    if kept:
        out[ORDER_KEY] = order_awareness(sim_TV, kept)
    out["num_videos"] = float(len(order))
    return out


def validate_and_track(engine: Any, cfg: Any, items: list[RetrievalItem], video_format: str, metric: str,
                       state: TrainState, rank: int, world: int, tracker: Any, tag: str,
                       pairs: list[tuple[int, int]] = ()) -> bool:
    """Validate at `state.step`, log `val/` metrics (rank 0), keep the best `metric` and its step in
    `state` on every rank; returns whether this step is the new best."""
    t0 = time.perf_counter()
    result = validate(engine.module.model, items, video_format, cfg, rank, world, pairs)
    improved = torch.zeros(1)
    if rank == 0:
        score = result[metric]
        tracker.log_metrics({f"val/{k}": v for k, v in result.items()}, step=state.step)
        if state.best_metric is None or score > state.best_metric:
            state.best_metric, state.best_step = float(score), state.step
            improved[0] = 1
        print(f"[{tag}] val @ step {state.step}: {metric} {score:.1f} (best {state.best_metric:.1f} @ "
              f"{state.best_step}) | t2v R@5 {result['t2v/R5']:.1f}"
              + (f" | order-aware {result[ORDER_KEY]:.1f}%" if ORDER_KEY in result else "")
              + f" | {time.perf_counter() - t0:.1f} s | "
              f"{cfg.run_name}", flush=True)
    if world > 1:
        dist.broadcast(improved, src=0)
        best = [state.best_metric, state.best_step]
        dist.broadcast_object_list(best, src=0)
        state.best_metric, state.best_step = best
    return bool(improved[0] > 0)
