"""Tests for pipeline/data/synthetic.py: HD-VILA-format sample data made by the project."""

from __future__ import annotations

import json
import os
import re

import av
import numpy as np
import pytest

from pipeline.data.sampling import sample_frame_indices
from pipeline.data.synthetic import SampleDataset, SampleDataSpec, make_sample_dataset
from pipeline.data.synthetic_render import COLOURS, encode_video

SMALL = SampleDataSpec(
    num_videos=3, min_duration_s=3.0, max_duration_s=6.0, resolutions=((320, 240), (160, 120), (256, 144)),
    fps=10.0, clips_per_video=(1, 3), clip_duration_s=(1.0, 3.0), gap_s=(0.2, 0.6), num_retrieval=6,
    num_retrieval_train=4, num_retrieval_val=2, retrieval_duration_s=(1.0, 1.5), retrieval_resolution=(160, 120), retrieval_fps=10.0)
CLIP_ID = re.compile(r"^([A-Za-z0-9_-]{11})\.(\d+)\.mp4$")
CUE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d\d\d) --> (\d\d):(\d\d):(\d\d)\.(\d\d\d)$")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> SampleDataset:
    return make_sample_dataset(str(tmp_path_factory.mktemp("sample") / "data"), seed=7, spec=SMALL)


def _seconds(ts: str) -> float:
    h, m, s = ts.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def _jsonl(path: str) -> list[dict]:
    with open(path, encoding="ascii") as f:
        return [json.loads(line) for line in f]


def _info(ds: SampleDataset) -> dict:
    with open(ds.info_path, encoding="ascii") as f:
        return json.load(f)


