"""Frame extraction core: one source video, many clip spans, one decode pass.

Pure (no Ray): `extract_clips` opens a video once, checks every span against the video's
duration, maps the sampled times of all spans to source frames, decodes the union of those
frames in one forward pass (keyframe seeks across gaps), and returns resized JPEGs per clip.
Bad input never raises: it becomes a `ClipFailure` naming the stage (open / span / decode).

Frame choice, shared by both backends: a sampled time t maps to the last frame whose
presentation time is <= t (the frame on screen at t); times are on the video's own timeline
(stream start time subtracted). The middle frame is the frame whose time is nearest to
(start + end) / 2, earlier one on a tie.
"""

from __future__ import annotations

import bisect
import typing
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.config import FramesConfig
from pipeline.data.decoders import Probe, decord_backend, output_size, pyav_backend
from pipeline.schema import STAGE_DECODE, STAGE_OPEN, STAGE_SPAN

__all__ = ["ClipFailure", "ClipFrames", "SpanRequest", "VideoResult", "extract_clips", "output_size", "sample_times"]


@dataclass(frozen=True, slots=True)
class SpanRequest:
    clip_id: str
    start_s: float
    end_s: float


@dataclass(slots=True)
class ClipFrames:
    """One successfully decoded clip."""

    clip_id: str
    frames: list[bytes]
    """JPEG bytes, in time order."""
    frame_times_s: list[float]
    """Presentation time (seconds, source timeline) of each stored frame."""
    middle_frame: bytes
    """JPEG of the source frame nearest the span middle (start + end) / 2."""
    middle_frame_time_s: float
    height: int
    """Of the stored frames (after resize)."""
    width: int


@dataclass(slots=True)
class ClipFailure:
    clip_id: str
    stage: str
    """schema.STAGE_OPEN | STAGE_SPAN | STAGE_DECODE."""
    error: str


@dataclass(slots=True)
class VideoResult:
    source_fps: float
    duration_s: float
    clips: list[ClipFrames | ClipFailure]
    """Same order as the requests."""
    frames_decoded: int | None = None
    """Pictures the decoder produced (pyav backend; None for decord, which does not say): how
    close the decode pass came to the frames that had to be decoded (bench/decode.py)."""


@dataclass(slots=True)
class _ClipPlan:
    clip_id: str
    frame_idx: list[int]
    middle_idx: int


def sample_times(start_s: float, end_s: float, fps: float, max_frames: int) -> list[float]:
    """Sampling times inside [start_s, end_s) at `fps`, at most `max_frames` of them.

    Args:
        start_s: Span start (seconds).
        end_s: Span end (seconds, exclusive).
        fps: Sampling rate; t_k = start_s + k / fps.
        max_frames: Cap; longer spans keep `max_frames` times chosen uniformly over the list.

    Returns:
        At least one time ([start_s] for a span shorter than 1 / fps), ascending.
    """
    # Multiplying instead of accumulating keeps t_k free of drift on long spans.
    num_times = max(1, int(np.ceil((end_s - start_s) * fps)))
    times = [start_s + k / fps for k in range(num_times)]
    while len(times) > 1 and times[-1] >= end_s:
        times.pop()
    if len(times) > max_frames:
        keep = np.round(np.linspace(0, len(times) - 1, max_frames)).astype(int)
        times = [times[i] for i in keep]
    return times


