"""Gradient caching: the contrastive loss over a global batch larger than the GPUs hold at once.

Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
(https://arxiv.org/abs/2101.06983). The InfoNCE batch of CLIP-ViP is 1024 (paper section 4.1);
with micro batch m on W ranks, plain data parallelism sees m x W negatives, and gradient
accumulation does not help: each accumulated micro batch would see only its own. Here a rank's
share of the global batch, B = chunks x m rows, is processed in three passes:

    1. embed every chunk of m rows without a graph (activation memory of one chunk);
    2. score the loss over all B rows at once (gathered across ranks as always, losses.py), with
       the features as leaves, and back-propagate it to them: the cached gradients d loss / d f;
    3. embed each chunk again, with a graph, and back-propagate sum(f * cached grad) (plus the
       logit scale's cached gradient once), accumulating the parameter gradients chunk by chunk.

The parameter gradient is the full batch's: d loss / d theta = sum over rows of (d loss / d f)
(d f / d theta), and pass 3 adds exactly those products. It costs one extra forward per chunk
and needs the forward to be deterministic (CLIP has no dropout). Checked against the full-batch
gradient on a 2-rank gloo group in tests/unit/train/test_gradcache.py.

Shape legend: B rows of this rank's share, m rows a chunk, D embedding width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


Embed = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor | None]]
"""A chunk's features: the task (or its DeepSpeed engine) called with embed_only=True."""
Score = Callable[[dict[str, torch.Tensor | None], torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""The loss and its metrics from all rows' features (`task.score`)."""


def split(batch: dict[str, torch.Tensor], chunks: int) -> list[dict[str, torch.Tensor]]:
    """`chunks` equal consecutive row slices of every column.

    Raises:
        ValueError: the rows do not split evenly.
    """
    rows = int(batch["clip_id"].shape[0])
    if rows % chunks:
        raise ValueError(f"{rows} rows do not split into {chunks} equal chunks")
    m = rows // chunks
    return [{k: v[i * m:(i + 1) * m] for k, v in batch.items()} for i in range(chunks)]


def cached_backward(embed: Embed, score: Score, batch: dict[str, torch.Tensor], chunks: int,
                    backward: Callable[[torch.Tensor], Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Passes 1-3 of the module docstring over this rank's rows; `backward(surrogate)` is called
    once per chunk (the engine's backward, which accumulates). Every rank must call it with the
    same `chunks` (the loss gathers across ranks).

    Returns:
        (the loss over all B rows, detached; its metrics).
    """
    parts = split(batch, chunks)
    with torch.no_grad():
        embedded = [embed(p) for p in parts]
    names = [k for k, v in embedded[0].items() if k != "logit_scale" and v is not None]
    leaves = {k: torch.cat([e[k] for e in embedded]).detach().requires_grad_() for k in names}
    scale = embedded[0]["logit_scale"].detach().requires_grad_()
    del embedded
    loss, metrics = score({**leaves, "logit_scale": scale}, batch["clip_id"])
    loss.backward()
    m = int(batch["clip_id"].shape[0]) // chunks
    for i, part in enumerate(parts):
        feats = embed(part)
        rows = slice(i * m, (i + 1) * m)
        surrogate = sum((feats[k] * leaves[k].grad[rows].to(feats[k].dtype)).sum() for k in names)
        if i == 0:  # the logit scale is one parameter, shared by every chunk: its gradient once
            surrogate = surrogate + (feats["logit_scale"] * scale.grad.to(feats["logit_scale"].dtype)).sum()
        backward(surrogate)
    return loss.detach(), metrics


def train_step(engine: Any, batch: dict[str, torch.Tensor], chunks: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step of a DeepSpeed engine on this rank's share of the global batch.

    chunks = 1 is the plain step. Otherwise the engine was built with gradient_accumulation_steps
    = chunks: each chunk's backward accumulates unscaled (the cached gradients are already the
    full batch's) and the last one's `step` is the update.
    """
    if chunks == 1:
        loss, metrics = engine(batch)
        engine.backward(loss)
        engine.step()
        return loss.detach(), metrics

    def backward(surrogate: torch.Tensor) -> None:
        engine.backward(surrogate, scale_wrt_gas=False)
        engine.step()

    return cached_backward(lambda b: engine(b, embed_only=True), engine.module.score, batch, chunks, backward)
