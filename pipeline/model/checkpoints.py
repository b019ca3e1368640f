"""Strict loading and saving of CLIP-ViP weights.

`load_clip_vip(source)` accepts three layouts:

1. an HF CLIP id or directory (`model_type: clip`, e.g. openai/clip-vit-base-patch32): every CLIP
   weight is copied, `added_cls` / `temporal_embedding` keep their init (N(0,1) / zeros) and
   `logit_scale` is set to `ModelConfig.logit_scale_init`, as the official `VidCLIP.__init__`;
2. an official CLIP-ViP release `.pt` (a state_dict with `clipmodel.` prefix, stale
   `position_ids` buffers, possibly fp16): the architecture is inferred from the tensor shapes;
3. a directory written by `CLIPViPModel.save_pretrained` (`model_type: clip_vip`).

With `clip_only`, an official `.pt` or an export gives only its CLIP weights (towers, projections,
temperature) to a model of `model_cfg`'s ViP architecture, whose ViP-only tensors keep their init:
how a mean-pooling baseline starts from a CLIP-ViP checkpoint. (An HF CLIP gives no more than that
anyway; its temperature is reset as in layout 1.)

Every path is strict: a missing, unexpected (other than `position_ids`) or mis-shaped key raises
`ValueError` naming the keys and shapes. The official code loads non-strictly, which hid a broken
released checkpoint (microsoft/XPretrain issue 43).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from pipeline.config import ModelConfig
from pipeline.model.clip_vip import PRESETS, CLIPViPConfig, CLIPViPModel, vip_extras

OFFICIAL_PREFIX = "clipmodel."
# Parameters that an HF CLIP checkpoint cannot have; they keep the ViP init.
VIP_ONLY_KEYS = ("vision_model.embeddings.added_cls", "vision_model.embeddings.temporal_embedding")
_MAX_LISTED = 20


def load_clip_vip(source: str, model_cfg: ModelConfig | None = None, clip_only: bool = False) -> CLIPViPModel:
    """Build a `CLIPViPModel` from `source` (HF CLIP, official `.pt`, or our export), strictly.

    Args:
        source: An HF CLIP hub id, a local directory (HF CLIP or CLIP-ViP `save_pretrained`),
            or an official CLIP-ViP `.pt` file.
        model_cfg: ViP settings (proxies, temporal size, attention mode, logit scale init/max).
            Defaults to `ModelConfig()`. Its `preset` is ignored: shapes come from the source.
            For checkpoints that carry the ViP tensors, `add_cls_num` / `temporal_size` /
            `use_temporal_embed` must agree with them; when `model_cfg` is None they are read
            from the checkpoint.
        clip_only: Take only the CLIP weights of `source` (read in its own ViP architecture) into
            a model of `model_cfg`'s; `added_cls` / `temporal_embedding` keep their init, and
            `logit_scale` is the source's (unlike an HF CLIP, whose is reset as VidCLIP does).

    Returns:
        The model in fp32, train mode off (`eval()`).

    Raises:
        ValueError: Missing, unexpected or mis-shaped keys, or an unknown layout; `clip_only`
            without a `model_cfg`.
    """
    path = os.path.expanduser(source)
    if clip_only:
        if model_cfg is None:
            raise ValueError(f"{source}: clip_only needs the model config of the architecture to load into")
        if os.path.isfile(path) or _model_type(path) == CLIPViPConfig.model_type:
            saved = load_clip_vip(source)  # its own ViP architecture, strictly
            return _clip_weights_into(saved, model_cfg, source).eval()
    if os.path.isfile(path):
        model = _load_official(path, model_cfg)
    else:
        model_type = _model_type(path)
        if model_type == CLIPViPConfig.model_type:
            model = _load_export(path, model_cfg)
        elif model_type == "clip":
            model = _load_hf_clip(path, model_cfg or ModelConfig())
        else:
            raise ValueError(f"{source}: model_type {model_type!r} is neither 'clip' nor 'clip_vip'")
    return model.eval()


def _model_type(path: str) -> str:
    from transformers import AutoConfig  # noqa: PLC0415  transformers only when loading HF weights

    return AutoConfig.from_pretrained(path).model_type


def _clip_weights_into(saved: CLIPViPModel, cfg: ModelConfig, source: str) -> CLIPViPModel:
    """A model with `saved`'s shapes and `cfg`'s ViP settings, holding every weight of `saved`
    but the ViP-only ones, which keep their random init: deterministic for the caller's seed, so
    the same on every rank (though not the values a fresh model would draw, as reading an
    official `.pt` consumes random numbers first)."""
    clip_state = {k: v for k, v in saved.state_dict().items() if k not in VIP_ONLY_KEYS}
    return _clip_into_vip(saved.config, clip_state, cfg, source)


def _clip_into_vip(clip_config, clip_state: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str
                   ) -> CLIPViPModel:
    """A CLIP-ViP with the towers and projection of `clip_config` (a CLIP or CLIP-ViP config) and
    `cfg`'s ViP settings, holding `clip_state` strictly; only the ViP-only tensors may be absent."""
    config = CLIPViPConfig(
        text_config=clip_config.text_config.to_dict(),
        vision_config=clip_config.vision_config.to_dict(),
        projection_dim=clip_config.projection_dim,
        **vip_extras(cfg),
    )
    model = CLIPViPModel(config)
    load_state_dict_strict(model, clip_state, source, allowed_missing=VIP_ONLY_KEYS)
    return model


