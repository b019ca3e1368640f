"""One rank of the 2-process gloo gradient check in test_losses.py (also imported by it).

Run as: python _gather_worker.py RANK WORLD_SIZE PORT OUT_PATH. Each rank encodes its slice of a
fixed global batch with a tiny linear "encoder", runs every loss with gather on, backpropagates,
averages parameter gradients over ranks as DDP/DeepSpeed do, and rank 0 saves the averaged
gradients and the rank-averaged loss. The test compares them with one process on the whole batch.

Shape legend: N global rows, B rows per rank, I input width, D embedding width.
"""

from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pipeline.model.losses import LOSS_VARIANTS, NCELearnableTempLoss, OmnisourceLoss  # noqa: E402

NUM_GLOBAL, INPUT_WIDTH, EMBED_WIDTH = 6, 5, 4
# Row 1 (rank 0) and row 4 (rank 1) are the same clip: the id mask must work across ranks.
CLIP_IDS_N = torch.tensor([10, 11, 12, 13, 11, 15])
# Every loss in the check; "*_nogather" must NOT match the single-process gradient.
CASES = [*LOSS_VARIANTS, "nce", "vsc_fc_nogather"]


class TinyEncoder(nn.Module):
    """Four linear heads (video, subtitle, frame, caption) + a learnable log logit scale."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():  # same init in every process, caller's RNG untouched
            torch.manual_seed(0)
            self.heads = nn.ModuleDict({k: nn.Linear(INPUT_WIDTH, EMBED_WIDTH) for k in "vsfc"})
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, inputs_NI: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: F.normalize(self.heads[k](x), dim=-1) for k, x in inputs_NI.items()}


def global_inputs() -> dict[str, Tensor]:
    """Fixed [N, I] inputs per source, identical in every process."""
    gen = torch.Generator().manual_seed(1)
    return {k: torch.randn(NUM_GLOBAL, INPUT_WIDTH, generator=gen) for k in "vsfc"}


def loss_and_grads(case: str, rows: slice) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss on `rows` of the global batch and the parameter gradients of this process."""
    model = TinyEncoder()
    feats = model({k: x[rows] for k, x in global_inputs().items()})
    ids_B = CLIP_IDS_N[rows]
    if case == "nce":
        out = NCELearnableTempLoss()(feats["v"], feats["s"], model.logit_scale, clip_ids=ids_B)
    else:
        variant = case.removesuffix("_nogather")
        loss_fn = OmnisourceLoss(variant, gather=not case.endswith("_nogather"))
        out = loss_fn(
            video_BD=feats["v"],
            subtitle_BD=feats["s"],
            frame_BD=feats["f"],
            caption_BD=feats["c"],
            logit_scale=model.logit_scale,
            clip_ids=ids_B,
        )
    out["loss"].backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    return out["loss"].detach(), grads


def main(rank: int, world_size: int, port: int, out_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        per_rank = NUM_GLOBAL // world_size
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        results = {}
        for case in CASES:
            loss, grads = loss_and_grads(case, rows)
            # What DDP / DeepSpeed do to gradients: average over data-parallel ranks.
            for g in grads.values():
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                g /= world_size
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            results[case] = {"loss": loss / world_size, "grads": grads}
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
