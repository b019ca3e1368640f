"""One rank of test_reshape.py: DeepSpeed state written at one world size, loaded at another.

Run as: python _reshape_worker.py RANK WORLD_SIZE PORT OUT_DIR save|load. For each (ZeRO stage,
precision) of CASES, on a gloo group of WORLD_SIZE processes, the tiny CLIP-ViP and the omnisource
loss in a DeepSpeed engine built by `session.build_engine` (the workers' own: AdamW groups,
ds_config with gradient caching over a global batch of 8):

- save: two steps, `reshape.save_universal`, then the full state (fp32 masters and Adam moments,
  gathered) as `ref.pt`, then a third step and its weights as `after.pt`;
- load: an engine from another init, `reshape.load_universal`, its full state as `got.pt`, a third
  step and its weights as `got_after.pt`; plus `fresh.pt`, the state before the load (the control).
"""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pipeline.config import PretrainJobConfig, build_dataclass  # noqa: E402
from pipeline.train import reshape  # noqa: E402
from pipeline.train.gradcache import train_step  # noqa: E402
from pipeline.train.optim import set_lr  # noqa: E402
from tests.unit.train._gradcache_worker import GLOBAL, global_batch, task  # noqa: E402

CASES = {"z1_fp32": (1, "fp32"), "z2_bf16": (2, "bf16"), "z3_bf16": (3, "bf16")}
MICRO = 2


def engine_for(stage: int, precision: str, world: int, perturb: bool):
    from pipeline.train.session import build_engine

    cfg = build_dataclass(PretrainJobConfig, {"root": "unused", "train": {"view": "unused",
        "zero_stage": stage, "precision": precision, "micro_batch_size": MICRO, "num_workers": world,
        "global_batch_size": GLOBAL, "lr": 1e-3, "weight_decay": 0.05, "grad_clip": 1.0}})
    t = task()
    if perturb:  # another init: the load must overwrite every weight
        with torch.no_grad():
            for p in t.parameters():
                p.add_(0.01 * torch.randn_like(p))
    return build_engine(cfg, t, world), cfg.train.chunks(world)


def full_state(engine, with_moments: bool) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    for name, p in engine.module.named_parameters():
        out[f"{name}::fp32"] = safe_get_full_fp32_param(p).detach().cpu().clone()
        for m in reshape.MOMENTS if with_moments else ():
            out[f"{name}::{m}"] = safe_get_full_optimizer_state(p, m).detach().cpu().clone()
    return out


def step(engine, chunks: int, rank: int, world: int) -> None:
    share = GLOBAL // world
    batch = {k: v[rank * share:(rank + 1) * share] for k, v in global_batch().items()}
    set_lr(engine.optimizer, 1e-3)
    train_step(engine, batch, chunks)


def main(rank: int, world: int, port: int, out_dir: str, mode: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # gloo does the allreduce
    deepspeed.init_distributed("gloo")
    for case, (stage, precision) in CASES.items():
        d = os.path.join(out_dir, case)
        os.makedirs(d, exist_ok=True)
        engine, chunks = engine_for(stage, precision, world, perturb=mode == "load")
        if mode == "save":
            for _ in range(2):
                step(engine, chunks, rank, world)
            reshape.save_universal(engine, d, rank, world)
            ref = full_state(engine, True)
            step(engine, chunks, rank, world)
            after = full_state(engine, False)
            if rank == 0:
                torch.save(ref, os.path.join(d, "ref.pt"))
                torch.save(after, os.path.join(d, "after.pt"))
        else:
            fresh = full_state(engine, False)
            got_step = reshape.load_universal(engine, d)
            got = full_state(engine, True)
            step(engine, chunks, rank, world)
            got_after = full_state(engine, False)
            if rank == 0:
                torch.save(fresh, os.path.join(d, "fresh.pt"))
                torch.save(got, os.path.join(d, "got.pt"))
                torch.save(got_after, os.path.join(d, "got_after.pt"))
                torch.save({"step": torch.tensor(got_step), "after": torch.tensor(reshape.optimizer_step(engine))},
                           os.path.join(d, "steps.pt"))
        torch.distributed.barrier()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
