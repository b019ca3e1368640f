"""Every recipe in jobs/configs/ loads and validates as exactly one job's config."""

from __future__ import annotations

import glob
import os

import pytest

from pipeline.config import ConfigError, PrepareJobConfig, PretrainJobConfig, RecaptionJobConfig, load_config
from tests.conftest import ROOT

RECIPES = sorted(glob.glob(os.path.join(ROOT, "jobs", "configs", "*.yaml")))


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.basename(p) for p in RECIPES])
def test_recipe_is_valid(path):
    loaded = []
    for cls in (PrepareJobConfig, PretrainJobConfig, RecaptionJobConfig):
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
