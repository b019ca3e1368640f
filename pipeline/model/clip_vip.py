"""CLIP-ViP: Hugging Face CLIP with video proxy tokens and proxy-guided attention.

This file owns the whole CLIP-ViP forward (clipvip_spec.md sections 1.2-1.5): the ViP vision
embeddings (video proxies + temporal embedding), proxy-guided attention, the vision tower, the
unchanged HF text tower, projections and the learnable logit scale. Parameter names are the HF
`CLIPModel` names plus exactly two new tensors, so `openai/clip-vit-base-patch*` weights and the
official release (`clipmodel.` prefix stripped) load unchanged:

    vision_model.embeddings.added_cls            [add_cls_num, D]
    vision_model.embeddings.temporal_embedding   [1, temporal_size, D]

Unlike the official repo, which vendors and edits a transformers-4.2x copy of `modeling_clip.py`,
we subclass/reuse the installed transformers 5 modules (CLIPVisionEmbeddings, CLIPAttention,
CLIPMLP, CLIPTextModel) so the weights keep their names and the text tower stays HF's own.

Shape legend for tensor-name suffixes:
    B batch            T frames per video     C image channels    H, W image height/width
    L patches/frame    M video proxies (1 + add_cls_num)         S = M + T*L vision tokens
    D hidden width     A attention heads      E head dim (D/A)    K = M + L keys per frame
    F = B*T frame sequences                   X = T*L patch tokens
    Q = 1 + L position slots                  G = temporal_size   N text tokens
    P projection width
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, CLIPConfig, CLIPVisionConfig
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import (
    CLIPAttention,
    CLIPMLP,
    CLIPPreTrainedModel,
    CLIPTextModel,
    CLIPVisionEmbeddings,
)

from pipeline.config import ModelConfig

ATTENTION_MODES = ("sparse", "dense")
VIDEO_POOLINGS = ("proxy", "mean")
LN_200 = math.log(200.0)

# --------------------------------------------------------------------------------------------
# Config


@strict
class CLIPViPConfig(CLIPConfig):
    """HF `CLIPConfig` plus the ViP extras (the official `clip_vision_additional_config`).

    A distinct `model_type` makes `save_pretrained` / `from_pretrained` / `AutoModel` round-trip
    to this class instead of plain CLIP.
    """

    model_type = "clip_vip"

    temporal_size: int = 12
    """Length of the learned temporal embedding; resampled linearly to other frame counts."""
    add_cls_num: int = 3
    """Extra video proxy tokens beside CLIP's class embedding (M = 1 + add_cls_num)."""
    use_temporal_embed: bool = True
    """Official `if_use_temporal_embed`; when False the parameter does not exist at all."""
    logit_scale_max: float = LN_200
    """Upper clamp of the log logit scale, applied functionally in `clamped_logit_scale`."""
    attention: str = "sparse"
    """Vision attention: "sparse" (two-branch SDPA, the training path) or "dense" (S x S mask)."""
    video_pooling: str = "proxy"
    """"proxy": the first proxy token pools the video (CLIP-ViP). "mean": CLIP4Clip-MeanP baseline
    (spec 1.6): each frame encoded alone, unit features averaged and renormalised."""

    def validate_vip(self) -> None:
        """Strict-dataclass class validator for the ViP fields."""
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.temporal_size < 1:
            raise ValueError(f"temporal_size must be >= 1, got {self.temporal_size}")
        if self.add_cls_num < 0:
            raise ValueError(f"add_cls_num must be >= 0, got {self.add_cls_num}")
        if self.video_pooling not in VIDEO_POOLINGS:
            raise ValueError(f"video_pooling must be one of {VIDEO_POOLINGS}, got {self.video_pooling!r}")


_TEXT_B = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
)
_VISION_B = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224)

PRESETS: dict[str, dict] = {
    # Tiny random-init model for CPU tests/demos. The vocab stays CLIP's real 49408 because the
    # real BPE tokenizer produces the ids (EOT = 49407 must be the largest id for argmax pooling).
    "tiny": dict(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    ),
    # Exact OpenAI ViT-B/32 and ViT-B/16 shapes (openai/clip-vit-base-patch32|16 config.json).
    "b32": dict(text_config=_TEXT_B, vision_config=dict(_VISION_B, patch_size=32), projection_dim=512),
    "b16": dict(text_config=_TEXT_B, vision_config=dict(_VISION_B, patch_size=16), projection_dim=512),
}