def save_official(model: CLIPViPModel, path: str) -> None:
    """Write `model` in the official release layout: `clipmodel.` + HF key, plus `position_ids`.

    The stale `position_ids` buffers are written because the release has them (older
    transformers saved them), so a strict loader of the official code accepts the file too.

    Args:
        model: The model to save (tensors are moved to CPU, dtype kept).
        path: Destination `.pt` file; parent directories are created.
    """
    state = {OFFICIAL_PREFIX + k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for tower in ("text_model", "vision_model"):
        ids = getattr(model, tower).embeddings.position_ids
        state[f"{OFFICIAL_PREFIX}{tower}.embeddings.position_ids"] = ids.detach().cpu().clone()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state, path)


# --------------------------------------------------------------------------------------------
# The three layouts


def _load_hf_clip(source: str, cfg: ModelConfig) -> CLIPViPModel:
    from transformers import CLIPModel  # noqa: PLC0415  transformers only when loading HF weights

    clip, info = CLIPModel.from_pretrained(source, output_loading_info=True, dtype=torch.float32)
    _raise_on_loading_info(source, info)
    model = _clip_into_vip(clip.config, clip.state_dict(), cfg, source)
    with torch.no_grad():
        # VidCLIP: logit_scale.data.fill_(logit_scale_init_value) after loading CLIP (CLIP's own is ln 100 too).
        model.logit_scale.fill_(cfg.logit_scale_init)
    return model


def _load_official(path: str, model_cfg: ModelConfig | None) -> CLIPViPModel:
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected a state_dict (mapping of tensors), got {type(raw).__name__}")
    bad = [k for k in raw if not k.startswith(OFFICIAL_PREFIX)]
    if bad:
        raise ValueError(f"{path}: keys without the {OFFICIAL_PREFIX!r} prefix: {_listed(bad)}")
    state = {}
    for key, value in raw.items():
        key = key[len(OFFICIAL_PREFIX) :]
        if key.endswith("position_ids"):
            continue  # stale persistent buffers of older transformers; we recompute them
        # The release is fp16 (apex O2); training and our strict comparisons are fp32.
        state[key] = value.float() if value.is_floating_point() else value
    config = _config_from_shapes(state, model_cfg, path)
    model = CLIPViPModel(config)
    load_state_dict_strict(model, state, path)
    return model


def _load_export(path: str, model_cfg: ModelConfig | None) -> CLIPViPModel:
    model, info = CLIPViPModel.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    _raise_on_loading_info(path, info)
    if model_cfg is not None:
        saved = {k: getattr(model.config, k)
                 for k in ("add_cls_num", "temporal_size", "use_temporal_embed", "video_pooling")}
        wanted = {k: v for k, v in vip_extras(model_cfg).items() if k in saved}
        if saved != wanted:
            raise ValueError(f"{path}: saved ViP architecture {saved} differs from model config {wanted}")
        model.set_attention(model_cfg.attention)
        model.config.logit_scale_max = float(model_cfg.logit_scale_max)
    return model


# --------------------------------------------------------------------------------------------
# Strictness


