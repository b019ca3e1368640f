"""Optimizer parameter groups and the learning-rate schedule (clipvip_spec.md section 4.1).

The schedule is a pure function of the global step, so a resumed run needs no scheduler state
and cannot drift from an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

# The official `build_e2e_optimizer_w_lr_mul` exempts names containing any of these from weight
# decay. HF CLIP names its norms layer_norm1/2, pre_layrnorm, post_layernorm, final_layer_norm,
# so "LayerNorm.*" never matches: LayerNorm weights ARE decayed, and so are all embeddings
# (added_cls, temporal_embedding included). Only biases and logit_scale are exempt. We keep
# this quirk on purpose: it is what the released weights were trained with.
NO_DECAY_SUBSTRINGS = ("bias", "LayerNorm.bias", "LayerNorm.weight", "logit_scale")


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two AdamW groups, decay and no-decay, by the official name rule; frozen params skipped."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if any(nd in name for nd in NO_DECAY_SUBSTRINGS) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_adamw(groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6,
               fused: bool = False) -> torch.optim.AdamW:
    """AdamW as the paper: betas (0.9, 0.98), eps 1e-6, decoupled decay; torch's fused kernel when
    `fused` (train.adamw_impl), else torch's default kernel.

    A torch optimizer passed to DeepSpeed as a client optimizer: a DeepSpeed-config optimizer
    would JIT-build FusedAdam on CPU (84 s) for no gain at this size.
    """
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def lr_at(step: int, base_lr: float, total_steps: int, warmup_ratio: float = 0.01, min_lr: float = 1e-8) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to 0.

    Warmup covers ceil(warmup_ratio * total_steps) steps and starts at base_lr / warmup (the
    official schedule starts from step 1 / warmup, never from 0); the cosine part is floored at
    min_lr as the official `warmup_cosine`.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    warmup = max(1, math.ceil(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return max(min_lr, base_lr * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
