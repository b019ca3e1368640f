from __future__ import annotations

import math

import pytest
import torch

from pipeline.train.optim import lr_at, make_adamw, param_groups


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer_norm1 = torch.nn.LayerNorm(4)
        self.fc = torch.nn.Linear(4, 4)
        self.added_cls = torch.nn.Parameter(torch.randn(3, 4))
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))


def test_official_no_decay_rule():
    m = Tiny()
    groups = param_groups(m.named_parameters(), weight_decay=0.05)
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(m.named_parameters())
    # HF-named LayerNorm weights and embeddings ARE decayed, as in the official code.
    assert by_id[id(named["layer_norm1.weight"])] == 0.05
    assert by_id[id(named["added_cls"])] == 0.05
    assert by_id[id(named["fc.weight"])] == 0.05
    assert by_id[id(named["fc.bias"])] == 0.0
    assert by_id[id(named["layer_norm1.bias"])] == 0.0
    assert by_id[id(named["logit_scale"])] == 0.0


def test_adamw_hyperparameters():
    opt = make_adamw(param_groups(Tiny().named_parameters(), 0.05), lr=5e-6)
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6
    assert not opt.defaults["fused"]


def test_fused_adamw_is_the_same_update_up_to_rounding():
    """train.adamw_impl=fused: torch's fused kernel, what the demo's robustness bench flips."""
    torch.manual_seed(0)
    models = [Tiny(), Tiny()]
    models[1].load_state_dict(models[0].state_dict())
    opts = [make_adamw(param_groups(m.named_parameters(), 0.05), lr=1e-2, fused=f)
            for m, f in zip(models, (False, True), strict=True)]
    assert opts[1].defaults["fused"]
    x = torch.randn(8, 4)
    for _ in range(5):
        for m, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            (m.fc(m.layer_norm1(x)).square().sum() * m.logit_scale + m.added_cls.square().sum()).backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_schedule_warmup_then_cosine():
    total, base = 1000, 5e-6
    warm = math.ceil(0.01 * total)
    assert lr_at(0, base, total) == pytest.approx(base / warm)
    assert lr_at(warm - 1, base, total) == pytest.approx(base)
    assert lr_at(warm, base, total) == pytest.approx(base)
    mid = warm + (total - warm) // 2
    assert lr_at(mid, base, total) == pytest.approx(base * 0.5, rel=1e-2)
    assert lr_at(total - 1, base, total) < base * 1e-2
    assert lr_at(total + 5, base, total) == pytest.approx(1e-8)
    values = [lr_at(s, base, total) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(values, values[1:])), "cosine part never increases"
