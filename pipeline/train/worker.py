"""`train_loop_per_worker`: what each Ray Train worker runs for `pretrain`.

One worker = one data-parallel rank. The session (pipeline/train/session.py: DeepSpeed engine,
resume, tracker, finish) and the step loop (pipeline/train/steps.py) are shared with finetune;
what is pretrain's own is here: CLIP-ViP with the omnisource loss, the training view streamed by
`pipeline.data.loader`, zero-shot retrieval validation on `val` (when given), its progress line,
and a finish that exports and registers the final weights.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import PretrainJobConfig, build_dataclass
from pipeline.eval.formats import RetrievalItem
from pipeline.train.checkpoint import TrainState
from pipeline.train.session import RunLog, build_model, finish_session, start_session
from pipeline.train.steps import StepLoop, run_steps
from pipeline.train.validation import validate_and_track

VAL_METRIC = "t2v/R1"
"""What pretrain's validation calls best (reported only: pretrain keeps its last weights)."""


def build_task(cfg: PretrainJobConfig):
    from pipeline.model.losses import build_loss  # noqa: PLC0415
    from pipeline.train.task import ClipVipTask  # noqa: PLC0415

    return ClipVipTask(build_model(cfg), build_loss(cfg.loss))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = build_dataclass(PretrainJobConfig, loop_config["job"])
    s = start_session(cfg, loop_config, build_task(cfg))

    import ray.data  # noqa: PLC0415

    from pipeline.data.loader import BatchSpec, ViewIndex, iter_rank_batches  # noqa: PLC0415
    from pipeline.utils.fs import S3Options  # noqa: PLC0415

    index = ViewIndex.open(cfg.root, cfg.train.view, S3Options.of(cfg.storage))
    index.check_size(cfg.train.image_size_px)
    spec = BatchSpec(global_batch=cfg.train.global_batch(), num_frames=cfg.train.num_frames,
                     image_size_px=cfg.train.image_size_px, max_text_len=cfg.model.max_text_len)
    # One progress bar per rank per epoch would drown the driver's progress line.
    ray.data.DataContext.get_current().enable_progress_bars = False
    spe = index.layout.steps(spec.global_batch)
    if spe < 1:
        raise ValueError(f"{index.num_rows} clips cannot fill one global batch of "
                         f"{spec.global_batch}; lower train.global_batch_size or train.micro_batch_size")
    total = cfg.train.max_steps or spe * cfg.train.epochs
    if s.rank == 0:
        print(f"[pretrain] {'resumed at step ' + str(s.state.step) if s.state.step else 'starting'}; "
              f"{total} steps, {spe} per epoch, global batch {spec.global_batch} (workers {s.world} x chunks "
              f"{s.chunks} x micro batch {cfg.train.micro_batch_size}) ({cfg.run_name})", flush=True)

    log = s.run_log(cfg, total)

    def batches(epoch: int, start: int):
        return iter_rank_batches(index, spec, cfg.train.loader, cfg.train.seed, epoch, s.rank, s.world,
                                 start_step=start, device=str(s.engine.device))

    val_items = [RetrievalItem(**it) for it in loop_config.get("val_items", [])]

    def validate_when_due(state: TrainState) -> None:
        # Zero-shot: the post-pretrained model ranks a downstream split it never trained on.
        if val_items and (state.step % cfg.train.val_every_steps == 0 or state.step == total):
            validate_and_track(s.engine, cfg, val_items, cfg.val.video_format, VAL_METRIC, state, s.rank, s.world,
                               s.tracker, "pretrain", [tuple(p) for p in loop_config.get("val_pairs", [])])

    run_steps(s, cfg, loop_config, log, spe, StepLoop(batches, log_step, validate_when_due))
    finish_session(s, cfg, loop_config["export_dir"], [(loop_config["export_dir"], "model")], "model", "pretrain")


def log_step(log: RunLog, metrics: dict[str, torch.Tensor], state: TrainState, lr: float, wait_s: float) -> None:
    """pretrain's `train/` metrics (rank means, skipped rows summed) and its progress line."""
    out, elapsed, rate = log.train_metrics(metrics, state, lr, sums=("skipped_rows",))
    out["train/data_wait_frac"] = wait_s / max(elapsed, 1e-9)
    log.tracker.log_metrics(out, step=state.step)
    if log.rank == 0:
        batch = log.engine.train_batch_size()  # micro batch x chunks x workers
        eta = (log.total - state.step) * batch / rate if rate > 0 else 0.0
        mfu = f" | MFU {out['train/mfu']:.1%}" if "train/mfu" in out else ""
        print(f"[pretrain] step {state.step}/{log.total} loss {out['train/loss']:.4f} | {rate:.1f} samples/s{mfu} | "
              f"data wait {out['train/data_wait_frac']:.0%} | lr {lr:.2e} | ETA {eta:.0f} s | {log.run_name}",
              flush=True)
