"""Random-init captioners built offline: `builtin:tiny-blip` / `builtin:tiny-git` for CPU demos
and tests, `builtin:random-blip-large` / `builtin:random-git-large` for benchmarks.

Nothing here is downloaded. Each builtin is a real transformers architecture (BLIP conditional
captioning, GIT), initialised from a fixed seed, with a processor built offline: a pil image
processor from parameters and a WordPiece (BERT) tokenizer over a small fixed English vocabulary,
so its (random) captions are real words. The tiny ones are shrunk to a few hundred thousand
parameters; the `random-*-large` ones have the published shapes of BLIP-large (446M parameters)
and GIT-large (394M), their vocabulary padded to the real size, so they cost what the real
captioners cost per image (bench/gpu.py) while captioning nonsense.

`builtin_model_dir(name)` writes model + processor with `save_pretrained` into the cache dir and
returns that directory; `FrameCaptioner` then loads it like any other local directory, so the
builtins exercise the real loading path. Bump `_BUILTIN_VERSION` whenever anything that ends up
in the written files changes, so old cache entries are never reused for a new definition.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any

_BUILTIN_VERSION = "v1"
_SEED = 1234

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
"""Ids 0-5. [DEC] is BLIP's decoder-start token (its real tokenizer has it too)."""

_WORDS = """
a an the this that some two three four many one of on in at with and or to from by into onto over
under near behind above below across through along around between inside outside next while is
are was were being has have his her its their there here up down out off away back
red orange yellow green blue purple pink brown black white gray grey silver gold dark light bright
pale colorful striped spotted
circle square triangle rectangle line dot ball box cube ring star shape pattern stripe curve
edge corner
running walking jumping moving turning rolling spinning falling flying swimming sitting
standing dancing playing riding driving cooking eating drinking talking singing holding
throwing catching climbing sliding shaking waving pointing looking smiling reading writing
painting cutting pouring opening closing pushing pulling lifting carrying fast slow slowly quickly
man woman boy girl child children people person group crowd family friend player driver cook
teacher student baby dog cat horse bird fish cow sheep car truck bus bike boat train plane road
street city building house room kitchen table chair bed door window wall floor screen phone
camera computer book paper bag cup bottle plate bowl food pizza cake fruit apple ball game
field park beach sea ocean river lake water snow grass tree flower mountain hill sky sun cloud
rain light fire stage studio shop market office school video clip scene view picture photo
image frame shot close background foreground front top bottom left right side middle center
big small large tiny long short tall wide round flat old young new empty full open busy quiet
happy other same different
""".split()


def vocabulary() -> list[str]:
    """The builtin tokenizers' vocabulary: special tokens, then plain words (no duplicates).

    Returns:
        Tokens in id order.
    """
    seen: dict[str, None] = dict.fromkeys(SPECIAL_TOKENS)
    for word in _WORDS:
        seen.setdefault(word, None)
    return list(seen)


# --------------------------------------------------------------------------------------------
# Model definitions


def _token_ids(vocab_size: int | None = None) -> dict[str, int]:
    """Token -> id; with `vocab_size`, padded with `[unusedN]` tokens up to that many ids (a
    real-size model's LM head), the words keeping their ids."""
    ids = {tok: i for i, tok in enumerate(vocabulary())}
    for i in range(len(ids), vocab_size or 0):
        ids[f"[unused{i}]"] = i
    return ids


def _tokenizer(bos_token: str | None, vocab_size: int | None = None) -> Any:
    from transformers import BertTokenizer  # noqa: PLC0415

    kwargs = {"bos_token": bos_token} if bos_token else {}
    # v5 tokenizers silently ignore vocab_file=; the vocab dict must be passed as `vocab`.
    return BertTokenizer(vocab=_token_ids(vocab_size), do_lower_case=True, **kwargs)


@dataclass(frozen=True, slots=True)
class _Size:
    """Shapes of one builtin: the vision tower, the text model, the input size, the vocabulary."""

    vision: dict[str, int]
    text: dict[str, int]
    image_px: int
    vocab_size: int | None = None
    """None: the small word vocabulary; else padded to this size (see `_token_ids`)."""


