"""Thin Ray Data wrapper: decode retrieval videos in CPU tasks, encode them in model actors.

Decode (PyAV, one CPU task per block of videos) and encode (one model replica per actor,
`num_gpus` each on GPU clusters) are separate stages with different resources, so decoding
scales with the cluster's CPUs while the actor pool stays the size of `num_encoders`.
Rows carry their index, so the driver reassembles exactly N features in input order whatever
order Ray finishes them in (no padded duplicates, spec 5.1). A video that cannot be decoded
comes back flagged, never silently replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import ModelConfig, build_dataclass, to_dict
from pipeline.eval.formats import RetrievalItem


_DECODE_MEMORY_BYTES = 256 * 2**20  # T frames of one video, resized, plus the decoder's buffers


@dataclass(frozen=True, slots=True)
class EncodedSplit:
    text_NP: np.ndarray
    video_NP: np.ndarray
    """Rows of videos that failed to decode are zeros; see `failed`."""
    failed: dict[int, str]
    """item index -> why its video could not be decoded."""


class ClipEncoder:
    """Ray Data actor: one model replica; encodes each row's decoded clip and its text."""

    def __init__(self, weights: str | None, model_cfg: dict[str, Any], max_text_len: int, use_gpu: bool) -> None:
        import torch  # noqa: PLC0415

        from pipeline.eval.encode import load_eval_model  # noqa: PLC0415

        self.model = load_eval_model(weights, build_dataclass(ModelConfig, model_cfg))
        if use_gpu and torch.cuda.is_available():
            self.model = self.model.cuda()
        self.max_text_len = max_text_len

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each row is one video and its (square-matrix) text: both encoded by the same replica."""
        from pipeline.eval.encode import encode_clips, encode_texts  # noqa: PLC0415

        ok = batch["error"] == ""
        video = np.zeros((len(ok), self.model.config.projection_dim), np.float32)
        if ok.any():
            video[ok] = encode_clips(self.model, np.stack([f for f, good in zip(batch["frames"], ok) if good]))
        text = encode_texts(self.model, [str(t) for t in batch["text"]], self.max_text_len)
        return {"index": batch["index"], "video": video, "text": text, "error": batch["error"]}


def _decode_row(row: dict[str, Any], video_format: str, num_frames: int, size_px: int) -> dict[str, Any]:
    from pipeline.data.sampling import BadSample  # noqa: PLC0415
    from pipeline.eval.video import load_clip  # noqa: PLC0415

    item = RetrievalItem(clip_id=row["clip_id"], video_path=row["video_path"], texts=())
    try:
        frames = load_clip(item, video_format, num_frames, size_px, train=False, rng=None)
        error = ""
    except BadSample as e:
        frames, error = np.zeros((num_frames, size_px, size_px, 3), np.uint8), str(e)
    return {"index": row["index"], "text": row["text"], "frames": frames, "error": error}


def encode_split(items: list[RetrievalItem], texts: list[str], *, weights: str | None, model_cfg: ModelConfig,
                 video_format: str, num_frames: int, size_px: int, max_text_len: int, batch_size: int,
                 num_encoders: int, encoder_gpus: float, decode_cpus: float, progress_bars: bool = True
                 ) -> EncodedSplit:
    """Text and video features of one split for one model, computed on the Ray cluster."""
    import ray.data  # noqa: PLC0415

    ray.data.DataContext.get_current().enable_progress_bars = progress_bars

    encoder = dict(
        fn_constructor_kwargs={"weights": weights, "model_cfg": to_dict(model_cfg), "max_text_len": max_text_len,
                               "use_gpu": encoder_gpus > 0},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_encoders),
        num_gpus=encoder_gpus or None,
    )
    if len(texts) != len(items):
        raise ValueError(f"one text per video expected, got {len(texts)} texts for {len(items)} videos")
    rows = ray.data.from_items(
        [{"index": i, "clip_id": it.clip_id, "video_path": it.video_path, "text": t}
         for i, (it, t) in enumerate(zip(items, texts))],
        override_num_blocks=max(1, min(len(items), 64)))
    rows = rows.map(_decode_row, fn_kwargs={"video_format": video_format, "num_frames": num_frames,
                                            "size_px": size_px}, num_cpus=decode_cpus,
                    # Differing remote args keep Ray from fusing decode into the encoder actors.
                    memory=_DECODE_MEMORY_BYTES)
    out_rows = rows.map_batches(ClipEncoder, batch_size=batch_size, **encoder).take_all()

    order = sorted(out_rows, key=lambda r: int(r["index"]))
    if [int(r["index"]) for r in order] != list(range(len(items))):
        raise RuntimeError(f"expected features for items 0..{len(items) - 1}, got {len(order)} rows")
    dim = len(order[0]["video"]) if order else 0
    failed = {int(r["index"]): str(r["error"]) for r in order if str(r["error"])}
    return EncodedSplit(text_NP=np.stack([np.asarray(r["text"], np.float32) for r in order]).reshape(-1, dim),
                        video_NP=np.stack([np.asarray(r["video"], np.float32) for r in order]).reshape(-1, dim),
                        failed=failed)


__all__ = ["ClipEncoder", "EncodedSplit", "encode_split"]
