"""Gradient caching (pipeline/train/gradcache.py): on a 2-rank gloo group, the omnisource loss of
a global batch embedded in chunks of 1, 2 and 4 rows gives the parameter gradient of the whole
batch in one forward (within 1e-6 of its norm, fp32), where plain accumulation does not; through a DeepSpeed engine with gradient accumulation,
one step equals the plain step on the whole share."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from pipeline.train.gradcache import split, train_step
from tests.conftest import free_port, run_ranks
from tests.unit.train import _gradcache_worker as worker


def test_two_ranks_in_chunks_give_the_full_batch_gradient(tmp_path):
    out_path = tmp_path / "grads.pt"
    port, world = free_port(), 2
    run_ranks(lambda r: [sys.executable, os.path.abspath(worker.__file__), str(r), str(world), str(port),
                         str(out_path)], world, timeout=300)
    results = torch.load(out_path, weights_only=True)
    want_loss, want = worker.full_batch_grads()
    assert want["model.logit_scale"].abs() > 0 and want["model.vision_model.embeddings.added_cls"].abs().max() > 0
    for chunks in worker.CHUNKS:
        got = results[chunks]
        assert torch.allclose(got["loss"], want_loss, atol=1e-6), (chunks, got["loss"], want_loss)
        assert relative_error(got["grads"], want) <= 1e-6, (chunks, relative_error(got["grads"], want))
    assert relative_error(results["accumulated"]["grads"], want) > 1e-2, "the control must differ"


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """|got - want| / |want| over all parameters as one vector (per tensor, the gradients that are
    zero in exact arithmetic, e.g. attention key biases, are pure rounding noise)."""
    flat = lambda d: torch.cat([d[n].flatten() for n in sorted(want)])  # noqa: E731
    return float((flat(got) - flat(want)).norm() / flat(want).norm())


def test_split_refuses_uneven_chunks():
    batch = {"clip_id": torch.arange(6), "x": torch.zeros(6, 2)}
    assert [p["clip_id"].tolist() for p in split(batch, 3)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="6 rows do not split into 4 equal chunks"):
        split(batch, 4)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_step_with_chunks_equals_the_plain_step(gloo, stage):
    import deepspeed

    from pipeline.train.optim import make_adamw, param_groups

    batch = {k: v[:4] for k, v in worker.global_batch().items()}
    weights = []
    for chunks in (1, 2):
        t = worker.task()
        opt = make_adamw(param_groups(t.named_parameters(), 0.05), lr=1e-3)
        cfg = {"train_micro_batch_size_per_gpu": 4 // chunks, "gradient_accumulation_steps": chunks,
               "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=t, optimizer=opt, config=cfg)
        train_step(engine, batch, chunks)
        assert engine.global_steps == 1, "one optimizer step per global batch"
        from pipeline.train.checkpoint import full_fp32_state_dict

        weights.append(full_fp32_state_dict(engine))
    plain, cached = weights
    worst = max((cached[n] - w).abs().max().item() for n, w in plain.items())
    moved = max((plain[n] - w).abs().max().item() for n, w in full_fp32_state_dict_init().items())
    assert moved > 1e-5, "the step changed the weights"
    assert worst <= 1e-6, worst


def full_fp32_state_dict_init() -> dict[str, torch.Tensor]:
    return {n: p.detach().float() for n, p in worker.task().named_parameters()}