_TINY_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
_VIT_L = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16}
_BERT_BASE = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12}
# The published shapes (config.json) of Salesforce/blip-image-captioning-large (ViT-L/16 at
# 384 px, BERT-base decoder) and microsoft/git-large (CLIP ViT-L/14 at 224 px, 6-layer
# decoder), for benchmarks that need real cost without downloading weights.
_SIZES = {
    "tiny-blip": _Size(vision=dict(_TINY_TOWER, image_size=64, patch_size=16),
                       text=dict(_TINY_TOWER, max_position_embeddings=128), image_px=64),
    "tiny-git": _Size(vision=dict(_TINY_TOWER, image_size=64, patch_size=16),
                      text=dict(_TINY_TOWER, max_position_embeddings=128), image_px=64),
    "random-blip-large": _Size(vision=dict(_VIT_L, image_size=384, patch_size=16),
                               text=dict(_BERT_BASE, num_hidden_layers=12, max_position_embeddings=512),
                               image_px=384, vocab_size=30524),
    "random-git-large": _Size(vision=dict(_VIT_L, image_size=224, patch_size=14),
                              text=dict(_BERT_BASE, num_hidden_layers=6, max_position_embeddings=1024),
                              image_px=224, vocab_size=30522),
}


def _blip(size: _Size) -> tuple[Any, Any]:
    from transformers import (  # noqa: PLC0415
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    ids = _token_ids(size.vocab_size)
    config = BlipConfig(
        text_config=dict(
            size.text,
            vocab_size=len(ids),
            encoder_hidden_size=size.vision["hidden_size"],
            bos_token_id=ids["[DEC]"],
            eos_token_id=ids["[SEP]"],
            sep_token_id=ids["[SEP]"],
            pad_token_id=ids["[PAD]"],
        ),
        vision_config=dict(size.vision),
        projection_dim=32 if size.vocab_size is None else 512,
        image_text_hidden_size=32 if size.vocab_size is None else 256,
    )
    model = BlipForConditionalGeneration(config)
    image_processor = BlipImageProcessorPil(size={"height": size.image_px, "width": size.image_px})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=_tokenizer("[DEC]", size.vocab_size))
    return model, processor


def _git(size: _Size) -> tuple[Any, Any]:
    from transformers import CLIPImageProcessorPil, GitConfig, GitForCausalLM, GitProcessor  # noqa: PLC0415

    ids = _token_ids(size.vocab_size)
    config = GitConfig(
        vision_config=dict(size.vision),
        vocab_size=len(ids),
        **size.text,
        bos_token_id=ids["[CLS]"],
        eos_token_id=ids["[SEP]"],
        pad_token_id=ids["[PAD]"],
    )
    model = GitForCausalLM(config)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size.image_px}, crop_size={"height": size.image_px, "width": size.image_px}
    )
    processor = GitProcessor(image_processor=image_processor, tokenizer=_tokenizer(None, size.vocab_size))
    return model, processor


_BUILDERS = {"tiny-blip": _blip, "tiny-git": _git, "random-blip-large": _blip, "random-git-large": _git}
# [SEP] logit bias. Measured on 200 synthetic scenes (tests' make_jpeg), greedy, 30 new tokens:
# tiny-git at 1.25 never gives an empty caption, median 17 words; tiny-blip gives empty captions
# (stops at step one) for 3/200 images at 0.25 and 11/200 at 0.5, so it keeps 0 and mostly
# runs to max_new_tokens (0/200 empty). The real-size random ones never stop early, so every
# caption costs exactly max_new_tokens decoder steps (a fixed, worst-case unit for benchmarks).
_STOP_BOOST = {"tiny-blip": 0.0, "tiny-git": 1.25, "random-blip-large": -30.0, "random-git-large": -30.0}
BUILTIN_NAMES: tuple[str, ...] = tuple(sorted(_BUILDERS))


