"""Synthetic HD-VILA-format sample data, made by the project itself (`clipvip sample-data`).

Owns: the source videos (moving coloured shapes over a gradient + static noise background), the
HD-VILA-100M metadata jsonl, ASR-style subtitles (clip_id->text jsonl and per-video WebVTT), and a
MSR-VTT-format retrieval set whose captions need frame order to be matched (each pair of
clips is one rendering played forwards and backwards), with train / val / test splits. Everything is a pure function of the seed:
same seed, same bytes (x264 runs single-threaded, see `encode_video`; videos are encoded in
parallel instead).

On-disk layout under `out_dir`:
    metadata.jsonl                 {"video_id", "url", "clip": [{"clip_id", "span"}]} per video
    videos/<video_id>.mp4          H.264 yuv420p, B-frames on
    subtitles.jsonl                {"clip_id", "text"} per clip
    subtitles/<video_id>.vtt       1-3 cues per clip, inside its span; joined they give its text
    retrieval/test.jsonl           {"clip_id": "video<k>", "text": caption} (MSR-VTT test1ka style);
                                   its pairs never share colour+shape
    retrieval/train.jsonl          {"clip_id", "text": [3 captions]} (MSR-VTT train9k style): other
                                   renderings of the test clips' colour+shape combos, random motions
    retrieval/val.jsonl            {"clip_id", "text": caption}: a held-out split for model selection
    retrieval/train_pairs.json     [[forward id, backward id], ...] of train (finetune's data.batch_groups)
    retrieval/videos/video<k>.mp4  all splits (ids are distinct across splits, as in MSR-VTT)
    sample_data.json               spec, seed, counts, per-video facts, retrieval pairs
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
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
_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# YouTube ids encode 66 bits in 11 base64 chars, so the last char carries only 2 bits.
_ID_LAST_CHARS = "AEIMQUYcgkosw048"
_SAY_MOTION = {
    "left": ("moving to the left", "going left", "sliding over to the left", "heading left"),
    "right": ("moving to the right", "going right", "sliding over to the right", "heading right"),
    "up": ("going up", "moving up", "floating up", "rising up"),
    "down": ("going down", "moving down", "dropping down", "falling down"),
    "growing": ("getting bigger", "growing", "kind of growing"),
    "shrinking": ("getting smaller", "shrinking", "sort of shrinking"),
}
_OPENERS = ("so here we have", "okay so now we've got", "alright so this is", "and uh here there's",
            "so you can see", "now look at", "um so we got")
_JOINERS = ("and um", "and then", "and uh there's also", "and you can see", "plus")
_CLOSERS = ("", "", "okay", "you know", "pretty cool", "so yeah")
_CAPTION = {  # MSR-VTT style; the first one goes to the test file
    "right": ("moves to the right", "slides across the screen to the right", "travels to the right side"),
    "left": ("moves to the left", "slides across the screen to the left", "travels to the left side"),
    "up": ("moves up the screen", "rises up", "goes upward"),
    "down": ("moves down the screen", "falls down", "goes downward"),
    "growing": ("grows larger", "gets bigger and bigger", "expands in size"),
    "shrinking": ("shrinks", "gets smaller and smaller", "contracts in size"),
}


@dataclass(frozen=True, slots=True)
class SampleDataSpec:
    """Shape of the sample dataset; the defaults generate in a few seconds on 2 cores."""

    num_videos: int = 8
    min_duration_s: float = 4.0
    max_duration_s: float = 30.0
    resolutions: tuple[tuple[int, int], ...] = ((320, 240), (640, 360), (1280, 720))
    """(width, height) of source videos, cycled over videos; keep one 720p as in HD-VILA."""
    fps: float = 25.0
    clips_per_video: tuple[int, int] = (2, 4)
    """Min, max spans per video; fewer when the video is too short to hold them."""
    clip_duration_s: tuple[float, float] = (2.0, 13.0)
    gap_s: tuple[float, float] = (0.2, 1.0)
    """Gap before the first span, between spans and (at least the min) after the last."""
    objects_per_scene: tuple[int, int] = (1, 3)
    num_retrieval: int = 16
    """Retrieval test clips; even, as they come in forward/backward pairs."""
    num_retrieval_train: int = 256
    """Retrieval fine-tuning clips (even; pairs too, colour+shape drawn from the test combos)."""
    num_retrieval_val: int = 16
    """Retrieval validation clips (even; pairs as in test, new renderings of the test combos)."""
    # Retrieval clips are short and small (MSR-VTT itself is re-encoded to 6 fps): fine-tuning
    # decodes them on the fly, and the tiny model sees them at 32 px anyway.
    retrieval_duration_s: tuple[float, float] = (2.0, 3.0)
    retrieval_resolution: tuple[int, int] = (160, 120)
    retrieval_fps: float = 10.0
    retrieval_object_scale: float = 2.0
    """Size multiplier of the retrieval clips' object (models that see 32 px frames need > 1)."""
    crf: int = 23
    x264_preset: str = "veryfast"
    """veryfast keeps B-frames (3) and is ~2x faster than x264's default 'medium' at 720p."""

    def __post_init__(self) -> None:
        ranges = ("clips_per_video", "clip_duration_s", "gap_s", "objects_per_scene", "retrieval_duration_s")
        problems = [f"{k}: need (min, max) with 0 < min <= max, got {getattr(self, k)}"
                    for k in ranges if not 0 < getattr(self, k)[0] <= getattr(self, k)[1]]
        # Tiny frames (64x48, 96x64) gave libx264 output that changed between runs (~3%).
        problems += [f"resolutions: need even sizes of at least 160x120, got {(w, h)}"
                     for w, h in (*self.resolutions, self.retrieval_resolution)
                     if w % 2 or h % 2 or w < 160 or h < 120]
        checks = {
            "num_videos: must be >= 1": self.num_videos >= 1,
            "resolutions: must not be empty": bool(self.resolutions),
            "min_duration_s: need 0 < min_duration_s <= max_duration_s":
                0 < self.min_duration_s <= self.max_duration_s,
            "min_duration_s: too short for one clip plus its leading and trailing gaps":
                self.min_duration_s >= self.clip_duration_s[0] + 2 * self.gap_s[0],
            f"objects_per_scene: at most {len(COLOURS)} (one colour each)":
                self.objects_per_scene[1] <= len(COLOURS),
            "fps: fps and retrieval_fps must be > 0": self.fps > 0 and self.retrieval_fps > 0,
            "num_retrieval: must be even and >= 0": self.num_retrieval >= 0 and self.num_retrieval % 2 == 0,
            "num_retrieval_train: must be even and >= 0":
                self.num_retrieval_train >= 0 and self.num_retrieval_train % 2 == 0,
            "num_retrieval_val: must be even and >= 0": self.num_retrieval_val >= 0 and self.num_retrieval_val % 2 == 0,
            f"num_retrieval: at most {2 * len(COLOURS) * len(SHAPES)} (distinct colour+shape pairs)":
                self.num_retrieval <= 2 * len(COLOURS) * len(SHAPES),
        }
        problems += [why for why, ok in checks.items() if not ok]
        if problems:
            raise ValueError(f"SampleDataSpec.{problems[0]}")


