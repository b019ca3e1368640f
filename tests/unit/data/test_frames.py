"""Frame extraction core: which frames are picked, how they are stored, how bad input fails.

Test videos are made on the fly with PyAV/libx264 (B-frames, 1 s GOP). Every frame carries its
own index as a 7-bit black/white code in the top band, so a test can read back WHICH source
frame a JPEG shows, whatever the resize and compression did to it.
"""

from __future__ import annotations

import dataclasses
import io
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from pipeline.config import FramesConfig
from pipeline.data.frames import (
    ClipFailure,
    ClipFrames,
    SpanRequest,
    extract_clips,
    output_size,
    sample_times,
)
from pipeline.schema import STAGE_DECODE, STAGE_OPEN, STAGE_SPAN

FPS = 25
NUM_FRAMES = 100  # 4.0 s
WIDTH_PX, HEIGHT_PX = 160, 120
NUM_BITS = 7
BAND_PX = 40
BACKENDS = ["pyav", "decord"]


def _write_video(path: str, *, first_pts: int = 0, faststart: bool = False) -> None:
    import av

    container = av.open(path, "w", options={"movflags": "faststart"} if faststart else {})
    stream = container.add_stream("libx264", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = WIDTH_PX, HEIGHT_PX, "yuv420p"
    stream.codec_context.time_base = Fraction(1, FPS)
    stream.options = {"g": str(FPS), "preset": "veryfast"}
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 255, (HEIGHT_PX - BAND_PX, WIDTH_PX * 2, 3), dtype=np.uint8)
    for k in range(NUM_FRAMES):
        img = np.zeros((HEIGHT_PX, WIDTH_PX, 3), np.uint8)
        for b in range(NUM_BITS):
            if (k >> b) & 1:
                img[:BAND_PX, b * 20 : b * 20 + 20] = 255
        img[BAND_PX:] = texture[:, k : k + WIDTH_PX]
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts, frame.time_base = first_pts + k, Fraction(1, FPS)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def _frame_number(jpeg: bytes) -> int:
    """Read back the index code of a stored JPEG (any size, same aspect)."""
    img = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), dtype=np.float32)
    scale = img.shape[1] / WIDTH_PX
    row = int(BAND_PX * scale / 2)
    bits = [img[row, int((b * 20 + 10) * scale)] > 128 for b in range(NUM_BITS)]
    return sum(1 << b for b, on in enumerate(bits) if on)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("videos")
    paths = {name: str(root / f"{name}.mp4") for name in ("plain", "offset", "faststart")}
    _write_video(paths["plain"])
    _write_video(paths["offset"], first_pts=30)
    _write_video(paths["faststart"], faststart=True)
    return paths


def _cfg(**kwargs: object) -> FramesConfig:
    return dataclasses.replace(FramesConfig(short_side_px=0, fps=5.0), **kwargs)


def _ok(clip: ClipFrames | ClipFailure) -> ClipFrames:
    assert isinstance(clip, ClipFrames), clip
    return clip


# --------------------------------------------------------------------------------------------
# Pure helpers


def test_sample_times_steps_at_fps_and_excludes_end() -> None:
    assert sample_times(0.0, 1.0, 4.0, 32) == [0.0, 0.25, 0.5, 0.75]
    assert sample_times(2.0, 3.0, 3.0, 32) == pytest.approx([2.0, 2 + 1 / 3, 2 + 2 / 3])


def test_sample_times_short_span_gives_start() -> None:
    assert sample_times(5.0, 5.1, 3.0, 32) == [5.0]


def test_sample_times_caps_uniformly() -> None:
    times = sample_times(0.0, 100.0, 3.0, 32)
    full = sample_times(0.0, 100.0, 3.0, 10_000)
    assert len(full) == 300 and len(times) == 32
    assert times[0] == 0.0 and times[-1] == full[-1]
    steps = np.diff(times)
    assert steps.max() - steps.min() <= 1 / 3 + 1e-9  # uniform up to index rounding
    assert times == sample_times(0.0, 100.0, 3.0, 32)


def test_output_size_keeps_aspect_even_sides() -> None:
    assert output_size(1280, 720, 240) == (426, 240)
    assert output_size(720, 1280, 240) == (240, 426)
    assert output_size(161, 121, 0) == (161, 121)
    w, h = output_size(1920, 1080, 97)
    assert w % 2 == 0 and h % 2 == 0 and abs(w / h - 16 / 9) < 0.03


