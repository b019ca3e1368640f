"""Model + loss modules for DeepSpeed to wrap: `ClipVipTask` (omnisource post-pretraining) and
`RetrievalTask` (fine-tuning).

Batches come from `pipeline.data.loader` (frames stay uint8 until here, 4x less to move); the task
normalises them, runs the four branches (V, S, F, C) and returns the summed loss plus named terms.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.data.sampling import normalize_clip
from pipeline.model.clip_vip import CLIPViPModel
from pipeline.model.losses import NCELearnableTempLoss, OmnisourceLoss


class _ContrastiveTask(nn.Module):
    """model + loss; `forward(batch) -> (loss, metrics)`. The loss owns no parameters.

    `forward` is `score(embed(batch))`; `forward(batch, embed_only=True)` is `embed(batch)`, so
    gradient caching (pipeline/train/gradcache.py) embeds chunks through the module's call (and a
    DeepSpeed engine's: ZeRO-3 gathers parameters in its forward hooks) and scores them at once.
    Subclasses define `embed`: the loss's keyword inputs for a batch, logit_scale among them.
    """

    model: CLIPViPModel
    loss: nn.Module
    sources: tuple[str, ...]
    """The model's passes a clip costs (pipeline/model/flops.py counts their FLOPs)."""

    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        raise NotImplementedError

    def score(self, feats: dict[str, torch.Tensor | None], clip_ids: torch.Tensor
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = self.loss(**feats, clip_ids=clip_ids)
        return terms["loss"], _metrics(terms, feats["logit_scale"])

    def forward(self, batch: dict[str, torch.Tensor], embed_only: bool = False) -> Any:
        feats = self.embed(batch)
        return feats if embed_only else self.score(feats, batch["clip_id"])


class ClipVipTask(_ContrastiveTask):
    """CLIP-ViP post-pretraining: the omnisource loss over V, S, F, C (spec 2.2)."""

    def __init__(self, model: CLIPViPModel, loss: OmnisourceLoss) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.sources = tuple(loss.sources)

    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """The loss's inputs for these rows: {video,subtitle,frame,caption}_BD (None where the
        variant needs none) and the clamped log logit scale."""
        dtype = next(self.model.parameters()).dtype
        needs = set(self.loss.sources)
        out = self.model(
            pixel_values_BTCHW=normalize_clip(batch["frames"]).to(dtype),
            input_ids_BN=batch["subtitle_ids"],
            attention_mask_BN=batch["subtitle_mask"],
            frame_pixel_values_BCHW=normalize_clip(batch["middle_frame"]).to(dtype) if "frame" in needs else None,
            caption_ids_BN=batch["caption_ids"] if "caption" in needs else None,
            caption_mask_BN=batch["caption_mask"] if "caption" in needs else None,
        )
        return {"video_BD": out.video_feats_BP, "subtitle_BD": out.text_feats_BP, "frame_BD": out.frame_feats_BP,
                "caption_BD": out.caption_feats_BP, "logit_scale": out.logit_scale}


class RetrievalTask(_ContrastiveTask):
    """Fine-tuning: model + symmetric InfoNCE between videos and their captions (spec 4.2)."""

    def __init__(self, model: CLIPViPModel, loss: NCELearnableTempLoss) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.sources = ("video", "text")

    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values_BTCHW=normalize_clip(batch["frames"]).to(dtype),
                         input_ids_BN=batch["text_ids"], attention_mask_BN=batch["text_mask"])
        return {"video_BD": out.video_feats_BP, "text_BD": out.text_feats_BP, "logit_scale": out.logit_scale}


def _metrics(terms: dict[str, torch.Tensor], logit_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
    metrics = {k: v.detach().float() for k, v in terms.items() if k != "loss"}
    assert logit_scale is not None
    metrics["logit_scale"] = logit_scale.detach().float().exp()
    return metrics
