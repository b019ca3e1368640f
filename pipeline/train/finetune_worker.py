"""`finetune_loop_per_worker`: what each Ray Train worker runs for `finetune` (spec 4.2).

The same session and step loop as `pretrain` (pipeline/train/session.py, steps.py: engine,
checkpoints, resume, MLflow, the finish); different data (a downstream retrieval split decoded
on the fly), loss (symmetric InfoNCE) and a validation pass every `train.val_every_steps` and at
the end (pipeline/train/validation.py); when the selection metric improves the weights are
exported to `<storage>/<run_name>-best`. Selection never looks at the test split (the official code
kept `model_best.pt` by test R@1). Videos on S3 are read with `storage`'s options (one fetch per
load, our retries; a read that still fails skips the video as an undecodable one).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import FinetuneJobConfig, build_dataclass
from pipeline.eval.formats import RetrievalItem
from pipeline.train import finish
from pipeline.train.checkpoint import TrainState
from pipeline.train.session import RunLog, build_model, finish_session, start_session
from pipeline.train.steps import StepLoop, run_steps
from pipeline.train.validation import validate_and_track
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
        if state.step % cfg.train.val_every_steps == 0 or state.step == total:
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


def _validate_and_keep_best(engine, cfg, loop_config, val_items, state, rank, world, tracker) -> None:
    """Validation (pipeline/train/validation.py); a new best's weights go to `<run>-best`."""
    if validate_and_track(engine, cfg, val_items, cfg.data.train.video_format, cfg.data.select_metric, state,
                          rank, world, tracker, TAG, [tuple(p) for p in loop_config.get("val_pairs", [])]):
        finish.write_weights(engine, loop_config["best_dir"], cfg, rank, TAG)
