"""Training checkpoints: DeepSpeed state + our client state, laid out for Ray Train.

Every rank writes into its own local temp dir and reports it; Ray Train merges the ranks' files
into one checkpoint directory in `storage_path`:

    ds/                      DeepSpeed: model states, ZeRO optimizer shards (per rank), `latest`
    ds/<tag>/...             (DeepSpeed's own layout, tag "ds")
    universal/part*.safetensors  the full fp32 weights and Adam moments, free of the world size
                             (pipeline/train/reshape.py): what a resume on another GPU count loads
    rng_rank{r}.pt           this rank's torch/numpy/python RNG states
    train_state.json         step, epoch, data position, samples seen, MLflow run id (rank 0)
    config.json              the resolved job config (rank 0)

The data position is the global step: data order is a pure function of (seed, epoch, global
batch), so step k says exactly which samples the run has consumed, whatever the world size.
At the world size that wrote it a checkpoint resumes through DeepSpeed's own files, bit for bit;
at another one through `universal/`, its global batch unchanged (gradient caching keeps the
global batch when the GPUs change). RNG states are saved too
(cheap) although nothing random depends on them today: frame jitter is seeded per sample.

Nothing here unpickles code: every file is read with `torch.load(weights_only=True)`, DeepSpeed's
own reads included (`SafeCheckpointEngine`), with three plain DeepSpeed classes allowed by name. A
checkpoint bucket anyone can write to would otherwise be code execution on every worker
(https://pytorch.org/docs/stable/generated/torch.load.html, "weights_only").
"""

from __future__ import annotations

import json
import os
import pickle
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pipeline.train import reshape

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
    """Best validation score so far: finetune's `data.select_metric` (its weights are in
    <run>-best), pretrain's zero-shot t2v R@1 (reported only)."""
    best_step: int = 0
    global_batch: int = 0
    """Clips per step (train.global_batch()); 0 in checkpoints from before it was recorded."""


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holds something other than tensors and plain values: refused, not loaded."""


def safe_load(path: str, map_location: Any = "cpu") -> Any:
    """`torch.load` that cannot run code: tensors, plain containers and DeepSpeed's three state
    classes (its ZeRO optimizer files hold a LossScaler, ZeroStageEnum and fragment_address).

    Raises:
        UnsafeCheckpoint: the file needs any other global (a planted pickle, or a file from
            elsewhere); the message names the file and the global.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # noqa: PLC0415
    from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: PLC0415
    from deepspeed.utils.tensor_fragment import fragment_address  # noqa: PLC0415

    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                   str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise UnsafeCheckpoint(f"{path}: refused: it needs more than tensors and plain values to load ({why}); "
                               "checkpoints are data, so a file that carries code was not written by a "
                               "training run here") from e


def install_safe_loading(engine: Any) -> None:
    """Make DeepSpeed read checkpoints through `safe_load` (its default engine unpickles anything)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine  # noqa: PLC0415

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_load(path, map_location)

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:  # the decoupled/fast engines have other loads
        raise ValueError(f"checkpoint engine {type(current).__name__} is not supported (TorchCheckpointEngine only)")
    safe = SafeCheckpointEngine.__new__(SafeCheckpointEngine)
    safe.__dict__.update(current.__dict__)
    engine.checkpoint_engine = safe


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(mt), "gauss": gauss}}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def save(engine: Any, out_dir: str, state: TrainState, rank: int, config: dict[str, Any],
         universal: bool = True) -> None:
    """Write this rank's part of a checkpoint into `out_dir` (all ranks must call it); with
    `universal`, its share of the world-size-free state too."""
    os.makedirs(out_dir, exist_ok=True)
    # client_state is stored by rank 0 only in DeepSpeed's model-states file; keep it small.
    engine.save_checkpoint(os.path.join(out_dir, "ds"), tag=DS_TAG, client_state={"train_state": asdict(state)})
    if universal:
        reshape.save_universal(engine, out_dir, rank, state.world_size)
    torch.save(rng_state(), os.path.join(out_dir, f"rng_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(out_dir, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(asdict(state), f, indent=2, sort_keys=True)
        with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)


def load(engine: Any, ckpt_dir: str, rank: int, world_size: int, global_batch: int = 0,
         weights_only: bool = False) -> TrainState:
    """Restore DeepSpeed state (or only the module weights) and this rank's RNG from `ckpt_dir`.

    At the world size that wrote it: DeepSpeed's own files, bit for bit. At another: the
    world-size-free state (`reshape.load_universal`); the RNG states, one per old rank, are not
    restored (nothing random depends on them).

    Raises:
        ValueError: another global batch (the data position is counted in global batches), or
            another world size and no `universal/` in the checkpoint; the message says what to set.
        UnsafeCheckpoint: a file would need unpickling code (`safe_load`).
    """
    with open(os.path.join(ckpt_dir, STATE_FILE), encoding="utf-8") as f:
        state = TrainState(**json.load(f))
    install_safe_loading(engine)
    if weights_only:
        engine.load_checkpoint(os.path.join(ckpt_dir, "ds"), tag=DS_TAG, load_module_only=True,
                               load_optimizer_states=False, load_lr_scheduler_states=False)
        return TrainState()
    if global_batch and state.global_batch and state.global_batch != global_batch:
        raise ValueError(f"checkpoint {ckpt_dir} was written with a global batch of {state.global_batch} clips, this "
                         f"run's is {global_batch}: its step count and data position are in global batches, so set "
                         f"train.global_batch_size={state.global_batch} to resume it")
    # Without ZeRO, DeepSpeed's own files hold the whole state once and load at any world size.
    if state.world_size != world_size and reshape.partitioned(engine):
        return _load_reshaped(engine, ckpt_dir, state, rank, world_size)
    state.world_size = world_size
    path, _ = engine.load_checkpoint(os.path.join(ckpt_dir, "ds"), tag=DS_TAG)
    if path is None:
        raise ValueError(f"DeepSpeed found no checkpoint under {ckpt_dir}/ds")
    rng_file = os.path.join(ckpt_dir, f"rng_rank{rank}.pt")
    if os.path.exists(rng_file):
        set_rng_state(safe_load(rng_file))
    return state


def _load_reshaped(engine: Any, ckpt_dir: str, state: TrainState, rank: int, world_size: int) -> TrainState:
    why = None
    if not reshape.has_universal(ckpt_dir):
        why = ("it holds only DeepSpeed's per-rank state (no universal/: written with "
               "train.universal_checkpoint=false, or by an older version)")
    elif not state.global_batch:
        why = "it does not record its global batch (written by an older version), so the data position is unknown"
    if why:
        raise ValueError(f"checkpoint {ckpt_dir} was written with {state.world_size} workers, this run has {world_size}, "
                         f"and {why}: resume it with train.num_workers={state.world_size}")
    # AdamW's own step count comes with universal/: with bf16 DeepSpeed skips the update of a step
    # whose gradients overflowed, so it may trail state.step.
    step = reshape.load_universal(engine, ckpt_dir)
    if rank == 0:
        print(f"[resume] step {state.step} was written by {state.world_size} workers; resuming on {world_size} from the "
              f"full optimizer state in {reshape.UNIVERSAL_DIR}/ (global batch {state.global_batch} unchanged, AdamW at step {step})",
              flush=True)
    state.world_size = world_size
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
