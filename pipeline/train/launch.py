"""make_trainer: a PretrainJobConfig -> a Ray Train V2 TorchTrainer (no loop logic here).

Resume is Ray Train V2's: the same `RunConfig(name, storage_path)` finds the run's latest
checkpoint (`ray.train.get_checkpoint()` in the workers), both after a worker failure (the
controller restarts the group, up to `train.max_failures`) and when the whole job is submitted
again. The deprecated V1 `resume_from_checkpoint` / `Trainer.restore` raise in 2.60.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from pipeline.config import to_dict
from pipeline.utils import fs


def run_dir(cfg: Any) -> str:
    return fs.join(cfg.train.storage_path, cfg.run_name)


def export_dir(cfg: Any) -> str:
    """Where the final HF-format weights go (beside Ray Train's run directory)."""
    return fs.join(cfg.train.storage_path, cfg.run_name + "-export")


def storage_filesystem(cfg: Any) -> Any:
    """pyarrow filesystem for s3:// storage (endpoint override, AWS credential chain); None locally."""
    if not fs.is_s3(cfg.train.storage_path):
        return None
    filesystem, _ = fs.resolve(cfg.train.storage_path, fs.S3Options.of(cfg.storage))
    return filesystem


def best_dir(cfg: Any) -> str:
    """finetune: where the weights with the best validation score go (HF format)."""
    return fs.join(cfg.train.storage_path, cfg.run_name + "-best")


def make_trainer(cfg: Any, mlflow_run_id: str | None, loop: Callable[[dict], None] | None = None,
                 extra_loop_config: dict[str, Any] | None = None) -> Any:
    """A TorchTrainer for `pretrain` (default loop) or `finetune` (its loop + item lists).

    `cfg` is a PretrainJobConfig or FinetuneJobConfig: both have run_name, train, storage.
    """
    import ray.train  # noqa: PLC0415
    from ray.train.torch import TorchConfig, TorchTrainer  # noqa: PLC0415

    from pipeline.train.worker import train_loop_per_worker  # noqa: PLC0415

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    storage = t.storage_path
    filesystem = storage_filesystem(cfg)
    if filesystem is not None:
        storage = storage[len("s3://"):]
    env = {k: v for k, v in os.environ.items() if k in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "TORCH_EXTENSIONS_DIR",
                                                         "HF_HUB_OFFLINE", "CLIPVIP_CACHE_DIR")}
    # Ray Train V2 reroutes worker print() into the root logger *and* tees it to the redirected
    # stdout, so every progress line reached the driver twice; plain prints arrive once, with
    # Ray's "(RayTrainWorker pid=...)" prefix.
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    return TorchTrainer(
        loop or train_loop_per_worker,
        train_loop_config={"job": to_dict(cfg), "mlflow_run_id": mlflow_run_id, "export_dir": export_dir(cfg),
                           "best_dir": best_dir(cfg), **(extra_loop_config or {})},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=storage,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
            # Ray Train's own INFO lines (each checkpoint, each report) drown our progress lines;
            # they stay in the run's log files under the Ray session directory.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