# --------------------------------------------------------------------------------------------
# Which frames


@pytest.mark.parametrize("backend", BACKENDS)
def test_frames_are_the_frames_on_screen_at_sampled_times(videos: dict[str, str], backend: str) -> None:
    result = extract_clips(videos["plain"], [SpanRequest("c", 1.05, 2.9)], _cfg(backend=backend))
    clip = _ok(result.clips[0])
    assert result.duration_s == pytest.approx(4.0) and result.source_fps == pytest.approx(25.0)
    expected = [int(np.floor(t * FPS + 1e-9)) for t in sample_times(1.05, 2.9, 5.0, 32)]
    assert expected == [26, 31, 36, 41, 46, 51, 56, 61, 66, 71]
    assert [_frame_number(j) for j in clip.frames] == expected
    assert clip.frame_times_s == pytest.approx([k / FPS for k in expected])
    assert all(1.05 - 1 / FPS < t < 2.9 for t in clip.frame_times_s)


def test_pyav_decodes_only_the_segments_it_needs(videos: dict[str, str]) -> None:
    # 1-s keyframe segments; frames 26-71 sit in segments 1 and 2 (frames 25-74): segment 0 and
    # 3 are never decoded, and non-reference frames that are not needed are skipped.
    result = extract_clips(videos["plain"], [SpanRequest("c", 1.05, 2.9)], _cfg(backend="pyav"))
    assert 11 <= result.frames_decoded < 50
    short = extract_clips(videos["plain"], [SpanRequest("c", 3.05, 3.3)], _cfg(backend="pyav"))
    assert short.frames_decoded <= 8  # frames 76-81 need segment 3 from its keyframe (75) on, not 0-74
    assert extract_clips(videos["plain"], [SpanRequest("c", 1.05, 2.9)], _cfg(backend="decord")).frames_decoded is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_middle_frame_is_nearest_to_span_middle(videos: dict[str, str], backend: str) -> None:
    # Middle 1.505 s: frame 38 (1.52 s) is nearest; the frame on screen would be 37 (1.48 s).
    clip = _ok(extract_clips(videos["plain"], [SpanRequest("c", 1.0, 2.01)], _cfg(backend=backend)).clips[0])
    assert _frame_number(clip.middle_frame) == 38
    assert clip.middle_frame_time_s == pytest.approx(1.52)


def test_times_are_on_the_videos_own_timeline(videos: dict[str, str]) -> None:
    result = extract_clips(videos["offset"], [SpanRequest("c", 0.0, 1.0)], _cfg())
    clip = _ok(result.clips[0])
    assert clip.frame_times_s == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert [_frame_number(j) for j in clip.frames] == [0, 5, 10, 15, 20]


