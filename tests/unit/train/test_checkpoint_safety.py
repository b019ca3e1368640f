"""Checkpoint loads cannot execute code: a real DeepSpeed checkpoint (ZeRO-2, ZeRO-3) round-trips
through `checkpoint.load` with weights_only reads, and a pickle planted in the RNG file or in
DeepSpeed's optimizer file is refused, naming the file, without running its payload."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.train import checkpoint as ckpt_io
from pipeline.train.checkpoint import TrainState, UnsafeCheckpoint
from pipeline.train.optim import make_adamw, param_groups


class Planted:
    """Unpickling this runs `touch <marker>`: what a writable checkpoint bucket lets anyone plant."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).pow(2).mean()


def engine(stage: int, seed: int):
    import deepspeed

    torch.manual_seed(seed)
    model = Small()
    opt = make_adamw(param_groups(model.named_parameters(), 0.1), lr=1e-2)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return eng


def trained_checkpoint(stage: int, out: str):
    eng = engine(stage, seed=0)
    for _ in range(2):
        loss = eng(torch.randn(2, 4))
        eng.backward(loss)
        eng.step()
    ckpt_io.save(eng, out, TrainState(step=2, world_size=1), 0, {"k": 1})
    return eng


@pytest.mark.parametrize("stage", [2, 3])
def test_round_trip_with_safe_loads(gloo, tmp_path, stage):
    src = trained_checkpoint(stage, str(tmp_path / "ck"))
    want = {n: p.detach().clone() for n, p in ckpt_io.full_fp32_state_dict(src).items()}
    np.random.seed(7)
    random.seed(7)
    ckpt_io.save(src, str(tmp_path / "ck"), TrainState(step=2, world_size=1), 0, {"k": 1})  # RNG at seed 7
    expected = (np.random.rand(), random.random())
    np.random.seed(1)
    random.seed(1)
    dst = engine(stage, seed=1)
    state = ckpt_io.load(dst, str(tmp_path / "ck"), 0, 1)
    assert state.step == 2
    got = ckpt_io.full_fp32_state_dict(dst)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert (np.random.rand(), random.random()) == expected, "numpy and python RNG restored"


@pytest.mark.parametrize("target", ["rng", "optimizer"])
def test_planted_pickle_is_refused_and_never_runs(gloo, tmp_path, target):
    trained_checkpoint(2, str(tmp_path / "ck"))
    marker = tmp_path / "payload-ran"
    if target == "rng":
        victim = tmp_path / "ck" / "rng_rank0.pt"
        torch.save({"torch": torch.get_rng_state(), "x": Planted(str(marker))}, victim)
    else:
        (victim,) = (tmp_path / "ck" / "ds" / "ds").glob("*optim_states.pt")
        state = ckpt_io.safe_load(str(victim))
        state["optimizer_state_dict"]["planted"] = Planted(str(marker))
        torch.save(state, victim)
    with pytest.raises(UnsafeCheckpoint, match=rf"{victim.name}: refused: .*system"):
        ckpt_io.load(engine(2, seed=1), str(tmp_path / "ck"), 0, 1)
    assert not marker.exists(), "the payload must not run"
