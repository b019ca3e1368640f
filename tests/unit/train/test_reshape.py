"""Resume on another GPU count (pipeline/train/reshape.py): DeepSpeed state written by 2 gloo ranks
is loaded by 1, and the other way round, for ZeRO-1 fp32, ZeRO-2 bf16 and ZeRO-3 bf16. The loaded
fp32 masters, Adam moments and step equal the written ones bit for bit (the other init they
replace does not), and the next step, taken at the new world size with gradient caching over the
same global batch, gives the weights the writer's own next step gives, up to rounding."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import free_port
from tests.unit.train import _reshape_worker as worker


def run_ranks(world: int, out_dir: str, mode: str) -> None:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(worker.__file__), str(r), str(world), str(port),
                               out_dir, mode], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), f"{mode} at world {world}:\n" + "\n".join(x[-3000:] for x in logs)


def relative(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    flat = lambda d: torch.cat([d[k].float().flatten() for k in sorted(want)])  # noqa: E731
    return float((flat(got) - flat(want)).norm() / flat(want).norm())


@pytest.mark.parametrize(("written_by", "loaded_by"), [(2, 1), (1, 2)])
def test_state_written_at_one_world_size_loads_at_another(tmp_path, written_by, loaded_by):
    run_ranks(written_by, str(tmp_path), "save")
    run_ranks(loaded_by, str(tmp_path), "load")
    for case in worker.CASES:
        def load(name: str, case: str = case) -> dict:
            return torch.load(tmp_path / case / name, weights_only=True)

        ref, got, fresh = load("ref.pt"), load("got.pt"), load("fresh.pt")
        assert ref.keys() == got.keys() and any(k.endswith("::exp_avg_sq") for k in ref)
        differ = [k for k in ref if not torch.equal(ref[k], got[k])]
        assert not differ, f"{case}: {len(differ)} of {len(ref)} tensors differ after the load, e.g. {differ[:3]}"
        assert relative(fresh, {k: v for k, v in ref.items() if k in fresh}) > 1e-3, f"{case}: the control"
        steps = load("steps.pt")
        assert (int(steps["step"]), int(steps["after"])) == (2, 3), (case, steps)
        # The next step: same global batch, other chunking, so equal up to the rounding of the
        # reductions (bf16 activations: looser).
        err = relative(load("got_after.pt"), load("after.pt"))
        assert err <= (1e-6 if "fp32" in case else 1e-4), (case, err)
        moved = relative(load("after.pt"), {k: v for k, v in ref.items() if k in fresh})
        assert moved > 10 * err, (case, moved, err)
