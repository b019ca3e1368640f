"""CLIP-ViP model faithfulness (clipvip_spec.md section 7, tests 1-8 and 11) on tiny random models.

Numbers follow the spec: S = M + T*L, dense mask count 4*S + T*L*(4+L) for M=4, reduction to
HF CLIP at M=1/T=1, two-branch == masked attention layer by layer, locality, permutation,
temporal interpolation, position embeddings, logit scale. Plus one DeepSpeed ZeRO-2 step on the
real module (CPU, gloo, world size 1).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import CLIPConfig, CLIPModel

from pipeline.config import ModelConfig
from pipeline.model.clip_vip import (
    CLIPViPConfig,
    CLIPViPModel,
    additive_mask,
    build_vip_attention_mask,
    config_from_model_cfg,
    interpolate_temporal_embedding,
    sequence_length,
)

IMAGE = 32  # tiny preset: 32 px, patch 8 -> L = 16
L = 16
EOT = 49407
VIP_KEYS = {"vision_model.embeddings.added_cls", "vision_model.embeddings.temporal_embedding"}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(seed: int = 0, **overrides) -> CLIPViPModel:
    torch.manual_seed(seed)
    return CLIPViPModel(config_from_model_cfg(ModelConfig(preset="tiny", **overrides))).eval()


def video(batch: int, frames: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, frames, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def text_ids(batch: int, length: int = 9, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids like the real tokenizer's: BOS, words, EOT, then EOT padding with mask 0."""
    gen = torch.Generator().manual_seed(seed)
    ids_BN = torch.randint(1, 49406, (batch, length), generator=gen)
    mask_BN = torch.zeros(batch, length, dtype=torch.long)
    ids_BN[:, 0] = 49406
    for b in range(batch):
        eot = 3 + b % (length - 4)
        ids_BN[b, eot:] = EOT
        mask_BN[b, : eot + 1] = 1
    return ids_BN, mask_BN


def hf_clip(model: CLIPViPModel) -> CLIPModel:
    """A random HF CLIPModel with the same tower shapes."""
    config = model.config
    return CLIPModel(
        CLIPConfig(
            text_config=config.text_config.to_dict(),
            vision_config=config.vision_config.to_dict(),
            projection_dim=config.projection_dim,
        )
    )


