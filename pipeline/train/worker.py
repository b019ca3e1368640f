"""`train_loop_per_worker`: what each Ray Train worker runs for `pretrain`.

One worker = one data-parallel rank. The session (pipeline/train/session.py: DeepSpeed engine,
resume, tracker, finish) is shared with finetune; what is pretrain's own is here: CLIP-ViP with
the omnisource loss, the training view streamed by `pipeline.data.loader`, the step loop's
logging, and a finish that exports and registers the final weights.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pipeline.config import PretrainJobConfig, build_dataclass
from pipeline.train import gradcache
from pipeline.train.session import RunLog, Session, build_model, finish_session, save_checkpoint, start_session
from pipeline.train.optim import lr_at, set_lr


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

    index = ViewIndex.open(cfg.train.dataset_root, cfg.train.view, S3Options.of(cfg.storage))
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

    log = RunLog(s.engine, s.tracker, s.rank, s.world, total, cfg.run_name, samples_at_start=s.state.samples_seen)
    _run_steps(log, s, cfg, loop_config, index, spec, spe, iter_rank_batches)
    finish_session(s, cfg, loop_config["export_dir"], [(loop_config["export_dir"], "model")], "model", "pretrain")


def _run_steps(log: RunLog, s: Session, cfg, loop_config, index, spec, spe, iter_rank_batches) -> None:
    engine, rank, world, total, state = s.engine, s.rank, s.world, log.total, s.state
    while state.step < total:
        epoch, start = divmod(state.step, spe)
        t_wait0 = time.perf_counter()
        wait_s = 0.0
        batches = iter_rank_batches(index, spec, cfg.train.loader, cfg.train.seed, epoch, rank, world,
                                    start_step=start, device=str(engine.device))
        for batch in batches:
            t_got = time.perf_counter()
            step_wait_s = t_got - t_wait0
            wait_s += step_wait_s
            lr = lr_at(state.step, cfg.train.lr, total, cfg.train.warmup_ratio)
            set_lr(engine.optimizer, lr)
            loss, metrics = gradcache.train_step(engine, batch, s.chunks)
            state.step += 1
            state.step_in_epoch = state.step % spe
            state.epoch = state.step // spe
            state.samples_seen += int(batch["frames"].shape[0]) * world
            skipped = int(batch["skipped"].sum())
            metrics = dict(metrics, loss=loss, skipped_rows=torch.tensor(float(skipped)),
                           step_time_s=torch.tensor(time.perf_counter() - t_wait0),
                           data_wait_s=torch.tensor(step_wait_s))
            if state.step % cfg.train.log_every_steps == 0 or state.step == total:
                _log_step(log, metrics, state, lr, wait_s)
            if state.step % cfg.train.checkpoint_every_steps == 0 or state.step == total:
                save_checkpoint(s, cfg, loop_config)
            t_wait0 = time.perf_counter()
            if state.step >= total or state.step % spe == 0:
                break


def _log_step(log: RunLog, metrics, state, lr: float, wait_s: float) -> None:
    out, elapsed, rate = log.train_metrics(metrics, state, lr, sums=("skipped_rows",))
    out["train/data_wait_frac"] = wait_s / max(elapsed, 1e-9)
    log.tracker.log_metrics(out, step=state.step)
    if log.rank == 0:
        batch = log.engine.train_batch_size()  # micro batch x chunks x workers
        eta = (log.total - state.step) * batch / rate if rate > 0 else 0.0
        print(f"[pretrain] step {state.step}/{log.total} loss {out['train/loss']:.4f} | {rate:.1f} samples/s | "
              f"data wait {out['train/data_wait_frac']:.0%} | lr {lr:.2e} | ETA {eta:.0f} s | {log.run_name}",
              flush=True)


