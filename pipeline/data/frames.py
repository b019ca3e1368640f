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
import io
import os
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.config import FramesConfig
from pipeline.schema import STAGE_DECODE, STAGE_OPEN, STAGE_SPAN

# decord decodes sorted indices into one array per get_batch call; chunking bounds memory on
# long videos and keeps clips finished before a mid-file error.
_DECORD_CHUNK_FRAMES = 32


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


@dataclass(slots=True)
class _Probe:
    """What the decoder side knows about the video before any frame is decoded."""

    frame_times_s: list[float]
    """Presentation time of every frame, ascending; index = frame number."""
    duration_s: float
    """Declared duration; may exceed the indexed frames when the file is truncated."""
    indexed_end_s: float
    """End of the last indexed frame's display interval."""
    fps: float
    width_px: int
    height_px: int


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


def output_size(width_px: int, height_px: int, short_side_px: int) -> tuple[int, int]:
    """(width, height) with the short side at `short_side_px`, aspect kept, both even.

    `short_side_px == 0` keeps the source size.
    """
    if short_side_px == 0:
        return width_px, height_px
    scale = short_side_px / min(width_px, height_px)
    even = lambda x: max(2, int(round(x / 2)) * 2)  # noqa: E731
    return even(width_px * scale), even(height_px * scale)


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
    backend = _pyav_backend if cfg.backend == "pyav" else _decord_backend
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
    return VideoResult(probe.fps, probe.duration_s, out)


def _plan_clip(span: SpanRequest, probe: _Probe, cfg: FramesConfig) -> _ClipPlan | ClipFailure:
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
    plan: _ClipPlan, probe: _Probe, jpegs: dict[int, bytes], error: str, width_px: int, height_px: int
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


def _encode_jpeg(rgb: np.ndarray | Image.Image, quality: int) -> bytes:
    image = rgb if isinstance(rgb, Image.Image) else Image.fromarray(rgb)
    buf = io.BytesIO()
    # libjpeg with fixed settings is byte-deterministic; optimize=False keeps it fast.
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# A backend opens the source and returns its probe plus decode(needed, width, height, out),
# which fills out[frame_index] = JPEG for the sorted `needed` indices and may raise part-way.
DecodeFn = Callable[[list[int], int, int, dict[int, bytes]], None]


# --------------------------------------------------------------------------------------------
# PyAV


def _open_indexed(source: typing.Any) -> tuple[typing.Any, typing.Any, _PacketIndex, _Probe]:
    """Open with PyAV, index every packet, and describe the video (no decoding)."""
    import av  # noqa: PLC0415  (heavy import, only needed once a video is opened)

    container = av.open(source, mode="r")
    try:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        if stream.codec_context.width <= 0 or stream.codec_context.height <= 0:
            # Garbage can probe as a raw H.263/H.261 stream (~1 random file in 600) with no frame
            # size; it is not a video we can sample, and the resize would divide by zero.
            raise ValueError("video stream without a frame size (corrupt or not a video)")
        index = _PacketIndex.build(container, stream)
    except Exception:
        container.close()
        raise
    tb = float(stream.time_base)
    end_s = index.indexed_end_s
    if stream.duration:
        duration_s = stream.duration * tb
    elif container.duration:
        duration_s = container.duration / 1_000_000
    else:
        duration_s = end_s
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else (len(index.pts) / end_s if end_s > 0 else 0.0)
    ctx = stream.codec_context
    probe = _Probe(index.frame_times_s, max(duration_s, end_s), end_s, fps, ctx.width, ctx.height)
    return container, stream, index, probe


def _pyav_backend(source: str | typing.BinaryIO, cfg: FramesConfig) -> tuple[_Probe, DecodeFn]:
    container, stream, index, probe = _open_indexed(source)
    ctx = stream.codec_context
    ctx.thread_count = cfg.decode_threads
    # Frame threads add a frame of latency per thread; slice threads are the lean choice at 1.
    ctx.thread_type = "AUTO" if cfg.decode_threads != 1 else "SLICE"
    return probe, _PyavDecoder(container, stream, index, cfg.jpeg_quality)