@dataclass(frozen=True, slots=True)
class SampleDataset:
    """What `make_sample_dataset` wrote; all paths are absolute."""

    root: str
    metadata_path: str
    video_root: str
    subtitles_table: str
    subtitles_dir: str
    retrieval_jsonl: str
    retrieval_video_root: str
    num_videos: int
    num_clips: int
    num_retrieval: int
    retrieval_train_jsonl: str = ""
    retrieval_val_jsonl: str = ""
    retrieval_train_pairs: str = ""
    info_path: str = ""


@dataclass(frozen=True, slots=True)
class _Object:
    colour: str
    shape: str
    motion: str
    start_xyr: tuple[float, float, float]
    """Centre x (fraction of width), y (fraction of height), half-size (fraction of short side)."""
    end_xyr: tuple[float, float, float]


@dataclass(frozen=True, slots=True)
class _Scene:
    objects: tuple[_Object, ...]
    background: np.ndarray
    """yuv420p frame as PyAV lays it out: (H*3/2, W) uint8."""


def make_sample_dataset(out_dir: str, seed: int = 0, spec: SampleDataSpec = SampleDataSpec(), *,
                        num_workers: int | None = None) -> SampleDataset:
    """Write the sample dataset under local `out_dir`, replacing files of the same names.

    Args:
        out_dir: Directory to write into; created if missing.
        seed: Every byte written is a function of (seed, spec).
        spec: Sizes, durations and encoder settings.
        num_workers: Videos encoded at once (threads; PyAV releases the GIL while x264 works).
            Does not change any output byte. Default: min(4, CPU count).

    Returns:
        The paths written (absolute) and the counts.
    """
    if out_dir.startswith("s3://"):
        raise ValueError(f"out_dir: sample data is written locally, got {out_dir!r}; upload it afterwards")
    root = os.path.abspath(out_dir)
    ds = SampleDataset(
        root=root, metadata_path=os.path.join(root, "metadata.jsonl"), video_root=os.path.join(root, "videos"),
        subtitles_table=os.path.join(root, "subtitles.jsonl"), subtitles_dir=os.path.join(root, "subtitles"),
        retrieval_jsonl=os.path.join(root, "retrieval", "test.jsonl"),
        retrieval_video_root=os.path.join(root, "retrieval", "videos"), num_videos=spec.num_videos,
        num_clips=0, num_retrieval=spec.num_retrieval, info_path=os.path.join(root, "sample_data.json"),
        retrieval_train_jsonl=os.path.join(root, "retrieval", "train.jsonl"),
        retrieval_val_jsonl=os.path.join(root, "retrieval", "val.jsonl"),
        retrieval_train_pairs=os.path.join(root, "retrieval", "train_pairs.json"))
    for d in (ds.video_root, ds.subtitles_dir, ds.retrieval_video_root):
        os.makedirs(d, exist_ok=True)
    # One generator per video / pair, so results do not depend on scheduling or on num_videos.
    with ThreadPoolExecutor(num_workers or min(4, os.cpu_count() or 1)) as pool:
        videos = [pool.submit(_make_source_video, ds, vid, spec.resolutions[i % len(spec.resolutions)], spec,
                              np.random.default_rng([seed, 1, i]))
                  for i, vid in enumerate(_make_video_ids(seed, spec.num_videos))]
        pairs = [pool.submit(_make_retrieval_pair, ds, spec, *job) for job in _plan_retrieval(spec, seed)]
        videos_info = [f.result() for f in videos]
        pairs_info = [f.result() for f in pairs]
    clips = [c for v in videos_info for c in v["clips"]]
    _write_text(ds.metadata_path, "".join(json.dumps(v["metadata"]) + "\n" for v in videos_info))
    _write_text(ds.subtitles_table, "".join(
        json.dumps({"clip_id": c["clip_id"], "text": c["text"]}) + "\n" for c in clips))
    for split, path, pick in (("test", ds.retrieval_jsonl, lambda t: t[0]),
                              ("train", ds.retrieval_train_jsonl, lambda t: t),
                              ("val", ds.retrieval_val_jsonl, lambda t: t[0])):
        rows = sorted((r for p in pairs_info if p["split"] == split for r in p["rows"]),
                      key=lambda r: int(r[0][len("video"):]))
        _write_text(path, "".join(json.dumps({"clip_id": c, "text": pick(t)}) + "\n" for c, t in rows))
    _write_text(ds.retrieval_train_pairs, json.dumps([p["pair"] for p in pairs_info if p["split"] == "train"]) + "\n")
    info = {
        "generator": "pipeline.data.synthetic", "format_version": 1, "seed": seed,
        "spec": dataclasses.asdict(spec), "num_videos": spec.num_videos, "num_clips": len(clips),
        "num_retrieval": spec.num_retrieval,
        "paths": {k: os.path.relpath(getattr(ds, k), root) for k in (
            "metadata_path", "video_root", "subtitles_table", "subtitles_dir", "retrieval_jsonl",
            "retrieval_train_jsonl", "retrieval_val_jsonl", "retrieval_train_pairs", "retrieval_video_root")},
        "videos": [{k: v for k, v in info.items() if k != "metadata"} for info in videos_info],
        "retrieval_pairs": [p["pair"] for p in pairs_info if p["split"] == "test"],
        "retrieval_split_pairs": {k: [p["pair"] for p in pairs_info if p["split"] == k] for k in ("train", "val")},
        "retrieval_splits": {k: getattr(spec, n) for k, n in (
            ("train", "num_retrieval_train"), ("val", "num_retrieval_val"), ("test", "num_retrieval"))},
    }
    _write_text(ds.info_path, json.dumps(info, indent=1) + "\n")
    return dataclasses.replace(ds, num_clips=len(clips))


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


