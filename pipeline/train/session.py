"""What every training worker does around its steps, pretrain and finetune alike.

`start_session` is everything before the first step: rank and world size from Ray Train, the
model and loss wrapped in a DeepSpeed engine built from `train.*` (`ds_config`), the state of the
latest checkpoint (or a warm start), the MLflow tracker (rank 0). The step loop is
pipeline/train/steps.py; `save_checkpoint` writes a checkpoint, every rank together
(`ray.train.report` is a barrier); `finish_session` is the once-only finish
(pipeline/train/finish.py). What differs between the jobs (data, loss, validation, what is
exported) stays in `worker.py` and `finetune_worker.py`.
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

from pipeline.train import checkpoint as ckpt_io
from pipeline.train import finish
from pipeline.train.checkpoint import TrainState
from pipeline.train.optim import make_adamw, param_groups


def ds_config(cfg: Any, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config, built from TrainConfig (the one source of truth; no JSON file)."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        # One accumulation step per chunk of gradient caching (gradcache.py): the loss of every
        # chunk sees the whole global batch, unlike plain accumulation, which would shrink the
        # InfoNCE negatives to one micro batch.
        "gradient_accumulation_steps": t.chunks(world_size),
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
    if cfg.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # loaders return eval-mode models; training must not depend on that
    return model


def global_mean(metrics: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """Each rank's loss covers its own rows; the mean over ranks is the global-batch loss."""
    keys = sorted(metrics)
    vec = torch.stack([metrics[k].float().reshape(()) for k in keys])
    if world > 1:
        dist.all_reduce(vec)
        vec /= world
    return {k: float(v) for k, v in zip(keys, vec.tolist(), strict=True)}


def model_flops(cfg: Any, task: torch.nn.Module, device: torch.device) -> tuple[float, float | None]:
    """(model FLOPs of one training clip, one device's peak TFLOP/s or None) for `RunLog`.

    Model FLOPs, as MFU counts them (PaLM, Chowdhery et al. 2022, appendix B): forward + backward
    of the passes the loss uses; gradient caching's second forward and activation checkpointing's
    recompute are not counted, so they show as lower MFU, not as more work."""
    from pipeline.model.flops import peak_tflops, train_flops_per_clip  # noqa: PLC0415

    flops = train_flops_per_clip(task.model.config, cfg.train.num_frames, cfg.model.max_text_len, task.sources)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return flops.total, peak_tflops(name, cfg.train.peak_tflops)


def throughput(samples_per_s: float, world: int, flops_per_clip: float, peak: float | None) -> dict[str, float]:
    """The run's throughput metrics from its global samples/s: per worker (= per GPU), model
    TFLOP/s per worker, and MFU when the device's peak is known."""
    from pipeline.model.flops import mfu  # noqa: PLC0415

    per_worker = samples_per_s / world
    out = {"samples_per_s": samples_per_s, "samples_per_s_per_worker": per_worker}
    if flops_per_clip:
        out["tflops_per_worker"] = flops_per_clip * per_worker / 1e12
        util = mfu(flops_per_clip, per_worker, peak)
        if util is not None:
            out["mfu"] = util
    return out


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
    flops_per_clip: float = 0.0
    """Model FLOPs of one training clip, forward + backward (`model_flops`); 0 leaves FLOP/s out."""
    peak_tflops: float | None = None
    """One device's peak; None leaves MFU out."""
    t_start: float = field(default_factory=time.perf_counter)
    throughput: dict[str, float] = field(default_factory=dict)
    """The last logged throughput (samples_per_s, per worker, tflops_per_worker, mfu): reported
    with each checkpoint, so the driver's summary has the run's figures."""

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
        out.update({"train/lr": lr, "train/epoch": float(state.epoch)})
        self.throughput = throughput(rate, self.world, self.flops_per_clip, self.peak_tflops)
        out.update({f"train/{k}": v for k, v in self.throughput.items()})
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            out["train/grad_norm"] = float(grad_norm)
        return out, elapsed, rate


@dataclass
class Session:
    """A worker's training run: its place in the group, its engine and where the run is."""

    rank: int
    world: int
    engine: Any
    state: TrainState
    tracker: Any
    """MlflowTracker on rank 0 (when tracking), NullTracker elsewhere."""
    chunks: int
    """Forwards per step (gradient caching; 1 without)."""
    monitor: Any = None
    """This node's system-metrics monitor (its first worker only), finished with the session."""

    def run_log(self, cfg: Any, total: int) -> RunLog:
        """The progress log of this run of `total` steps, with the model's FLOPs for MFU."""
        flops, peak = model_flops(cfg, self.engine.module, self.engine.device)
        return RunLog(self.engine, self.tracker, self.rank, self.world, total, cfg.run_name,
                      samples_at_start=self.state.samples_seen, flops_per_clip=flops, peak_tflops=peak)


