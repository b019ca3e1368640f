"""Rendering and encoding of the synthetic videos: moving coloured shapes over a gradient + static
noise background, drawn straight into yuv420p planes, and the deterministic H.264 encoder.

Shared by the HD-VILA-format source videos (pipeline/data/synthetic.py) and the retrieval splits
(pipeline/data/synthetic_retrieval.py).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230), "yellow": (245, 215, 40),
    "orange": (250, 140, 20), "purple": (150, 60, 200), "white": (250, 250, 250), "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "growing", "shrinking")
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "up": "down", "down": "up",
                            "growing": "shrinking", "shrinking": "growing"}


@dataclass(frozen=True, slots=True)
class MovingObject:
    colour: str
    shape: str
    motion: str
    start_xyr: tuple[float, float, float]
    """Centre x (fraction of width), y (fraction of height), half-size (fraction of short side)."""
    end_xyr: tuple[float, float, float]


@dataclass(frozen=True, slots=True)
class Scene:
    objects: tuple[MovingObject, ...]
    background: np.ndarray
    """yuv420p frame as PyAV lays it out: (H*3/2, W) uint8."""


def encode_video(path: str, frames: Iterable[np.ndarray], fps: float, crf: int = 23, *,
                 preset: str = "veryfast", threads: int = 1) -> None:
    """Encode frames to H.264 (libx264, yuv420p); the container follows the extension (.mp4).

    Written to a temporary name and renamed, so `path` is never a half-written video.

    Args:
        path: Output file, e.g. `.../<video_id>.mp4`.
        frames: All RGB (H, W, 3) uint8, or all yuv420p as PyAV lays it out: (H*3/2, W) uint8.
            H and W must be even.
        fps: Constant frame rate.
        crf: x264 constant rate factor.
        preset: x264 preset; every preset but ultrafast uses B-frames.
        threads: x264 threads, fixed rather than "auto" because the count is written into the
            stream and steers x264's decisions. Frames under about 160x120 are not reproducible.
    """
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError(f"encode_video({path!r}): no frames")
    fmt = "rgb24" if first.ndim == 3 else "yuv420p"
    height, width = first.shape[:2] if fmt == "rgb24" else (first.shape[0] * 2 // 3, first.shape[1])
    if first.dtype != np.uint8 or width % 2 or height % 2 or (fmt == "rgb24" and first.shape[2] != 3) \
            or (fmt == "yuv420p" and (first.ndim != 2 or first.shape[0] != height * 3 // 2)):
        raise ValueError(f"encode_video: need (H, W, 3) or (H*3/2, W) uint8, even H and W; "
                         f"got {first.shape} {first.dtype}")
    stem, ext = os.path.splitext(path)
    tmp = f"{stem}.tmp{ext}"
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(tmp, "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # mbtree=0: with macroblock-tree rate control on, this libx264 gave other bytes for the same
        # frames depending on what the process had encoded before (the first encode of a process,
        # or the order threads happened to run in: 1 of 12 retrieval clips changed between runs
        # with 2 threads). Off, 30 encodes of one clip and 6 whole samples with 1/2/4 threads
        # were byte-identical. Costs a little compression; these videos are synthetic.
        stream.options = {"crf": str(crf), "preset": preset, "x264-params": "mbtree=0"}
        stream.codec_context.thread_count = threads
        for index, img in enumerate(itertools.chain([first], it)):
            if img.shape != first.shape:
                raise ValueError(f"encode_video: frame {index} is {img.shape}, first was {first.shape}")
            frame = av.VideoFrame.from_ndarray(img, format=fmt)
            frame.pts, frame.time_base = index, 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    os.replace(tmp, path)


def make_object(rng: np.random.Generator, colour: str, shape: str, motion: str, lane: float,
                 scale: float = 1.0) -> MovingObject:
    lane += rng.uniform(-0.05, 0.05)
    size, a, b = rng.uniform(0.07, 0.12) * scale, rng.uniform(0.12, 0.2), rng.uniform(0.8, 0.88)
    if motion in ("left", "right"):
        start, end = (a, lane, size), (b, lane, size)
    elif motion in ("up", "down"):
        start, end = (lane, a, size), (lane, b, size)
    else:
        y = rng.uniform(0.35, 0.65)
        start, end = (lane, y, rng.uniform(0.04, 0.06)), (lane, y, rng.uniform(0.18, 0.24))
    if motion in ("left", "up", "shrinking"):
        start, end = end, start
    return MovingObject(colour, shape, motion, tuple(float(v) for v in start), tuple(float(v) for v in end))


def background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Diagonal gradient between two muted colours plus static noise, as a yuv420p frame.

    Static noise costs x264 almost nothing after the first frame; drawing in yuv420p skips an
    RGB->YUV conversion per frame, which was a quarter of the encode time at 720p.
    """
    c0, c1 = rng.uniform(70, 170, 3), rng.uniform(70, 170, 3)
    ramp = (np.linspace(0, 1, width)[None, :] * 0.6 + np.linspace(0, 1, height)[:, None] * 0.4)[..., None]
    rgb = np.clip(c0 + (c1 - c0) * ramp + rng.normal(0, 4, (height, width, 3)), 0, 255).astype(np.uint8)
    return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray()


