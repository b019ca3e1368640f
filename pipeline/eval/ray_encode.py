"""Thin Ray Data wrapper: decode retrieval videos in CPU tasks, encode them in model actors.

Decode (PyAV, one CPU task per block of videos) and encode (one replica of every model per
actor, `num_gpus` each on GPU clusters) are separate stages with different resources, so
decoding scales with the cluster's CPUs while the actor pool stays the size of `num_encoders`.
Every model sees the same decoded frames, and a split is decoded once however many models are
compared (on a small split the actor start-up, paid once, is most of the time).
Rows carry their index, so the driver reassembles exactly N features in input order whatever
order Ray finishes them in (no padded duplicates, spec 5.1). A video that cannot be decoded
(S3 reads included, once our retries are spent) comes back flagged, never silently replaced.
The decode tasks get the job's S3 options as a plain dict (rebuilt into `fs.S3Options` there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.config import ModelConfig, build_dataclass, to_dict
from pipeline.eval.formats import RetrievalItem
from pipeline.utils import fs

_DECODE_MEMORY_BYTES = 256 * 2**20  # T frames of one video, resized, plus the decoder's buffers


@dataclass(frozen=True, slots=True)
class EncodedSplit:
    text_NP: np.ndarray
    video_NP: np.ndarray
    """Rows of videos that failed to decode are zeros; see `failed`."""
    failed: dict[int, str]
    """item index -> why its video could not be decoded."""


class ClipEncoder:
    """Ray Data actor: one replica of each model; encodes each row's decoded clip and its text
    with every model (columns `video_<k>` / `text_<k>` for models[k]), texts at each model's own
    `max_text_len`."""

    def __init__(self, models: list[tuple[str | None, dict[str, Any]]], use_gpu: bool) -> None:
        import torch  # noqa: PLC0415

        from pipeline.eval.encode import load_eval_model  # noqa: PLC0415

        configs = [build_dataclass(ModelConfig, cfg) for _, cfg in models]
        self.models = [load_eval_model(weights, cfg) for (weights, _), cfg in zip(models, configs)]
        self.text_lens = [cfg.max_text_len for cfg in configs]
        if use_gpu and torch.cuda.is_available():
            self.models = [m.cuda() for m in self.models]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each row is one video and its (square-matrix) text: both encoded by the same replica."""
        from pipeline.eval.encode import encode_clips, encode_texts  # noqa: PLC0415

        ok = batch["error"] == ""
        clips = np.stack([f for f, good in zip(batch["frames"], ok) if good]) if ok.any() else None
        texts = [str(t) for t in batch["text"]]
        out = {"index": batch["index"], "error": batch["error"]}
        for k, model in enumerate(self.models):
            video = np.zeros((len(ok), model.config.projection_dim), np.float32)
            if clips is not None:
                video[ok] = encode_clips(model, clips)
            out[f"video_{k}"] = video
            out[f"text_{k}"] = encode_texts(model, texts, self.text_lens[k])
        return out


def _decode_row(row: dict[str, Any], video_format: str, num_frames: int, size_px: int,
                s3_opts: dict[str, Any] | None) -> dict[str, Any]:
    from pipeline.data.sampling import BadSample  # noqa: PLC0415
    from pipeline.eval.video import load_clip  # noqa: PLC0415

    size = int(row["size_bytes"])
    item = RetrievalItem(clip_id=row["clip_id"], video_path=row["video_path"], texts=(),
                         size_bytes=None if size < 0 else size)
    opts = fs.S3Options(**s3_opts) if s3_opts else None
    try:
        frames = load_clip(item, video_format, num_frames, size_px, train=False, rng=None, opts=opts)
        error = ""
    except BadSample as e:
        frames, error = np.zeros((num_frames, size_px, size_px, 3), np.uint8), str(e)
    return {"index": row["index"], "text": row["text"], "frames": frames, "error": error}


def encode_split(items: list[RetrievalItem], texts: list[str], *, models: list[tuple[str | None, ModelConfig]],
                 video_format: str, num_frames: int, size_px: int, batch_size: int,
                 num_encoders: int, encoder_gpus: float, decode_cpus: float, progress_bars: bool = True,
                 opts: fs.S3Options | None = None) -> list[EncodedSplit]:
    """Text and video features of one split for each (weights, model config) of `models`, in
    that order, computed on the Ray cluster from one decode of the split; `opts`: how the
    decode tasks reach S3 for s3:// videos (the job's `storage`)."""
    import ray.data  # noqa: PLC0415

    ray.data.DataContext.get_current().enable_progress_bars = progress_bars
    if not models:
        raise ValueError("encode_split: no models to encode with")

    encoder = dict(
        fn_constructor_kwargs={"models": [(w, to_dict(m)) for w, m in models], "use_gpu": encoder_gpus > 0},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_encoders),
        num_gpus=encoder_gpus or None,
    )
    if len(texts) != len(items):
        raise ValueError(f"one text per video expected, got {len(texts)} texts for {len(items)} videos")
    rows = ray.data.from_items(
        # size_bytes -1 = unknown: a column of ints Arrow types the same in every block.
        [{"index": i, "clip_id": it.clip_id, "video_path": it.video_path, "text": t,
          "size_bytes": -1 if it.size_bytes is None else it.size_bytes}
         for i, (it, t) in enumerate(zip(items, texts))],
        override_num_blocks=max(1, min(len(items), 64)))
    rows = rows.map(_decode_row, fn_kwargs={"video_format": video_format, "num_frames": num_frames,
                                            "size_px": size_px, "s3_opts": None if opts is None else asdict(opts)},
                    num_cpus=decode_cpus,
                    # Differing remote args keep Ray from fusing decode into the encoder actors.
                    memory=_DECODE_MEMORY_BYTES)
    out_rows = rows.map_batches(ClipEncoder, batch_size=batch_size, **encoder).take_all()

    order = sorted(out_rows, key=lambda r: int(r["index"]))
    if [int(r["index"]) for r in order] != list(range(len(items))):
        raise RuntimeError(f"expected features for items 0..{len(items) - 1}, got {len(order)} rows")
    failed = {int(r["index"]): str(r["error"]) for r in order if str(r["error"])}
    out = []
    for k in range(len(models)):
        dim = len(order[0][f"video_{k}"]) if order else 0
        out.append(EncodedSplit(
            text_NP=np.stack([np.asarray(r[f"text_{k}"], np.float32) for r in order]).reshape(-1, dim),
            video_NP=np.stack([np.asarray(r[f"video_{k}"], np.float32) for r in order]).reshape(-1, dim),
            failed=failed))
    return out


__all__ = ["ClipEncoder", "EncodedSplit", "encode_split"]
