"""`finetune_loop_per_worker`: what each Ray Train worker runs for `finetune` (spec 4.2).

The same session and step loop as `pretrain` (pipeline/train/session.py, steps.py: engine,
checkpoints, resume, MLflow, the finish); different data (a downstream retrieval split decoded on the fly), loss (symmetric InfoNCE) and
a validation pass every `data.val_every_steps` and at the end. Validation runs on every rank
(each encodes its share of the held-out videos, so ZeRO-3 gathers stay collective), features
are gathered, rank 0 ranks them; when the selection metric improves the weights are exported
to `<storage>/<run_name>-best`. Selection never looks at the test split (the official code
kept `model_best.pt` by test R@1). Videos on S3 are read with `storage`'s options (one fetch per
load, our retries; a read that still fails skips the video as an undecodable one).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import build_dataclass
from pipeline.config import FinetuneJobConfig
from pipeline.eval.formats import RetrievalItem
from pipeline.train import finish
from pipeline.train.checkpoint import TrainState
from pipeline.train.session import RunLog, build_model, finish_session, start_session
from pipeline.train.steps import StepLoop, run_steps
from pipeline.utils import fs

TAG = "finetune"


def finetune_loop_per_worker(loop_config: dict[str, Any]) -> None:
    from pipeline.model.losses import NCELearnableTempLoss  # noqa: PLC0415
    from pipeline.train.retrieval_data import (  # noqa: PLC0415
        FrameCache,
        RankBatches,
        RetrievalLoaderSpec,
        steps_per_epoch,
    )
    from pipeline.train.task import RetrievalTask  # noqa: PLC0415

    cfg = build_dataclass(FinetuneJobConfig, loop_config["job"])
    s = start_session(cfg, loop_config, RetrievalTask(build_model(cfg), NCELearnableTempLoss(gather=True)))
    engine, rank, world, state, tracker = s.engine, s.rank, s.world, s.state, s.tracker
    train_items = [RetrievalItem(**it) for it in loop_config["train_items"]]
    val_items = [RetrievalItem(**it) for it in loop_config["val_items"]]
    groups = loop_config.get("train_groups", [])
    t = cfg.train
    share = t.micro_batch_size * s.chunks  # this rank's rows of a global batch
    loader_cfg = RetrievalLoaderSpec(video_format=cfg.data.train.video_format, num_frames=t.num_frames,
                                       size_px=t.image_size_px, max_text_len=cfg.model.max_text_len,
                                       micro_batch=share, seed=t.seed,
                                       decode_threads=cfg.data.decode_threads, opts=fs.S3Options.of(cfg.storage))
    cache = FrameCache(cfg.data.cache_decoded_mb * 2**20) if cfg.data.cache_decoded_mb else None
    spe = steps_per_epoch(len(train_items), world, share)
    if spe < 1:
        raise ValueError(f"{len(train_items)} training videos cannot fill one global batch of "
                         f"{t.global_batch()}; lower train.global_batch_size or train.micro_batch_size")
    total = t.max_steps or spe * t.epochs
    if rank == 0:
        print(f"[{TAG}] {'resumed at step ' + str(state.step) if state.step else 'starting'}; {total} steps, "
              f"{spe} per epoch, global batch {t.global_batch()}, {len(train_items)} train / "
              f"{len(val_items)} val videos ({cfg.run_name})", flush=True)

    log = s.run_log(cfg, total)

    def validate_when_due(state: TrainState) -> None:
        if state.step % cfg.data.val_every_steps == 0 or state.step == total:
            _validate_and_keep_best(engine, cfg, loop_config, val_items, state, rank, world, tracker)

    run_steps(s, cfg, loop_config, log, spe,
              StepLoop(lambda epoch, start: RankBatches(train_items, loader_cfg, epoch, rank, world, cache, groups)(start),
                       _log_train, validate_when_due))
    if rank == 0:
        print(f"[{TAG}] best {cfg.data.select_metric} {state.best_metric} at step {state.best_step} -> "
              f"{loop_config['best_dir']}", flush=True)
    best = [(loop_config["best_dir"], "best_model")] if state.best_metric is not None else []
    finish_session(s, cfg, loop_config["export_dir"], [(loop_config["export_dir"], "model"), *best],
                   "best_model" if best else None, TAG)


def _log_train(log: RunLog, metrics: dict[str, torch.Tensor], state: TrainState, lr: float, wait_s: float) -> None:
    out, elapsed, rate = log.train_metrics(metrics, state, lr, sums=("skipped_rows",))
    out["train/skipped_videos"] = float(state.skipped_rows)
    out["train/data_wait_frac"] = wait_s / max(elapsed, 1e-9)
    log.tracker.log_metrics(out, step=state.step)
    if log.rank == 0:
        # The run name ends the line: the demo fine-tunes two models side by side.
        print(f"[{TAG}] step {state.step}/{log.total} loss {out['train/loss']:.4f} | {rate:.1f} samples/s | "
              f"lr {lr:.2e} | {log.run_name}", flush=True)


def validate(model, items: list[RetrievalItem], cfg: FinetuneJobConfig, rank: int, world: int
             ) -> dict[str, float] | None:
    """t2v/v2t metrics of `items` (rank 0; None elsewhere). Every rank encodes items[rank::world]
    (padded to equal counts so collective forwards match), features are gathered."""
    from pipeline.data.sampling import BadSample  # noqa: PLC0415
    from pipeline.eval.encode import encode_clips, encode_texts  # noqa: PLC0415
    from pipeline.eval.formats import eval_texts  # noqa: PLC0415
    from pipeline.eval.metrics import t2v_v2t  # noqa: PLC0415
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
                clips.append(load_clip(items[i], cfg.data.train.video_format, t.num_frames, t.image_size_px,
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
    out = t2v_v2t(text_NP @ video_NP.T)
    out["num_videos"] = float(len(order))
    return out


def _validate_and_keep_best(engine, cfg, loop_config, val_items, state, rank, world, tracker) -> None:
    t0 = time.perf_counter()
    result = validate(engine.module.model, val_items, cfg, rank, world)
    improved = torch.zeros(1)
    if rank == 0:
        score = result[cfg.data.select_metric]
        tracker.log_metrics({f"val/{k}": v for k, v in result.items()}, step=state.step)
        if state.best_metric is None or score > state.best_metric:
            state.best_metric, state.best_step = float(score), state.step
            improved[0] = 1
        print(f"[{TAG}] val @ step {state.step}: {cfg.data.select_metric} {score:.1f} "
              f"(best {state.best_metric:.1f} @ {state.best_step}) | t2v R@5 {result['t2v/R5']:.1f} "
              f"| {time.perf_counter() - t0:.1f} s | {cfg.run_name}", flush=True)
    if world > 1:
        dist.broadcast(improved, src=0)
        best = [state.best_metric, state.best_step]
        dist.broadcast_object_list(best, src=0)
        state.best_metric, state.best_step = best
    if improved[0] > 0:
        finish.write_weights(engine, loop_config["best_dir"], cfg, rank, TAG)
