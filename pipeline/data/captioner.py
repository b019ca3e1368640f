"""Caption video frames with any Hugging Face image-to-text / image-text-to-text model.

`FrameCaptioner` loads a model and its processor once (in `__init__`, so a Ray actor pays for it
once) and turns JPEG bytes into captions in batches. `CaptionConfig.model` may be a hub id, a
local directory, or `builtin:<name>` (a random-init model materialized on disk by
`captioner_builtin`, then loaded through the same local-directory path as any other model).

Loading goes through the generic Auto classes (no per-model code, no `trust_remote_code` unless
the config asks for it). `identity()` says exactly what produced the captions: the resolved hub
commit, or a sha256 of a local directory's weight/config files, plus prompt, generation
parameters, dtype, device type and library version. Bad images never raise: each one becomes a
`CaptionResult` with an error while the rest of the batch is still captioned.

No Ray here; torch and transformers are imported inside functions so importing this module is
cheap for drivers.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.config import CaptionConfig
from pipeline.data.captioner_builtin import BUILTIN_NAMES, builtin_model_dir

if TYPE_CHECKING:
    from PIL.Image import Image

logger = logging.getLogger(__name__)

__all__ = ["BUILTIN_PREFIX", "CaptionResult", "FrameCaptioner", "builtin_model_dir"]

BUILTIN_PREFIX = "builtin:"

# Files that define a local model's outputs: weights, configs, tokenizer vocabularies, and
# remote code. Hashing only these keeps READMEs and stray files out of the revision.
_DIGEST_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt", ".model", ".py", ".tiktoken")

# Decoder-only captioners whose tokenizer ends a text with [SEP]: left in the prompt, generate()
# would continue after an end-of-text token. BLIP drops that token itself inside generate().
_DROP_PROMPT_SEP_MODEL_TYPES = frozenset({"git"})

_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


@dataclass(slots=True)
class CaptionResult:
    """Outcome for one image: exactly one of `caption` and `error` is None."""

    caption: str | None
    error: str | None

    def __post_init__(self) -> None:
        if (self.caption is None) == (self.error is None):
            raise ValueError(f"exactly one of caption/error must be set, got {self.caption!r}, {self.error!r}")


# --------------------------------------------------------------------------------------------
# Resolution helpers


def resolve_device(device: str | None) -> str:
    """`device`, or "cuda" when a GPU is visible, else "cpu"."""
    if device is not None:
        return device
    import torch  # noqa: PLC0415

    return "cuda" if torch.cuda.is_available() else "cpu"


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


def _hub_commit(repo_id: str, revision: str | None) -> str:
    """The commit a hub revision points to, from the hub or (offline) the local HF cache."""
    from transformers.utils.hub import cached_file, extract_commit_hash  # noqa: PLC0415

    try:
        config_path = cached_file(repo_id, "config.json", revision=revision)
    except Exception as e:  # noqa: BLE001  (hub/offline/auth errors come in many types)
        raise ValueError(
            f"cannot load captioner {repo_id!r} (revision {revision or 'default'}): config.json is not "
            f"reachable (offline and not cached, wrong id, or gated?): {type(e).__name__}: {e}"
        ) from e
    if config_path is None:
        raise ValueError(f"cannot load captioner {repo_id!r} (revision {revision or 'default'}): no config.json")
    return extract_commit_hash(config_path, None) or revision or "unknown"


def _pick_auto_class(config: Any, trust_remote_code: bool) -> Any:
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
        if type(config) in auto_cls._model_mapping:
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


# --------------------------------------------------------------------------------------------
# The captioner


class FrameCaptioner:
    """Loads an HF image-to-text / image-text-to-text model once; captions JPEG bytes in batches.

    Args:
        cfg: Caption section of the job config.
        device: Torch device string; None = "cuda" if available, else "cpu".

    Raises:
        ValueError: The model cannot be located or loaded (the message names the model and the
            step that failed), or the dtype is not usable on the device.
    """

    def __init__(self, cfg: CaptionConfig, device: str | None = None) -> None:
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415

        self.cfg = cfg
        self.device = resolve_device(device)
        self.device_type = torch.device(self.device).type
        self.dtype_name = resolve_dtype(cfg.dtype, self.device_type)
        self._torch_dtype = getattr(torch, self.dtype_name)
        self._transformers_version = transformers.__version__
        self._prompt = cfg.prompt or None

        source, is_local = locate_model(cfg.model)
        if is_local:
            self.revision = directory_digest(source)
            load_revision = None  # directories have no revisions; the digest stands in
            if cfg.revision is not None:
                logger.warning("caption.revision %r ignored: %r is a local directory", cfg.revision, cfg.model)
        else:
            self.revision = _hub_commit(source, cfg.revision)
            # Pin every file of this load to the one commit that identity() reports.
            load_revision = self.revision if self.revision != "unknown" else cfg.revision
        self._processor, self._model = self._load(source, load_revision)
        self._drop_prompt_sep = self._model.config.model_type in _DROP_PROMPT_SEP_MODEL_TYPES

    def _load(self, source: str, revision: str | None) -> tuple[Any, Any]:
        from transformers import AutoConfig, AutoProcessor  # noqa: PLC0415

        kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": self.cfg.trust_remote_code}
        where = f"captioner {self.cfg.model!r}" + (f" (revision {revision})" if revision else "")
        step = "config"
        try:
            config = AutoConfig.from_pretrained(source, **kwargs)
            step = "model class"
            auto_cls = _pick_auto_class(config, self.cfg.trust_remote_code)
            step = "processor"
            processor = AutoProcessor.from_pretrained(source, **kwargs)
            if getattr(processor, "image_processor", None) is None:
                raise ValueError(f"{type(processor).__name__} has no image processor")
            step = f"weights ({auto_cls.__name__})"
            model = auto_cls.from_pretrained(source, config=config, dtype=self._torch_dtype, **kwargs)
        except Exception as e:  # noqa: BLE001  (loaders raise OSError, ValueError, KeyError, ...)
            raise ValueError(f"cannot load {where}: {step} failed: {type(e).__name__}: {e}") from e
        model.to(self.device)
        model.eval()
        return processor, model

    def identity(self) -> dict[str, Any]:
        """What determines the captions, as plain JSON-able data (for caption_set.json).

        Returns:
            model, resolved revision (hub commit or `sha256:` of a local dir), prompt, generation
            parameters, dtype, device type, transformers version and model class name.
        """
        return {
            "model": self.cfg.model,
            "revision": self.revision,
            "prompt": self._prompt,
            "generation": {
                "max_new_tokens": self.cfg.max_new_tokens,
                "num_beams": self.cfg.num_beams,
                "do_sample": False,
            },
            "dtype": self.dtype_name,
            "device_type": self.device_type,
            "transformers_version": self._transformers_version,
            "model_class": type(self._model).__name__,
        }

    def caption(self, images: Sequence[bytes]) -> list[CaptionResult]:
        """Caption encoded images; one result per input, in input order.

        Undecodable inputs (and images the processor rejects) get an error result; the others
        are captioned in batches of `cfg.batch_size`.

        Args:
            images: Encoded images (JPEG bytes, typically a clip's middle frame).

        Returns:
            One `CaptionResult` per input.

        Raises:
            RuntimeError: From generate() (e.g. out of memory); that is not a property of an
                image, so it fails the call and leaves retrying to the caller.
        """
        results: list[CaptionResult | None] = [None] * len(images)
        decoded: list[tuple[int, Image]] = []
        for i, data in enumerate(images):
            try:
                decoded.append((i, decode_image(data)))
            except Exception as e:  # noqa: BLE001  (PIL raises OSError, SyntaxError, ValueError, ...)
                results[i] = CaptionResult(None, f"cannot decode JPEG: {_describe(e)}")
        step = self.cfg.batch_size
        for start in range(0, len(decoded), step):
            chunk = decoded[start:start + step]
            for (i, _), result in zip(chunk, self._caption_batch([image for _, image in chunk]), strict=True):
                results[i] = result
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    # ----------------------------------------------------------------------------------------

    def _preprocess(self, images: list[Image]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if self._prompt is not None:
            # Every image gets the same prompt, so prompt ids never need padding and batching
            # cannot shift token positions.
            kwargs["text"] = [self._prompt] * len(images)
        inputs = dict(self._processor(**kwargs))
        # Captioners take no segment ids; GIT's generate() rejects them as unused kwargs.
        inputs.pop("token_type_ids", None)
        sep_id = getattr(getattr(self._processor, "tokenizer", None), "sep_token_id", None)
        input_ids = inputs.get("input_ids")
        if self._drop_prompt_sep and input_ids is not None and bool((input_ids[:, -1] == sep_id).all()):
            inputs["input_ids"] = input_ids[:, :-1]
            if "attention_mask" in inputs:
                inputs["attention_mask"] = inputs["attention_mask"][:, :-1]
        return inputs

    def _caption_batch(self, images: list[Image]) -> list[CaptionResult]:
        try:
            inputs = self._preprocess(images)
        except Exception as e:  # noqa: BLE001
            if len(images) == 1:
                return [CaptionResult(None, f"cannot preprocess image: {_describe(e)}")]
            # Find the image(s) the processor rejects; caption the rest (results are batch
            # invariant, so splitting changes nothing).
            out: list[CaptionResult] = []
            for image in images:
                out.extend(self._caption_batch([image]))
            return out
        return [CaptionResult(text, None) for text in self._generate(inputs)]

    def _generate(self, inputs: dict[str, Any]) -> list[str]:
        import torch  # noqa: PLC0415

        moved: dict[str, Any] = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                if value.is_floating_point():
                    value = value.to(self._torch_dtype)
            moved[key] = value
        # Cloned because BLIP's generate() overwrites input_ids[:, 0] in place.
        prompt_ids = moved["input_ids"].clone() if "input_ids" in moved else None
        with torch.inference_mode():
            output_ids = self._model.generate(
                **moved,
                max_new_tokens=self.cfg.max_new_tokens,
                num_beams=self.cfg.num_beams,
                do_sample=False,
            )
        prompt_text = ""
        if prompt_ids is not None:
            width = prompt_ids.shape[1]
            if output_ids.shape[1] >= width and torch.equal(output_ids[:, :width], prompt_ids):
                # Decoder-only models echo the prompt ids exactly: cut them by position.
                output_ids = output_ids[:, width:]
            else:
                # Others (BLIP) echo a variant (new start token); cut the decoded prompt text.
                prompt_text = self._processor.decode(prompt_ids[0], skip_special_tokens=True).strip()
        texts = self._processor.batch_decode(output_ids.cpu(), skip_special_tokens=True)
        return [_strip_prefix(text.strip(), prompt_text) for text in texts]


def _describe(error: BaseException) -> str:
    # PIL names the stream object, address included; errors land in quarantine tables, where
    # the same bad input should give the same text on every run.
    return _OBJECT_REPR.sub("<bytes>", f"{type(error).__name__}: {error}")


def _strip_prefix(text: str, prefix: str) -> str:
    if prefix and text.lower().startswith(prefix.lower()):
        return text[len(prefix):].strip()
    return text
