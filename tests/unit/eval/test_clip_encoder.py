"""ClipEncoder (the Ray Data actor class of evaluate), called directly: one decode, many models.

Each model's columns must hold exactly what that model alone computes, rows whose video failed
to decode get a zero video row (and are dropped by the driver), and texts are always encoded, at
each model's own `model.max_text_len`.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import ModelConfig, to_dict
from pipeline.eval.encode import encode_clips, encode_texts, load_eval_model
from pipeline.eval.ray_encode import ClipEncoder

VIP = ModelConfig(preset="tiny", max_text_len=16)
MEAN = ModelConfig(preset="tiny", max_text_len=4, add_cls_num=0, use_temporal_embed=False, video_pooling="mean")


def test_every_model_gets_its_own_columns():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(3, 4, 32, 32, 3), dtype=np.uint8)
    texts = np.array(["a red square moves to the right", "a blue circle shrinks", "a green star grows larger"])
    batch = {"index": np.arange(3), "frames": frames, "text": texts, "error": np.array(["", "bad mp4", ""])}

    out = ClipEncoder([(None, to_dict(VIP)), (None, to_dict(MEAN))], use_gpu=False)(batch)

    for k, cfg in enumerate((VIP, MEAN)):
        alone = load_eval_model(None, cfg)
        np.testing.assert_allclose(out[f"video_{k}"][[0, 2]], encode_clips(alone, frames[[0, 2]]), atol=1e-5)
        np.testing.assert_array_equal(out[f"video_{k}"][1], 0.0)  # undecodable: zeros, flagged by "error"
        np.testing.assert_allclose(out[f"text_{k}"], encode_texts(alone, list(texts), cfg.max_text_len), atol=1e-5)
    # The texts are longer than 4 tokens: the baseline's were truncated, not padded to 16.
    assert not np.allclose(out["text_1"], encode_texts(load_eval_model(None, MEAN), list(texts), 16), atol=1e-3)
    assert not np.allclose(out["video_0"][[0, 2]], out["video_1"][[0, 2]])
    assert out["error"].tolist() == ["", "bad mp4", ""]
