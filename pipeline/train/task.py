"""Model + loss modules for DeepSpeed to wrap: `ClipVipTask` (omnisource post-pretraining) and
`RetrievalTask` (fine-tuning).

Batches come from `pipeline.data.loader` (frames stay uint8 until here, 4x less to move); the task
normalises them, runs the four branches (V, S, F, C) and returns the summed loss plus named terms.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.data.sampling import normalize_clip
from pipeline.model.clip_vip import CLIPViPModel
from pipeline.model.losses import NCELearnableTempLoss, OmnisourceLoss


class ClipVipTask(nn.Module):
    """model + loss; `forward(batch) -> (loss, metrics)`. The loss owns no parameters."""

    def __init__(self, model: CLIPViPModel, loss: OmnisourceLoss) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
        terms = self.loss(video_BD=out.video_feats_BP, subtitle_BD=out.text_feats_BP, logit_scale=out.logit_scale,
                          frame_BD=out.frame_feats_BP, caption_BD=out.caption_feats_BP, clip_ids=batch["clip_id"])
        metrics = {k: v.detach().float() for k, v in terms.items() if k != "loss"}
        metrics["logit_scale"] = out.logit_scale.detach().float().exp()
        return terms["loss"], metrics


class RetrievalTask(nn.Module):
    """Fine-tuning: model + symmetric InfoNCE between videos and their captions (spec 4.2)."""

    def __init__(self, model: CLIPViPModel, loss: NCELearnableTempLoss) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values_BTCHW=normalize_clip(batch["frames"]).to(dtype),
                         input_ids_BN=batch["text_ids"], attention_mask_BN=batch["text_mask"])
        terms = self.loss(video_BD=out.video_feats_BP, text_BD=out.text_feats_BP, logit_scale=out.logit_scale,
                          clip_ids=batch["clip_id"])
        metrics = {k: v.detach().float() for k, v in terms.items() if k != "loss"}
        metrics["logit_scale"] = out.logit_scale.detach().float().exp()
        return terms["loss"], metrics