def test_backends_and_thread_counts_pick_the_same_frames(videos: dict[str, str]) -> None:
    spans = [SpanRequest("a", 0.3, 1.9), SpanRequest("b", 2.2, 3.97)]
    picks = []
    for backend in BACKENDS:
        for threads in (1, 0):
            result = extract_clips(videos["plain"], spans, _cfg(backend=backend, decode_threads=threads))
            picks.append([(_ok(c).frame_times_s, [_frame_number(j) for j in _ok(c).frames]) for c in result.clips])
    assert all(p == picks[0] for p in picks[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_out_of_order_spans_match_single_extraction(videos: dict[str, str], backend: str) -> None:
    spans = [SpanRequest("late", 2.5, 3.5), SpanRequest("early", 0.1, 1.6), SpanRequest("mid", 1.0, 2.7)]
    cfg = _cfg(backend=backend)
    together = extract_clips(videos["plain"], spans, cfg)
    assert [c.clip_id for c in together.clips] == ["late", "early", "mid"]
    for span, clip in zip(spans, together.clips, strict=True):
        alone = _ok(extract_clips(videos["plain"], [span], cfg).clips[0])
        assert _ok(clip).frames == alone.frames
        assert clip.frame_times_s == alone.frame_times_s
        assert clip.middle_frame == alone.middle_frame


# --------------------------------------------------------------------------------------------
# How frames are stored


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_sets_short_side_and_jpeg_matches_stored_size(videos: dict[str, str], backend: str) -> None:
    cfg = _cfg(backend=backend, short_side_px=60, jpeg_quality=80)
    clip = _ok(extract_clips(videos["plain"], [SpanRequest("c", 0.0, 1.0)], cfg).clips[0])
    assert (clip.width, clip.height) == (80, 60)
    for jpeg in (*clip.frames, clip.middle_frame):
        image = Image.open(io.BytesIO(jpeg))
        assert image.format == "JPEG" and image.size == (80, 60)
    assert [_frame_number(j) for j in clip.frames] == [0, 5, 10, 15, 20]


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_is_byte_identical_across_runs(videos: dict[str, str], backend: str) -> None:
    cfg = _cfg(backend=backend, short_side_px=96)
    spans = [SpanRequest("a", 0.5, 2.5), SpanRequest("b", 2.0, 3.0)]
    first = extract_clips(videos["plain"], spans, cfg)
    second = extract_clips(videos["plain"], spans, cfg)
    assert [(c.frames, c.middle_frame) for c in first.clips] == [(c.frames, c.middle_frame) for c in second.clips]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["file", "bytesio"])
def test_file_like_source_equals_path(videos: dict[str, str], backend: str, kind: str) -> None:
    cfg, spans = _cfg(backend=backend), [SpanRequest("c", 0.5, 2.0)]
    expected = _ok(extract_clips(videos["plain"], spans, cfg).clips[0])
    with open(videos["plain"], "rb") as f:
        source = f if kind == "file" else io.BytesIO(f.read())
        got = _ok(extract_clips(source, spans, cfg).clips[0])
    assert got.frames == expected.frames and got.frame_times_s == expected.frame_times_s


# --------------------------------------------------------------------------------------------
# Bad input: failures with stages, never an exception


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_spans_fail_and_near_end_is_clamped(videos: dict[str, str], backend: str) -> None:
    spans = [
        SpanRequest("empty", 2.0, 2.0),
        SpanRequest("reversed", 3.0, 1.0),
        SpanRequest("after", 7.0, 9.0),
        SpanRequest("far_past", 3.0, 5.0),
        SpanRequest("near_past", 3.5, 4.3),
        SpanRequest("good", 0.0, 0.5),
    ]
    clips = extract_clips(videos["plain"], spans, _cfg(backend=backend)).clips
    for clip in clips[:4]:
        assert isinstance(clip, ClipFailure) and clip.stage == STAGE_SPAN, clip
    assert clips[2].error == "span 7.00-9.00 s starts after the video ends (4.00 s)"
    near = _ok(clips[4])
    assert near.frame_times_s == pytest.approx([3.48, 3.68, 3.88])
    assert [_frame_number(j) for j in near.frames] == [87, 92, 97]
    assert _frame_number(near.middle_frame) == 94  # middle of the clamped span, 3.75 s
    _ok(clips[5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreadable_sources_fail_every_clip_at_open(tmp_path, backend: str) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 100)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    spans = [SpanRequest("a", 0.0, 1.0), SpanRequest("b", 1.0, 2.0)]
    # Random bytes that FFmpeg probes as a raw H.263 stream of one frame without a frame size
    # (about 1 random file in 600 opens as H.263/H.261; this one used to raise ZeroDivisionError).
    sizeless = io.BytesIO(np.random.default_rng(1875).bytes(50_000))
    for source in (str(text), str(empty), str(tmp_path / "missing.mp4"), io.BytesIO(b"\x00" * 64), sizeless):
        result = extract_clips(source, spans, _cfg(backend=backend))
        assert [c.clip_id for c in result.clips] == ["a", "b"]
        assert all(isinstance(c, ClipFailure) and c.stage == STAGE_OPEN and c.error for c in result.clips)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_mp4_keeps_early_clips_and_fails_the_rest(videos: dict[str, str], tmp_path, backend: str) -> None:
    spans = [SpanRequest("late", 3.0, 3.9), SpanRequest("early", 0.0, 0.8)]
    # Index (moov) at the front: the header promises 4 s, the data stops part-way.
    data = open(videos["faststart"], "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    result = extract_clips(str(cut), spans, _cfg(backend=backend))
    late, early = result.clips
    assert isinstance(late, ClipFailure) and late.stage == STAGE_DECODE, late
    assert [_frame_number(j) for j in _ok(early).frames] == [0, 5, 10, 15]
    # Index at the back (the default mp4 layout): half a file has no index at all.
    data = open(videos["plain"], "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    result = extract_clips(str(cut), spans, _cfg(backend=backend))
    assert all(isinstance(c, ClipFailure) and c.stage == STAGE_OPEN for c in result.clips)