def _decode_rgb(path: str) -> list[np.ndarray]:
    with av.open(path) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def _all_files(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_metadata_lines_match_the_real_videos(dataset: SampleDataset) -> None:
    rows = _jsonl(dataset.metadata_path)
    assert len(rows) == dataset.num_videos == SMALL.num_videos
    sizes = set()
    for index, row in enumerate(rows):
        assert list(row) == ["video_id", "url", "clip"]
        assert row["url"] == f"https://www.youtube.com/watch?v={row['video_id']}"
        with av.open(os.path.join(dataset.video_root, f"{row['video_id']}.mp4")) as container:
            stream = container.streams.video[0]
            duration_s = float(stream.duration * stream.time_base)
            size = (stream.codec_context.width, stream.codec_context.height)
            packets = [p for p in container.demux(stream) if p.size]
        assert size == SMALL.resolutions[index % len(SMALL.resolutions)]
        sizes.add(size)
        assert SMALL.min_duration_s - 0.1 <= duration_s <= SMALL.max_duration_s + 0.1
        assert any(p.pts != p.dts for p in packets), "expected B-frames (reordered packets)"
        spans = [(_seconds(c["span"][0]), _seconds(c["span"][1])) for c in row["clip"]]
        assert spans[0][0] >= SMALL.gap_s[0] and spans[-1][1] <= duration_s - SMALL.gap_s[0] + 1e-6
        for (start, end), nxt in zip(spans, [*spans[1:], None], strict=True):
            assert SMALL.clip_duration_s[0] - 0.002 <= end - start <= SMALL.clip_duration_s[1]
            if nxt is not None:
                assert nxt[0] - end >= SMALL.gap_s[0] - 0.002
    assert len(sizes) == 3


def test_clip_ids_are_unique_hdvila_ids(dataset: SampleDataset) -> None:
    ids = []
    for row in _jsonl(dataset.metadata_path):
        for n, clip in enumerate(row["clip"]):
            match = CLIP_ID.match(clip["clip_id"])
            assert match and match.group(1) == row["video_id"] and int(match.group(2)) == n
            assert all(re.fullmatch(r"\d\d:\d\d:\d\d\.\d\d\d", t) for t in clip["span"])
            ids.append(clip["clip_id"])
    assert len(ids) == len(set(ids)) == dataset.num_clips
    assert [r["clip_id"] for r in _jsonl(dataset.subtitles_table)] == ids


def test_vtt_cues_inside_spans_join_to_table_text(dataset: SampleDataset) -> None:
    texts = {r["clip_id"]: r["text"] for r in _jsonl(dataset.subtitles_table)}
    for row in _jsonl(dataset.metadata_path):
        with open(os.path.join(dataset.subtitles_dir, f"{row['video_id']}.vtt"), encoding="ascii") as f:
            blocks = f.read().split("\n\n")
        assert blocks[0].startswith("WEBVTT")
        cues = []
        for block in filter(None, blocks[1:]):
            timing, text = block.split("\n")
            g = [int(x) for x in CUE.match(timing).groups()]
            cues.append((g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000,
                         g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000, text))
        used = 0
        for clip in row["clip"]:
            start, end = (_seconds(t) for t in clip["span"])
            inside = [c for c in cues if c[0] < end and c[1] > start]
            assert 1 <= len(inside) <= 3
            assert all(start <= c[0] < c[1] <= end for c in inside)
            assert " ".join(c[2] for c in inside) == texts[clip["clip_id"]]
            used += len(inside)
        assert used == len(cues)


def test_subtitles_describe_the_scene_in_asr_style(dataset: SampleDataset) -> None:
    texts = {r["clip_id"]: r["text"] for r in _jsonl(dataset.subtitles_table)}
    for video in _info(dataset)["videos"]:
        for clip in video["clips"]:
            text = texts[clip["clip_id"]]
            assert text == text.lower() and "," not in text and "." not in text
            for obj in clip["objects"]:
                assert f"{obj['colour']} {obj['shape']}" in text


def test_frames_show_the_described_object(dataset: SampleDataset) -> None:
    """The topmost object of each span's middle frame has its colour where the plan puts it."""
    checked = 0
    for video in _info(dataset)["videos"]:
        if video["height"] < 100:  # objects are a few pixels wide at the smallest sizes
            continue
        frames = _decode_rgb(os.path.join(dataset.video_root, f"{video['video_id']}.mp4"))
        for clip in video["clips"]:
            start, end = (_seconds(t) for t in clip["span"])
            index = round((start + end) / 2 * video["fps"])
            progress = (index / video["fps"] - start) / (end - start)
            obj = clip["objects"][-1]
            x, y, _ = (s + (e - s) * progress for s, e in zip(obj["start_xyr"], obj["end_xyr"], strict=True))
            pixel = frames[index][int(y * video["height"]), int(x * video["width"])].astype(int)
            assert np.abs(pixel - np.array(COLOURS[obj["colour"]])).max() < 45, (clip["clip_id"], pixel)
            checked += 1
    assert checked >= 1


def test_retrieval_pairs_need_frame_order(dataset: SampleDataset) -> None:
    rows = _jsonl(dataset.retrieval_jsonl)
    assert [r["clip_id"] for r in rows] == [f"video{k}" for k in range(SMALL.num_retrieval)]
    text = {r["clip_id"]: r["text"] for r in rows}
    pairs = _info(dataset)["retrieval_pairs"]
    with open(dataset.retrieval_test_pairs, encoding="ascii") as f:
        assert json.load(f) == pairs
    assert sorted(c for p in pairs for c in p) == sorted(text)
    directions = {("to the right", "to the left"): "horizontal", ("up the screen", "down the screen"): "vertical",
                  ("grows larger", "shrinks"): "size"}
    named = set()
    for fwd_id, bwd_id in pairs:
        fwd, bwd = text[fwd_id], text[bwd_id]
        assert fwd.split()[:3] == bwd.split()[:3] and fwd != bwd
        axis = [axis for (a, b), axis in directions.items() if (a in fwd and b in bwd) or (b in fwd and a in bwd)]
        assert len(axis) == 1, (fwd, bwd)
        named.add((*fwd.split()[1:3], axis[0]))
        a = _decode_rgb(os.path.join(dataset.retrieval_video_root, f"{fwd_id}.mp4"))
        b = _decode_rgb(os.path.join(dataset.retrieval_video_root, f"{bwd_id}.mp4"))
        # Lossless: the twin decodes to exactly the same frames, reversed, and 12k + 1 of them, so
        # uniform test sampling of 4 frames picks the same frames from both.
        assert len(a) == len(b) and (len(a) - 1) % 12 == 0
        assert all(np.array_equal(x, y) for x, y in zip(a, b[::-1], strict=True))
        assert not np.array_equal(a[0], a[-1])
        picks_a, picks_b = sample_frame_indices(len(a), 4, False), sample_frame_indices(len(b), 4, False)
        assert [a[i].tobytes() for i in picks_a] == [b[i].tobytes() for i in picks_b][::-1]
    assert len(named) == len(pairs)  # a test caption names its pair: colour + shape + axis never repeat


def test_retrieval_splits_are_disjoint_and_share_the_vocabulary(dataset: SampleDataset) -> None:
    test = {r["clip_id"] for r in _jsonl(dataset.retrieval_jsonl)}
    train = {r["clip_id"]: r["text"] for r in _jsonl(dataset.retrieval_train_jsonl)}
    val = {r["clip_id"]: r["text"] for r in _jsonl(dataset.retrieval_val_jsonl)}
    assert len(train) == SMALL.num_retrieval_train and len(val) == SMALL.num_retrieval_val
    assert sorted(test | set(train) | set(val), key=lambda c: int(c[5:])) == [
        f"video{k}" for k in range(SMALL.num_retrieval + SMALL.num_retrieval_train + SMALL.num_retrieval_val)]
    assert all(isinstance(t, list) and len(t) == 3 for t in train.values())  # MSR-VTT train: caption lists
    assert all(isinstance(t, str) for t in val.values())
    assert len(set(val.values())) == len(val)  # unique captions, as in test: val R@1 can rank order
    for clip_id in (*train, *val):
        assert os.path.exists(os.path.join(dataset.retrieval_video_root, f"{clip_id}.mp4"))
    info = _info(dataset)
    assert info["retrieval_splits"] == {"train": 4, "val": 2, "test": 6}
    for split, ids in (("train", train), ("val", val)):
        with open(os.path.join(os.path.dirname(dataset.retrieval_jsonl), f"{split}_pairs.json"), encoding="ascii") as f:
            assert sorted(c for p in json.load(f) for c in p) == sorted(ids, key=str)
    assert sorted(c for p in info["retrieval_pairs"] for c in p) == sorted(test, key=str)


def test_same_seed_same_bytes_other_seed_differs(dataset: SampleDataset, tmp_path: os.PathLike) -> None:
    again = make_sample_dataset(str(tmp_path / "again"), seed=7, spec=SMALL, num_workers=1)
    other = make_sample_dataset(str(tmp_path / "other"), seed=8, spec=SMALL)
    first, second = _all_files(dataset.root), _all_files(again.root)
    assert sorted(first) == sorted(second)
    assert [p for p in first if first[p] != second[p]] == []
    assert any(p.endswith(".mp4") for p in first) and any(p.endswith(".vtt") for p in first)
    third = _all_files(other.root)
    assert first["metadata.jsonl"] != third["metadata.jsonl"]
    assert set(p for p in first if p.startswith("videos/")).isdisjoint(p for p in third if p.startswith("videos/"))
    assert _jsonl(other.retrieval_jsonl) != _jsonl(dataset.retrieval_jsonl)


def test_encode_video_rejects_bad_input_and_accepts_rgb(tmp_path: os.PathLike) -> None:
    path = str(tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="no frames"):
        encode_video(path, [], 10.0)
    with pytest.raises(ValueError, match="even"):
        encode_video(path, [np.zeros((33, 32, 3), np.uint8)], 10.0)
    frames = [np.full((32, 48, 3), (200, 30, 30), np.uint8) for _ in range(5)]
    encode_video(path, frames, 10.0)
    decoded = _decode_rgb(path)
    assert len(decoded) == 5 and decoded[0].shape == (32, 48, 3)
    assert np.abs(decoded[2].astype(int) - (200, 30, 30)).max() < 12
    assert not os.path.exists(str(tmp_path / "x.tmp.mp4"))


def test_spec_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="num_retrieval"):
        SampleDataSpec(num_retrieval=3)
    with pytest.raises(ValueError, match="resolutions"):
        SampleDataSpec(resolutions=((321, 240),))
    with pytest.raises(ValueError, match="160x120"):
        SampleDataSpec(resolutions=((96, 64),))
    with pytest.raises(ValueError, match="min_duration_s"):
        SampleDataSpec(min_duration_s=1.0)
