"""`train_loop_per_worker`: what each Ray Train worker runs for `pretrain`.

One worker = one data-parallel rank: build CLIP-ViP + omnisource loss, wrap it in a DeepSpeed
engine (ZeRO stage, bf16/fp32, gradient clipping from TrainConfig), restore the latest checkpoint
if Ray Train has one, then stream this rank's batches and step. Every rank saves and reports
checkpoints together (`ray.train.report` is a barrier); rank 0 alone talks to MLflow.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import PretrainJobConfig, build_dataclass
from pipeline.train import checkpoint as ckpt_io
from pipeline.train import finish
from pipeline.train.checkpoint import TrainState
from pipeline.train.optim import lr_at, make_adamw, param_groups, set_lr


def ds_config(cfg: PretrainJobConfig) -> dict[str, Any]:
    """The DeepSpeed config, built from TrainConfig (the one source of truth; no JSON file)."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        # Accumulation would shrink the InfoNCE negative set; the paper uses none.
        "gradient_accumulation_steps": 1,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def skip_cpu_shm_build() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory allreduce op on first use (~1 min cold);
    gloo's allreduce is fine for CPU runs, so skip the build (environment.md section 3)."""
    import deepspeed.comm.torch  # noqa: F401,PLC0415

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def quiet_report_lines() -> None:
    """Ray Train 2.60 logs every `ray.train.report` at INFO, one long line per rank, from a logger
    named after its source file: neither RunConfig's log level nor the `ray.train` logger covers it."""
    import logging  # noqa: PLC0415

    try:  # a private module: if a Ray release moves it, the lines merely come back
        from ray.train.v2._internal.execution import context  # noqa: PLC0415
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def build_model(cfg: Any):
    """The model a run starts from: warm start > model.pretrained > random init (same on every rank)."""
    from pipeline.model.checkpoints import load_clip_vip  # noqa: PLC0415
    from pipeline.model.clip_vip import CLIPViPModel, config_from_model_cfg  # noqa: PLC0415

    torch.manual_seed(cfg.train.seed)  # same init on every rank (DeepSpeed also broadcasts rank 0's)
    warm = cfg.train.warm_start
    if warm and not os.path.isdir(os.path.join(warm, "ds")):
        model = load_clip_vip(warm, cfg.model)
    elif cfg.model.pretrained:
        model = load_clip_vip(cfg.model.pretrained, cfg.model, clip_only=cfg.model.pretrained_clip_only)
    else:
        model = CLIPViPModel(config_from_model_cfg(cfg.model))
    model.set_attention(cfg.model.attention)
    model.train()  # loaders return eval-mode models; training must not depend on that
    return model


def build_task(cfg: PretrainJobConfig):
    from pipeline.model.losses import build_loss  # noqa: PLC0415
    from pipeline.train.task import ClipVipTask  # noqa: PLC0415

    return ClipVipTask(build_model(cfg), build_loss(cfg.loss))


