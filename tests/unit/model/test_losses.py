"""Omnisource losses and the cross-rank gather (clipvip_spec.md 2.2 and 7 items 9-10).

Expected numbers come from explicit log-sum-exp formulas written here, never from the code under
test. Shape legend: B rows, N global rows, D embedding width.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import LossConfig
from pipeline.model.distributed import all_gather_no_grad, all_gather_with_grad, rank_and_world_size
from pipeline.model.losses import (
    LOSS_VARIANTS,
    NCELearnableTempLoss,
    OmnisourceLoss,
    build_loss,
    hash_clip_ids,
)
from tests.conftest import free_port
from tests.unit.model import _gather_worker

LOG2 = torch.tensor(math.log(2.0))  # logit multiplier g = 2


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def feats(*rows: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def random_feats(num_rows: int, dim: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: F.normalize(torch.randn(num_rows, dim, generator=gen), dim=-1) for k in "vsfc"}


def omni(loss_fn: OmnisourceLoss, f: dict[str, torch.Tensor], scale=LOG2, ids=None):
    return loss_fn(
        video_BD=f["v"], subtitle_BD=f["s"], frame_BD=f["f"], caption_BD=f["c"], logit_scale=scale, clip_ids=ids
    )


# ---------------------------------------------------------------------------------------------
# Hand-computed B = 2 examples


def test_symmetric_nce_hand_computed():
    video = feats((1.0, 0.0), (0.6, 0.8))
    text = feats((0.8, 0.6), (0.0, 1.0))
    # g * v_i . t_j with g = 2: VT = [[1.6, 0.0], [1.92, 1.6]] (not symmetric on purpose)
    v2t = 0.5 * ((-1.6 + lse(1.6, 0.0)) + (-1.6 + lse(1.92, 1.6)))
    t2v = 0.5 * ((-1.6 + lse(1.6, 1.92)) + (-1.6 + lse(0.0, 1.6)))
    out = NCELearnableTempLoss()(video, text, LOG2)
    assert set(out) == {"vt_loss", "loss", "v2t", "t2v"}
    assert out["v2t"].item() == pytest.approx(v2t, abs=1e-6)
    assert out["t2v"].item() == pytest.approx(t2v, abs=1e-6)
    # SUM of the two directions, not the mean (spec 2.2)
    assert out["vt_loss"].item() == pytest.approx(v2t + t2v, abs=1e-6)
    assert out["loss"].item() == pytest.approx(v2t + t2v, abs=1e-6)


def test_vsc_fc_hand_computed():
    f = {
        "v": feats((1.0, 0.0), (0.0, 1.0)),
        "s": feats((0.8, 0.6), (0.0, 1.0)),
        "c": feats((0.6, 0.8), (1.0, 0.0)),
        "f": feats((0.8, 0.6), (0.6, 0.8)),
    }
    # Similarities times g = 2, worked out by hand from the vectors above.
    vs11, vs12, vs21, vs22 = 1.6, 0.0, 1.2, 2.0
    vc11, vc12, vc21, vc22 = 1.2, 2.0, 1.6, 0.0
    fc11, fc12, fc21, fc22 = 1.92, 1.6, 2.0, 1.2
    # Video->text rows: 2B-1 = 3 logits, the other positive (VC_ii resp. VS_ii) excluded.
    v2s = 0.5 * ((-vs11 + lse(vs11, vs12, vc12)) + (-vs22 + lse(vs22, vs21, vc21)))
    v2c = 0.5 * ((-vc11 + lse(vc11, vc12, vs12)) + (-vc22 + lse(vc22, vc21, vs21)))
    s2v = 0.5 * ((-vs11 + lse(vs11, vs21)) + (-vs22 + lse(vs12, vs22)))
    c2v = 0.5 * ((-vc11 + lse(vc11, vc21)) + (-vc22 + lse(vc12, vc22)))
    f2c = 0.5 * ((-fc11 + lse(fc11, fc12)) + (-fc22 + lse(fc21, fc22)))
    c2f = 0.5 * ((-fc11 + lse(fc11, fc21)) + (-fc22 + lse(fc12, fc22)))
    out = omni(OmnisourceLoss("vsc_fc"), f)
    expected = {"v2s": v2s, "v2c": v2c, "s2v": s2v, "c2v": c2v, "f2c": f2c, "c2f": c2f}
    for name, value in expected.items():
        assert out[name].item() == pytest.approx(value, abs=1e-6), name
    assert out["vsc_loss"].item() == pytest.approx(v2s + v2c + s2v + c2v, abs=1e-6)
    assert out["fc_loss"].item() == pytest.approx(f2c + c2f, abs=1e-6)
    assert out["loss"].item() == pytest.approx(sum(expected.values()), abs=1e-5)
    # Had the other positive been kept in the denominator, v2s would differ visibly.
    v2s_with_other_positive = 0.5 * (
        (-vs11 + lse(vs11, vs12, vc11, vc12)) + (-vs22 + lse(vs22, vs21, vc21, vc22))
    )
    assert abs(v2s_with_other_positive - out["v2s"].item()) > 0.1


# ---------------------------------------------------------------------------------------------
# Structure of every variant

CE_TERMS = {  # term key -> its CE metric names (spec 2.2 table)
    "vs_loss": ("v2s", "s2v"),
    "vc_loss": ("v2c", "c2v"),
    "fc_loss": ("f2c", "c2f"),
    "vsc_loss": ("v2s", "v2c", "s2v", "c2v"),
}
VARIANT_KEYS = {
    "vs": ("vs_loss",),
    "vs_fc": ("vs_loss", "fc_loss"),
    "vs_vc": ("vs_loss", "vc_loss"),
    "vs_vc_fc": ("vs_loss", "vc_loss", "fc_loss"),
    "vsc_fc": ("vsc_loss", "fc_loss"),
    "vsc": ("vsc_loss",),
}
NUM_CE = {"vs": 2, "vs_fc": 4, "vs_vc": 4, "vs_vc_fc": 6, "vsc_fc": 6, "vsc": 4}


@pytest.mark.parametrize("variant", sorted(VARIANT_KEYS))
def test_variant_keys_and_totals(variant):
    assert set(LOSS_VARIANTS) == set(VARIANT_KEYS)
    f = {k: x.requires_grad_() for k, x in random_feats(4).items()}
    out = omni(OmnisourceLoss(variant), f)
    term_keys = VARIANT_KEYS[variant]
    ce_names = {n for k in term_keys for n in CE_TERMS[k]}
    assert set(out) == {*term_keys, "loss", *ce_names}
    assert len(ce_names) == NUM_CE[variant]
    for key in term_keys:
        assert torch.allclose(out[key], sum(out[n] for n in CE_TERMS[key]), atol=1e-6)
        assert out[key].requires_grad and out[key].dtype == torch.float32
    assert torch.allclose(out["loss"], sum(out[n] for n in ce_names), atol=1e-5)
    assert all(not out[n].requires_grad for n in ce_names)


def test_plain_pair_terms_match_torch_cross_entropy():
    f = random_feats(5)
    out = omni(OmnisourceLoss("vs_vc_fc"), f)
    for x, y in ("vs", "vc", "fc"):
        logits = 2.0 * f[x] @ f[y].T
        target = torch.arange(5)
        assert torch.allclose(out[f"{x}2{y}"], F.cross_entropy(logits, target), atol=1e-6)
        assert torch.allclose(out[f"{y}2{x}"], F.cross_entropy(logits.T, target), atol=1e-6)


def test_vsc_with_caption_equal_subtitle_is_ce_over_duplicated_negatives():
    # spec 7 item 9: with c == s, each v2t row is a CE over 2B-1 logits: the positive and each
    # other subtitle twice.
    num_rows = 5
    f = random_feats(num_rows, seed=3)
    f["c"] = f["s"].clone()
    vs = 2.0 * f["v"] @ f["s"].T
    rows = []
    for i in range(num_rows):
        negatives = [vs[i, j] for j in range(num_rows) if j != i]
        rows.append(torch.stack([vs[i, i], *negatives, *negatives]))
    logits = torch.stack(rows)
    assert logits.shape == (num_rows, 2 * num_rows - 1)
    expected = F.cross_entropy(logits, torch.zeros(num_rows, dtype=torch.long))
    out = omni(OmnisourceLoss("vsc"), f)
    assert torch.allclose(out["v2s"], expected, atol=1e-6)
    assert torch.allclose(out["v2c"], expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Duplicate clip ids


def _reference_with_exclusions(f, ids, scale=2.0):
    """Per-row CE written out with Python loops: same-id columns are dropped, not negatives."""
    n = len(ids)

    def ce(rows_x, cols, other=None):
        total = 0.0
        for i in range(n):
            pos = scale * float(rows_x[i] @ cols[i])
            logits = [pos] + [scale * float(rows_x[i] @ cols[j]) for j in range(n) if ids[j] != ids[i]]
            if other is not None:
                logits += [scale * float(rows_x[i] @ other[j]) for j in range(n) if ids[j] != ids[i]]
            total += -pos + lse(*logits)
        return total / n

    return {
        "v2s": ce(f["v"], f["s"], other=f["c"]),
        "v2c": ce(f["v"], f["c"], other=f["s"]),
        "s2v": ce(f["s"], f["v"]),
        "c2v": ce(f["c"], f["v"]),
        "f2c": ce(f["f"], f["c"]),
        "c2f": ce(f["c"], f["f"]),
    }


def test_duplicate_clip_is_never_a_negative():
    f = random_feats(5, seed=7)
    ids = [0, 1, 2, 1, 4]  # rows 1 and 3 are the same clip
    expected = _reference_with_exclusions(f, ids)
    out = omni(OmnisourceLoss("vsc_fc"), f, ids=torch.tensor(ids))
    for name, value in expected.items():
        assert out[name].item() == pytest.approx(value, abs=1e-5), name
    # The mask matters: without ids the duplicate is a negative and the value changes.
    plain = omni(OmnisourceLoss("vsc_fc"), f)
    assert abs(plain["v2s"].item() - out["v2s"].item()) > 1e-3
    # String clip ids hash consistently to the same mask.
    out_str = omni(OmnisourceLoss("vsc_fc"), f, ids=["a", "b", "c", "b", "e"])
    assert torch.equal(out_str["loss"], out["loss"])


def test_distinct_ids_reduce_exactly_to_plain_ce():
    f = random_feats(5, seed=8)
    with_ids = omni(OmnisourceLoss("vsc_fc"), f, ids=torch.tensor([40, 3, 17, 5, 9]))
    without = omni(OmnisourceLoss("vsc_fc"), f)
    for key in without:
        assert torch.equal(with_ids[key], without[key]), key
    expected = _reference_with_exclusions(f, [0, 1, 2, 3, 4])
    assert without["v2s"].item() == pytest.approx(expected["v2s"], abs=1e-5)
    nce = NCELearnableTempLoss()(f["v"], f["s"], LOG2, clip_ids=torch.tensor([40, 3, 17, 5, 9]))
    logits = 2.0 * f["v"] @ f["s"].T
    assert torch.allclose(nce["v2t"], F.cross_entropy(logits, torch.arange(5)), atol=1e-6)


def test_hash_clip_ids_is_stable_int64():
    ids = hash_clip_ids(["clip-0", "clip-1", "clip-0"])
    assert ids.dtype == torch.int64 and ids[0] == ids[2] and ids[0] != ids[1]
    # blake2b, not the per-process salted hash(): this value is the same on every rank and run
    assert int(hash_clip_ids(["clip-0"])[0]) == int(hash_clip_ids(["clip-0"])[0])
    assert hash_clip_ids([]).shape == (0,)


# ---------------------------------------------------------------------------------------------
# Dtypes, inputs, config


def test_bf16_features_give_fp32_loss_and_logits():
    f32 = random_feats(4, seed=2)
    bf16 = {k: x.bfloat16().requires_grad_() for k, x in f32.items()}
    scale = torch.tensor(math.log(100.0), dtype=torch.bfloat16)
    out = omni(OmnisourceLoss("vsc_fc"), bf16, scale=scale)
    assert all(v.dtype == torch.float32 for v in out.values())
    # Same numbers as fp32 on the bf16-rounded inputs: nothing is computed in bf16.
    ref = omni(OmnisourceLoss("vsc_fc"), {k: x.detach().float() for k, x in bf16.items()}, scale=scale.float())
    assert torch.equal(out["loss"], ref["loss"])
    out["loss"].backward()
    assert bf16["v"].grad is not None and bf16["v"].grad.dtype == torch.bfloat16


def test_logit_scale_shape_one_equals_scalar():
    f = random_feats(3)
    a = omni(OmnisourceLoss("vsc_fc"), f, scale=LOG2)
    b = omni(OmnisourceLoss("vsc_fc"), f, scale=LOG2.reshape(1))
    assert torch.equal(a["loss"], b["loss"]) and a["loss"].shape == ()


def test_bad_inputs_and_config():
    f = random_feats(3)
    with pytest.raises(ValueError, match="frame_BD"):
        OmnisourceLoss("vsc_fc")(video_BD=f["v"], subtitle_BD=f["s"], caption_BD=f["c"], logit_scale=LOG2)
    with pytest.raises(ValueError, match="unknown loss variant"):
        OmnisourceLoss("vcs")
    with pytest.raises(ValueError, match="same B"):
        OmnisourceLoss("vs")(video_BD=f["v"], subtitle_BD=f["s"][:2], logit_scale=LOG2)
    with pytest.raises(ValueError, match="clip ids"):
        omni(OmnisourceLoss("vs"), f, ids=torch.tensor([1, 2]))
    # "vs" needs only video and subtitle: the caller may skip the frame branch
    out = OmnisourceLoss("vs")(video_BD=f["v"], subtitle_BD=f["s"], logit_scale=LOG2)
    assert set(out) == {"vs_loss", "loss", "v2s", "s2v"}
    assert OmnisourceLoss("vs").sources == ("video", "subtitle")
    assert OmnisourceLoss("vs_vc").sources == ("video", "subtitle", "caption")
    assert OmnisourceLoss("vsc_fc").sources == ("video", "subtitle", "frame", "caption")
    loss = build_loss(LossConfig())
    assert loss.variant == "vsc_fc" and loss.gather and not list(loss.parameters())


def test_gathers_are_identity_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert rank_and_world_size() == (0, 1)
    assert all_gather_with_grad(x) is x
    assert all_gather_no_grad(x) is x


# ---------------------------------------------------------------------------------------------
# Two gloo processes vs one process on the concatenated batch (spec 7 item 10)


def test_two_rank_gradients_equal_single_process_gradient(tmp_path):
    out_path = tmp_path / "grads.pt"
    port, world_size = free_port(), 2
    script = os.path.abspath(_gather_worker.__file__)
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(rank), str(world_size), str(port), str(out_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world_size)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    results = torch.load(out_path)

    everything = slice(0, _gather_worker.NUM_GLOBAL)
    for case in _gather_worker.CASES:
        single_loss, single_grads = _gather_worker.loss_and_grads(case.removesuffix("_nogather"), everything)
        dist_grads = results[case]["grads"]
        close = all(torch.allclose(dist_grads[n], g, atol=1e-6, rtol=1e-5) for n, g in single_grads.items())
        if case.endswith("_nogather"):
            # Control: per-rank negatives only must NOT reproduce the global-batch gradient.
            assert not close, case
            continue
        assert single_grads["logit_scale"].abs() > 0 and single_grads["heads.v.weight"].abs().max() > 0
        for name, g in single_grads.items():
            torch.testing.assert_close(dist_grads[name], g, atol=1e-6, rtol=1e-5, msg=f"{case} {name}")
        assert results[case]["loss"].item() == pytest.approx(single_loss.item(), rel=1e-6), case