def _make_video_ids(seed: int, count: int) -> list[str]:
    rng = np.random.default_rng([seed, 0])
    ids: list[str] = []
    while len(ids) < count:
        body = "".join(_ID_CHARS[i] for i in rng.integers(0, len(_ID_CHARS), 10))
        vid = body + _ID_LAST_CHARS[int(rng.integers(0, len(_ID_LAST_CHARS)))]
        if vid not in ids:
            ids.append(vid)
    return ids


def _make_source_video(ds: SampleDataset, video_id: str, size: tuple[int, int],
                       spec: SampleDataSpec, rng: np.random.Generator) -> dict:
    """Plan spans, scenes and subtitles of one video; encode it and write its WebVTT.

    Returns:
        Facts about the video: size, frames, its HD-VILA metadata line and per-clip ground truth.
    """
    num_frames = max(1, round(rng.uniform(spec.min_duration_s, spec.max_duration_s) * spec.fps))
    spans_ms = _plan_spans(rng, num_frames / spec.fps, spec)
    width, height = size
    lo, hi = spec.objects_per_scene
    scenes = [_make_scene(rng, width, height, int(rng.integers(lo, hi + 1))) for _ in spans_ms]
    clips, cues = [], []
    for n, ((start_ms, end_ms), scene) in enumerate(zip(spans_ms, scenes, strict=True)):
        text = _subtitle_text(rng, scene)
        clips.append({"clip_id": f"{video_id}.{n}.mp4", "span": [_format_ts(start_ms), _format_ts(end_ms)],
                      "text": text, "objects": [dataclasses.asdict(o) for o in scene.objects]})
        cues.extend(_split_cues(rng, text, start_ms, end_ms))
    encode_video(os.path.join(ds.video_root, f"{video_id}.mp4"),
                 _timeline_frames(scenes, spans_ms, num_frames, spec.fps), spec.fps, spec.crf,
                 preset=spec.x264_preset)
    vtt = "".join(f"{_format_ts(s)} --> {_format_ts(e)}\n{t}\n\n" for s, e, t in cues)
    _write_text(os.path.join(ds.subtitles_dir, f"{video_id}.vtt"), f"WEBVTT\nKind: captions\n\n{vtt}")
    metadata = {"video_id": video_id, "url": f"https://www.youtube.com/watch?v={video_id}",
                "clip": [{"clip_id": c["clip_id"], "span": c["span"]} for c in clips]}
    return {"video_id": video_id, "width": width, "height": height, "fps": spec.fps,
            "num_frames": num_frames, "duration_s": num_frames / spec.fps, "metadata": metadata, "clips": clips}