def vip_extras(cfg: ModelConfig) -> dict:
    """The `CLIPViPConfig` fields that come from a `ModelConfig` (everything but the shapes)."""
    return dict(
        temporal_size=cfg.temporal_size,
        add_cls_num=cfg.add_cls_num,
        use_temporal_embed=cfg.use_temporal_embed,
        logit_scale_max=float(cfg.logit_scale_max),
        logit_scale_init_value=float(cfg.logit_scale_init),
        attention=cfg.attention,
        video_pooling=cfg.video_pooling,
    )


def config_from_model_cfg(cfg: ModelConfig) -> CLIPViPConfig:
    """Build the HF config for `cfg.preset` ("tiny", "b32", "b16") with the ViP extras of `cfg`.

    Args:
        cfg: The model section of the job config.

    Returns:
        A `CLIPViPConfig`; `logit_scale_init_value` is `cfg.logit_scale_init` (4.60 = ln 100).
    """
    if cfg.preset not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {cfg.preset!r}, expected one of {sorted(PRESETS)}")
    preset = PRESETS[cfg.preset]
    return CLIPViPConfig(
        text_config=dict(preset["text_config"]),
        vision_config=dict(preset["vision_config"]),
        projection_dim=preset["projection_dim"],
        **vip_extras(cfg),
    )