def load_state_dict_strict(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, allowed_missing: tuple[str, ...] = ()
) -> None:
    """Copy `state` into `model`, or raise `ValueError` listing every problem key with shapes.

    Args:
        model: Destination module.
        state: Key -> tensor, keys as in `model.state_dict()`.
        source: Named in the error message.
        allowed_missing: Model keys that may be absent from `state` (they keep their init).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and k not in allowed_missing]
    unexpected = [k for k in state if k not in expected and not k.endswith("position_ids")]
    mismatched = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append("missing: " + _listed([f"{k} {tuple(expected[k].shape)}" for k in missing]))
    if unexpected:
        problems.append("unexpected: " + _listed([f"{k} {tuple(state[k].shape)}" for k in unexpected]))
    if mismatched:
        shapes = [f"{k} checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched]
        problems.append("wrong shape: " + _listed(shapes))
    if problems:
        raise ValueError(f"{source}: checkpoint does not match the model; " + "; ".join(problems))
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def _raise_on_loading_info(source: str, info: Mapping | object) -> None:
    """Turn HF `from_pretrained(output_loading_info=True)` findings into a ValueError."""

    def field(name: str) -> list:
        value = info.get(name) if isinstance(info, Mapping) else getattr(info, name, None)
        return sorted(value or [], key=str)

    missing = [k for k in field("missing_keys") if not k.endswith("position_ids")]
    unexpected = [k for k in field("unexpected_keys") if not k.endswith("position_ids")]
    mismatched = [f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in field("mismatched_keys")]
    problems = [
        f"{name}: {_listed(keys)}"
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
        if keys
    ]
    problems += [str(m) for m in field("error_msgs")]
    if problems:
        raise ValueError(f"{source}: checkpoint does not match the model; " + "; ".join(problems))


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


# --------------------------------------------------------------------------------------------
# Architecture from tensor shapes (official release)


def _config_from_shapes(state: Mapping[str, torch.Tensor], model_cfg: ModelConfig | None, source: str) -> CLIPViPConfig:
    """Infer the CLIPViPConfig of a state_dict (HF keys, prefix stripped)."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ValueError(f"{source}: missing {key}, needed to infer the architecture")
        return tuple(state[key].shape)

    def num_layers(tower: str) -> int:
        # Consecutive layers from 0 that have a q_proj; a stray or partial extra layer is then
        # reported by the strict load as unexpected keys rather than re-shaping the model.
        count = 0
        while f"{tower}.encoder.layers.{count}.self_attn.q_proj.weight" in state:
            count += 1
        if not count:
            raise ValueError(f"{source}: no {tower}.encoder.layers.0 keys")
        return count

    v_hidden, channels, patch, _ = shape("vision_model.embeddings.patch_embedding.weight")
    num_positions = shape("vision_model.embeddings.position_embedding.weight")[0]
    grid = round((num_positions - 1) ** 0.5)
    if grid * grid != num_positions - 1:
        raise ValueError(f"{source}: {num_positions - 1} patch positions is not a square grid")
    vocab, t_hidden = shape("text_model.embeddings.token_embedding.weight")
    vision_config = dict(
        hidden_size=v_hidden,
        intermediate_size=shape("vision_model.encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=num_layers("vision_model"),
        num_channels=channels,
        image_size=grid * patch,
        patch_size=patch,
    )
    text_config = dict(
        vocab_size=vocab,
        hidden_size=t_hidden,
        intermediate_size=shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=num_layers("text_model"),
        max_position_embeddings=shape("text_model.embeddings.position_embedding.weight")[0],
    )
    vision_config["num_attention_heads"] = _num_heads(vision_config, "vision_config", model_cfg, source)
    text_config["num_attention_heads"] = _num_heads(text_config, "text_config", model_cfg, source)
    if model_cfg is not None:
        extras = vip_extras(model_cfg)  # disagreement with the tensors surfaces in the strict load
    else:
        temporal = state.get("vision_model.embeddings.temporal_embedding")
        extras = vip_extras(ModelConfig())
        extras.update(
            add_cls_num=shape("vision_model.embeddings.added_cls")[0],
            use_temporal_embed=temporal is not None,
            temporal_size=temporal.shape[1] if temporal is not None else extras["temporal_size"],
        )
    return CLIPViPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=shape("visual_projection.weight")[0],
        **extras,
    )


_HEAD_KEYS = {"vision_config": "vision_heads", "text_config": "text_heads"}
_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers")


def _num_heads(tower_cfg: dict, tower: str, model_cfg: ModelConfig | None, source: str) -> int:
    """The tower's head count, which no tensor shape shows: `model.<vision|text>_heads` when set, else
    the preset whose tower has exactly these shapes (width, MLP width, depth: the released B/32 and
    B/16 are such), else an error naming the key. Never a guess: a wrong head count loads without
    complaint and computes another function."""
    key = _HEAD_KEYS[tower]
    hidden = tower_cfg["hidden_size"]
    explicit = getattr(model_cfg, key, None) if model_cfg is not None else None
    if explicit is not None:
        if hidden % explicit:
            raise ValueError(f"{source}: model.{key}={explicit} does not divide the {tower} width {hidden}")
        return explicit
    for sub in (p[tower] for p in PRESETS.values()):
        if all(sub[k] == tower_cfg[k] for k in _SHAPE_KEYS):
            return sub["num_attention_heads"]
    shapes = ", ".join(f"{k} {tower_cfg[k]}" for k in _SHAPE_KEYS)
    raise ValueError(f"{source}: the {tower} head count is not in the tensor shapes and no preset has this tower "
                     f"({shapes}); set model.{key}")