def _plan_spans(rng: np.random.Generator, duration_s: float, spec: SampleDataSpec) -> list[tuple[int, int]]:
    """Spans as integer ms, in order, gaps >= gap_s[0] between them and at both ends."""
    (clip_lo, clip_hi), (gap_lo, gap_hi) = spec.clip_duration_s, spec.gap_s
    budget_s = duration_s - 2 * gap_lo
    fits = int((budget_s + gap_lo) // (clip_lo + gap_lo))
    num = max(1, min(int(rng.integers(spec.clips_per_video[0], spec.clips_per_video[1] + 1)), fits))
    # Everything above the minimums is "extra"; scale the drawn extras down if they overflow.
    extra_clip = rng.uniform(0, clip_hi - clip_lo, num)
    extra_gap = rng.uniform(0, gap_hi - gap_lo, num)  # lead gap + inner gaps
    room_s = max(0.0, duration_s - num * clip_lo - (num + 1) * gap_lo)
    total = extra_clip.sum() + extra_gap.sum()
    if total > room_s:
        extra_clip, extra_gap = extra_clip * (room_s / total), extra_gap * (room_s / total)
    spans, t = [], 0.0
    for i in range(num):
        t += gap_lo + extra_gap[i]
        end = t + clip_lo + extra_clip[i]
        # Round inwards so a span never leaves the video or loses its gaps.
        spans.append((math.ceil(t * 1000), math.floor(end * 1000)))
        t = end
    return spans


def _make_scene(rng: np.random.Generator, width: int, height: int, num_objects: int) -> _Scene:
    colours = rng.choice(list(COLOURS), num_objects, replace=False)
    # One lane per object (a row for horizontal movers, a column otherwise) limits overlaps.
    lanes = (rng.permutation(num_objects) + 0.5) / num_objects
    objects = tuple(
        _make_object(rng, str(colour), str(rng.choice(SHAPES)),
                     str(rng.choice(MOTIONS, p=[0.2, 0.2, 0.2, 0.2, 0.1, 0.1])), float(lane))
        for colour, lane in zip(colours, lanes, strict=True))
    return _Scene(objects, _background(rng, width, height))


def _make_object(rng: np.random.Generator, colour: str, shape: str, motion: str, lane: float,
                 scale: float = 1.0) -> _Object:
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
    return _Object(colour, shape, motion, tuple(float(v) for v in start), tuple(float(v) for v in end))


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
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


def _render(scene: _Scene, progress: float) -> np.ndarray:
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


def _timeline_frames(scenes: list[_Scene], spans_ms: list[tuple[int, int]], num_frames: int,
                     fps: float) -> Iterator[np.ndarray]:
    """Scene k is on screen from span k's start (scene 0 from t=0); its motion runs over the span.

    The frame on screen at span k's start (the one a decoder returns for that time) already shows
    scene k: a frame belongs to the scene whose span starts before the frame's display ends.
    """
    for index in range(num_frames):
        t_ms = index / fps * 1000
        shown_until_ms = (index + 1) / fps * 1000
        k = max([i for i, (start, _) in enumerate(spans_ms) if start < shown_until_ms], default=0)
        start, end = spans_ms[k]
        yield _render(scenes[k], min(1.0, max(0.0, (t_ms - start) / (end - start))))


def _subtitle_text(rng: np.random.Generator, scene: _Scene) -> str:
    parts = [str(rng.choice(_OPENERS))]
    for i, obj in enumerate(scene.objects):
        if i:
            parts.append(str(rng.choice(_JOINERS)))
        parts.append(f"{_a(obj.colour)} {obj.colour} {obj.shape} {rng.choice(_SAY_MOTION[obj.motion])}")
    parts.append(str(rng.choice(_CLOSERS)))
    return " ".join(" ".join(parts).split())


def _split_cues(rng: np.random.Generator, text: str, start_ms: int, end_ms: int) -> list[tuple[int, int, str]]:
    """1-3 cues tiling [start_ms, end_ms], timed by word count; their texts joined by ' ' == text."""
    words = text.split()
    num = int(rng.integers(1, min(3, len(words)) + 1))
    # Near-equal chunks with a word of jitter; a duplicate cut just means one cue fewer.
    jittered = (round(len(words) * i / num) + int(rng.integers(-1, 2)) for i in range(1, num))
    cuts = [0, *sorted({min(len(words) - 1, max(1, c)) for c in jittered}), len(words)]
    times = [start_ms + (end_ms - start_ms) * c // len(words) for c in cuts]
    return [(times[i], times[i + 1], " ".join(words[cuts[i]:cuts[i + 1]])) for i in range(len(cuts) - 1)]


def _plan_retrieval(spec: SampleDataSpec, seed: int) -> list[tuple[str, str, str, list[str], np.random.Generator]]:
    """(split, colour, shape, [forward id, backward id], generator) per pair.

    Test pairs never share colour+shape (so only motion direction separates a pair's two clips);
XX
    splits (test first, so test ids do not depend on the train/val sizes); within a split a pair's
    ids are not adjacent.
    """
    rng = np.random.default_rng([seed, 2])
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = rng.choice(len(combos), spec.num_retrieval // 2, replace=False)
    slots = rng.permutation(spec.num_retrieval).tolist()
    plan = [("test", *combos[c], [f"video{slots[2 * p]}", f"video{slots[2 * p + 1]}"],
             np.random.default_rng([seed, 3, p])) for p, c in enumerate(chosen)]
    first = spec.num_retrieval
    for split, count, stream in (("train", spec.num_retrieval_train, 4), ("val", spec.num_retrieval_val, 5)):
        split_rng = np.random.default_rng([seed, stream])
        # Train/val show the test split's colour+shape combos (new renderings, random motions), so a
        # random batch holds clips that differ only in motion: the contrastive loss then has to
        # read frame order, the thing the test pairs measure (MSR-VTT-like: test concepts are seen
        # in training, the test videos are not).
        vocab = chosen if len(chosen) else np.arange(len(combos))
        if split == "val":
            # Like test: pairs take distinct combos (cycling once they run out), so validation
            # captions are unique and val R@1 ranks what test R@1 ranks (with repeated captions
            # it could not tell an order-aware model from an order-blind one).
            picks = np.resize(split_rng.permutation(vocab), count // 2)
        else:
            picks = vocab[split_rng.integers(0, len(vocab), count // 2)]
        slots = (first + split_rng.permutation(count)).tolist()
        plan += [(split, *combos[c], [f"video{slots[2 * p]}", f"video{slots[2 * p + 1]}"],
                  np.random.default_rng([seed, stream, p])) for p, c in enumerate(picks)]
        first += count
    return plan


def _make_retrieval_pair(ds: SampleDataset, spec: SampleDataSpec, split: str, colour: str, shape: str,
                         ids: list[str], rng: np.random.Generator) -> dict:
    """One rendering encoded forwards and backwards: both clips hold the same frames, reversed."""
    motion = str(rng.choice(MOTIONS, p=[0.2, 0.2, 0.2, 0.2, 0.1, 0.1]))
    width, height = spec.retrieval_resolution
    scene = _Scene((_make_object(rng, colour, shape, motion, 0.5, spec.retrieval_object_scale),),
                   _background(rng, width, height))
    num_frames = max(2, round(rng.uniform(*spec.retrieval_duration_s) * spec.retrieval_fps))
    frames = [_render(scene, i / (num_frames - 1)) for i in range(num_frames)]
    rows = []
    for clip_id, clip_frames, m in ((ids[0], frames, motion), (ids[1], frames[::-1], OPPOSITE[motion])):
        encode_video(os.path.join(ds.retrieval_video_root, f"{clip_id}.mp4"), clip_frames,
                     spec.retrieval_fps, spec.crf, preset=spec.x264_preset)
        rows.append((clip_id, [f"{_a(colour)} {colour} {shape} {verb}" for verb in _CAPTION[m]]))
    return {"split": split, "pair": ids, "rows": rows}


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _format_ts(ms: int) -> str:
    """Integer milliseconds -> 'HH:MM:SS.mmm' (HD-VILA spans and WebVTT cue times)."""
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)
