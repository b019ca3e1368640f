"""Decode one retrieval video (file or JPEG frame directory) into T squash-resized RGB frames.

Pure (no Ray); used by evaluation and fine-tuning. Frame choice is the project's
`sample_frame_indices` over the video's F frames (clipvip_spec.md 3.2: test linspace(0, F-1, T)
truncated, train the official jitter); every chosen frame is squash-resized to size x size,
bicubic, no crop, with the same PIL call as `sampling.decode_resize`.

Video files (PyAV): F is the container's frame count, or, when the container does not store
one (mkv, webm: `stream.frames == 0`), the number of video packets from a demux-only pass, as
decord counts them. The decode pass then converts only the chosen frames to RGB (the costly
step) and stops after the last one, so memory holds T small frames whatever the length.
If the stream decodes to fewer frames than counted, the indices are drawn again over the
frames that do decode. Frame directories: `<clip_id>_<i>.jpg` sorted by i.

Paths may be `s3://` URIs (`opts` says how to reach S3), read as `prepare` reads videos
(`s3.open_read`, our retries): a video is fetched once per load, whole in one GET when small,
else in 8 MiB blocks with read-ahead, and both passes (count, decode) seek back over that one
source; a frame directory is one listing plus one GET per chosen frame. A read that still fails
after the retry budget is a `BadSample` naming the URI and the S3 error, as an unreadable file.

Why not decode once and keep every frame object: on a 90-frame 320x240 clip decoding is ~95%
of the time (0.46 s of 0.49-0.52 s for T = 12; the demux-only count costs 8 ms), so keeping
all F frames saves nothing measurable and makes memory grow with the video's length.

Shape legend: T frames, H = W = size_px, 3 RGB channels.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from pipeline.data.sampling import DECODE_ERRORS, BadSample, sample_frame_indices
from pipeline.eval.formats import RetrievalItem
from pipeline.utils import fs, s3


def resize_rgb(image: Image.Image, size_px: int) -> np.ndarray:
    """Squash-resize to size x size (bicubic, no aspect-preserving crop) -> [H, W, 3] uint8."""
    rgb = image.convert("RGB").resize((size_px, size_px), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def load_clip(item: RetrievalItem, video_format: str, num_frames: int, size_px: int, train: bool,
              rng: np.random.Generator | None, *, decode_threads: int = 1,
              opts: fs.S3Options | None = None) -> np.ndarray:
    """T frames of one retrieval item, sampled and squash-resized.

    Args:
        item: the item; `video_path` is a file ("video") or a frame directory ("frames").
        video_format: "video" or "frames" (RetrievalDataConfig.video_format).
        num_frames: T.
        size_px: output side (224 for CLIP-ViP).
        train: jittered sampling (True, needs rng) or uniform test sampling (False).
        rng: generator of the train jitter; unused at test time.
        decode_threads: FFmpeg decoder threads (1 suits one Ray task per CPU).
        opts: how to reach S3 when `item.video_path` is s3://; None: defaults (local paths ignore it).

    Returns:
        frames_THWC: [T, size_px, size_px, 3] uint8, in time order.

    Raises:
        BadSample: the video or a chosen frame cannot be read (S3 included, after its retries), or
            it has no frames; the message names the path.
    """
    if video_format == "frames":
        paths = _frame_paths(item, opts)
        return _read_frames(paths, sample_frame_indices(len(paths), num_frames, train, rng), size_px, opts)
    if video_format == "video":
        return _load_video(item, num_frames, size_px, train, rng, decode_threads, opts)
    raise ValueError(f"video_format must be 'video' or 'frames', got {video_format!r}")


def decode_all(item: RetrievalItem, video_format: str, size_px: int, *, decode_threads: int = 1,
               opts: fs.S3Options | None = None) -> np.ndarray:
    """Every frame of the item, squash-resized: [F, size, size, 3] uint8.

    For callers that keep small clips in memory across epochs (fine-tuning's decoded-frame
    cache) and then sample with `sample_frame_indices` over F = the frames that decoded.

    Raises:
        BadSample: unreadable video / frame directory (S3 included), or no frames.
    """
    if video_format == "frames":
        paths = _frame_paths(item, opts)
        return _read_frames(paths, np.arange(len(paths)), size_px, opts)
    if video_format != "video":
        raise ValueError(f"video_format must be 'video' or 'frames', got {video_format!r}")
    path = item.video_path
    source: Any = None
    try:
        with _open_source(item, opts) as source:
            container, stream = _open(source, path)
            stream.codec_context.thread_count = decode_threads
            with container:
                frames = [resize_rgb(frame.to_image(), size_px) for frame in container.decode(stream)]
    except BadSample:
        raise
    except Exception as e:  # any FFmpeg/PIL error here is the file's fault
        raise _unreadable(path, source, e) from e
    if not frames:
        raise BadSample(f"{path}: no frame decodes")
    return np.stack(frames, axis=0)


def _stack(idx_T: np.ndarray, frames: dict[int, np.ndarray]) -> np.ndarray:
    return np.stack([frames[i] for i in idx_T.tolist()], axis=0)


# --------------------------------------------------------------------------------------------
# Frame directories


def list_frame_files(frame_dir: str, clip_id: str, opts: fs.S3Options | None = None) -> list[str]:
    """Paths of `<clip_id>_<i>.jpg` under frame_dir (local or s3://, one listing), sorted by the
    integer i (other files ignored).

    Raises:
        BadSample: frame_dir cannot be listed.
    """
    pattern = re.compile(re.escape(clip_id) + r"_(\d+)\.jpe?g", re.IGNORECASE)
    try:
        if fs.is_s3(frame_dir):
            objects, _ = s3.list_prefix(frame_dir, opts or fs.S3Options())
            names = [key.rsplit("/", 1)[-1] for key, _ in objects]
        else:
            names = os.listdir(frame_dir)
    except Exception as e:  # OSError (S3 errors included), a listing bug
        raise BadSample(f"{frame_dir}: cannot list frames: {e}") from e
    numbered = [(int(m.group(1)), n) for n in names if (m := pattern.fullmatch(n))]
    return [fs.join(frame_dir, n) for _, n in sorted(numbered)]


def _frame_paths(item: RetrievalItem, opts: fs.S3Options | None) -> list[str]:
    paths = list_frame_files(item.video_path, item.clip_id, opts)
    if not paths:
        raise BadSample(f"{item.video_path}: no frames named {item.clip_id}_<i>.jpg")
    return paths


def _read_frames(paths: list[str], idx_T: np.ndarray, size_px: int, opts: fs.S3Options | None) -> np.ndarray:
    """The frames paths[idx_T], resized; each file read once (one GET on S3) however often chosen."""
    frames: dict[int, np.ndarray] = {}
    for i in idx_T.tolist():
        if i in frames:  # F < T repeats indices; read each once
            continue
        source: str | io.BytesIO = paths[i]
        if fs.is_s3(paths[i]):
            try:
                source = io.BytesIO(fs.read_bytes(paths[i], opts))
            except Exception as e:  # missing, refused, or failing through the retries
                raise BadSample(f"{paths[i]}: S3 read failed: {type(e).__name__}: {e}") from e
        try:
            with Image.open(source) as image:
                frames[i] = resize_rgb(image, size_px)
        except DECODE_ERRORS as e:
            raise BadSample(f"{paths[i]}: undecodable frame: {type(e).__name__}: {e}") from e
    return _stack(idx_T, frames)


# --------------------------------------------------------------------------------------------
# Video files


def _open_source(item: RetrievalItem, opts: fs.S3Options | None) -> contextlib.AbstractContextManager[Any]:
    """What PyAV opens: a local path as is (opening a file twice costs nothing), an S3 object as
    one seekable file for every pass of this load (`s3.open_read`: one GET when small; the
    listing's size saves the HEAD)."""
    if not fs.is_s3(item.video_path):
        return contextlib.nullcontext(item.video_path)
    return s3.open_read(item.video_path, opts or fs.S3Options(), item.size_bytes)


def _unreadable(path: str, source: Any, error: BaseException) -> BadSample:
    """The BadSample of a failed load; an S3 read that failed under the decoder is named as such
    (FFmpeg reports it as its own I/O error)."""
    read_error = getattr(source, "read_error", None)
    if read_error is not None or isinstance(error, s3.TransientS3Error):
        return BadSample(f"{path}: S3 read failed: {read_error or error}")
    return BadSample(f"{path}: unreadable video: {type(error).__name__}: {error}")


def _open(source: str | BinaryIO, path: str) -> tuple[Any, Any]:
    """(container, video stream) of a path or an open file (read from its start); `path` names it
    in errors."""
    import av  # noqa: PLC0415  (heavy import, only needed once a video is opened)

    if not isinstance(source, str):
        source.seek(0)  # a second pass over the same fetched object
    container = av.open(source, mode="r")
    if not container.streams.video:
        container.close()
        raise BadSample(f"{path}: no video stream")
    return container, container.streams.video[0]


def count_frames(source: str | BinaryIO, opts: fs.S3Options | None = None) -> int:
    """F of a video: the stored frame count, else the number of non-empty video packets.

    Args:
        source: a local path, an s3:// URI (fetched for this count), or an open seekable file.
        opts: how to reach S3 for an s3:// URI.
    """
    if isinstance(source, str) and fs.is_s3(source):
        with s3.open_read(source, opts or fs.S3Options()) as f:
            return count_frames(f)
    container, stream = _open(source, source if isinstance(source, str) else getattr(source, "uri", "video"))
    with container:
        if stream.frames > 0:
            return int(stream.frames)
        # Demuxing reads packets without decoding them: cheap next to the decode pass.
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def _decode_chosen(source: str | BinaryIO, path: str, idx_T: np.ndarray, size_px: int,
                   decode_threads: int) -> tuple[dict[int, np.ndarray], int]:
    """Decode up to the last chosen frame, converting only the chosen ones.

    Returns:
        (chosen frame index -> [H, W, 3] uint8, number of frames decoded).
    """
    wanted = set(idx_T.tolist())
    last = max(wanted)
    frames: dict[int, np.ndarray] = {}
    container, stream = _open(source, path)
    stream.codec_context.thread_count = decode_threads
    num_decoded = 0
    with container:
        for frame in container.decode(stream):
            if num_decoded in wanted:
                frames[num_decoded] = resize_rgb(frame.to_image(), size_px)
            num_decoded += 1
            if num_decoded > last:
                break
    return frames, num_decoded


def _load_video(item: RetrievalItem, num_frames: int, size_px: int, train: bool, rng: np.random.Generator | None,
                decode_threads: int, opts: fs.S3Options | None) -> np.ndarray:
    path = item.video_path
    source: Any = None
    try:
        with _open_source(item, opts) as source:
            num_counted = count_frames(source)
            idx_T = sample_frame_indices(num_counted, num_frames, train, rng)
            frames, num_decoded = _decode_chosen(source, path, idx_T, size_px, decode_threads)
            if len(frames) < len(set(idx_T.tolist())):
                if num_decoded == 0:
                    raise BadSample(f"{path}: no frame decodes ({num_counted} counted)")
                # The count came from the header or packets; trust what really decodes.
                idx_T = sample_frame_indices(num_decoded, num_frames, train, rng)
                frames, _ = _decode_chosen(source, path, idx_T, size_px, decode_threads)
                if len(frames) < len(set(idx_T.tolist())):
                    raise BadSample(f"{path}: decoding is not repeatable ({num_decoded} frames, then fewer)")
    except BadSample as e:
        if str(e).startswith(path):
            raise
        raise BadSample(f"{path}: {e}") from e
    except Exception as e:  # any FFmpeg/PIL error here is the file's fault
        raise _unreadable(path, source, e) from e
    return _stack(idx_T, frames)
