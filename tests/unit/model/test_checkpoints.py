"""Strict CLIP-ViP loading (clipvip_spec.md section 7, test 13) from the three layouts.

Official release format round trip, HF save_pretrained round trip, HF CLIP directory, and the
strict errors (extra / missing / mis-shaped key) that the official non-strict loader hid
(XPretrain issue 43). Real weights only in the `slow` tests.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, CLIPConfig, CLIPModel

from pipeline.config import ModelConfig
from pipeline.model.checkpoints import load_clip_vip, save_official
from pipeline.model.clip_vip import CLIPViPConfig, CLIPViPModel, config_from_model_cfg

TINY = ModelConfig(preset="tiny")
VIP_KEYS = {"vision_model.embeddings.added_cls", "vision_model.embeddings.temporal_embedding"}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(seed: int = 0, cfg: ModelConfig = TINY) -> CLIPViPModel:
    torch.manual_seed(seed)
    model = CLIPViPModel(config_from_model_cfg(cfg)).eval()
    with torch.no_grad():
        # Non-trivial values everywhere, so a tensor that is not copied shows up.
        model.vision_model.embeddings.temporal_embedding.normal_()
        model.logit_scale.fill_(3.3)
    return model


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 49406, (2, 8), generator=gen)
    ids[:, 0], ids[:, 5:] = 49406, 49407
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[:, 6:] = 0
    pixels = torch.randn(2, 3, 3, 32, 32, generator=gen)
    return dict(
        pixel_values_BTCHW=pixels, input_ids_BN=ids, attention_mask_BN=mask, frame_pixel_values_BCHW=pixels[:, 1]
    )


def assert_same_model(a: CLIPViPModel, b: CLIPViPModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    with torch.no_grad():
        oa, ob = a(**inputs()), b(**inputs())
    for field in ("video_feats_BP", "text_feats_BP", "frame_feats_BP", "logit_scale"):
        assert torch.equal(getattr(oa, field), getattr(ob, field)), field


def hf_clip(config: CLIPViPConfig, seed: int = 5) -> CLIPModel:
    torch.manual_seed(seed)
    return CLIPModel(
        CLIPConfig(
            text_config=config.text_config.to_dict(),
            vision_config=config.vision_config.to_dict(),
            projection_dim=config.projection_dim,
        )
    )


# ---------------------------------------------------------------------------------------------
# Official release layout


def test_official_round_trip(tmp_path):
    model = tiny()
    path = tmp_path / "release" / "clipvip.pt"
    save_official(model, str(path))
    raw = torch.load(path, weights_only=True)
    assert all(k.startswith("clipmodel.") for k in raw)
    stale = {f"clipmodel.{tower}.embeddings.position_ids" for tower in ("text_model", "vision_model")}
    assert stale <= set(raw)
    assert raw["clipmodel.vision_model.embeddings.added_cls"].shape == (3, 32)
    assert raw["clipmodel.vision_model.embeddings.temporal_embedding"].shape == (1, 12, 32)
    loaded = load_clip_vip(str(path), TINY)
    assert_same_model(model, loaded)
    assert loaded.logit_scale.item() == pytest.approx(3.3)  # loaded, not reset to 4.60


def test_official_architecture_inferred_from_shapes(tmp_path):
    cfg = dataclasses.replace(TINY, add_cls_num=2, temporal_size=8)
    model = tiny(cfg=cfg)
    path = tmp_path / "x.pt"
    save_official(model, str(path))
    loaded = load_clip_vip(str(path))  # no model_cfg: everything from the tensors
    assert (loaded.config.add_cls_num, loaded.config.temporal_size) == (2, 8)
    assert loaded.config.vision_config.num_attention_heads == 4
    assert (loaded.config.vision_config.image_size, loaded.config.vision_config.patch_size) == (32, 8)
    assert_same_model(model, loaded)
    # Heads are in no shape: a tower no preset has is refused naming the key, and loads once it is set.
    odd = tiny(cfg=dataclasses.replace(TINY, add_cls_num=2, temporal_size=8))
    odd_cfg = odd.config.to_dict()
    odd_cfg["vision_config"].update(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    wide = CLIPViPModel(CLIPViPConfig(**{k: odd_cfg[k] for k in ("text_config", "vision_config", "projection_dim",
                                                                   "add_cls_num", "temporal_size")}))
    save_official(wide, str(tmp_path / "wide.pt"))
    with pytest.raises(ValueError, match=r"vision_config head count .*hidden_size 64, intermediate_size 128, "
                                         r"num_hidden_layers 2\); set model\.vision_heads"):
        load_clip_vip(str(tmp_path / "wide.pt"))
    cfg4 = dataclasses.replace(TINY, add_cls_num=2, temporal_size=8, vision_heads=4)
    assert load_clip_vip(str(tmp_path / "wide.pt"), cfg4).config.vision_config.num_attention_heads == 4
    with pytest.raises(ValueError, match=r"model\.vision_heads=5 does not divide the vision_config width 64"):
        load_clip_vip(str(tmp_path / "wide.pt"), dataclasses.replace(cfg4, vision_heads=5))
    # A model config that disagrees with the checkpoint is an error naming the tensor.
    with pytest.raises(ValueError, match=r"added_cls checkpoint \(2, 32\) vs model \(3, 32\)"):
        load_clip_vip(str(path), TINY)


def test_official_fp16_release_is_cast_to_fp32(tmp_path):
    model = tiny()
    path = tmp_path / "half.pt"
    save_official(model.half(), str(path))
    loaded = load_clip_vip(str(path), TINY)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.visual_projection.weight, model.visual_projection.weight.float())


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ("extra", r"unexpected: vision_model\.encoder\.layers\.7\.mlp\.fc1\.weight \(4, 4\)"),
        ("missing", r"missing: vision_model\.embeddings\.temporal_embedding \(1, 12, 32\)"),
        ("shape", r"wrong shape: text_projection\.weight checkpoint \(16, 31\) vs model \(16, 32\)"),
        ("prefix", r"without the 'clipmodel\.' prefix: logit_scale"),
    ],
)
def test_official_strict_errors(tmp_path, edit, match):
    path = tmp_path / "broken.pt"
    save_official(tiny(), str(path))
    state = torch.load(path, weights_only=True)
    if edit == "extra":
        state["clipmodel.vision_model.encoder.layers.7.mlp.fc1.weight"] = torch.zeros(4, 4)
    elif edit == "missing":
        del state["clipmodel.vision_model.embeddings.temporal_embedding"]
    elif edit == "shape":
        state["clipmodel.text_projection.weight"] = torch.zeros(16, 31)
    else:
        state["logit_scale"] = state.pop("clipmodel.logit_scale")
    torch.save(state, path)
    with pytest.raises(ValueError, match=match):
        load_clip_vip(str(path), TINY)


# ---------------------------------------------------------------------------------------------
# Our export (save_pretrained) and HF CLIP directories


def test_save_pretrained_round_trip(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "export")
    assert_same_model(model, load_clip_vip(str(tmp_path / "export")))
    again = CLIPViPModel.from_pretrained(tmp_path / "export")
    assert isinstance(again.config, CLIPViPConfig) and again.config.add_cls_num == 3
    assert_same_model(model, again.eval())
    assert isinstance(AutoModel.from_pretrained(tmp_path / "export"), CLIPViPModel)
    # Runtime options come from the model config; the architecture must match it.
    dense = load_clip_vip(str(tmp_path / "export"), dataclasses.replace(TINY, attention="dense"))
    assert dense.vision_model.encoder.layers[0].self_attn.attention_mode == "dense"
    with pytest.raises(ValueError, match="add_cls_num"):
        load_clip_vip(str(tmp_path / "export"), dataclasses.replace(TINY, add_cls_num=1))


def test_save_pretrained_strict_errors(tmp_path):
    tiny().save_pretrained(tmp_path / "export")
    weights = tmp_path / "export" / "model.safetensors"
    state = load_file(weights)
    del state["vision_model.embeddings.added_cls"]
    state["vision_model.extra"] = torch.zeros(2)
    save_file(state, weights, metadata={"format": "pt"})
    expected = r"missing: .*vision_model\.embeddings\.added_cls.*unexpected: .*vision_model\.extra"
    with pytest.raises(ValueError, match=expected):
        load_clip_vip(str(tmp_path / "export"))


MEANPOOL = dataclasses.replace(TINY, add_cls_num=0, use_temporal_embed=False, video_pooling="mean")


@pytest.mark.parametrize("layout", ["export", "official"])
def test_clip_only_gives_the_clip_weights_to_another_vip_architecture(tmp_path, layout):
    vip = tiny()
    if layout == "export":
        vip.save_pretrained(tmp_path / "w")
        source = str(tmp_path / "w")
    else:
        save_official(vip, str(tmp_path / "w.pt"))
        source = str(tmp_path / "w.pt")
    with pytest.raises(ValueError, match="add_cls_num|added_cls"):  # without clip_only they must agree
        load_clip_vip(source, MEANPOOL)
    base = load_clip_vip(source, MEANPOOL, clip_only=True)
    assert base.config.video_pooling == "mean" and base.config.add_cls_num == 0
    assert base.vision_model.embeddings.temporal_embedding is None
    vip_state, base_state = vip.state_dict(), base.state_dict()
    assert set(base_state) == set(vip_state) - VIP_KEYS | {"vision_model.embeddings.added_cls"}
    for key in set(base_state) - VIP_KEYS:  # every CLIP weight, the temperature included
        assert torch.equal(base_state[key], vip_state[key]), key
    assert base_state["vision_model.embeddings.added_cls"].shape == (0, vip.config.vision_config.hidden_size)
    # The same ViP shapes: the proxies and temporal embedding keep their (seeded) init anyway.
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(load_clip_vip(source, TINY, clip_only=True))
    same, again = runs
    assert not torch.equal(same.vision_model.embeddings.added_cls, vip.vision_model.embeddings.added_cls)
    assert not torch.equal(same.vision_model.embeddings.temporal_embedding,
                           vip.vision_model.embeddings.temporal_embedding)  # zero init, not the checkpoint's
    assert torch.equal(same.vision_model.embeddings.added_cls, again.vision_model.embeddings.added_cls)  # per seed
    assert torch.equal(same.logit_scale, vip.logit_scale)
    # Runtime options come from the model config, as on the plain export path.
    dense = load_clip_vip(source, dataclasses.replace(MEANPOOL, attention="dense", logit_scale_max=5.0), clip_only=True)
    assert dense.vision_model.encoder.layers[0].self_attn.attention_mode == "dense"
    assert dense.config.logit_scale_max == 5.0


def test_clip_only_needs_a_model_config(tmp_path):
    tiny().save_pretrained(tmp_path / "w")
    with pytest.raises(ValueError, match="clip_only needs the model config"):
        load_clip_vip(str(tmp_path / "w"), clip_only=True)


def test_hf_clip_directory_copies_every_weight(tmp_path):
    config = config_from_model_cfg(TINY)
    clip = hf_clip(config)
    clip.save_pretrained(tmp_path / "clip")
    model = load_clip_vip(str(tmp_path / "clip"), TINY)
    ours, theirs = model.state_dict(), clip.state_dict()
    assert set(ours) == set(theirs) | VIP_KEYS
    for key in theirs:
        if key != "logit_scale":
            assert torch.equal(ours[key], theirs[key]), key
    # New parameters keep their init; the logit scale is reset to logit_scale_init (VidCLIP).
    assert model.logit_scale.item() == pytest.approx(TINY.logit_scale_init)
    assert theirs["logit_scale"].item() != pytest.approx(TINY.logit_scale_init)
    assert ours["vision_model.embeddings.temporal_embedding"].abs().max() == 0
    assert 0.7 < ours["vision_model.embeddings.added_cls"].std() < 1.3


def test_hf_clip_directory_strict_errors(tmp_path):
    clip = hf_clip(config_from_model_cfg(TINY))
    clip.save_pretrained(tmp_path / "clip")
    weights = tmp_path / "clip" / "model.safetensors"
    state = load_file(weights)
    del state["text_projection.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing: text_projection\.weight"):
        load_clip_vip(str(tmp_path / "clip"))


def test_unknown_layout_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="bert"):
        load_clip_vip(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Real weights (skipped unless run with -m slow and the weights are reachable)


@pytest.mark.slow
def test_openai_b32_parity():
    """Spec test 3 with real weights: M=1, T=1, zero temporal == CLIPModel.get_image_features."""
    source = os.environ.get("CLIP_B32_PATH", "openai/clip-vit-base-patch32")
    cfg = ModelConfig(preset="b32", add_cls_num=0)
    model = load_clip_vip(source, cfg)
    clip = CLIPModel.from_pretrained(source).eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.encode_video(images[:, None], normalize=False)
        theirs = clip.get_image_features(pixel_values=images).pooler_output
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-5


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CLIPVIP_OFFICIAL_CKPT"), reason="set CLIPVIP_OFFICIAL_CKPT to a release .pt")
def test_official_release_loads():
    """Spec test 13: only position_ids are stale; added_cls [3,768], temporal_embedding [1,12,768]."""
    model = load_clip_vip(os.environ["CLIPVIP_OFFICIAL_CKPT"], ModelConfig())
    emb = model.vision_model.embeddings
    assert emb.added_cls.shape == (3, 768) and emb.temporal_embedding.shape == (1, 12, 768)
    assert 0 <= model.clamped_logit_scale().item() <= ModelConfig().logit_scale_max
    with torch.no_grad():
        out = model.encode_video(torch.zeros(1, 12, 3, 224, 224))
    assert torch.isfinite(out).all()