@dataclass(slots=True)
class _PacketIndex:
    """Presentation times and keyframe segments of every packet, from one demux pass.

    Demuxing reads bytes but decodes nothing, so it costs little next to decoding; knowing every
    frame's timestamp up front lets the decode pass seek over gaps and skip non-reference
    frames without ever missing a needed one.
    """

    pts: list[int]
    """Frame pts ascending (index = frame number)."""
    frame_times_s: list[float]
    indexed_end_s: float
    segment_of_pts: dict[int, int]
    """Keyframe segment (decode order: a keyframe and the packets up to the next) of each pts."""
    keyframe_pts: list[int]
    keyframe_seek_ts: list[int]
    """min(pts, dts) of each keyframe: some demuxers index by dts (mp4), some by pts (mkv); a
    backward seek to the smaller one never lands past the keyframe."""

    @classmethod
    def build(cls, container: typing.Any, stream: typing.Any) -> _PacketIndex:
        start = stream.start_time or 0
        time_base = stream.time_base
        tb = float(time_base)
        segment_of_pts: dict[int, int] = {}
        keyframe_pts: list[int] = []
        keyframe_seek_ts: list[int] = []
        end_pts = start
        for packet in container.demux(stream):
            pts = packet.pts if packet.pts is not None else packet.dts
            if pts is None or packet.size == 0:
                continue
            if packet.is_keyframe or not keyframe_pts:
                keyframe_pts.append(pts)
                keyframe_seek_ts.append(min(pts, packet.dts if packet.dts is not None else pts))
            segment_of_pts[pts] = len(keyframe_pts) - 1
            end_pts = max(end_pts, pts + (packet.duration or 0))
        ordered = sorted(segment_of_pts)
        # Exact rational arithmetic, so a frame at 3.32 s reads 3.32, not 3.3200000000000003.
        times = [float((p - start) * time_base) for p in ordered]
        if ordered and end_pts == ordered[-1]:  # packets without durations: assume the mean step
            end_pts += (ordered[-1] - ordered[0]) / max(1, len(ordered) - 1)
        return cls(ordered, times, (end_pts - start) * tb, segment_of_pts, keyframe_pts, keyframe_seek_ts)


