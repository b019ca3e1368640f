"""Loading a captioner: which device and dtype, where the model is (hub id, local directory or
`builtin:<name>`), what revision names it, and which generic Auto class loads it; and decoding
the images it captions. No Ray; torch and transformers are imported inside functions.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import TYPE_CHECKING, Any

from pipeline.data.captioner_builtin import BUILTIN_NAMES, builtin_model_dir

if TYPE_CHECKING:
    from PIL.Image import Image

BUILTIN_PREFIX = "builtin:"

# Files that define a local model's outputs: weights, configs, tokenizer vocabularies, and
# remote code. Hashing only these keeps READMEs and stray files out of the revision.
_DIGEST_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt", ".model", ".py", ".tiktoken")


# --------------------------------------------------------------------------------------------
# Resolution helpers


def resolve_device(device: str | None, where: str = "this machine") -> str:
    """`device` ("auto" or None: "cuda" when a GPU is visible, else "cpu").

    Raises:
        RuntimeError: "cuda" asked for and no CUDA device visible (the message names `where`):
            a GPU recipe must not quietly caption on a CPU, 20-50x slower.
    """
    import torch  # noqa: PLC0415

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else " built without CUDA")
        raise RuntimeError(
            f"caption.device=cuda: no CUDA device is visible to the captioner on {where} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, {build}); run it on GPU nodes, "
            "or set caption.device=cpu to caption on CPUs on purpose")
    return device


def resolve_dtype(dtype: str, device_type: str) -> str:
    """Turn `CaptionConfig.dtype` into a concrete torch dtype name for this device type.

    Args:
        dtype: "auto", "float32", "bfloat16" or "float16".
        device_type: "cpu", "cuda", ...

    Returns:
        "float32", "bfloat16" or "float16".

    Raises:
        ValueError: float16 on CPU (many CPU kernels lack it, and it is slower than float32),
            or an unknown name.
    """
    if dtype == "auto":
        return "bfloat16" if device_type == "cuda" else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"caption.dtype: unknown dtype {dtype!r}")
    if dtype == "float16" and device_type == "cpu":
        raise ValueError("caption.dtype: float16 is not supported on CPU; use float32 or bfloat16")
    return dtype


def _looks_like_path(model: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a filesystem path.
    return model.startswith(("/", "./", "../", "~")) or model.count("/") > 1


def locate_model(model: str) -> tuple[str, bool]:
    """Map `CaptionConfig.model` to (what to pass to from_pretrained, is it a local dir).

    Raises:
        ValueError: Unknown builtin, or a path that is not an existing directory.
    """
    if model.startswith(BUILTIN_PREFIX):
        name = model[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_NAMES:
            known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_NAMES)
            raise ValueError(f"caption.model {model!r}: unknown builtin captioner (known: {known})")
        return builtin_model_dir(name), True
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return os.path.abspath(path), True
    if os.path.exists(path):
        raise ValueError(f"caption.model {model!r}: is a file; expected a model directory or hub id")
    if _looks_like_path(model):
        raise ValueError(f"caption.model {model!r}: local model directory not found")
    return model, False


def directory_digest(path: str) -> str:
    """`sha256:<hex>` over the names and bytes of a model directory's defining files.

    Args:
        path: Local model directory (top level only; HF checkpoints are flat).

    Returns:
        A revision string that changes whenever weights, configs or vocabularies change.
    """
    digest = hashlib.sha256()
    names = sorted(
        n for n in os.listdir(path)
        if n.endswith(_DIGEST_SUFFIXES) and not n.startswith(".") and os.path.isfile(os.path.join(path, n))
    )
    for name in names:
        digest.update(name.encode("utf-8") + b"\0")
        with open(os.path.join(path, name), "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return "sha256:" + digest.hexdigest()


def hub_commit(repo_id: str, revision: str | None) -> str:
    """The commit a hub revision points to, from the hub or (offline) the local HF cache."""
    from transformers.utils.hub import cached_file, extract_commit_hash  # noqa: PLC0415

    try:
        config_path = cached_file(repo_id, "config.json", revision=revision)
    except Exception as e:  # hub/offline/auth errors come in many types
        raise ValueError(
            f"cannot load captioner {repo_id!r} (revision {revision or 'default'}): config.json is not "
            f"reachable (offline and not cached, wrong id, or gated?): {type(e).__name__}: {e}"
        ) from e
    if config_path is None:
        raise ValueError(f"cannot load captioner {repo_id!r} (revision {revision or 'default'}): no config.json")
    return extract_commit_hash(config_path, None) or revision or "unknown"


def pick_auto_class(config: Any, trust_remote_code: bool) -> Any:
    """The first generic Auto class that knows this config, in order of specificity."""
    import transformers  # noqa: PLC0415

    candidates = [
        getattr(transformers, "AutoModelForImageTextToText", None),
        getattr(transformers, "AutoModelForVision2Seq", None),  # gone in transformers 5
        transformers.AutoModelForCausalLM,
    ]
    remote_classes = getattr(config, "auto_map", None) or {}
    for auto_cls in candidates:
        if auto_cls is None:
            continue
        if type(config) in auto_cls._model_mapping:  # noqa: SLF001  the Auto class's own registry
            return auto_cls
        if trust_remote_code and auto_cls.__name__ in remote_classes:
            return auto_cls
    names = ", ".join(c.__name__ for c in candidates if c is not None)
    raise ValueError(f"model type {config.model_type!r} is not an image captioner (not known to {names})")


def decode_image(data: Any) -> Image:
    """Decode image bytes fully into an RGB PIL image.

    Raises:
        TypeError: Not bytes.
        Exception: Whatever PIL raises for undecodable or truncated data.
    """
    from PIL import Image  # noqa: PLC0415

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected image bytes, got {type(data).__name__}")
    with Image.open(io.BytesIO(data)) as image:
        # load() forces the full decode here, so truncated files fail now, not in the processor.
        image.load()
        return image.convert("RGB")