def num_patches_per_frame(vision_config: CLIPVisionConfig) -> int:
    """L = (image_size / patch_size)^2 patches per frame (49 for B/32, 196 for B/16)."""
    return (vision_config.image_size // vision_config.patch_size) ** 2


def sequence_length(config: CLIPViPConfig, num_frames: int) -> int:
    """S = M + T*L vision tokens (592 for B/32 at T=12, 2356 for B/16 at T=12)."""
    return 1 + config.add_cls_num + num_frames * num_patches_per_frame(config.vision_config)


# --------------------------------------------------------------------------------------------
# Embeddings


def interpolate_temporal_embedding(temporal_1GD: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Resample the learned temporal embedding [1, G, D] (G = temporal_size) to T frames.

    Linear interpolation with align_corners=False, as the official code: T=1 gives the mean of
    entries G/2-1 and G/2 (entries 5 and 6 for G=12), which the frame branch uses.

    Args:
        temporal_1GD: The `temporal_embedding` parameter, [1, G, D].
        num_frames: T.

    Returns:
        [1, T, D]; the parameter itself when T == G.
    """
    if num_frames == temporal_1GD.shape[1]:
        return temporal_1GD
    temporal_1DT = F.interpolate(temporal_1GD.transpose(1, 2), size=num_frames, mode="linear", align_corners=False)
    return temporal_1DT.transpose(1, 2)


class CLIPViPVisionEmbeddings(CLIPVisionEmbeddings):
    """Patch + position + temporal embeddings of T frames, prefixed by M video proxy tokens.

    Inherits `class_embedding`, `patch_embedding`, `position_embedding` (HF names) and adds
    `added_cls` [add_cls_num, D] and `temporal_embedding` [1, temporal_size, D].
    """

    def __init__(self, config: CLIPVisionConfig, add_cls_num: int, temporal_size: int, use_temporal_embed: bool):
        super().__init__(config)
        self.add_cls_num = add_cls_num
        self.temporal_size = temporal_size
        # N(0,1) as the official `torch.randn`, far larger than CLIP's learned embeddings;
        # pre_layrnorm normalises every token, so we keep it for faithfulness.
        self.added_cls = nn.Parameter(torch.randn(add_cls_num, self.embed_dim))
        if use_temporal_embed:
            # Zero init: at init every frame sees plain CLIP positions.
            self.temporal_embedding = nn.Parameter(torch.zeros(1, temporal_size, self.embed_dim))
        else:
            self.register_parameter("temporal_embedding", None)

    @property
    def num_proxies(self) -> int:
        """M = 1 + add_cls_num."""
        return 1 + self.add_cls_num

    def forward(self, pixel_values_BTCHW: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Embed a batch of videos.

        Args:
            pixel_values_BTCHW: Normalised frames [B, T, C, H, W]; H = W = image_size.

        Returns:
            Token embeddings [B, S, D] ordered [proxies; frame_1 patches; ...; frame_T patches].
        """
        if pixel_values_BTCHW.dim() != 5:
            raise ValueError(f"pixel_values must be [B, T, C, H, W], got shape {tuple(pixel_values_BTCHW.shape)}")
        B, T, C, H, W = pixel_values_BTCHW.shape
        if H != self.image_size or W != self.image_size:
            raise ValueError(f"Input frame size ({H}*{W}) doesn't match model ({self.image_size}*{self.image_size}).")
        dtype = self.patch_embedding.weight.dtype
        patch_FDhw = self.patch_embedding(pixel_values_BTCHW.reshape(B * T, C, H, W).to(dtype))
        patch_BTLD = patch_FDhw.flatten(2).transpose(1, 2).reshape(B, T, -1, self.embed_dim)
        position_QD = self.position_embedding.weight  # Q = 1 + L positions: [CLS, patch_1..L]
        # Same addition order as the official code: temporal first, then spatial position.
        if self.temporal_embedding is not None:
            temporal_1TD = interpolate_temporal_embedding(self.temporal_embedding, T)
            patch_BTLD = patch_BTLD + temporal_1TD.unsqueeze(2)
        patch_BTLD = patch_BTLD + position_QD[1:]
        # Every proxy gets the CLS position embedding and no temporal term (spec 1.2).
        proxies_MD = torch.cat([self.class_embedding.unsqueeze(0), self.added_cls], dim=0) + position_QD[:1]
        proxies_BMD = proxies_MD.unsqueeze(0).expand(B, -1, -1)
        return torch.cat([proxies_BMD, patch_BTLD.reshape(B, -1, self.embed_dim)], dim=1)


# --------------------------------------------------------------------------------------------
# Proxy-guided attention


def build_vip_attention_mask(
    num_proxies: int, num_frames: int, num_patches: int, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean S x S mask A of proxy-guided attention (spec 1.3); True = may attend.

    A[q, k] = (q < M) or (k < M) or (frame(q) == frame(k)), frame(t) = (t - M) // L.

    Args:
        num_proxies: M.
        num_frames: T.
        num_patches: L.
        device: Where to build it.

    Returns:
        Bool tensor [S, S], S = M + T*L.
    """
    M, T, L = num_proxies, num_frames, num_patches
    S = M + T * L
    frame_S = torch.arange(S, device=device)
    frame_S = torch.where(frame_S < M, -1, (frame_S - M) // L)
    is_proxy_S = frame_S < 0
    return is_proxy_S[:, None] | is_proxy_S[None, :] | (frame_S[:, None] == frame_S[None, :])


class CLIPViPAttention(CLIPAttention):
    """HF `CLIPAttention` (same q/k/v/out projections) with proxy-guided attention.

    `attention_mode` selects the path: "sparse" runs two SDPA calls without ever building an
    S x S tensor (spec 1.3 Option B, the official `forward2`); "dense" runs one SDPA call with the
    S x S additive mask and serves as the reference in tests and benchmarks.
    """

    def __init__(self, config: CLIPVisionConfig, attention_mode: str = "sparse"):
        super().__init__(config)
        self.attention_mode = attention_mode

    def forward(  # type: ignore[override]
        self,
        hidden_BSD: torch.Tensor,
        num_proxies: int,
        num_frames: int,
        dense_mask_SS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Proxy-guided self-attention over [proxies; frame patches].

        Args:
            hidden_BSD: Layer-normed tokens [B, S, D].
            num_proxies: M.
            num_frames: T; L = (S - M) / T.
            dense_mask_SS: Additive mask [S, S] (0 / -inf) for the dense path; built here when
                None. Ignored by the sparse path.

        Returns:
            Attention output after `out_proj`, [B, S, D].
        """
        B, S, D = hidden_BSD.shape
        A, E = self.num_heads, self.head_dim
        q_BSAE = self.q_proj(hidden_BSD).view(B, S, A, E)
        k_BSAE = self.k_proj(hidden_BSD).view(B, S, A, E)
        v_BSAE = self.v_proj(hidden_BSD).view(B, S, A, E)
        return self.out_proj(self.attend(q_BSAE, k_BSAE, v_BSAE, num_proxies, num_frames, dense_mask_SS))

    def attend(
        self,
        q_BSAE: torch.Tensor,
        k_BSAE: torch.Tensor,
        v_BSAE: torch.Tensor,
        num_proxies: int,
        num_frames: int,
        dense_mask_SS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention core between the projections: per-head queries/keys/values -> context.

        Args:
            q_BSAE, k_BSAE, v_BSAE: Projected tokens split into heads, [B, S, A, E].
            num_proxies, num_frames, dense_mask_SS: As in `forward`.

        Returns:
            Context [B, S, D] (heads concatenated), before `out_proj`.
        """
        B, S, A, E = q_BSAE.shape
        M, T = num_proxies, num_frames
        L = (S - M) // T
        if M + T * L != S:
            raise ValueError(f"sequence length {S} != M + T*L with M={M}, T={T}")
        dropout_p = self.dropout if self.training else 0.0

        if self.attention_mode == "dense":
            if dense_mask_SS is None:
                dense_mask_SS = additive_mask(build_vip_attention_mask(M, T, L, q_BSAE.device), q_BSAE.dtype)
            out_BASE = F.scaled_dot_product_attention(
                q_BSAE.transpose(1, 2),
                k_BSAE.transpose(1, 2),
                v_BSAE.transpose(1, 2),
                attn_mask=dense_mask_SS,
                dropout_p=dropout_p,
                scale=self.scale,
            )
            return out_BASE.transpose(1, 2).reshape(B, S, A * E)
        if self.attention_mode != "sparse":
            raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {self.attention_mode!r}")

        # split (not two slices) so the backward is one cat, not two zero-padded grads + add.
        q_proxy_BMAE, q_patch_BXAE = q_BSAE.split([M, T * L], dim=1)  # X = T*L
        # Branch 1, proxies: M queries against all S keys.
        proxy_BAME = F.scaled_dot_product_attention(
            q_proxy_BMAE.transpose(1, 2),
            k_BSAE.transpose(1, 2),
            v_BSAE.transpose(1, 2),
            dropout_p=dropout_p,
            scale=self.scale,
        )
        # Branch 2, patches: each frame is its own sequence of L queries against [M proxy keys;
        # its L patch keys]; the proxy keys/values are repeated per frame (F = B*T sequences).
        q_FALE = q_patch_BXAE.reshape(B * T, L, A, E).transpose(1, 2)
        k_FAKE = _frame_keys(k_BSAE, M, T, L)
        v_FAKE = _frame_keys(v_BSAE, M, T, L)
        patch_FALE = F.scaled_dot_product_attention(q_FALE, k_FAKE, v_FAKE, dropout_p=dropout_p, scale=self.scale)
        return torch.cat(
            [proxy_BAME.transpose(1, 2).reshape(B, M, A * E), patch_FALE.transpose(1, 2).reshape(B, T * L, A * E)],
            dim=1,
        )


def _frame_keys(x_BSAE: torch.Tensor, M: int, T: int, L: int) -> torch.Tensor:
    """[B, S, A, E] keys or values -> per-frame [F, A, M+L, E] (proxies first, then the frame)."""
    B, _, A, E = x_BSAE.shape
    proxy_BMAE, patch_BXAE = x_BSAE.split([M, T * L], dim=1)
    proxy_BTMAE = proxy_BMAE.unsqueeze(1).expand(B, T, M, A, E)
    patch_BTLAE = patch_BXAE.view(B, T, L, A, E)
    return torch.cat([proxy_BTMAE, patch_BTLAE], dim=2).view(B * T, M + L, A, E).transpose(1, 2)


def additive_mask(allowed_SS: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> additive float mask (0 where allowed, -inf elsewhere) for SDPA."""
    mask_SS = torch.zeros(allowed_SS.shape, dtype=dtype, device=allowed_SS.device)
    return mask_SS.masked_fill_(~allowed_SS, float("-inf"))


# --------------------------------------------------------------------------------------------
# Vision tower


class CLIPViPEncoderLayer(nn.Module):
    """Pre-LN CLIP block with proxy-guided attention: h = x + Attn(LN1(x)); y = h + MLP(LN2(h))."""

    def __init__(self, config: CLIPVisionConfig, attention_mode: str):
        super().__init__()
        self.self_attn = CLIPViPAttention(config, attention_mode)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, hidden_BSD: torch.Tensor, num_proxies: int, num_frames: int, dense_mask_SS: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, S, D] -> [B, S, D]; see `CLIPViPAttention.forward` for the arguments."""
        attn_BSD = self.self_attn(self.layer_norm1(hidden_BSD), num_proxies, num_frames, dense_mask_SS)
        hidden_BSD = hidden_BSD + attn_BSD
        return hidden_BSD + self.mlp(self.layer_norm2(hidden_BSD))


class CLIPViPEncoder(nn.Module):
    """Stack of `CLIPViPEncoderLayer` (HF name `encoder.layers.i`), optional activation checkpointing."""

    def __init__(self, config: CLIPVisionConfig, attention_mode: str):
        super().__init__()
        self.layers = nn.ModuleList(
            [CLIPViPEncoderLayer(config, attention_mode) for _ in range(config.num_hidden_layers)]
        )
        # Set by HF `gradient_checkpointing_enable()` (it looks for this attribute).
        self.gradient_checkpointing = False

    def forward(
        self, hidden_BSD: torch.Tensor, num_proxies: int, num_frames: int, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Run every layer.

        Returns:
            (last hidden [B, S, D], all hidden states (input + one per layer) or None).
        """
        dense_mask_SS = None
        if any(layer.self_attn.attention_mode == "dense" for layer in self.layers):
            L = (hidden_BSD.shape[1] - num_proxies) // num_frames
            allowed_SS = build_vip_attention_mask(num_proxies, num_frames, L, hidden_BSD.device)
            dense_mask_SS = additive_mask(allowed_SS, hidden_BSD.dtype)
        all_hidden = [hidden_BSD] if output_hidden_states else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_BSD = checkpoint(
                    layer, hidden_BSD, num_proxies, num_frames, dense_mask_SS, use_reentrant=False
                )
            else:
                hidden_BSD = layer(hidden_BSD, num_proxies, num_frames, dense_mask_SS)
            if all_hidden is not None:
                all_hidden.append(hidden_BSD)
        return hidden_BSD, (tuple(all_hidden) if all_hidden is not None else None)


class CLIPViPVisionTransformer(nn.Module):
    """ViP vision tower with HF child names: embeddings, pre_layrnorm, encoder, post_layernorm."""

    def __init__(self, config: CLIPVisionConfig, vip: CLIPViPConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPViPVisionEmbeddings(config, vip.add_cls_num, vip.temporal_size, vip.use_temporal_embed)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPViPEncoder(config, vip.attention)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, pixel_values_BTCHW: torch.Tensor, output_hidden_states: bool = False
    ) -> BaseModelOutputWithPooling:
        """Encode videos.

        Args:
            pixel_values_BTCHW: [B, T, C, H, W].
            output_hidden_states: Also return the input of every layer and the last output.

        Returns:
            `last_hidden_state` [B, S, D]; `pooler_output` [B, D] = post_layernorm(token 0), the
            CLS-initialised proxy only (the other proxies are not pooled, as the official code);
            `hidden_states` (num_layers + 1 tensors [B, S, D]) when asked.
        """
        M = self.embeddings.num_proxies
        T = pixel_values_BTCHW.shape[1]
        hidden_BSD = self.pre_layrnorm(self.embeddings(pixel_values_BTCHW))
        last_BSD, all_hidden = self.encoder(hidden_BSD, M, T, output_hidden_states)
        return BaseModelOutputWithPooling(
            last_hidden_state=last_BSD, pooler_output=self.post_layernorm(last_BSD[:, 0]), hidden_states=all_hidden
        )


# --------------------------------------------------------------------------------------------
# Full model


@dataclasses.dataclass
class CLIPViPOutput:
    """L2-normalised features of each branch that was given, and the clamped log logit scale.

    Similarities are `exp(logit_scale) * a @ b.T` (exp <= 200 after the clamp).
    """

    logit_scale: torch.Tensor
    """0-dim, clamp(logit_scale, 0, logit_scale_max), differentiable inside the range."""
    video_feats_BP: torch.Tensor | None = None
    text_feats_BP: torch.Tensor | None = None
    frame_feats_BP: torch.Tensor | None = None
    caption_feats_BP: torch.Tensor | None = None


class CLIPViPModel(CLIPPreTrainedModel):
    """CLIP-ViP (video tower with proxies + HF CLIP text tower), HF `CLIPModel` parameter names.

    `state_dict()` keys are exactly `transformers.CLIPModel`'s plus `added_cls` and
    `temporal_embedding` under `vision_model.embeddings.`.
    """

    config_class = CLIPViPConfig
    config: CLIPViPConfig
    main_input_name = "pixel_values_BTCHW"
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPViPVisionEmbeddings", "CLIPViPEncoderLayer"]

    def __init__(self, config: CLIPViPConfig):
        super().__init__(config)
        self.projection_dim = config.projection_dim
        self.text_embed_dim = config.text_config.hidden_size
        self.vision_embed_dim = config.vision_config.hidden_size
        self.text_model = CLIPTextModel._from_config(config.text_config)  # noqa: SLF001  HF's config-only build
        self.vision_model = CLIPViPVisionTransformer(config.vision_config, config)
        self.visual_projection = nn.Linear(self.vision_embed_dim, self.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim, bias=False)
        # 0-dim as in HF; deepspeed is pinned to 0.19.7 because 0.19.8 cannot broadcast 0-dim params.
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.post_init()

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        """Never take transformers' custom-code shortcut.

        For classes defined outside `transformers.` it marks a module initialised when it has no
        direct parameters, which skips the CLIPAttention/CLIPMLP branches of `_init_weights`
        (their weights live in child Linears) and leaves the vision tower at the generic
        N(0, initializer_factor=1) init. All our init goes through the flag-aware
        `transformers.initialization` functions, so the shortcut is not needed.
        """
        super()._initialize_weights(module, is_custom_code=False)

    def _init_weights(self, module: nn.Module) -> None:
        """HF CLIP init, plus the ViP tensors, the projections and the logit scale."""
        super()._init_weights(module)
        if isinstance(module, CLIPViPVisionEmbeddings):
            init.normal_(module.added_cls, mean=0.0, std=1.0)  # official: torch.randn
            if module.temporal_embedding is not None:
                init.zeros_(module.temporal_embedding)
        elif isinstance(module, CLIPViPModel):
            factor = self.config.initializer_factor
            init.normal_(module.text_projection.weight, std=module.text_embed_dim**-0.5 * factor)
            init.normal_(module.visual_projection.weight, std=module.vision_embed_dim**-0.5 * factor)
            init.constant_(module.logit_scale, float(self.config.logit_scale_init_value))

    # ----- switches -------------------------------------------------------------------------

    def set_attention(self, mode: str) -> None:
        """Switch every vision layer to "sparse" (two-branch) or "dense" (masked reference)."""
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {mode!r}")
        self.config.attention = mode
        for layer in self.vision_model.encoder.layers:
            layer.self_attn.attention_mode = mode

    def clamped_logit_scale(self) -> torch.Tensor:
        """clamp(logit_scale, 0, logit_scale_max), computed functionally (0-dim tensor).

        The official code clamps `logit_scale.data` in place each step. Under DeepSpeed that is
        silently undone: the optimizer steps its fp32 master copy and copies it back over the
        module parameter (training_anchors.md probe P3). Clamping inside forward bounds every
        logit the loss sees; the stored parameter may drift past the bound but gets no gradient
        there (clamp's gradient is zero outside the range).
        """
        return self.logit_scale.clamp(0.0, self.config.logit_scale_max)

    # ----- encoders -------------------------------------------------------------------------

    def encode_video(self, pixel_values_BTCHW: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Video embedding: token 0 -> post_layernorm -> visual_projection (-> L2 norm).

        Args:
            pixel_values_BTCHW: [B, T, C, H, W], every video with the same T (no frame padding).
            normalize: L2-normalise (False returns the raw projection, as HF `get_image_features`).

        Returns:
            [B, P].
        """
        if self.config.video_pooling == "mean":
            return self._encode_video_meanpool(pixel_values_BTCHW, normalize)
        pooled_BD = self.vision_model(pixel_values_BTCHW).pooler_output
        feats_BP = self.visual_projection(pooled_BD)
        return F.normalize(feats_BP, dim=-1) if normalize else feats_BP

    def _encode_video_meanpool(self, pixel_values_BTCHW: torch.Tensor, normalize: bool) -> torch.Tensor:
        """CLIP4Clip-MeanP (spec 1.6): frames as independent 1-frame inputs, unit features averaged.

        With M=1 and no temporal embedding a 1-frame input is exactly plain CLIP (spec 7 test 3),
        so frame order cannot matter: the baseline the proxies are measured against.
        """
        B, T = pixel_values_BTCHW.shape[:2]
        frames_N1CHW = pixel_values_BTCHW.reshape(B * T, 1, *pixel_values_BTCHW.shape[2:])
        per_frame_NP = F.normalize(self.visual_projection(self.vision_model(frames_N1CHW).pooler_output), dim=-1)
        mean_BP = per_frame_NP.reshape(B, T, -1).mean(dim=1)
        return F.normalize(mean_BP, dim=-1) if normalize else mean_BP

    def encode_frames(self, pixel_values_BCHW: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Frame/image branch (spec 1.5): each middle frame as a 1-frame video, same ViP tower.

        All M proxies are used and the temporal embedding is interpolated to T=1.

        Args:
            pixel_values_BCHW: [B, C, H, W].
            normalize: L2-normalise.

        Returns:
            [B, P].
        """
        return self.encode_video(pixel_values_BCHW.unsqueeze(1), normalize=normalize)

    def encode_text(
        self, input_ids_BN: torch.Tensor, attention_mask_BN: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """Text embedding: HF CLIP text tower, EOT token -> text_projection (-> L2 norm).

        The EOT position is `input_ids.argmax(-1)` as in OpenAI CLIP and the official code (EOT
        49407 is the largest id; its first occurrence wins even when padding also uses 49407),
        independent of the HF config's `eos_token_id`.

        Args:
            input_ids_BN: Token ids [B, N].
            attention_mask_BN: 1 for real tokens, 0 for padding [B, N]; combined with the causal mask.
            normalize: L2-normalise.

        Returns:
            [B, P].
        """
        hidden_BND = self.text_model(input_ids=input_ids_BN, attention_mask=attention_mask_BN).last_hidden_state
        eot_B = input_ids_BN.to(torch.int).argmax(dim=-1).to(hidden_BND.device)
        pooled_BD = hidden_BND[torch.arange(hidden_BND.shape[0], device=hidden_BND.device), eot_B]
        feats_BP = self.text_projection(pooled_BD)
        return F.normalize(feats_BP, dim=-1) if normalize else feats_BP

    def forward(  # type: ignore[override]
        self,
        pixel_values_BTCHW: torch.Tensor | None = None,
        input_ids_BN: torch.Tensor | None = None,
        attention_mask_BN: torch.Tensor | None = None,
        frame_pixel_values_BCHW: torch.Tensor | None = None,
        caption_ids_BN: torch.Tensor | None = None,
        caption_mask_BN: torch.Tensor | None = None,
    ) -> CLIPViPOutput:
        """Encode whichever branches are given (official `VidCLIP.forward`).

        Args:
            pixel_values_BTCHW: Videos V [B, T, C, H, W].
            input_ids_BN / attention_mask_BN: Subtitles S (or captions when fine-tuning).
            frame_pixel_values_BCHW: Middle frames F [B, C, H, W] (1-frame videos).
            caption_ids_BN / caption_mask_BN: Auxiliary captions C.

        Returns:
            `CLIPViPOutput` with unit-norm [B, P] features and the clamped log logit scale.
        """
        out = CLIPViPOutput(logit_scale=self.clamped_logit_scale())
        if pixel_values_BTCHW is not None:
            out.video_feats_BP = self.encode_video(pixel_values_BTCHW)
        if input_ids_BN is not None:
            out.text_feats_BP = self.encode_text(input_ids_BN, attention_mask_BN)
        if frame_pixel_values_BCHW is not None:
            out.frame_feats_BP = self.encode_frames(frame_pixel_values_BCHW)
        if caption_ids_BN is not None:
            out.caption_feats_BP = self.encode_text(caption_ids_BN, caption_mask_BN)
        return out


AutoConfig.register(CLIPViPConfig.model_type, CLIPViPConfig, exist_ok=True)
AutoModel.register(CLIPViPConfig, CLIPViPModel, exist_ok=True)

__all__ = [
    "CLIPViPConfig",
    "CLIPViPModel",
    "CLIPViPOutput",
    "build_vip_attention_mask",
    "config_from_model_cfg",
    "interpolate_temporal_embedding",
    "sequence_length",
]
