"""Synthetic HD-VILA-format sample data, made by the project itself (`clipvip sample-data`).

Owns: the source videos (moving coloured shapes over a gradient + static noise background), the
HD-VILA-100M metadata jsonl, ASR-style subtitles (clip_id->text jsonl and per-video WebVTT), and a
MSR-VTT-format retrieval set whose captions need frame order to be matched (each pair of
clips is one rendering played forwards and backwards; pipeline/data/synthetic_retrieval.py), with
train / val / test splits. Everything is a pure function of the seed: same seed, same bytes (x264 runs single-threaded, see `encode_video`; videos are encoded in
parallel instead).

On-disk layout under `out_dir`:
    metadata.jsonl                 {"video_id", "url", "clip": [{"clip_id", "span"}]} per video
    videos/<video_id>.mp4          H.264 yuv420p, B-frames on
    subtitles.jsonl                {"clip_id", "text"} per clip
    subtitles/<video_id>.vtt       1-3 cues per clip, inside its span; joined they give its text
    retrieval/test.jsonl           {"clip_id": "video<k>", "text": caption} (MSR-VTT test1ka style);
                                   its pairs never share colour + shape + axis of motion
    retrieval/train.jsonl          {"clip_id", "text": [3 captions]} (MSR-VTT train9k style): other
                                   renderings of the test pairs' combos
    retrieval/val.jsonl            {"clip_id", "text": caption}: a held-out split for model selection
    retrieval/<split>_pairs.json   [[forward id, backward id], ...] per split
    retrieval/videos/video<k>.mp4  all splits, lossless H.264 (ids are distinct across splits)
    sample_data.json               spec, seed, counts, per-video facts, retrieval pairs
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline.data import synthetic_retrieval
from pipeline.data.synthetic_render import (COLOURS, MOTIONS, SHAPES, Scene, article, background, encode_video,
                                            make_object, render, write_text)

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
    num_retrieval: int = 128
    """Retrieval test clips; even, as they come in forward/backward pairs (64 pairs: one clip is
    0.8 points of R@1)."""
    num_retrieval_train: int = 512
    """Retrieval fine-tuning clips (even; pairs too, of the test pairs' combos). 512 rather than
    256 took the tiny demo model's test R@1 from 18-26 to 39-56 in side runs (README, Known limits)."""
    num_retrieval_val: int = 64
    """Retrieval validation clips (even; pairs as in test, new renderings of the test combos)."""
    # Retrieval clips are short and small (MSR-VTT itself is re-encoded to 6 fps): fine-tuning
    # decodes them on the fly, and the tiny model sees them at 32 px anyway.
    retrieval_duration_s: tuple[float, float] = (2.0, 3.0)
    retrieval_resolution: tuple[int, int] = (160, 120)
    retrieval_fps: float = 10.0
    retrieval_object_scale: float = 2.0
    """Size multiplier of the retrieval clips' object (models that see 32 px frames need > 1)."""
    crf: int = 23
    """x264 constant rate factor of the source videos."""
    retrieval_crf: int = 0
    """Of the retrieval clips: 0 is lossless, so a clip and its reversed twin decode to the same
    frames (pipeline/data/synthetic_retrieval.py)."""
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
            f"num_retrieval: at most {2 * len(synthetic_retrieval.COMBOS)} (distinct colour+shape+axis pairs)":
                self.num_retrieval <= 2 * len(synthetic_retrieval.COMBOS),
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
    retrieval_test_pairs: str = ""
    """[[forward id, backward id], ...] of the test split (evaluate's eval.data.order_pairs)."""
    info_path: str = ""



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
        retrieval_train_pairs=os.path.join(root, "retrieval", "train_pairs.json"),
        retrieval_test_pairs=os.path.join(root, "retrieval", "test_pairs.json"))
    for d in (ds.video_root, ds.subtitles_dir, ds.retrieval_video_root):
        os.makedirs(d, exist_ok=True)
    # One generator per video / pair, so results do not depend on scheduling or on num_videos.
    with ThreadPoolExecutor(num_workers or min(4, os.cpu_count() or 1)) as pool:
        videos = [pool.submit(_make_source_video, ds, vid, spec.resolutions[i % len(spec.resolutions)], spec,
                              np.random.default_rng([seed, 1, i]))
                  for i, vid in enumerate(_make_video_ids(seed, spec.num_videos))]
        pairs = [pool.submit(synthetic_retrieval.make_pair, ds.retrieval_video_root, spec, *job)
                 for job in synthetic_retrieval.plan_pairs(spec, seed)]
        videos_info = [f.result() for f in videos]
        pairs_info = [f.result() for f in pairs]
    clips = [c for v in videos_info for c in v["clips"]]
    write_text(ds.metadata_path, "".join(json.dumps(v["metadata"]) + "\n" for v in videos_info))
    write_text(ds.subtitles_table, "".join(
        json.dumps({"clip_id": c["clip_id"], "text": c["text"]}) + "\n" for c in clips))
    split_pairs = synthetic_retrieval.write_splits(os.path.dirname(ds.retrieval_jsonl), pairs_info)
    info = {
        "generator": "pipeline.data.synthetic", "format_version": 2, "seed": seed,
        "spec": dataclasses.asdict(spec), "num_videos": spec.num_videos, "num_clips": len(clips),
        "num_retrieval": spec.num_retrieval,
        "paths": {k: os.path.relpath(getattr(ds, k), root) for k in (
            "metadata_path", "video_root", "subtitles_table", "subtitles_dir", "retrieval_jsonl",
            "retrieval_train_jsonl", "retrieval_val_jsonl", "retrieval_train_pairs", "retrieval_test_pairs",
            "retrieval_video_root")},
        "videos": [{k: v for k, v in info.items() if k != "metadata"} for info in videos_info],
        "retrieval_pairs": split_pairs["test"],
        "retrieval_split_pairs": {k: split_pairs[k] for k in ("train", "val")},
        "retrieval_splits": {k: getattr(spec, n) for k, n in (
            ("train", "num_retrieval_train"), ("val", "num_retrieval_val"), ("test", "num_retrieval"))},
    }
    write_text(ds.info_path, json.dumps(info, indent=1) + "\n")
    return dataclasses.replace(ds, num_clips=len(clips))



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
    write_text(os.path.join(ds.subtitles_dir, f"{video_id}.vtt"), f"WEBVTT\nKind: captions\n\n{vtt}")
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


