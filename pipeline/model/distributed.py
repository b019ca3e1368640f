"""Cross-rank gathers for contrastive losses; plain torch.distributed (gloo, NCCL, ...).

The losses need the global batch as negatives. `all_gather_with_grad` concatenates every rank's
rows and lets gradients flow back to the rank that produced them: its backward SUMS the incoming
gradient over ranks and returns this rank's slice. Combined with a *local* loss (each rank scores
only its own rows, see losses.py) and the data-parallel gradient average of DDP/DeepSpeed, the
parameter gradient is exactly the gradient of the single-process loss on the concatenated batch
(derivation in losses.py; tested in tests/unit/model/test_losses.py).

Every function is the identity (world size 1) when torch.distributed is unavailable or not
initialised, so single-process training, evaluation and unit tests need no process group.

Requirement: every rank passes the same shape (equal per-rank batch, i.e. drop_last=True), and
every rank runs the same sequence of gathers, forward and backward (they are collectives).

Shape legend: B = rows on this rank, W = world size, N = W * B rows in the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_no_grad", "all_gather_with_grad", "rank_and_world_size"]


def rank_and_world_size(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """This process's rank and the world size, or (0, 1) without an initialised process group.

    Args:
        group: process group; None is the default (world) group.

    Returns:
        (rank, world_size).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group=group), dist.get_world_size(group=group)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward reduces (sums) the gradient and keeps the local slice."""

    @staticmethod
    def forward(ctx, x_BX: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        rank, world_size = rank_and_world_size(group)
        ctx.group, ctx.rank, ctx.rows = group, rank, x_BX.shape[0]
        x_BX = x_BX.contiguous()
        parts = [torch.empty_like(x_BX) for _ in range(world_size)]
        dist.all_gather(parts, x_BX, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_NX: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        # Rank r's rows are used as negatives by every rank, so their gradient is the sum of
        # all ranks' gradients for those rows. all_reduce + slice instead of reduce_scatter:
        # it runs on every backend (gloo has no reduce_scatter), and the tensor is tiny
        # (N x D fp32, 2 MB at N=1024, D=512) next to the model's own gradient all-reduce.
        grad_NX = grad_NX.contiguous().clone()
        dist.all_reduce(grad_NX, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad_NX[start : start + ctx.rows], None


def all_gather_with_grad(x_BX: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate `x` from all ranks in rank order, differentiably.

    Backward: the gradient w.r.t. this rank's `x` is the slice [rank*B, (rank+1)*B) of the
    SUM over ranks of the gradients w.r.t. the gathered tensor (open_clip "gather with grad",
    horovod allgather with summing). Identity when not distributed or world size 1.

    Args:
        x_BX: [B, ...] local rows; same shape and dtype on every rank.
        group: process group; None is the default group.

    Returns:
        [W*B, ...] rows of rank 0, then rank 1, ...; rows of this rank keep their autograd
        connection to `x_BX`.
    """
    _, world_size = rank_and_world_size(group)
    if world_size == 1:
        return x_BX
    return _AllGatherWithGrad.apply(x_BX, group)


@torch.no_grad()
def all_gather_no_grad(x_BX: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate `x` from all ranks in rank order without autograd (ids, labels, eval features).

    Args:
        x_BX: [B, ...] local rows; same shape and dtype on every rank.
        group: process group; None is the default group.

    Returns:
        [W*B, ...] detached; `x_BX` itself when not distributed or world size 1.
    """
    _, world_size = rank_and_world_size(group)
    if world_size == 1:
        return x_BX
    x_BX = x_BX.contiguous()
    parts = [torch.empty_like(x_BX) for _ in range(world_size)]
    dist.all_gather(parts, x_BX, group=group)
    return torch.cat(parts, dim=0)
