"""Pure cores of training data: hash keys, which rows a shard holds, frame sampling, decode,
substitution of bad rows.

No Ray and no I/O here. The epoch order over a training view is `view_order.py`; `loader.py`
wraps both in a Ray Data pipeline. Everything is a pure function of its arguments so a resumed
run rebuilds exactly the batches it would have seen.

Frame sampling follows CLIP-ViP `get_sample_idx` (clipvip_spec.md 3.2); the jitter's randomness
comes from a generator seeded by (seed, epoch, global sample index), so no RNG state is checkpointed.

Shape legend: B batch, T frames, C = 3 channels, H x W pixels, N rows, E plan entries.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import simplejpeg
import torch
from PIL import Image

MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_STREAM_JITTER = 3

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# What PIL raises on undecodable bytes (UnidentifiedImageError and truncation are OSErrors).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class BadSample(ValueError):
    """A row whose stored frames cannot be decoded (or that has no caption)."""


# ---------------------------------------------------------------------------------------------
# Hash keys


def _mix64_int(x: int) -> int:
    x &= MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def stream_key(seed: int, epoch: int, stream: int) -> int:
    """64-bit key of one random stream (shard order, row order, ...) of one epoch."""
    h = 0
    for v in (seed, epoch, stream):
        h = _mix64_int(h ^ ((v & MASK64) + _GOLDEN))
    return h


def hash_keys(ids: np.ndarray, key: int) -> np.ndarray:
    """splitmix64(key + id * golden) for each id: a bijection of the uint64 ids, so no ties.

    Args:
        ids: [N] non-negative integer ids.
        key: stream key from `stream_key`.

    Returns:
        [N] uint64 keys.
    """
    x = ids.astype(np.uint64, copy=False)
    with np.errstate(over="ignore"):
        x = np.uint64(key) + x * np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def clip_hash(clip_id: str) -> int:
    """Stable signed int64 of a clip id (process- and platform-independent, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(clip_id.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


# ---------------------------------------------------------------------------------------------
# Which rows a shard holds


@dataclass(frozen=True)
class ShardLayout:
    """Which rows exist: shard indices, their row counts, and rows excluded up front.

    Attributes:
        shard_ids: [S] shard (unit) indices, as in `part-NNNNN`.
        num_rows: [S] rows in each shard.
        excluded: shard index -> sorted rows never scheduled (e.g. null caption).
    """

    shard_ids: np.ndarray
    num_rows: np.ndarray
    excluded: dict[int, np.ndarray] = field(default_factory=dict)

    def valid_rows(self, i: int) -> np.ndarray:
        """Rows of the i-th shard (position in `shard_ids`) that take part in the order."""
        rows = np.arange(int(self.num_rows[i]), dtype=np.int64)
        bad = self.excluded.get(int(self.shard_ids[i]))
        return rows if bad is None or len(bad) == 0 else np.setdiff1d(rows, bad, assume_unique=True)

    def num_valid(self, i: int) -> int:
        bad = self.excluded.get(int(self.shard_ids[i]))
        return int(self.num_rows[i]) - (0 if bad is None else len(bad))

    @property
    def total(self) -> int:
        """N: rows taking part in the order."""
        return sum(self.num_valid(i) for i in range(len(self.shard_ids)))


# ---------------------------------------------------------------------------------------------
# Frames


def jitter_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The generator behind one sample's frame jitter: reproducible from its order position."""
    return np.random.default_rng([seed & MASK64, epoch, position, _STREAM_JITTER])


def sample_frame_indices(num_available: int, num_frames: int, train: bool,
                         rng: np.random.Generator | None = None) -> np.ndarray:
    """CLIP-ViP `get_sample_idx` with sample_rate 0 (clipvip_spec.md 3.2).

    Train: interval = int(F / (T - 1)); start ~ U{0..interval}; end ~ U{F-1-interval..F-1};
    linspace(start, end, T) truncated. Eval: linspace(0, F-1, T) truncated. Indices are clipped
    into [0, F-1]: for T = 2 the official bounds reach F and -1; for F < T indices repeat.

    Args:
        num_available: F, stored frames of the clip (>= 1).
        num_frames: T, frames to return (>= 1).
        train: jittered (True) or uniform (False).
        rng: required when train; draws start then end.

    Returns:
        [T] int64 indices into the stored frames, non-decreasing.
    """
    if num_available < 1:
        raise BadSample("clip has no frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    last = num_available - 1
    if not train or num_frames == 1:
        if num_frames == 1:
            return np.array([last // 2], dtype=np.int64)
        return np.linspace(0, last, num_frames).astype(int).astype(np.int64)
    if rng is None:
        raise ValueError("train sampling needs an rng (jitter_rng)")
    interval = int(num_available / (num_frames - 1))
    start = int(rng.integers(0, interval + 1))
    end = int(rng.integers(last - interval, last + 1))
    idx = np.linspace(start, end, num_frames).astype(int)
    return np.clip(idx, 0, last).astype(np.int64)


def decode_resize(jpeg: bytes, size_px: int) -> np.ndarray:
    """Decode one JPEG and squash-resize it (bicubic, no aspect-preserving crop), as CLIP-ViP.

    Returns:
        [size_px, size_px, C] uint8.

    Raises:
        BadSample: the bytes do not decode.
    """
    try:
        with Image.open(io.BytesIO(jpeg)) as img:
            rgb = img.convert("RGB").resize((size_px, size_px), Image.Resampling.BICUBIC)
    except DECODE_ERRORS as e:
        raise BadSample(f"undecodable frame: {type(e).__name__}: {e}") from e
    return np.asarray(rgb, dtype=np.uint8)


def decode_into(jpeg: bytes, out_HWC: np.ndarray) -> None:
    """Decode one JPEG into `out_HWC` [H, W, C] uint8 (H = W), squash-resizing when its size differs.

    A frame already at the target size (a training view's) is decoded by libjpeg-turbo straight
    into `out_HWC` through simplejpeg: no resize, no copy, ~1.5x PIL's decode of the same bytes
    (bench/ingest.py), and the same pixels (both are libjpeg-turbo with the accurate DCT). Other
    frames, and JPEGs simplejpeg refuses (CMYK), go through PIL's `decode_resize`.

    Raises:
        BadSample: the bytes do not decode.
    """
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
        if (height, width) == out_HWC.shape[:2]:
            simplejpeg.decode_jpeg(jpeg, colorspace="RGB", buffer=out_HWC)
            return
    except ValueError:
        pass  # truncated or unsupported: PIL below decides, with its own error
    out_HWC[...] = decode_resize(jpeg, out_HWC.shape[0])


def transform_clip(frames: Sequence[bytes], middle_frame: bytes, num_frames: int, size_px: int, train: bool,
                   rng: np.random.Generator | None, out_THWC: np.ndarray | None = None,
                   out_middle_HWC: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One clip's model inputs: T sampled frames and the middle frame, uint8 channels-last.

    Only the sampled frames are decoded, each once (F < T repeats indices). Pixels stay uint8 and
    channels-last until the trainer (`normalize_clip`): the decoder writes HWC, and the permute to
    the model's CHW is free on the device but a full copy on a loader core.

    Args:
        out_THWC / out_middle_HWC: where to write (e.g. a micro batch's slots); allocated when None.

    Returns:
        frames_THWC: [T, H, W, C] uint8.
        middle_HWC: [H, W, C] uint8.

    Raises:
        BadSample: no frames, or a needed JPEG does not decode.
    """
    idx = sample_frame_indices(len(frames), num_frames, train, rng).tolist()
    if out_THWC is None:
        out_THWC = np.empty((num_frames, size_px, size_px, 3), np.uint8)
    if out_middle_HWC is None:
        out_middle_HWC = np.empty((size_px, size_px, 3), np.uint8)
    first: dict[int, int] = {}
    for t, i in enumerate(idx):
        if i in first:
            out_THWC[t] = out_THWC[first[i]]
        else:
            first[i] = t
            decode_into(frames[i], out_THWC[t])
    decode_into(middle_frame, out_middle_HWC)
    return out_THWC, out_middle_HWC


def normalize_clip(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 channels-last pixels -> CLIP-normalised float32 channels-first, on x's device.

    Args:
        x_uint8: [..., H, W, C] uint8, C = 3 (e.g. frames [B, T, H, W, C]).

    Returns:
        [..., C, H, W] float32: (x / 255 - mean) / std per channel.
    """
    mean = torch.tensor(CLIP_MEAN, device=x_uint8.device)
    std = torch.tensor(CLIP_STD, device=x_uint8.device)
    return ((x_uint8.float() / 255.0 - mean) / std).movedim(-1, -3).contiguous()


# ---------------------------------------------------------------------------------------------
# Bad rows


def substitute_slots(good: np.ndarray) -> np.ndarray:
    """Donor slot for each slot of one micro batch: itself if good, else the next good slot.

    "Next" is cyclic in slot order (j+1, ..., m-1, 0, ..., j-1). The result depends only on
    which slots are good, so a batch is the same whether the stream started at its step or
    earlier (exact resume), and the batch keeps its fixed size.

    Args:
        good: [m] bool.

    Returns:
        [m] int64 donor slot per slot; all -1 when no slot is good (caller falls back).
    """
    m = len(good)
    good_slots = np.flatnonzero(good)
    if len(good_slots) == 0:
        return np.full(m, -1, dtype=np.int64)
    slots = np.arange(m)
    nxt = np.searchsorted(good_slots, slots)  # first good slot >= j
    return np.where(nxt < len(good_slots), good_slots[np.minimum(nxt, len(good_slots) - 1)],
                    good_slots[0]).astype(np.int64)
