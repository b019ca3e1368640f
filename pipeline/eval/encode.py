"""Retrieval features: load a model to evaluate, encode texts and decoded clips (pure torch, no Ray).

`pipeline.eval.ray_encode` runs `ClipEncoder` in Ray actors; fine-tuning validation calls the
same functions inside its workers, so every number comes from one code path.

Shape legend: N items, T frames, H = W = image side, P projection dim.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.config import ModelConfig
from pipeline.data.sampling import normalize_clip
from pipeline.model.checkpoints import load_clip_vip
from pipeline.model.clip_vip import CLIPViPModel, config_from_model_cfg
from pipeline.model.tokenizer import tokenize


def load_eval_model(weights: str | None, model_cfg: ModelConfig, seed: int = 0) -> CLIPViPModel:
    """The model to evaluate, in eval mode and fp32.

    Args:
        weights: our HF-format export (`<run>-export`, `<run>-best`), an official `.pt`, an HF
            CLIP id/dir, or None for a random init of `model_cfg.preset` (seeded; smoke runs).
        model_cfg: proxies / pooling / attention; for exports it must agree with the saved one.
        seed: random-init seed.

    Raises:
        ValueError: the weights do not match the architecture (strict loading, every key named).
        FileNotFoundError: a local-looking path that does not exist.
    """
    if weights is None:
        torch.manual_seed(seed)
        model = CLIPViPModel(config_from_model_cfg(model_cfg))
    else:
        # An "org/name" string may be an HF hub id; anything else must be a local path.
        if not os.path.exists(os.path.expanduser(weights)) and (
                weights.startswith((".", "/", "~")) or weights.count("/") != 1):
            raise FileNotFoundError(f"weights: {weights} does not exist")
        if os.path.isdir(os.path.join(weights, "ds")):
            raise ValueError(f"weights: {weights} is a training checkpoint (DeepSpeed shards); evaluate the "
                             "HF-format export beside the run instead (<storage>/<run_name>-export or -best)")
        model = load_clip_vip(weights, model_cfg)
    model.set_attention(model_cfg.attention)
    return model.eval()


@torch.no_grad()
def encode_texts(model: CLIPViPModel, texts: Sequence[str], max_text_len: int, batch_size: int = 256
                 ) -> np.ndarray:
    """[N, P] float32 unit text features (CLIP BPE, padded to max_text_len, truncated)."""
    out = []
    for i in range(0, len(texts), batch_size):
        ids_BN, mask_BN = tokenize(list(texts[i:i + batch_size]), max_text_len)
        device = next(model.parameters()).device
        feats = model.encode_text(ids_BN.to(device), mask_BN.to(device))
        out.append(feats.float().cpu().numpy())
    dim = model.config.projection_dim
    return np.concatenate(out, axis=0) if out else np.zeros((0, dim), np.float32)


@torch.no_grad()
def encode_clips(model: CLIPViPModel, clips_NTHWC: np.ndarray | torch.Tensor) -> np.ndarray:
    """[N, P] float32 unit video features from uint8 [N, T, H, W, 3] frames."""
    x = torch.as_tensor(clips_NTHWC)
    param = next(model.parameters())
    pixels_NTCHW = normalize_clip(x.to(param.device)).to(param.dtype)
    return model.encode_video(pixels_NTCHW).float().cpu().numpy()


def similarity(text_NP: np.ndarray, video_NP: np.ndarray) -> np.ndarray:
    """Cosine similarities [N_text, N_video] (features are unit-norm), float64 for stable ranking."""
    return text_NP.astype(np.float64) @ video_NP.astype(np.float64).T