def hidden_states(model: CLIPViPModel, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return model.vision_model(pixels, output_hidden_states=True).hidden_states


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    """Max-abs difference relative to the tensors' scale (fp32 rounding grows with magnitude)."""
    scale = max(1.0, a.abs().max().item())
    diff = (a - b).abs().max().item()
    assert diff <= rel * scale, f"max diff {diff} > {rel} * {scale}"


# ---------------------------------------------------------------------------------------------
# 1. Shapes


def test_sequence_length_and_output_shapes():
    model = tiny()
    M, T, B = 4, 3, 2
    assert sequence_length(model.config, T) == M + T * L == 52
    pixels = video(B, T)
    emb = model.vision_model.embeddings(pixels)
    assert emb.shape == (B, 52, 32)
    assert model.vision_model(pixels).last_hidden_state.shape == (B, 52, 32)

    ids, mask = text_ids(B)
    out = model(pixels, ids, mask, pixels[:, 1], ids, mask)
    for feats in (out.video_feats_BP, out.text_feats_BP, out.frame_feats_BP, out.caption_feats_BP):
        assert feats.shape == (B, 16)
        torch.testing.assert_close(feats.norm(dim=-1), torch.ones(B))
    assert out.logit_scale.dim() == 0
    # Frame branch == the middle frame as a 1-frame video through the same tower.
    torch.testing.assert_close(model.encode_frames(pixels[:, 1]), model.encode_video(pixels[:, 1:2]))
    assert model(input_ids_BN=ids).video_feats_BP is None


@pytest.mark.parametrize(("preset", "frames", "expected"), [("b32", 12, 592), ("b16", 12, 2356), ("b16", 32, 6276)])
def test_sequence_length_of_real_shapes(preset, frames, expected):
    config = config_from_model_cfg(ModelConfig(preset=preset))
    assert sequence_length(config, frames) == expected
    assert (config.vision_config.hidden_size, config.text_config.hidden_size, config.projection_dim) == (768, 512, 512)


@pytest.mark.parametrize("bad", [dict(attention="flash"), dict(add_cls_num=-1), dict(temporal_size=0)])
def test_config_validation(bad):
    with pytest.raises(StrictDataclassClassValidationError, match=next(iter(bad))):
        CLIPViPConfig(**bad)


def test_state_dict_is_hf_clip_plus_two_tensors():
    model = tiny()
    hf = hf_clip(model)
    ours, theirs = model.state_dict(), hf.state_dict()
    assert set(ours) - set(theirs) == VIP_KEYS
    assert set(theirs) <= set(ours)
    assert all(ours[k].shape == theirs[k].shape for k in theirs)
    assert not any(k.endswith("position_ids") for k in ours)
    assert ours["vision_model.embeddings.added_cls"].shape == (3, 32)
    assert ours["vision_model.embeddings.temporal_embedding"].shape == (1, 12, 32)
    # Init as the official code: added_cls ~ N(0, 1), temporal zeros, logit scale ln 100.
    assert 0.7 < ours["vision_model.embeddings.added_cls"].std() < 1.3
    assert ours["vision_model.embeddings.temporal_embedding"].abs().max() == 0
    # The tower gets CLIP's init, not the generic N(0, 1) (q_proj std = D^-0.5 * (2*layers)^-0.5).
    q_std = ours["vision_model.encoder.layers.0.self_attn.q_proj.weight"].std().item()
    assert 0.5 * 32**-0.5 * 4**-0.5 < q_std < 1.5 * 32**-0.5 * 4**-0.5
    assert "temporal_embedding" not in str(list(tiny(use_temporal_embed=False).state_dict()))


# ---------------------------------------------------------------------------------------------
# 2. Dense reference mask


@pytest.mark.parametrize(("T", "Lp"), [(3, 5), (12, 49)])
def test_dense_mask_properties(T, Lp):
    M = 4
    S = M + T * Lp
    allowed = build_vip_attention_mask(M, T, Lp)
    assert allowed.shape == (S, S) and allowed.dtype == torch.bool
    assert allowed[:M].all() and allowed[:, :M].all()
    patches = allowed[M:, M:]
    block = torch.block_diag(*[torch.ones(Lp, Lp, dtype=torch.bool)] * T)
    assert torch.equal(patches, block)
    assert int(allowed.sum()) == 4 * S + T * Lp * (4 + Lp)
    assert torch.equal(allowed, allowed.T)
    add = additive_mask(allowed, torch.float32)
    assert (add[allowed] == 0).all() and torch.isinf(add[~allowed]).all()


# ---------------------------------------------------------------------------------------------
# 3. Reduction to CLIP


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_reduces_to_hf_clip(attention):
    model = tiny(add_cls_num=0, attention=attention)
    torch.manual_seed(3)
    hf = hf_clip(model).eval()
    missing, unexpected = model.load_state_dict(hf.state_dict(), strict=False)
    assert set(missing) == VIP_KEYS
    assert not unexpected
    assert model.vision_model.embeddings.temporal_embedding.abs().max() == 0
    images = video(3, 1)[:, 0]
    with torch.no_grad():
        ours = model.encode_video(images[:, None], normalize=False)
        theirs = hf.get_image_features(pixel_values=images).pooler_output
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() < 1e-5
        # Text tower unchanged: EOT pooling and the padding mask as HF (eos 49407 = argmax).
        ids, mask = text_ids(3)
        ours_t = model.encode_text(ids, mask, normalize=False)
        theirs_t = hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        assert (ours_t - theirs_t).abs().max() < 1e-5
        # A perturbed (still non-zero) patch changes the output: the comparison can fail.
        assert (model.encode_video(images[:, None] * 0.5, normalize=False) - theirs).abs().max() > 1e-3


def test_meanpool_baseline_is_clip4clip_meanp():
    """video_pooling=mean: per-frame HF CLIP features, unit-normalised, averaged, renormalised (spec 1.6)."""
    with pytest.raises(Exception, match="add_cls_num=0"):
        ModelConfig(preset="tiny", video_pooling="mean")
    model = tiny(add_cls_num=0, use_temporal_embed=False, video_pooling="mean")
    torch.manual_seed(3)
    hf = hf_clip(model).eval()
    missing, unexpected = model.load_state_dict(hf.state_dict(), strict=False)
    assert set(missing) <= {"vision_model.embeddings.added_cls"} and not unexpected  # [0, D] when M = 1
    clip_BTCHW = video(2, 4)
    with torch.no_grad():
        per_frame = F.normalize(hf.get_image_features(pixel_values=clip_BTCHW.flatten(0, 1)).pooler_output, dim=-1)
        expected = F.normalize(per_frame.reshape(2, 4, -1).mean(1), dim=-1)
        ours = model.encode_video(clip_BTCHW)
        assert (ours - expected).abs().max() < 1e-5
        # Order-blind by construction; CLIP-ViP with a temporal embedding is not.
        assert (model.encode_video(clip_BTCHW.flip(1)) - ours).abs().max() < 1e-5
        vip = tiny(seed=4)
        with torch.no_grad():
            vip.vision_model.embeddings.temporal_embedding.normal_()
        assert (vip.encode_video(clip_BTCHW.flip(1)) - vip.encode_video(clip_BTCHW)).abs().max() > 1e-3


def test_text_attention_mask_is_respected():
    model = tiny()
    ids, mask = text_ids(2, seed=5)
    changed = ids.clone()
    changed[:, 1] = 1234
    masked = mask.clone()
    masked[:, 1] = 0
    with torch.no_grad():
        base = model.encode_text(ids, masked)
        assert torch.allclose(base, model.encode_text(changed, masked), atol=1e-6)
        assert not torch.allclose(model.encode_text(ids, mask), model.encode_text(changed, mask), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# 4. Two-branch == dense masked attention, layer by layer


def test_sparse_matches_dense_layer_by_layer():
    model = tiny(seed=4)
    with torch.no_grad():
        model.vision_model.embeddings.temporal_embedding.normal_()
    pixels = video(2, 5)
    sparse = hidden_states(model, pixels)
    model.set_attention("dense")
    dense = hidden_states(model, pixels)
    assert len(sparse) == len(dense) == 3
    for s, d in zip(sparse, dense, strict=True):
        assert_close_rel(s, d, 1e-5)
    # Gradients agree too (the backward of the two-branch form is what training runs).
    grads = {}
    for mode in ("sparse", "dense"):
        model.set_attention(mode)
        model.zero_grad()
        model.encode_video(pixels).pow(2).sum().backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["sparse"].keys() == grads["dense"].keys()
    for name in grads["sparse"]:
        assert_close_rel(grads["sparse"][name], grads["dense"][name], 1e-4)
    # fp64 removes rounding: the two forms are the same function.
    model.double()
    dense64 = hidden_states(model, pixels.double())
    model.set_attention("sparse")
    sparse64 = hidden_states(model, pixels.double())
    assert max((s - d).abs().max().item() for s, d in zip(sparse64, dense64, strict=True)) < 1e-10


def test_dense_reference_differs_from_full_attention():
    """The reference mask really removes cross-frame patch attention (so test 4 can fail)."""
    model = tiny(seed=6, attention="dense")
    pixels = video(1, 3)
    layer = model.vision_model.encoder.layers[0]
    with torch.no_grad():
        hidden = model.vision_model.pre_layrnorm(model.vision_model.embeddings(pixels))
        full = layer.self_attn(layer.layer_norm1(hidden), 4, 3, torch.zeros(52, 52))
        masked = layer.self_attn(layer.layer_norm1(hidden), 4, 3)
    assert (full[:, :4] - masked[:, :4]).abs().max() < 1e-6  # proxies attend everywhere anyway
    assert (full[:, 4:] - masked[:, 4:]).abs().max() > 1e-3


def test_video_embedding_is_first_proxy_only():
    model = tiny(seed=13)
    pixels = video(2, 3)
    with torch.no_grad():
        last = model.vision_model(pixels).last_hidden_state
        expected = model.visual_projection(model.vision_model.post_layernorm(last[:, 0]))
        torch.testing.assert_close(model.encode_video(pixels, normalize=False), expected)
        torch.testing.assert_close(model.encode_video(pixels), F.normalize(expected, dim=-1))


# ---------------------------------------------------------------------------------------------
# 5. Information-flow locality, 6. frame permutation


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_information_flow_locality(attention):
    model = tiny(seed=7, attention=attention)
    M, T, j, n = 4, 3, 0, 2
    pixels = video(1, T)
    perturbed = pixels.clone()
    perturbed[:, j] += torch.randn_like(perturbed[:, j])
    with torch.no_grad():
        a, b = hidden_states(model, pixels), hidden_states(model, perturbed)
    frame_n = slice(M + n * L, M + (n + 1) * L)
    assert (a[1][:, frame_n] - b[1][:, frame_n]).abs().max() < 1e-6  # after 1 layer: untouched
    assert (a[1][:, :M] - b[1][:, :M]).abs().max() > 1e-3  # proxies saw frame j
    assert (a[2][:, frame_n] - b[2][:, frame_n]).abs().max() > 1e-3  # after 2 layers: via proxies


def test_frame_permutation():
    model = tiny(seed=8)
    M, T = 4, 4
    pixels = video(2, T)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        base = model.vision_model(pixels).last_hidden_state
        moved = model.vision_model(pixels[:, perm]).last_hidden_state
        assert_close_rel(base[:, :M], moved[:, :M], 1e-5)
        patches_BTLD = base[:, M:].reshape(2, T, L, -1)
        assert_close_rel(patches_BTLD[:, perm].reshape(2, T * L, -1), moved[:, M:], 1e-5)
        assert_close_rel(model.encode_video(pixels), model.encode_video(pixels[:, perm]), 1e-5)
        # With a non-zero temporal embedding, order matters.
        model.vision_model.embeddings.temporal_embedding.normal_()
        assert (model.encode_video(pixels) - model.encode_video(pixels[:, perm])).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# 7. Temporal interpolation, 8. position embeddings


def test_temporal_interpolation():
    E = torch.randn(1, 12, 8)
    assert interpolate_temporal_embedding(E, 12) is E
    torch.testing.assert_close(interpolate_temporal_embedding(E, 1), (E[:, 5:6] + E[:, 6:7]) / 2)
    expected = F.interpolate(E.transpose(1, 2), size=32, mode="linear", align_corners=False).transpose(1, 2)
    torch.testing.assert_close(interpolate_temporal_embedding(E, 32), expected)
    assert not torch.allclose(interpolate_temporal_embedding(E, 32)[:, :12], E)


@pytest.mark.parametrize("frames", [12, 1, 5])
def test_embeddings_add_temporal_to_patches_only(frames):
    model = tiny(seed=9)
    emb = model.vision_model.embeddings
    pixels = video(2, frames)
    with torch.no_grad():
        before = emb(pixels)
        emb.temporal_embedding.normal_()
        after = emb(pixels)
    assert torch.equal(before[:, :4], after[:, :4])  # proxies never get a temporal term
    delta_BTLD = (after - before)[:, 4:].reshape(2, frames, L, -1)
    expected_1TD = interpolate_temporal_embedding(emb.temporal_embedding.detach(), frames)
    torch.testing.assert_close(delta_BTLD, expected_1TD[:, :, None].expand_as(delta_BTLD), atol=1e-6, rtol=0)


def test_position_embeddings_of_proxies_and_patches():
    model = tiny(seed=10)
    emb = model.vision_model.embeddings
    with torch.no_grad():
        emb.patch_embedding.weight.zero_()  # patch content 0: only positions (+ proxy vectors) remain
        out = emb(video(2, 3))
    pos = emb.position_embedding.weight.detach()
    proxies = torch.cat([emb.class_embedding[None], emb.added_cls]).detach()
    torch.testing.assert_close(out[:, :4], (proxies + pos[0]).expand(2, 4, -1))
    torch.testing.assert_close(out[:, 4:].reshape(2, 3, L, -1), pos[1:].expand(2, 3, L, -1))


# ---------------------------------------------------------------------------------------------
# 11. Logit scale


def test_logit_scale_init_and_functional_clamp():
    model = tiny()
    assert model.logit_scale.dim() == 0
    assert model.logit_scale.item() == pytest.approx(4.60)
    assert model.clamped_logit_scale().exp().item() == pytest.approx(math.exp(4.60), rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(6.0)
    clamped = model.clamped_logit_scale()
    assert clamped.exp().item() == pytest.approx(200.0, rel=1e-6)
    assert model.logit_scale.item() == 6.0  # never clamped in place
    clamped.backward()
    assert model.logit_scale.grad.item() == 0.0  # outside the range: no gradient
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    model.logit_scale.grad = None
    out = model(input_ids_BN=text_ids(2)[0])
    (out.logit_scale.exp() * 2).backward()
    assert model.logit_scale.grad.item() == pytest.approx(2 * math.exp(3.0), rel=1e-6)


def test_gradient_checkpointing_gives_same_gradients():
    model = tiny(seed=11).train()
    pixels = video(2, 3)
    model.encode_video(pixels).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.vision_model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.vision_model.encoder.gradient_checkpointing
    model.encode_video(pixels).sum().backward()
    for n, p in model.vision_model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n])


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2 on the real module (CPU, gloo, world size 1)


def test_deepspeed_zero2_step(gloo):  # the session's single-rank gloo group (tests/conftest.py)
    import deepspeed

    model = tiny(seed=12).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "gradient_clipping": 5.0,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    ids, mask = text_ids(2)
    pixels = video(2, 3)
    out = engine(pixels, ids, mask, pixels[:, 1], ids, mask)
    gamma = out.logit_scale.exp()
    loss = sum(
        F.cross_entropy(gamma * a @ b.T, torch.arange(2)) + F.cross_entropy(gamma * b @ a.T, torch.arange(2))
        for a, b in ((out.video_feats_BP, out.text_feats_BP), (out.frame_feats_BP, out.caption_feats_BP))
    )
    assert torch.isfinite(loss)
    engine.backward(loss)
    engine.step()
    after = dict(engine.module.named_parameters())
    changed = [n for n in before if not torch.equal(before[n], after[n].detach())]
    for name in ("logit_scale", *VIP_KEYS, "visual_projection.weight", "text_projection.weight"):
        assert name in changed, name
    assert len(changed) > 0.9 * len(before)
    # The clamp lives in forward: logit_scale is still a plain 0-dim parameter after the step.
    assert engine.module.logit_scale.dim() == 0
    assert dataclasses.is_dataclass(out)

