"""Resume on another GPU count (pipeline/train/reshape.py): DeepSpeed state written by 2 gloo ranks
is loaded by 1, and the other way round, for ZeRO-1 fp32, ZeRO-2 bf16 and ZeRO-3 bf16. The loaded
fp32 masters, Adam moments and step equal the written ones bit for bit (the other init they
replace does not), and the next step, taken at the new world size with gradient caching over the
same global batch, gives the weights the writer's own next step gives, up to rounding."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from tests.conftest import free_port, run_ranks
from tests.unit.train import _reshape_worker as worker


def run_world(world: int, out_dir: str, mode: str) -> None:
    port = free_port()
    run_ranks(lambda r: [sys.executable, os.path.abspath(worker.__file__), str(r), str(world), str(port), out_dir,
                         mode], world, what=f"{mode} at world {world}")


def relative(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    flat = lambda d: torch.cat([d[k].float().flatten() for k in sorted(want)])  # noqa: E731
    return float((flat(got) - flat(want)).norm() / flat(want).norm())


@pytest.mark.parametrize(("written_by", "loaded_by"), [(2, 1), (1, 2)])
def test_state_written_at_one_world_size_loads_at_another(tmp_path, written_by, loaded_by):
    run_world(written_by, str(tmp_path), "save")
    run_world(loaded_by, str(tmp_path), "load")
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


def _rewrite_state(ckpt: str, **changes) -> None:
    path = os.path.join(ckpt, "train_state.json")
    state = json.load(open(path))
    state.update(changes)
    json.dump(state, open(path, "w"))


def test_refusals_say_why_and_what_resumes(gloo, tmp_path):
    """At another world size: a checkpoint without universal/ and one of another global batch are
    refused naming the setting that resumes them; universal/ parts that do not make one whole
    (a part lost) are refused too."""
    from pipeline.train import checkpoint as ckpt_io
    from tests.unit.train.test_checkpoint_safety import engine, trained_checkpoint

    ckpt = str(tmp_path / "ck")
    trained_checkpoint(2, ckpt)  # world 1, written with universal/
    _rewrite_state(ckpt, world_size=2, global_batch=4)
    with pytest.raises(ValueError, match=r"global batch of 4 clips, this run's is 8.*train.global_batch_size=4"):
        ckpt_io.load(engine(2, seed=1), ckpt, 0, 1, global_batch=8)
    os.rename(os.path.join(ckpt, "universal", "part00000-of-00001.safetensors"),
              os.path.join(ckpt, "universal", "part00000-of-00002.safetensors"))
    _rewrite_state(ckpt, world_size=1)
    state = ckpt_io.load(engine(2, seed=1), ckpt, 0, 1, global_batch=4)  # same world: DeepSpeed's own files
    assert state.step == 2
    from safetensors.torch import load_file, save_file

    part = os.path.join(ckpt, "universal", "part00000-of-00002.safetensors")
    save_file(load_file(part), part, metadata={"format": "clipvip-universal-1", "optimizer_step": "2",
                                               "world_size": "2"})
    _rewrite_state(ckpt, world_size=2)
    with pytest.raises(ValueError, match=r"1 parts that do not make one whole"):
        ckpt_io.load(engine(2, seed=1), ckpt, 0, 1, global_batch=4)
    shutil.rmtree(os.path.join(ckpt, "universal"))
    with pytest.raises(ValueError, match=r"written with 2 workers, this run has 1, and it holds only DeepSpeed's "
                                         r".*resume it with train.num_workers=2"):
        ckpt_io.load(engine(2, seed=1), ckpt, 0, 1, global_batch=4)


def test_another_shape_is_refused_not_cut_to_fit(gloo, tmp_path):
    from safetensors.torch import load_file, save_file

    from pipeline.train import checkpoint as ckpt_io
    from tests.unit.train.test_checkpoint_safety import engine, trained_checkpoint

    ckpt = str(tmp_path / "ck")
    trained_checkpoint(2, ckpt)
    _rewrite_state(ckpt, world_size=2, global_batch=4)  # written at 2 workers: the reshaping path
    part = os.path.join(ckpt, "universal", "part00000-of-00001.safetensors")
    tensors = load_file(part)
    tensors["lin.weight::exp_avg"] = torch.zeros(4, 5)  # a wider layer: ZeRO-1/2 would slice it silently
    save_file(tensors, part, metadata={"format": "clipvip-universal-1", "optimizer_step": "2", "world_size": "1"})
    with pytest.raises(ValueError, match=r"shapes: \['lin.weight::exp_avg \(4, 5\) != \(4, 4\)'\]"):
        ckpt_io.load(engine(2, seed=1), ckpt, 0, 1, global_batch=4)


def test_without_zero_the_deepspeed_files_load_at_another_world_size(gloo, tmp_path):
    """ZeRO stage 0 keeps the whole optimizer state in DeepSpeed's own files: no universal/ is
    written, and a checkpoint of another world size loads through them."""
    from pipeline.train import checkpoint as ckpt_io
    from tests.unit.train.test_checkpoint_safety import engine, trained_checkpoint

    ckpt = str(tmp_path / "ck")
    src = trained_checkpoint(0, ckpt)
    assert not os.path.exists(os.path.join(ckpt, "universal"))
    _rewrite_state(ckpt, world_size=2, global_batch=4)
    dst = engine(0, seed=1)
    state = ckpt_io.load(dst, ckpt, 0, 1, global_batch=4)
    assert (state.step, state.world_size) == (2, 1)
    want, got = ckpt_io.full_fp32_state_dict(src), ckpt_io.full_fp32_state_dict(dst)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert dst.optimizer.state_dict()["state"][0]["step"] == 2, "AdamW's state came with the weights"
