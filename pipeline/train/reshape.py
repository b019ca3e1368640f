"""Resume on another GPU count: the optimizer state in a form free of the world size.

ZeRO partitions the fp32 master weights and the Adam moments by data-parallel rank (and pads the
partitions to the world size), so DeepSpeed's own checkpoint loads only at the world size that
wrote it. Every checkpoint therefore also holds, per trainable parameter, its full fp32 master
and moments (`universal/`), gathered with DeepSpeed's `safe_get_full_fp32_param` /
`safe_get_full_optimizer_state` (any ZeRO stage, bf16 or fp32) and written as safetensors (no
pickle). Parameter i is written by rank i % world, so each rank writes 1/world of the state.

A run resumed at another world size builds its engine fresh and gives every rank its partition
back through `safe_set_full_*`, then refreshes the low-precision weights the forward uses. This is
what DeepSpeed's universal checkpoints do (https://www.deepspeed.ai/tutorials/universal-checkpointing/),
without their offline `ds_to_universal` step between runs and without unpickling
(`torch.load(weights_only=False)` there). It costs one gather of the optimizer state per
checkpoint: about as much traffic as three all-reduces of the model, and as many bytes again as
DeepSpeed's own optimizer files (`train.universal_checkpoint: false` turns it off).
"""

from __future__ import annotations

import glob
import os
from typing import Any

import torch

UNIVERSAL_DIR = "universal"
FORMAT = "clipvip-universal-1"
# make_adamw (pipeline/train/optim.py) is AdamW without amsgrad: these are all of its state.
MOMENTS = ("exp_avg", "exp_avg_sq")


def _key(name: str, what: str) -> str:
    return f"{name}::{what}"


def _trainable(engine: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _states(engine: Any) -> tuple[Any, list[torch.Tensor]]:
    """(the torch optimizer inside DeepSpeed's, the flat fp32 partitions it steps)."""
    inner = engine.optimizer.optimizer
    z3 = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if z3 is not None:  # ZeRO-3 hands them to the torch optimizer only for the step itself
        return inner, list(z3)
    return inner, [p for group in inner.param_groups for p in group["params"]]


def optimizer_step(engine: Any) -> int:
    """AdamW's step count (its bias correction); 0 before the first step."""
    inner, flats = _states(engine)
    steps = {int(inner.state[p]["step"]) for p in flats if "step" in inner.state[p]}
    if len(steps) > 1:
        raise ValueError(f"optimizer partitions disagree on the step count: {sorted(steps)}")
    return steps.pop() if steps else 0


def partitioned(engine: Any) -> bool:
    """Whether DeepSpeed partitions the optimizer state by rank (ZeRO 1-3). Without ZeRO its own
    checkpoint holds the whole state once and loads at any world size."""
    return engine.zero_optimization_stage() > 0


def save_universal(engine: Any, out_dir: str, rank: int, world: int) -> str | None:
    """Write this rank's share of the full optimizer state to `out_dir/universal/` (every rank must
    call it: the gathers are collectives). Returns the file written (None without ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    if not partitioned(engine):
        return None
    step = optimizer_step(engine)
    if step:
        _link_states(engine)
    mine: dict[str, torch.Tensor] = {}
    for i, (name, param) in enumerate(_trainable(engine)):
        values = {"fp32": safe_get_full_fp32_param(param)}
        if step:  # AdamW creates its moments at the first step
            values.update({m: safe_get_full_optimizer_state(param, m) for m in MOMENTS})
        if i % world == rank:
            for what, value in values.items():
                if value is None:
                    raise ValueError(f"DeepSpeed has no full {what} for {name}: universal/ cannot be written")
                mine[_key(name, what)] = value.detach().float().cpu().contiguous()
    os.makedirs(os.path.join(out_dir, UNIVERSAL_DIR), exist_ok=True)
    path = os.path.join(out_dir, UNIVERSAL_DIR, f"part{rank:05d}-of-{world:05d}.safetensors")
    save_file(mine, path, metadata={"format": FORMAT, "optimizer_step": str(step), "world_size": str(world)})
    return path


def has_universal(ckpt_dir: str) -> bool:
    return bool(glob.glob(os.path.join(ckpt_dir, UNIVERSAL_DIR, "part*.safetensors")))


def load_universal(engine: Any, ckpt_dir: str) -> int:
    """Set every rank's partition of the fp32 weights and Adam moments from `ckpt_dir/universal/`,
    whatever world size wrote it (every rank must call it). Returns the optimizer step.

    Raises:
        ValueError: parts missing or from different writes, or parameters that do not match the
            model (names the first few).
    """
    from safetensors import safe_open  # noqa: PLC0415

    where = os.path.join(ckpt_dir, UNIVERSAL_DIR)
    paths = sorted(glob.glob(os.path.join(where, "part*.safetensors")))
    handles = [safe_open(p, framework="pt") for p in paths]
    metas = [h.metadata() or {} for h in handles]
    if not paths or any(m.get("format") != FORMAT for m in metas):
        raise ValueError(f"{where}: no {FORMAT} parts")
    worlds = {m.get("world_size") for m in metas}
    steps = {m.get("optimizer_step") for m in metas}
    if len(worlds) != 1 or len(steps) != 1 or len(paths) != int(worlds.pop()):
        raise ValueError(f"{where}: {len(paths)} parts that do not make one whole (world sizes, steps: "
                         f"{sorted(m.get('world_size', '?') for m in metas)}, {sorted(steps)})")
    step = int(steps.pop())
    owner = {k: h for h in handles for k in h.keys()}  # noqa: SIM118  safe_open has no __iter__
    wanted = {_key(n, w) for n, _ in _trainable(engine) for w in ("fp32", *(MOMENTS if step else ()))}
    missing, extra = sorted(wanted - owner.keys()), sorted(owner.keys() - wanted)
    if missing or extra:
        raise ValueError(f"{where} does not match this model: missing {missing[:3]} ({len(missing)}), "
                         f"unexpected {extra[:3]} ({len(extra)}); was it written by another model.*?")
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in _trainable(engine)}
    wrong = [f"{k} {tuple(owner[k].get_slice(k).get_shape())} != {shapes[k.split('::')[0]]}"
             for k in sorted(wanted) if tuple(owner[k].get_slice(k).get_shape()) != shapes[k.split("::")[0]]]
    if wrong:
        raise ValueError(f"{where} does not match this model's shapes: {wrong[:3]} ({len(wrong)}); "
                         "was it written with other model.* or train.num_frames / image_size_px?")
    if step:
        _create_adam_states(engine, step)
    opt = engine.optimizer
    if hasattr(opt, "checkpoint_event_prologue"):  # ZeRO-3: as DeepSpeed's own load, all partitioned first
        opt.checkpoint_event_prologue()
    for name, param in _trainable(engine):
        for what in ("fp32", *(MOMENTS if step else ())):
            _set_full(engine, param, owner[_key(name, what)].get_tensor(_key(name, what)), what)
    _refresh_module_weights(engine)
    if hasattr(opt, "checkpoint_event_epilogue"):  # ZeRO-3: re-gather the small persistent parameters
        opt.checkpoint_event_epilogue()
    return step


def _set_full(engine: Any, param: torch.nn.Parameter, value: torch.Tensor, what: str) -> None:
    """This rank's partition of `param`'s fp32 master (what="fp32") or Adam moment, from its full value."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state  # noqa: PLC0415

    value = value.to(param.device)
    if not hasattr(param, "ds_id"):  # ZeRO-1/2, bf16 optimizer
        if what == "fp32":
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, what)
        return
    # ZeRO-3: DeepSpeed's setter (stage3.py set_full_hp_param) reads past the end of a parameter
    # whose last partition is padding (a 1-element logit_scale on 2 ranks); write the real part.
    opt = engine.optimizer
    # DeepSpeed's own setter goes through the same two private methods.
    part, _ = opt._get_fp32_opt_state_partition(  # noqa: SLF001
        param, release_swap_buffers=False, optim_state_key=None if what == "fp32" else what)
    flat = value.flatten()
    start = part.numel() * opt._get_param_partition_rank(param)  # noqa: SLF001
    n = max(0, min(part.numel(), flat.numel() - start))
    part.data.zero_()
    part.data[:n].copy_(flat[start:start + n])


