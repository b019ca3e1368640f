"""The synthetic MSR-VTT-format retrieval set: train / val / test splits whose captions need frame order.

Every split is made of pairs: one rendering of one object encoded forwards and backwards, captioned
with opposite motions ("a red circle moves to the right" / "... to the left"). Test pairs never
share colour + shape + axis of motion, so a caption names its pair and only the direction tells
the pair's two clips apart.

The pair's two clips hold exactly the same frames, reversed: they are encoded losslessly (x264
qp 0; decoding gives back the rendered yuv420p planes), and a clip has 12k + 1 frames, so the
uniform test sampling of T frames, linspace(0, F-1, T) truncated, picks the same frames from a clip
and its twin whenever T - 1 divides 12 (T = 2, 3, 4, 5, 7, 13; the demo uses 4). A model blind to
frame order (mean pooling) then gives the two clips the same features and sits at exactly 50% on
the order-awareness measure (pipeline/eval/metrics.py `order_awareness`); with lossy encodes the
twin's other compression noise let it win or lose pairs by chance.

Files, under `<root>/retrieval/`:
    test.jsonl / val.jsonl         {"clip_id": "video<k>", "text": caption} (MSR-VTT test1ka style)
    train.jsonl                    {"clip_id", "text": [3 captions]} (MSR-VTT train9k style)
    <split>_pairs.json             [[forward id, backward id], ...] (finetune's data.batch_groups for
                                   train; evaluate's eval.data.order_pairs for test)
    videos/video<k>.mp4            all splits (ids are distinct across splits, as in MSR-VTT)
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from pipeline.data.synthetic_render import (COLOURS, OPPOSITE, SHAPES, Scene, article, background, encode_video,
                                            make_object, render, write_text)

AXES: dict[str, tuple[str, str]] = {"horizontal": ("left", "right"), "vertical": ("up", "down"),
                                    "size": ("growing", "shrinking")}
COMBOS: tuple[tuple[str, str, str], ...] = tuple((c, s, a) for c in COLOURS for s in SHAPES for a in AXES)
"""(colour, shape, axis): what a test pair's caption names; 96 of them, so at most 192 test clips."""
SPLITS = ("test", "train", "val")
CAPTIONS = {  # MSR-VTT style; the first one goes to the test and val files
    "right": ("moves to the right", "slides across the screen to the right", "travels to the right side"),
    "left": ("moves to the left", "slides across the screen to the left", "travels to the left side"),
    "up": ("moves up the screen", "rises up", "goes upward"),
    "down": ("moves down the screen", "falls down", "goes downward"),
    "growing": ("grows larger", "gets bigger and bigger", "expands in size"),
    "shrinking": ("shrinks", "gets smaller and smaller", "contracts in size"),
}
FRAME_STEP = 12
"""A clip has FRAME_STEP * k + 1 frames (see the module docstring)."""


def plan_pairs(spec: Any, seed: int) -> list[tuple[str, tuple[str, str, str], list[str], np.random.Generator]]:
    """(split, (colour, shape, axis), [forward id, backward id], generator) per pair.

    `spec` is a `SampleDataSpec` (num_retrieval, num_retrieval_train, num_retrieval_val). Ids are
    numbered test first, then train, then val, so test ids do not depend on the other sizes; within
    a split a pair's ids are not adjacent.
    """
    rng = np.random.default_rng([seed, 2])
    chosen = rng.choice(len(COMBOS), spec.num_retrieval // 2, replace=False)
    plan, first = [], 0
    for split, count, stream in (("test", spec.num_retrieval, 3), ("train", spec.num_retrieval_train, 4),
                                 ("val", spec.num_retrieval_val, 5)):
        split_rng = np.random.default_rng([seed, stream])
        # Train and val show the test pairs' combos (new renderings), as MSR-VTT's test concepts
        # are seen in training and its test videos are not.
        vocab = chosen if len(chosen) else np.arange(len(COMBOS))
        if split == "test":
            picks = chosen
        elif split == "val":
            # Like test: distinct combos (cycling once they run out), so validation captions are
            # unique and val R@1 ranks what test R@1 ranks.
            picks = np.resize(split_rng.permutation(vocab), count // 2)
        else:
            picks = vocab[split_rng.integers(0, len(vocab), count // 2)]
        slots = (first + (rng.permutation(count) if split == "test" else split_rng.permutation(count))).tolist()
        plan += [(split, COMBOS[c], [f"video{slots[2 * p]}", f"video{slots[2 * p + 1]}"],
                  np.random.default_rng([seed, stream, p])) for p, c in enumerate(picks)]
        first += count
    return plan


def make_pair(video_root: str, spec: Any, split: str, combo: tuple[str, str, str], ids: list[str],
              rng: np.random.Generator) -> dict:
    """Render one pair and encode both clips; returns {"split", "pair", "rows": [(clip_id, captions)]}."""
    colour, shape, axis = combo
    motion = AXES[axis][int(rng.integers(2))]
    width, height = spec.retrieval_resolution
    scene = Scene((make_object(rng, colour, shape, motion, 0.5, spec.retrieval_object_scale),),
                  background(rng, width, height))
    drawn = rng.uniform(*spec.retrieval_duration_s) * spec.retrieval_fps
    num_frames = FRAME_STEP * max(1, round((drawn - 1) / FRAME_STEP)) + 1
    frames = [render(scene, i / (num_frames - 1)) for i in range(num_frames)]
    rows = []
    for clip_id, clip_frames, m in ((ids[0], frames, motion), (ids[1], frames[::-1], OPPOSITE[motion])):
        encode_video(os.path.join(video_root, f"{clip_id}.mp4"), clip_frames, spec.retrieval_fps,
                     spec.retrieval_crf, preset=spec.x264_preset)
        rows.append((clip_id, [f"{article(colour)} {colour} {shape} {verb}" for verb in CAPTIONS[m]]))
    return {"split": split, "pair": ids, "rows": rows}


def write_splits(retrieval_dir: str, pairs_info: list[dict]) -> dict[str, list[list[str]]]:
    """Write each split's jsonl and pairs file; returns {split: pairs}."""
    out = {}
    for split in SPLITS:
        rows = sorted((r for p in pairs_info if p["split"] == split for r in p["rows"]),
                      key=lambda r: int(r[0][len("video"):]))
        write_text(os.path.join(retrieval_dir, f"{split}.jsonl"), "".join(
            json.dumps({"clip_id": c, "text": t if split == "train" else t[0]}) + "\n" for c, t in rows))
        out[split] = [p["pair"] for p in pairs_info if p["split"] == split]
        write_text(os.path.join(retrieval_dir, f"{split}_pairs.json"), json.dumps(out[split]) + "\n")
    return out
