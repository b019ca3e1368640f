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

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.config import CaptionConfig
from pipeline.data.captioner_builtin import builtin_model_dir
from pipeline.data.captioner_load import (
    BUILTIN_PREFIX,
    decode_image,
    directory_digest,
    hub_commit,
    locate_model,
    pick_auto_class,
    resolve_device,
    resolve_dtype,
)

if TYPE_CHECKING:
    from PIL.Image import Image

logger = logging.getLogger(__name__)

__all__ = ["BUILTIN_PREFIX", "CaptionResult", "FrameCaptioner", "builtin_model_dir", "decode_image", "resolve_device",
           "resolve_dtype"]

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
# The captioner


class FrameCaptioner:
    """Loads an HF image-to-text / image-text-to-text model once; captions JPEG bytes in batches.

    Preprocessing (JPEG decode and the processor) of the next batch runs on a thread while the
    model generates the current one, so the accelerator does not wait for the CPU between
    batches. A batch that runs out of memory is split in halves and retried, and later batches
    stay at the size that fit.

    Args:
        cfg: Caption section of the job config.
        device: Torch device string; None = `cfg.device`.
        where: Names this process in errors (e.g. the Ray node).

    Raises:
        ValueError: The model cannot be located or loaded (the message names the model and the
            step that failed), or the dtype is not usable on the device.
        RuntimeError: cuda asked for and not visible here.
    """

    def __init__(self, cfg: CaptionConfig, device: str | None = None, where: str = "this machine") -> None:
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415

        self.cfg = cfg
        self.device = resolve_device(device or cfg.device, where)
        self.batch_limit = cfg.batch_size
        """Images per generate() call now: cfg.batch_size, halved on each out-of-memory."""
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
            self.revision = hub_commit(source, cfg.revision)
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
            auto_cls = pick_auto_class(config, self.cfg.trust_remote_code)
            step = "processor"
            processor = AutoProcessor.from_pretrained(source, **kwargs)
            if getattr(processor, "image_processor", None) is None:
                raise ValueError(f"{type(processor).__name__} has no image processor")
            step = f"weights ({auto_cls.__name__})"
            model = auto_cls.from_pretrained(source, config=config, dtype=self._torch_dtype, **kwargs)
        except Exception as e:  # loaders raise OSError, ValueError, KeyError, ...
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
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

        results: list[CaptionResult | None] = [None] * len(images)
        step = self.cfg.batch_size
        chunks = [list(range(start, min(start + step, len(images)))) for start in range(0, len(images), step)]
        with ThreadPoolExecutor(1, thread_name_prefix="caption-preprocess") as pool:
            ahead = pool.submit(self._prepare, images, chunks[0]) if chunks else None
            for k in range(len(chunks)):
                assert ahead is not None
                prepared = ahead.result()
                ahead = pool.submit(self._prepare, images, chunks[k + 1]) if k + 1 < len(chunks) else None
                for i, result in prepared.failed:
                    results[i] = result
                if prepared.inputs is not None:
                    for i, result in zip(prepared.indices, self._generate_fitting(prepared.inputs), strict=True):
                        results[i] = result
                else:  # the processor refused the batch: one image at a time finds the bad one(s)
                    for i, image in zip(prepared.indices, prepared.images, strict=True):
                        results[i] = self._caption_one(image)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _prepare(self, images: Sequence[bytes], chunk: list[int]) -> _Prepared:
        """Decode and preprocess one batch (on the preprocessing thread)."""
        prepared = _Prepared()
        for i in chunk:
            try:
                prepared.images.append(decode_image(images[i]))
                prepared.indices.append(i)
            except Exception as e:  # noqa: BLE001  (PIL raises OSError, SyntaxError, ValueError, ...)
                prepared.failed.append((i, CaptionResult(None, f"cannot decode JPEG: {_describe(e)}")))
        if prepared.images:
            try:
                prepared.inputs = self._preprocess(prepared.images)
            except Exception:  # noqa: BLE001
                prepared.inputs = None
        return prepared

    def _caption_one(self, image: Image) -> CaptionResult:
        try:
            inputs = self._preprocess([image])
        except Exception as e:  # noqa: BLE001
            return CaptionResult(None, f"cannot preprocess image: {_describe(e)}")
        return self._generate_fitting(inputs)[0]

    def _generate_fitting(self, inputs: dict[str, Any]) -> list[CaptionResult]:
        """Captions of a preprocessed batch, generated in slices of at most `batch_limit` images;
        a slice that runs out of memory is halved (results are batch invariant)."""
        import torch  # noqa: PLC0415

        n = _batch_len(inputs)
        out: list[CaptionResult] = []
        start = 0
        while start < n:
            size = min(self.batch_limit, n - start)
            part = _slice(inputs, start, start + size)
            try:
                texts = self._generate(part)
            except torch.OutOfMemoryError as e:
                if self.device_type == "cuda":
                    torch.cuda.empty_cache()
                if size == 1:
                    raise RuntimeError(f"captioner {self.cfg.model!r} runs out of memory on a single image on "
                                       f"{self.device}: {_describe(e)}") from e
                self.batch_limit = max(1, size // 2)
                logger.warning("captioner out of memory on a batch of %d images; now %d per batch", size,
                               self.batch_limit)
                continue
            out += [CaptionResult(text, None) for text in texts]
            start += size
        return out

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


@dataclass(slots=True)
class _Prepared:
    """One batch after the preprocessing thread: decoded images, processor output (None when the
    processor refused the batch), and the inputs that failed to decode."""

    indices: list[int] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    inputs: dict[str, Any] | None = None
    failed: list[tuple[int, CaptionResult]] = field(default_factory=list)


def _batch_len(inputs: dict[str, Any]) -> int:
    return next(len(v) for v in inputs.values() if hasattr(v, "shape"))


def _slice(inputs: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    if start == 0 and end == _batch_len(inputs):
        return inputs
    return {k: v[start:end] if hasattr(v, "shape") else v for k, v in inputs.items()}


def _describe(error: BaseException) -> str:
    # PIL names the stream object, address included; errors land in quarantine tables, where
    # the same bad input should give the same text on every run.
    return _OBJECT_REPR.sub("<bytes>", f"{type(error).__name__}: {error}")


def _strip_prefix(text: str, prefix: str) -> str:
    if prefix and text.lower().startswith(prefix.lower()):
        return text[len(prefix):].strip()
    return text
