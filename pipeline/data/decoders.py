"""Video decoders behind `frames.extract_clips`: each opens a source, describes it (`Probe`: every
frame's presentation time from one demux pass, duration, size) and returns a decode function
that fills `out[frame_index] = JPEG` for the sorted needed frames. PyAV decodes exactly what is
needed in one forward pass over keyframe segments; decord is the alternative backend.
"""

from __future__ import annotations

import io
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.config import FramesConfig

# decord decodes sorted indices into one array per get_batch call; chunking bounds memory on
# long videos and keeps clips finished before a mid-file error.
_DECORD_CHUNK_FRAMES = 32


@dataclass(slots=True)
class Probe:
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


def output_size(width_px: int, height_px: int, short_side_px: int) -> tuple[int, int]:
    """(width, height) with the short side at `short_side_px`, aspect kept, both even.

    `short_side_px == 0` keeps the source size.
    """
    if short_side_px == 0:
        return width_px, height_px
    scale = short_side_px / min(width_px, height_px)
    even = lambda x: max(2, int(round(x / 2)) * 2)  # noqa: E731
    return even(width_px * scale), even(height_px * scale)


def encode_jpeg(rgb: np.ndarray | Image.Image, quality: int) -> bytes:
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


def open_indexed(source: typing.Any) -> tuple[typing.Any, typing.Any, PacketIndex, Probe]:
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
        index = PacketIndex.build(container, stream)
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
    probe = Probe(index.frame_times_s, max(duration_s, end_s), end_s, fps, ctx.width, ctx.height)
    return container, stream, index, probe


def pyav_backend(source: str | typing.BinaryIO, cfg: FramesConfig) -> tuple[Probe, DecodeFn]:
    container, stream, index, probe = open_indexed(source)
    ctx = stream.codec_context
    ctx.thread_count = cfg.decode_threads
    # Frame threads add a frame of latency per thread; slice threads are the lean choice at 1.
    ctx.thread_type = "AUTO" if cfg.decode_threads != 1 else "SLICE"
    return probe, PyavDecoder(container, stream, index, cfg.jpeg_quality)


@dataclass(slots=True)
class PacketIndex:
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
    def build(cls, container: typing.Any, stream: typing.Any) -> PacketIndex:
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


class PyavDecoder:
    """Decode the needed frames in one forward pass over keyframe segments, in order.

    Each segment holding a needed frame is decoded from its keyframe (a random access point by
    the container's contract) up to its last needed packet only; the tail after it and whole
    segments without a needed frame are skipped by a keyframe seek. Packets of non-reference
    frames that are not needed are not decoded at all (`skip_frame = NONREF`). Neither skip
    changes any returned pixel: nothing needed references the skipped frames.

    A needed open-GOP leading picture pulls in the previous segment. A frame the decoder still
    does not return is a decode failure.
    """

    def __init__(self, container: typing.Any, stream: typing.Any, index: PacketIndex, quality: int) -> None:
        self._container, self._stream, self._index, self._quality = container, stream, index, quality
        self._size_px: tuple[int, int] = (0, 0)
        self._out: dict[int, bytes] = {}
        self.frames_decoded = 0

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
        self.frames_decoded += 1
        i = wanted.get(frame.pts)
        if i is None or i in self._out:
            return
        width_px, height_px = self._size_px
        # Scaling inside the YUV->RGB conversion touches only the output pixels.
        image = frame.to_image(width=width_px, height=height_px, interpolation="AREA")
        self._out[i] = encode_jpeg(image, self._quality)


# --------------------------------------------------------------------------------------------
# decord


def decord_backend(source: str | typing.BinaryIO, cfg: FramesConfig) -> tuple[Probe, DecodeFn]:
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
    container, _, _, probe = open_indexed(index_src)
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
        return pyav_backend(source if isinstance(source, (str, os.PathLike)) else io.BytesIO(data), cfg)

    def decode(needed: list[int], width_px: int, height_px: int, out: dict[int, bytes]) -> None:
        for lo in range(0, len(needed), _DECORD_CHUNK_FRAMES):
            chunk = needed[lo : lo + _DECORD_CHUNK_FRAMES]
            batch = reader.get_batch(chunk).asnumpy()
            for i, rgb in zip(chunk, batch, strict=True):
                out[i] = encode_jpeg(rgb, cfg.jpeg_quality)

    return probe, decode
