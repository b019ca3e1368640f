"""Training checkpoints: DeepSpeed state + our client state, laid out for Ray Train.

Every rank writes into its own local temp dir and reports it; Ray Train merges the ranks' files
into one checkpoint directory in `storage_path`:

    ds/                      DeepSpeed: model states, ZeRO optimizer shards (per rank), `latest`
    ds/<tag>/...             (DeepSpeed's own layout, tag "ds")
    rng_rank{r}.pt           this rank's torch/numpy/python RNG states
    train_state.json         step, epoch, data position, samples seen, MLflow run id (rank 0)
    config.json              the resolved job config (rank 0)

The data position is the global step: data order is a pure function of (seed, epoch, world
size), so step k says exactly which samples every rank has consumed. RNG states are saved too
(cheap) although nothing random depends on them today: frame jitter is seeded per sample.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

DS_TAG = "ds"
STATE_FILE = "train_state.json"
CONFIG_FILE = "config.json"


@dataclass(slots=True)
class TrainState:
    """Where a run is; saved in every checkpoint and restored on resume."""

    step: int = 0
    """Optimizer steps done (global: all ranks step together)."""
    epoch: int = 0
    step_in_epoch: int = 0
    """Global batches of `epoch` consumed; the next step reads batch `step_in_epoch`."""
    samples_seen: int = 0
    skipped_rows: int = 0
    mlflow_run_id: str | None = None
    world_size: int = 1
    best_metric: float | None = None
    """finetune: best validation score so far (its weights are in <run>-best)."""
    best_step: int = 0


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(engine: Any, out_dir: str, state: TrainState, rank: int, config: dict[str, Any]) -> None:
    """Write this rank's part of a checkpoint into `out_dir` (all ranks must call it)."""
    os.makedirs(out_dir, exist_ok=True)
    # client_state is stored by rank 0 only in DeepSpeed's model-states file; keep it small.
    engine.save_checkpoint(os.path.join(out_dir, "ds"), tag=DS_TAG, client_state={"train_state": asdict(state)})
    torch.save(rng_state(), os.path.join(out_dir, f"rng_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(out_dir, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(asdict(state), f, indent=2, sort_keys=True)
        with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)


def load(engine: Any, ckpt_dir: str, rank: int, world_size: int, weights_only: bool = False) -> TrainState:
    """Restore DeepSpeed state (or only the module weights) and this rank's RNG from `ckpt_dir`.

    Raises:
        ValueError: the checkpoint was written at another world size (ZeRO shards are bound to the
            data-parallel size; convert it with DeepSpeed's ds_to_universal first).
    """
    with open(os.path.join(ckpt_dir, STATE_FILE), encoding="utf-8") as f:
        state = TrainState(**json.load(f))
    if weights_only:
        engine.load_checkpoint(os.path.join(ckpt_dir, "ds"), tag=DS_TAG, load_module_only=True,
                               load_optimizer_states=False, load_lr_scheduler_states=False)
        return TrainState()
    if state.world_size != world_size:
        raise ValueError(f"checkpoint {ckpt_dir} was written with {state.world_size} workers, this run has "
                         f"{world_size}; keep train.num_workers fixed to resume (data order and ZeRO "
                         "shards depend on it)")
    path, _ = engine.load_checkpoint(os.path.join(ckpt_dir, "ds"), tag=DS_TAG)
    if path is None:
        raise ValueError(f"DeepSpeed found no checkpoint under {ckpt_dir}/ds")
    rng_file = os.path.join(ckpt_dir, f"rng_rank{rank}.pt")
    if os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state




def full_fp32_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The module's weights in fp32 from the optimizer's master copy (any ZeRO stage, any dtype).

    With bf16 the module holds bf16 copies; the fp32 masters are what training actually has, so
    export those. Must be called on all ranks (ZeRO-3 gathers).
    """
    from deepspeed.utils import safe_get_full_fp32_param  # noqa: PLC0415

    out = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        out[name] = (full if full is not None else param.detach().float()).detach().cpu().clone()
    persistent = set(engine.module.state_dict())  # skip non-persistent buffers (e.g. position_ids)
    for name, buf in engine.module.named_buffers():
        if name in persistent:
            out.setdefault(name, buf.detach().cpu().clone())
    return out
