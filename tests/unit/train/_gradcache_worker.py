"""One rank of the 2-process gloo check of gradient caching in test_gradcache.py (also imported).

Run as: python _gradcache_worker.py RANK WORLD_SIZE PORT OUT_PATH. Each rank takes its share of a
fixed global batch, runs `gradcache.cached_backward` through the real tiny CLIP-ViP and the
omnisource loss (gathered across ranks) with chunks of 1, 2 and 4, averages the parameter
gradients over ranks as DeepSpeed does, and rank 0 saves them. The test compares them with one
process computing the loss of the whole global batch at once.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pipeline.config import ModelConfig  # noqa: E402
from pipeline.model.clip_vip import CLIPViPModel, config_from_model_cfg  # noqa: E402
from pipeline.model.losses import OmnisourceLoss  # noqa: E402
from pipeline.train.gradcache import cached_backward, split  # noqa: E402
from pipeline.train.task import ClipVipTask  # noqa: E402

GLOBAL, FRAMES, PX, TEXT = 8, 4, 32, 12
CHUNKS = (1, 2, 4)
# Rows 1 and 6 are the same clip (on different ranks): the duplicate mask is part of the check.
CLIP_IDS = torch.tensor([100, 101, 102, 103, 104, 105, 101, 107])


def task() -> ClipVipTask:
    # logit scale 10 (not CLIP's 100): keeps the random-init loss, and its fp32 rounding, sane
    with torch.random.fork_rng():  # same init in every process
        torch.manual_seed(0)
        model = CLIPViPModel(config_from_model_cfg(ModelConfig(preset="tiny", logit_scale_init=2.3)))
    return ClipVipTask(model.train(), OmnisourceLoss("vsc_fc"))


def global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)

    def text() -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(1, 49000, (GLOBAL, TEXT), generator=g)
        ids[:, -1] = 49407  # EOT: CLIP pools at the largest id
        return ids, torch.ones(GLOBAL, TEXT, dtype=torch.int64)

    sub, sub_mask = text()
    cap, cap_mask = text()
    return {"frames": torch.randint(0, 256, (GLOBAL, FRAMES, PX, PX, 3), generator=g, dtype=torch.uint8),
            "middle_frame": torch.randint(0, 256, (GLOBAL, PX, PX, 3), generator=g, dtype=torch.uint8),
            "subtitle_ids": sub, "subtitle_mask": sub_mask, "caption_ids": cap, "caption_mask": cap_mask,
            "clip_id": CLIP_IDS.clone()}


def grads(t: ClipVipTask) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in t.named_parameters()}


def full_batch_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One process, the whole global batch in one forward: the reference."""
    t = task()
    loss, _ = t(global_batch())
    loss.backward()
    return loss.detach(), grads(t)


def main(rank: int, world_size: int, port: int, out_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        share = GLOBAL // world_size
        mine = {k: v[rank * share:(rank + 1) * share] for k, v in global_batch().items()}
        results = {}
        for chunks in CHUNKS:
            t = task()
            loss, _ = cached_backward(functools.partial(t, embed_only=True), t.score, mine, chunks, lambda s: s.backward())
            g = grads(t)
            for x in g.values():  # what DeepSpeed does with them: the data-parallel average
                dist.all_reduce(x, op=dist.ReduceOp.SUM)
                x /= world_size
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            results[chunks] = {"loss": loss / world_size, "grads": g}
        # Control: plain accumulation over 2 chunks (each chunk's loss against its own rows only)
        # is what gradient caching replaces; it must NOT give the full batch's gradient.
        t = task()
        for part in split(mine, 2):
            (t(part)[0] / 2).backward()
        g = grads(t)
        for x in g.values():
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
            x /= world_size
        results["accumulated"] = {"grads": g}
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