def _create_adam_states(engine: Any, step: int) -> None:
    """AdamW creates its state at the first step; a resumed engine needs it now, to be filled in.
    The step count is AdamW's own scalar tensor (float32 on the CPU, as torch makes it)."""
    inner, flats = _states(engine)
    for flat in flats:
        state = inner.state[flat]
        state["step"] = torch.tensor(float(step), dtype=torch.float32)
        for m in MOMENTS:
            state.setdefault(m, torch.zeros_like(flat, memory_format=torch.preserve_format))
    _link_states(engine)


def _link_states(engine: Any) -> None:
    """ZeRO-1/2 and the bf16 optimizer keep per-parameter views into the flat optimizer states,
    made once, right after the first param group's first step (DeepSpeed 0.19.7,
    `_lazy_init_hp_params_optimizer_state`): the second group (no weight decay) has no state yet
    then, so its views stay empty and `safe_get_full_optimizer_state` fails on its parameters.
    Make them again now that every group has its state."""
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        engine.optimizer._hp_optimizer_states_linked = False  # noqa: SLF001  (the flag `link` checks)
        link()


def _refresh_module_weights(engine: Any) -> None:
    """The forward uses the low-precision (or ZeRO-partitioned) copies: make them the new masters."""
    opt = engine.optimizer
    if hasattr(opt, "update_lp_params"):  # ZeRO-1/2, bf16 optimizer: copy and all-gather
        opt.update_lp_params()
        return
    # ZeRO-3: each rank's fp32 partition into its low-precision partition, as DeepSpeed's own
    # universal load does (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3).
    for i, fp32 in enumerate(opt.fp32_partitioned_groups_flat):
        if fp32.numel() > 0:
            opt.fp16_partitioned_groups_flat[i].data.copy_(fp32.data)
        updated = opt.unflatten(opt.fp16_partitioned_groups_flat[i], opt.fp16_partitioned_groups[i])
        for partitioned, q in zip(opt.fp16_partitioned_groups[i], updated, strict=True):
            partitioned.data = q.data
