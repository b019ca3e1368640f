"""The FLOP formula against torch's FLOP counter on a real forward + backward (two architectures,
proxy and mean pooling, sparse and dense attention), and the MFU helpers."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import ModelConfig
from pipeline.model.clip_vip import CLIPViPConfig, CLIPViPModel, vip_extras
from pipeline.model.flops import mfu, peak_tflops, train_flops_per_clip

TEXT = dict(vocab_size=49408, max_position_embeddings=77)
TINY = dict(text_config=dict(TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8),
            projection_dim=16)
WIDER = dict(text_config=dict(TEXT, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
             vision_config=dict(hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                                image_size=64, patch_size=16),
             projection_dim=64)
MEAN_POOL = dict(video_pooling="mean", add_cls_num=0, use_temporal_embed=False)


def counted_flops_per_clip(arch: dict, model_cfg: ModelConfig, frames: int, batch: int = 2) -> tuple[float, object]:
    torch.manual_seed(0)
    config = CLIPViPConfig(**arch, **vip_extras(model_cfg))
    model = CLIPViPModel(config)
    px, n = config.vision_config.image_size, model_cfg.max_text_len
    ids = torch.randint(0, 49000, (batch, n))
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[:, n // 2:] = 0  # padded rows cost the same: SDPA computes the masked pairs too
    # The math backend, because the counter has no formula for CPU's fused SDPA kernel; on the
    # math path the two attention products are plain bmm calls that it counts.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(pixel_values_BTCHW=torch.randn(batch, frames, 3, px, px), input_ids_BN=ids,
                    attention_mask_BN=mask, frame_pixel_values_BCHW=torch.randn(batch, 3, px, px),
                    caption_ids_BN=ids, caption_mask_BN=mask)
        sum(f.sum() for f in (out.video_feats_BP, out.text_feats_BP, out.frame_feats_BP, out.caption_feats_BP)).backward()
    return counter.get_total_flops() / batch, config


@pytest.mark.parametrize("arch", [TINY, WIDER], ids=["tiny", "wider"])
@pytest.mark.parametrize("extra", [{}, {"attention": "dense"}, MEAN_POOL], ids=["proxy", "dense", "meanpool"])
def test_formula_equals_counted_forward_backward(arch, extra):
    model_cfg = ModelConfig(max_text_len=16, **extra)
    counted, config = counted_flops_per_clip(arch, model_cfg, frames=4)
    formula = train_flops_per_clip(config, num_frames=4, num_tokens=16).total
    assert formula == pytest.approx(counted, rel=0.05)
    assert formula == pytest.approx(counted, rel=1e-9), "the formula counts exactly what the counter counts"


def test_sources_select_towers():
    config = CLIPViPConfig(**TINY, **vip_extras(ModelConfig()))
    both = train_flops_per_clip(config, 12, 70)
    video_text = train_flops_per_clip(config, 12, 70, sources=("video", "subtitle"))
    assert video_text.frame == 0 and video_text.text == pytest.approx(both.text / 2)
    assert both.total == pytest.approx(both.video + both.frame + both.text)


def test_b16_costs_about_four_times_b32_per_clip():
    from pipeline.model.clip_vip import config_from_model_cfg

    b32 = train_flops_per_clip(config_from_model_cfg(ModelConfig(preset="b32")), 12, 70)
    b16 = train_flops_per_clip(config_from_model_cfg(ModelConfig(preset="b16")), 12, 70)
    assert 3.5 < b16.video / b32.video < 4.5  # 4x the patches; attention grows a little faster
    assert b16.text == b32.text


def test_peak_and_mfu():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert peak_tflops("Tesla T4") is None
    assert peak_tflops("Tesla T4", override=65.0) == 65.0
    assert mfu(1e12, 100.0, 1000.0) == pytest.approx(0.1)
    assert mfu(1e12, 100.0, 1000.0, num_devices=2) == pytest.approx(0.05)
    assert mfu(1e12, 100.0, None) is None