def global_mean(metrics: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """Each rank's loss covers its own rows; the mean over ranks is the global-batch loss."""
    keys = sorted(metrics)
    vec = torch.stack([metrics[k].float().reshape(()) for k in keys])
    if world > 1:
        dist.all_reduce(vec)
        vec /= world
    return {k: float(v) for k, v in zip(keys, vec.tolist(), strict=True)}


@dataclass
class RunLog:
    """What the training loops' progress logging needs besides each step's own values: rank 0
    prints the line, `tracker` is a NullTracker on the other ranks."""

    engine: Any
    tracker: Any
    rank: int
    world: int
    total: int
    run_name: str
    samples_at_start: int = 0
    t_start: float = field(default_factory=time.perf_counter)

    def train_metrics(self, metrics: dict[str, torch.Tensor], state: TrainState, lr: float,
                      sums: tuple[str, ...] = ()) -> tuple[dict[str, float], float, float]:
        """(MLflow `train/` metrics, seconds since start, samples/s): the step's metrics averaged
        over ranks (those in `sums` summed), lr, throughput, epoch and the global grad norm."""
        logged = global_mean(metrics, self.world)
        for key in sums:
            logged[key] *= self.world
        elapsed = time.perf_counter() - self.t_start
        rate = (state.samples_seen - self.samples_at_start) / elapsed if elapsed > 0 else 0.0
        out = {f"train/{k}": v for k, v in logged.items()}
        out.update({"train/lr": lr, "train/samples_per_s": rate, "train/epoch": float(state.epoch)})
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            out["train/grad_norm"] = float(grad_norm)
        return out, elapsed, rate


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train  # noqa: PLC0415

    cfg = build_dataclass(PretrainJobConfig, loop_config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    quiet_report_lines()
    if not cfg.train.use_gpu:
        skip_cpu_shm_build()
    import deepspeed  # noqa: PLC0415

    from pipeline.data.loader import BatchSpec, ViewIndex, iter_rank_batches  # noqa: PLC0415
    from pipeline.tracking import MlflowTracker, NullTracker  # noqa: PLC0415
    from pipeline.utils.fs import S3Options  # noqa: PLC0415

    task = build_task(cfg)
    optimizer = make_adamw(param_groups(task.named_parameters(), cfg.train.weight_decay), lr=cfg.train.lr)
    engine, optimizer, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, config=ds_config(cfg))

    index = ViewIndex.open(cfg.train.dataset_root, cfg.train.view, S3Options.of(cfg.storage))
    index.check_size(cfg.train.image_size_px)
    spec = BatchSpec(global_batch=cfg.train.micro_batch_size * world, num_frames=cfg.train.num_frames,
                     image_size_px=cfg.train.image_size_px, max_text_len=cfg.model.max_text_len)
    import ray.data  # noqa: PLC0415

    # One progress bar per rank per epoch would drown the driver's progress line.
    ray.data.DataContext.get_current().enable_progress_bars = False
    spe = index.layout.steps(spec.global_batch)
    if spe < 1:
        raise ValueError(f"{index.num_rows} clips cannot fill one global batch of "
                         f"{spec.global_batch}; lower train.micro_batch_size")
    total = cfg.train.max_steps or spe * cfg.train.epochs

    state = TrainState(world_size=world, mlflow_run_id=loop_config.get("mlflow_run_id"))
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            state = ckpt_io.load(engine, d, rank, world)
    elif cfg.train.warm_start and os.path.isdir(os.path.join(cfg.train.warm_start, "ds")):
        ckpt_io.load(engine, cfg.train.warm_start, rank, world, weights_only=True)
    state.mlflow_run_id = state.mlflow_run_id or loop_config.get("mlflow_run_id")

    tracker: Any = NullTracker()
    if rank == 0 and cfg.tracking.enabled and state.mlflow_run_id:
        tracker = MlflowTracker(cfg.tracking.tracking_uri, state.mlflow_run_id, cfg.tracking.system_metrics)
        if state.step == 0:
            tracker.log_params(loop_config["job"])
            tracker.log_dict(loop_config["job"], "config/job.json")
            tracker.log_dict(ds_config(cfg), "config/deepspeed.json")
    if rank == 0:
        print(f"[pretrain] {'resumed at step ' + str(state.step) if state.step else 'starting'}; "
              f"{total} steps, {spe} per epoch, global batch {cfg.train.micro_batch_size * world} ({cfg.run_name})",
              flush=True)

    log = RunLog(engine, tracker, rank, world, total, cfg.run_name, samples_at_start=state.samples_seen)
    _run_steps(log, cfg, loop_config, index, spec, state, spe, iter_rank_batches)
    # The finish runs on every submission, a finished one too: its steps that a kill cut off are
    # done now, those recorded done are skipped (pipeline/train/finish.py).
    finish.pause_point("checkpoint", rank)
    finish.export_once(engine, loop_config["export_dir"], state.step, cfg, rank, world, "pretrain")
    finish.pause_point("export", rank)
    if rank == 0 and tracker.run_id:
        finish.log_artifacts_once(tracker, loop_config["export_dir"], "model", cfg)
        finish.pause_point("artifacts", rank)
        if cfg.tracking.register_model:
            finish.register_once(tracker, "model", cfg.tracking.register_model, cfg, "pretrain")
    tracker.close("FINISHED")


def _run_steps(log: RunLog, cfg, loop_config, index, spec, state, spe, iter_rank_batches) -> None:
    engine, rank, world, total = log.engine, log.rank, log.world, log.total
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
            loss, metrics = engine(batch)
            engine.backward(loss)
            engine.step()
            state.step += 1
            state.step_in_epoch = state.step % spe
            state.epoch = state.step // spe
            state.samples_seen += int(batch["frames"].shape[0]) * world
            skipped = int(batch["skipped"].sum())
            metrics = dict(metrics, loss=loss.detach(), skipped_rows=torch.tensor(float(skipped)),
                           step_time_s=torch.tensor(time.perf_counter() - t_wait0),
                           data_wait_s=torch.tensor(step_wait_s))
            if state.step % cfg.train.log_every_steps == 0 or state.step == total:
                _log_step(log, metrics, state, lr, wait_s)
            if state.step % cfg.train.checkpoint_every_steps == 0 or state.step == total:
                save_and_report(engine, cfg, loop_config, state, rank)
            t_wait0 = time.perf_counter()
            if state.step >= total or state.step % spe == 0:
                break


def _log_step(log: RunLog, metrics, state, lr: float, wait_s: float) -> None:
    out, elapsed, rate = log.train_metrics(metrics, state, lr, sums=("skipped_rows",))
    out["train/data_wait_frac"] = wait_s / max(elapsed, 1e-9)
    log.tracker.log_metrics(out, step=state.step)
    if log.rank == 0:
        batch = log.world * log.engine.train_micro_batch_size_per_gpu()
        eta = (log.total - state.step) * batch / rate if rate > 0 else 0.0
        print(f"[pretrain] step {state.step}/{log.total} loss {out['train/loss']:.4f} | {rate:.1f} samples/s | "
              f"data wait {out['train/data_wait_frac']:.0%} | lr {lr:.2e} | ETA {eta:.0f} s | {log.run_name}",
              flush=True)


def save_and_report(engine, cfg, loop_config, state, rank) -> None:
    import ray.train  # noqa: PLC0415

    tmp = tempfile.mkdtemp(prefix=f"clipvip-ckpt-r{rank}-")
    try:
        ckpt_io.save(engine, tmp, state, rank, loop_config["job"])
        ray.train.report({"step": state.step, "epoch": state.epoch, "samples_seen": state.samples_seen},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step_{state.step:09d}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
