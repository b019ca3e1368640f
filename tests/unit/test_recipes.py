"""Every recipe in jobs/configs/ loads and validates as exactly one job's config."""

from __future__ import annotations

import glob
import os

import pytest

from pipeline.config import (ConfigError, PackJobConfig, PrepareJobConfig, PretrainJobConfig, RecaptionJobConfig,
                             load_config)
from pipeline.config import EvaluateJobConfig, FinetuneJobConfig
from tests.conftest import ROOT

RECIPES = sorted(glob.glob(os.path.join(ROOT, "jobs", "configs", "*.yaml")))


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.basename(p) for p in RECIPES])
def test_recipe_is_valid(path):
    loaded = []
    for cls in (PrepareJobConfig, PretrainJobConfig, RecaptionJobConfig, PackJobConfig, FinetuneJobConfig,
                EvaluateJobConfig):
        try:
            loaded.append(load_config(cls, path))
        except ConfigError:
            pass
    assert len(loaded) == 1, f"{os.path.basename(path)} should load as exactly one job config"


def test_paper_recipes_match_the_spec():
    for v in (32, 16):
        cfg = load_config(PretrainJobConfig, os.path.join(ROOT, "jobs", "configs", f"hdvila_b{v}.yaml"))
        t = cfg.train
        assert t.num_workers * t.micro_batch_size == 1024
        assert (t.lr, t.weight_decay, t.grad_clip, t.num_frames, t.image_size_px) == (5e-6, 0.05, 5.0, 12, 224)
        assert cfg.model.max_text_len == 70 and cfg.loss.variant == "vsc_fc"
        assert cfg.model.preset == f"b{v}" and cfg.model.pretrained == f"openai/clip-vit-base-patch{v}"
    # The view both read: frames at their training size, row groups dividing their micro batch.
    pack = load_config(PackJobConfig, os.path.join(ROOT, "jobs", "configs", "hdvila_pack.yaml"))
    assert cfg.train.view == pack.view.name and pack.view.image_size_px == cfg.train.image_size_px
    assert cfg.train.micro_batch_size % pack.view.rows_per_group == 0


@pytest.mark.parametrize("name, epochs, frames, text_len", [
    ("msrvtt_finetune_b32", 100, 12, 50), ("msrvtt_finetune_b16", 100, 12, 50), ("didemo_finetune_b16", 20, 12, 70),
    ("lsmdc_finetune_b32", 10, 12, 50), ("activitynet_finetune_b32", 20, 32, 70)])
def test_finetune_recipes_match_the_spec(name, epochs, frames, text_len):
    """clipvip_spec.md 4.2: global batch 128, lr 1e-6, wd 0.2, clip 1.0, per-dataset epochs/frames/text length."""
    cfg = load_config(FinetuneJobConfig, os.path.join(ROOT, "jobs", "configs", f"{name}.yaml"))
    t = cfg.train
    assert t.num_workers * t.micro_batch_size == 128
    assert (t.lr, t.weight_decay, t.grad_clip, t.warmup_ratio) == (1e-6, 0.2, 1.0, 0.01)
    assert (t.epochs, t.num_frames, t.image_size_px) == (epochs, frames, 224)
    assert cfg.model.max_text_len == text_len
    assert cfg.model.pretrained, "fine-tuning starts from post-pretrained weights"
    assert cfg.data.val is not None or cfg.data.val_holdout > 0, "selection on a held-out split, never test"
    paragraph = cfg.data.train.resolved_paragraph()
    assert paragraph == (cfg.data.train.format in ("didemo", "activitynet"))