def _yuv(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """BT.601 limited range, the matrix swscale uses for rgb24 -> yuv420p by default."""
    r, g, b = (c / 255 for c in rgb)
    return (round(16 + 65.481 * r + 128.553 * g + 24.966 * b),
            round(128 - 37.797 * r - 74.203 * g + 112.0 * b),
            round(128 + 112.0 * r - 93.786 * g - 18.214 * b))


def _planes(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of Y (H, W), U and V (H/2, W/2) inside PyAV's (H*3/2, W) yuv420p array."""
    height, width = frame.shape[0] * 2 // 3, frame.shape[1]
    chroma = frame[height:].reshape(2, height // 2, width // 2)
    return frame[:height], chroma[0], chroma[1]


def _paint(plane: np.ndarray, step_px: int, shape: str, cx: float, cy: float, r_px: float, value: int) -> None:
    """Fill `shape` (centre and half-size in luma pixels) on a plane subsampled by `step_px`."""
    height, width = plane.shape
    x0, x1 = max(0, int((cx - r_px) / step_px)), min(width, int((cx + r_px) / step_px) + 1)
    y0, y1 = max(0, int((cy - r_px) / step_px)), min(height, int((cy + r_px) / step_px) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    dy = (np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5) * step_px - cy
    dx = (np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5) * step_px - cx
    if shape == "circle":
        mask = dx * dx + dy * dy <= r_px * r_px
    elif shape == "square":
        mask = np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r_px
    elif shape == "triangle":  # apex up, base r_px below the centre
        mask = (np.abs(dy) <= r_px) & (np.abs(dx) <= (dy + r_px) / 2)
    else:
        mask = np.abs(dx) + np.abs(dy) <= r_px
    np.copyto(plane[y0:y1, x0:x1], np.uint8(value), where=mask)


def render(scene: Scene, progress: float) -> np.ndarray:
    """One yuv420p frame of `scene` with every object at `progress` in [0, 1] along its path."""
    frame = scene.background.copy()
    planes = _planes(frame)
    height, width = planes[0].shape
    for obj in scene.objects:
        x, y, r = (s + (e - s) * progress for s, e in zip(obj.start_xyr, obj.end_xyr, strict=True))
        geometry = (obj.shape, x * width, y * height, max(2.0, r * min(width, height)))
        for plane, step_px, value in zip(planes, (1, 2, 2), _yuv(COLOURS[obj.colour]), strict=True):
            _paint(plane, step_px, *geometry, value)
    return frame


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)