class _PyavDecoder:
    """Decode the needed frames in one forward pass over keyframe segments, in order.

    Each segment holding a needed frame is decoded from its keyframe (a random access point by
    the container's contract) up to its last needed packet only; the tail after it and whole
    segments without a needed frame are skipped by a keyframe seek. Packets of non-reference
    frames that are not needed are not decoded at all (`skip_frame = NONREF`). Neither skip
    changes any returned pixel: nothing needed references the skipped frames.

    A needed open-GOP leading picture pulls in the previous segment. A frame the decoder still
    does not return is a decode failure.
    """

    def __init__(self, container: typing.Any, stream: typing.Any, index: _PacketIndex, quality: int) -> None:
        self._container, self._stream, self._index, self._quality = container, stream, index, quality
        self._size_px: tuple[int, int] = (0, 0)
        self._out: dict[int, bytes] = {}

    def __call__(self, needed: list[int], width_px: int, height_px: int, out: dict[int, bytes]) -> None:
        self._size_px, self._out = (width_px, height_px), out
        try:
            self._decode(needed)
        finally:
            self._container.close()

    def _decode(self, needed: list[int]) -> None:
        index = self._index
        frame_of_pts = {index.pts[i]: i for i in needed}
        segment_set = {index.segment_of_pts[p] for p in frame_of_pts}
        # A frame shown before its segment's keyframe (open-GOP leading picture) references the
        # previous segment, so that one is decoded into it without a seek in between.
        leading = {s for p in frame_of_pts if (s := index.segment_of_pts[p]) > 0 and p < index.keyframe_pts[s]}
        runs: list[list[int]] = []
        for seg in sorted(segment_set | {s - 1 for s in leading}):
            if runs and seg == runs[-1][-1] + 1 and seg in leading:
                runs[-1].append(seg)
            else:
                runs.append([seg])
        for run in runs:
            wanted = {p: i for p, i in frame_of_pts.items() if index.segment_of_pts[p] in run}
            self._decode_run(run[0], run[-1], wanted)

    def _decode_run(self, first_seg: int, last_seg: int, wanted: dict[int, int]) -> None:
        index, stream = self._index, self._stream
        ctx = stream.codec_context
        self._container.seek(index.keyframe_seek_ts[first_seg], stream=stream, backward=True, any_frame=False)
        ctx.flush_buffers()
        to_send = set(wanted)
        for packet in self._container.demux(stream):
            pts = packet.pts if packet.pts is not None else packet.dts
            seg = index.segment_of_pts.get(pts) if pts is not None else None
            if seg is None or seg < first_seg:
                continue
            if seg > last_seg:
                break
            ctx.skip_frame = "DEFAULT" if pts in wanted else "NONREF"
            for frame in ctx.decode(packet):
                self._keep(frame, wanted)
            to_send.discard(pts)
            if not to_send:  # later packets only feed later frames; drain the reorder delay
                break
        ctx.skip_frame = "DEFAULT"
        for frame in ctx.decode(None):
            self._keep(frame, wanted)

    def _keep(self, frame: typing.Any, wanted: dict[int, int]) -> None:
        i = wanted.get(frame.pts)
        if i is None or i in self._out:
            return
        width_px, height_px = self._size_px
        # Scaling inside the YUV->RGB conversion touches only the output pixels.
        image = frame.to_image(width=width_px, height=height_px, interpolation="AREA")
        self._out[i] = _encode_jpeg(image, self._quality)


# --------------------------------------------------------------------------------------------
# decord


def _decord_backend(source: str | typing.BinaryIO, cfg: FramesConfig) -> tuple[_Probe, DecodeFn]:
    import decord  # noqa: PLC0415

    if isinstance(source, (str, os.PathLike)):
        index_src: typing.Any = os.fspath(source)
        video_src: typing.Any = index_src
    else:
        data = source.read()
        index_src, video_src = io.BytesIO(data), io.BytesIO(data)
    # Frame times come from the same PyAV packet index as the pyav backend, so both pick the
    # same frames: decord's own timestamps are float32 (off by ticks on long videos) and it
    # exposes no declared duration, which truncation detection needs.
    container, _, _, probe = _open_indexed(index_src)
    container.close()
    width_px, height_px = output_size(probe.width_px, probe.height_px, cfg.short_side_px)
    try:
        reader = decord.VideoReader(
            video_src, ctx=decord.cpu(0), num_threads=cfg.decode_threads, width=width_px, height=height_px
        )
        if len(reader) != len(probe.frame_times_s):
            raise ValueError(f"decord indexed {len(reader)} frames, the demuxer {len(probe.frame_times_s)}")
    except Exception:  # noqa: BLE001
        # decord refuses files PyAV can index (e.g. truncated part-way); decode those with
        # PyAV so the good clips are still kept. Same frame choice, same output size.
        return _pyav_backend(source if isinstance(source, (str, os.PathLike)) else io.BytesIO(data), cfg)

    def decode(needed: list[int], width_px: int, height_px: int, out: dict[int, bytes]) -> None:
        for lo in range(0, len(needed), _DECORD_CHUNK_FRAMES):
            chunk = needed[lo : lo + _DECORD_CHUNK_FRAMES]
            batch = reader.get_batch(chunk).asnumpy()
            for i, rgb in zip(chunk, batch, strict=True):
                out[i] = _encode_jpeg(rgb, cfg.jpeg_quality)

    return probe, decode