def build_engine(cfg: Any, task: torch.nn.Module, world_size: int) -> Any:
    """`task` in a DeepSpeed engine built from `train.*` (`ds_config`) with AdamW and the official
    weight-decay groups: what every worker trains, and what the benches time."""
    import deepspeed  # noqa: PLC0415

    optimizer = make_adamw(param_groups(task.named_parameters(), cfg.train.weight_decay), lr=cfg.train.lr,
                           fused=cfg.train.adamw_impl == "fused")
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, config=ds_config(cfg, world_size))
    return engine


def start_session(cfg: Any, loop_config: dict[str, Any], task: torch.nn.Module) -> Session:
    """Engine, resumed state and tracker of this worker (call first in a Ray Train loop)."""
    import ray.train  # noqa: PLC0415

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    quiet_report_lines()
    if not cfg.train.use_gpu:
        skip_cpu_shm_build()
    from pipeline.tracking import MlflowTracker, NullTracker, start_node_monitor  # noqa: PLC0415

    engine = build_engine(cfg, task, world)
    state = TrainState(world_size=world, mlflow_run_id=loop_config.get("mlflow_run_id"))
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            state = ckpt_io.load(engine, d, rank, world, cfg.train.global_batch())
    elif cfg.train.warm_start and os.path.isdir(os.path.join(cfg.train.warm_start, "ds")):
        ckpt_io.load(engine, cfg.train.warm_start, rank, world, weights_only=True)
    state.mlflow_run_id = state.mlflow_run_id or loop_config.get("mlflow_run_id")
    state.global_batch = cfg.train.global_batch()
    tracker: Any = NullTracker()
    monitor = None
    if cfg.tracking.enabled and cfg.tracking.system_metrics and state.mlflow_run_id and ctx.get_local_rank() == 0:
        monitor = start_node_monitor(cfg.tracking.tracking_uri, state.mlflow_run_id, f"node{ctx.get_node_rank()}",
                                     resume=state.step > 0)
    if rank == 0 and cfg.tracking.enabled and state.mlflow_run_id:
        tracker = MlflowTracker(cfg.tracking.tracking_uri, state.mlflow_run_id)
        if state.step == 0:
            tracker.log_params(loop_config["job"])
            # What rank 0 computes with: Ray sets OMP_NUM_THREADS from train.cpus_per_worker.
            tracker.log_params({"runtime.torch_threads": torch.get_num_threads()})
            tracker.log_dict(loop_config["job"], "config/job.json")
            tracker.log_dict(ds_config(cfg, world), "config/deepspeed.json")
    return Session(rank=rank, world=world, engine=engine, state=state, tracker=tracker,
                   chunks=cfg.train.chunks(world), monitor=monitor)


def save_checkpoint(s: Session, cfg: Any, loop_config: dict[str, Any], metrics: dict[str, float] | None = None
                    ) -> None:
    """Metrics flushed, then a checkpoint of every rank reported to Ray Train with `metrics`
    (the run's throughput: what the driver's summary prints)."""
    s.tracker.flush()  # the metrics up to a checkpoint are in MLflow before it is recorded
    save_and_report(s.engine, cfg, loop_config, s.state, s.rank, metrics)


def finish_session(s: Session, cfg: Any, export_dir: str, artifacts: list[tuple[str, str]],
                   register: str | None, tag: str) -> None:
    """The finish (pipeline/train/finish.py) on every submission, a finished run's too: the final
    weights exported to `export_dir`, each (uri, artifact path) of `artifacts` logged, the artifact
    path `register` registered as `tracking.register_model`; each once. Closes the tracker."""
    finish.pause_point("checkpoint", s.rank)
    finish.export_once(s.engine, export_dir, s.state.step, cfg, s.rank, s.world, tag)
    finish.pause_point("export", s.rank)
    if s.rank == 0 and s.tracker.run_id:
        for uri, path in artifacts:
            finish.log_artifacts_once(s.tracker, uri, path, cfg)
        finish.pause_point("artifacts", s.rank)
        if register and cfg.tracking.register_model:
            finish.register_once(s.tracker, register, cfg.tracking.register_model, cfg, tag)
    if s.monitor is not None:
        s.monitor.finish()
    s.tracker.close("FINISHED")


def save_and_report(engine, cfg, loop_config, state, rank, metrics: dict[str, float] | None = None) -> None:
    import ray.train  # noqa: PLC0415

    tmp = tempfile.mkdtemp(prefix=f"clipvip-ckpt-r{rank}-")
    try:
        ckpt_io.save(engine, tmp, state, rank, loop_config["job"], universal=cfg.train.universal_checkpoint)
        best = {"best_metric": state.best_metric, "best_step": state.best_step} if state.best_metric is not None else {}
        ray.train.report({**(metrics or {}), **best, "step": state.step, "epoch": state.epoch,
                          "samples_seen": state.samples_seen},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step_{state.step:09d}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