def _make_scene(rng: np.random.Generator, width: int, height: int, num_objects: int) -> Scene:
    colours = rng.choice(list(COLOURS), num_objects, replace=False)
    # One lane per object (a row for horizontal movers, a column otherwise) limits overlaps.
    lanes = (rng.permutation(num_objects) + 0.5) / num_objects
    objects = tuple(
        make_object(rng, str(colour), str(rng.choice(SHAPES)),
                     str(rng.choice(MOTIONS, p=[0.2, 0.2, 0.2, 0.2, 0.1, 0.1])), float(lane))
        for colour, lane in zip(colours, lanes, strict=True))
    return Scene(objects, background(rng, width, height))


def _timeline_frames(scenes: list[Scene], spans_ms: list[tuple[int, int]], num_frames: int,
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
        yield render(scenes[k], min(1.0, max(0.0, (t_ms - start) / (end - start))))


def _subtitle_text(rng: np.random.Generator, scene: Scene) -> str:
    parts = [str(rng.choice(_OPENERS))]
    for i, obj in enumerate(scene.objects):
        if i:
            parts.append(str(rng.choice(_JOINERS)))
        parts.append(f"{article(obj.colour)} {obj.colour} {obj.shape} {rng.choice(_SAY_MOTION[obj.motion])}")
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



def _format_ts(ms: int) -> str:
    """Integer milliseconds -> 'HH:MM:SS.mmm' (HD-VILA spans and WebVTT cue times)."""
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