def _reinit(model: Any, seed: int) -> None:
    """Re-draw every matrix with fan-in scaling from one seeded generator, in name order.

    HF's default init (std 0.02, BLIP vision 1e-10) leaves a 32-wide model's cross-attention
    so weak that every image gets the same caption; O(1) activations make captions depend on
    the image. Drawing from our own generator in sorted-name order also keeps the bytes
    independent of HF's init order. Vectors (LayerNorm, biases) keep their constant init.
    """
    import torch  # noqa: PLC0415

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.ndim < 2:
                continue
            # Conv kernels (out, in, kh, kw) sum over in*kh*kw; linear weights, embeddings and
            # (1, n, hidden) position tables over their last axis.
            fan_in = param[0].numel() if param.ndim == 4 else param.shape[-1]
            std = 1.0 / math.sqrt(fan_in)
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def _set_generation_ids(model: Any) -> None:
    """Start, stop and pad ids on config and generation_config (generate reads the latter)."""
    ids = _token_ids()
    for cfg in (model.config.get_text_config(), model.generation_config):
        cfg.eos_token_id = ids["[SEP]"]
        cfg.pad_token_id = ids["[PAD]"]
    model.generation_config.bos_token_id = model.config.get_text_config().bos_token_id


def _shape_output_bias(model: Any, stop_boost: float) -> None:
    """Bias the LM head so a random decoder emits only words and stops after a few of them.

    This lives in the weights, not in generation_config, because BLIP's generate() runs its
    text decoder with that submodule's own generation config and never sees the saved one.
    Specials other than [SEP] would decode to nothing ([UNK], [CLS], ...), so they get a
    prohibitive bias; [SEP] gets `stop_boost` so greedy decoding stops at varied lengths
    instead of always running to max_new_tokens.
    """
    import torch  # noqa: PLC0415

    ids = _token_ids()
    # BLIP keeps its LM head on the text decoder (the top model returns None here).
    head = model.get_output_embeddings()
    if head is None:
        head = model.text_decoder.get_output_embeddings()
    with torch.no_grad():
        for tok in ("[PAD]", "[UNK]", "[CLS]", "[MASK]", "[DEC]"):
            head.bias[ids[tok]] = -30.0
        head.bias[ids["[SEP]"]] = stop_boost


def build_builtin(name: str) -> tuple[Any, Any]:
    """Construct a builtin model (eval mode) and its processor in memory.

    Args:
        name: One of `BUILTIN_NAMES` (without the `builtin:` prefix).

    Returns:
        (model, processor).

    Raises:
        ValueError: Unknown name.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown builtin captioner {name!r}; known: {', '.join(BUILTIN_NAMES)}")
    import torch  # noqa: PLC0415

    # Construction draws from the global RNG; fork it so callers' random state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model, processor = _BUILDERS[name](_SIZES[name])
    _reinit(model, _SEED)
    _shape_output_bias(model, stop_boost=_STOP_BOOST[name])
    _set_generation_ids(model)
    return model.eval(), processor


# --------------------------------------------------------------------------------------------
# Materialization


def cache_root() -> str:
    """`$CLIPVIP_CACHE_DIR` if set, else `~/.cache/clipvip`."""
    return os.environ.get("CLIPVIP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "clipvip")


def builtin_model_dir(name: str) -> str:
    """Materialize a builtin captioner on disk (once) and return its directory.

    The directory is `<cache_root()>/builtin/<name>-v1/`, holding what `save_pretrained` writes
    for the model and the processor. It is written to a temp dir and renamed into place, so
    concurrent callers (several Ray actors on one node) never see a half-written directory;
    the loser of a race discards its copy. Weights are seeded: every materialization writes the
    same bytes (for a given torch/transformers version).

    Args:
        name: Builtin name without the prefix, e.g. "tiny-blip".

    Returns:
        Absolute path of the directory.

    Raises:
        ValueError: Unknown name.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown builtin captioner {name!r}; known: {', '.join(BUILTIN_NAMES)}")
    parent = os.path.join(cache_root(), "builtin")
    final = os.path.join(parent, f"{name}-{_BUILTIN_VERSION}")
    if os.path.isdir(final):
        return final
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{name}-{_BUILTIN_VERSION}-{uuid.uuid4().hex[:8]}")
    try:
        model, processor = build_builtin(name)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its copy first (rename onto a non-empty dir fails).
            if not os.path.isdir(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