def extract_clips(
    source: str | typing.BinaryIO, spans: Sequence[SpanRequest], cfg: FramesConfig
) -> VideoResult:
    """Decode all clip spans of one video in a single pass.

    Args:
        source: Local path, or a seekable binary file object (e.g. an S3 object via pyarrow).
        spans: Clip spans in any order; they may overlap.
        cfg: Sampling rate, frame cap, resize, JPEG quality, backend and decoder threads.

    Returns:
        A VideoResult whose `clips` follow the order of `spans`. Never raises for bad input.
    """
    backend = pyav_backend if cfg.backend == "pyav" else decord_backend
    try:
        probe, decode = backend(source, cfg)
    except Exception as exc:  # noqa: BLE001  (any open error is the input's fault)
        error = f"cannot open video: {type(exc).__name__}: {exc}"
        return VideoResult(0.0, 0.0, [ClipFailure(s.clip_id, STAGE_OPEN, error) for s in spans])
    width_px, height_px = output_size(probe.width_px, probe.height_px, cfg.short_side_px)
    results: list[ClipFrames | ClipFailure | _ClipPlan] = [_plan_clip(s, probe, cfg) for s in spans]
    plans = [r for r in results if isinstance(r, _ClipPlan)]
    needed = sorted({i for p in plans for i in (*p.frame_idx, p.middle_idx)})
    jpegs: dict[int, bytes] = {}
    error = ""
    try:
        decode(needed, width_px, height_px, jpegs)
    except Exception as exc:  # noqa: BLE001  (corrupt data part-way: keep what was decoded)
        error = f"{type(exc).__name__}: {exc}"
    out: list[ClipFrames | ClipFailure] = []
    for r in results:
        if isinstance(r, _ClipPlan):
            r = _assemble(r, probe, jpegs, error, width_px, height_px)
        out.append(r)
    return VideoResult(probe.fps, probe.duration_s, out, getattr(decode, "frames_decoded", None))


def _plan_clip(span: SpanRequest, probe: Probe, cfg: FramesConfig) -> _ClipPlan | ClipFailure:
    """Validate one span and map its sampled times and middle to frame indices."""
    start_s, end_s, duration_s = span.start_s, span.end_s, probe.duration_s
    where = f"span {start_s:.2f}-{end_s:.2f} s"
    if not end_s > start_s:
        return ClipFailure(span.clip_id, STAGE_SPAN, f"{where} is empty (end <= start)")
    if start_s < -cfg.span_tolerance_s:
        return ClipFailure(span.clip_id, STAGE_SPAN, f"{where} starts before the video starts")
    if start_s >= duration_s:
        msg = f"{where} starts after the video ends ({duration_s:.2f} s)"
        return ClipFailure(span.clip_id, STAGE_SPAN, msg)
    if end_s > duration_s + cfg.span_tolerance_s:
        msg = (
            f"{where} ends {end_s - duration_s:.2f} s after the video ends ({duration_s:.2f} s),"
            f" more than the tolerance {cfg.span_tolerance_s:.2f} s"
        )
        return ClipFailure(span.clip_id, STAGE_SPAN, msg)
    start_s, end_s = max(start_s, 0.0), min(end_s, duration_s)
    times = probe.frame_times_s
    # A time past the indexed frames (truncated file) has no frame on screen; it must not
    # silently map to the last indexed frame. The tolerance absorbs duration rounding.
    limit_s = probe.indexed_end_s + cfg.span_tolerance_s
    if not times or end_s > limit_s:
        msg = (
            f"{where}: no frames after {probe.indexed_end_s:.2f} s of a {duration_s:.2f} s video"
            " (file truncated or corrupt)"
        )
        return ClipFailure(span.clip_id, STAGE_DECODE, msg)
    sampled_s = sample_times(start_s, end_s, cfg.fps, cfg.max_frames)
    frame_idx = [max(0, bisect.bisect_right(times, t) - 1) for t in sampled_s]
    middle_s = (start_s + end_s) / 2
    hi = min(bisect.bisect_left(times, middle_s), len(times) - 1)
    middle_idx = hi - 1 if hi > 0 and middle_s - times[hi - 1] <= times[hi] - middle_s else hi
    return _ClipPlan(span.clip_id, frame_idx, middle_idx)


def _assemble(
    plan: _ClipPlan, probe: Probe, jpegs: dict[int, bytes], error: str, width_px: int, height_px: int
) -> ClipFrames | ClipFailure:
    missing = [i for i in (*plan.frame_idx, plan.middle_idx) if i not in jpegs]
    if missing:
        at_s = probe.frame_times_s[missing[0]]
        reason = error or "decoder returned no picture (corrupt data?)"
        return ClipFailure(plan.clip_id, STAGE_DECODE, f"frame at {at_s:.2f} s not decoded: {reason}")
    return ClipFrames(
        clip_id=plan.clip_id,
        frames=[jpegs[i] for i in plan.frame_idx],
        frame_times_s=[probe.frame_times_s[i] for i in plan.frame_idx],
        middle_frame=jpegs[plan.middle_idx],
        middle_frame_time_s=probe.frame_times_s[plan.middle_idx],
        height=height_px,
        width=width_px,
    )
