"""Downstream annotation readers: per-format texts and video lookup, skipped rows, limit, config checks."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.config import ConfigError, build_dataclass
from pipeline.config import RetrievalDataConfig
from pipeline.eval.formats import RetrievalItem, eval_texts, order_pair_indices, read_items


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


def touch(root, *names) -> str:
    os.makedirs(root, exist_ok=True)
    for name in names:
        open(os.path.join(root, name), "wb").close()
    return str(root)


def test_msrvtt_test1ka_string_texts(tmp_path):
    videos = touch(tmp_path / "videos", "video7020.mp4", "video7021.mp4")
    ann = write_jsonl(tmp_path / "test1ka.jsonl", [{"clip_id": "video7020", "text": "a man is singing"},
                                                   {"clip_id": "video7021", "text": "  cars race  "}])
    cfg = RetrievalDataConfig(annotations=ann, video_root=videos)
    assert cfg.resolved_paragraph() is False and cfg.resolved_num_frames() == 12
    items, skipped = read_items(cfg)
    assert items == [RetrievalItem("video7020", os.path.join(videos, "video7020.mp4"), ("a man is singing",)),
                     RetrievalItem("video7021", os.path.join(videos, "video7021.mp4"), ("cars race",))]
    assert skipped == []
    assert eval_texts(items) == ["a man is singing", "cars race"]


def test_msrvtt_train9k_list_texts_are_separate(tmp_path):
    videos = touch(tmp_path / "videos", "video0.mp4")
    ann = write_jsonl(tmp_path / "train9k.jsonl", [{"clip_id": "video0", "text": ["one", "two", " ", "three"]}])
    result = read_items(RetrievalDataConfig(annotations=ann, video_root=videos))
    assert result.items[0].texts == ("one", "two", "three")
    assert eval_texts(result.items) == ["one"]


def test_extension_order_and_fallbacks(tmp_path):
    videos = touch(tmp_path / "videos", "a.mp4", "a.avi", "b.avi", "c.mkv", "d.webm", "e.mov")
    ann = write_jsonl(tmp_path / "x.jsonl", [{"clip_id": c, "text": c} for c in "abcde"])
    items, skipped = read_items(RetrievalDataConfig(annotations=ann, video_root=videos))
    assert [os.path.basename(i.video_path) for i in items] == ["a.mp4", "b.avi", "c.mkv", "d.webm"]
    assert skipped[0][0] == "e" and "no video file" in skipped[0][1]


def test_didemo_joins_sentences_into_one_paragraph(tmp_path):
    videos = touch(tmp_path / "videos", "v1.mp4", "v2.mp4")
    ann = write_jsonl(tmp_path / "didemo_test.jsonl", [
        {"clip_id": "v1", "text": ["a dog runs.", " the dog stops. ", "", "it barks."]},
        {"clip_id": "v2", "text": "already one paragraph."},
    ])
    cfg = RetrievalDataConfig(format="didemo", annotations=ann, video_root=videos)
    items, _ = read_items(cfg)
    assert [i.texts for i in items] == [("a dog runs. the dog stops. it barks.",), ("already one paragraph.",)]
    assert eval_texts(items) == ["a dog runs. the dog stops. it barks.", "already one paragraph."]
    sentences = RetrievalDataConfig(format="didemo", annotations=ann, video_root=videos, paragraph=False)
    assert read_items(sentences).items[0].texts == ("a dog runs.", "the dog stops.", "it barks.")


def test_lsmdc_reads_avi_only(tmp_path):
    videos = touch(tmp_path / "videos", "1001_Flight_00.00.47.000-00.00.49.000.avi", "other.mp4")
    ann = write_jsonl(tmp_path / "lsmdc_test.jsonl", [
        {"clip_id": "1001_Flight_00.00.47.000-00.00.49.000", "text": "SOMEONE looks up."},
        {"clip_id": "other", "text": "an mp4 is not an LSMDC clip"},
    ])
    items, skipped = read_items(RetrievalDataConfig(format="lsmdc", annotations=ann, video_root=videos))
    assert [i.video_path for i in items] == [os.path.join(videos, "1001_Flight_00.00.47.000-00.00.49.000.avi")]
    assert skipped == [("other", f"no video file other{{.avi}} under {videos} (line 2)")]


def test_activitynet_frame_dirs(tmp_path):
    frames = tmp_path / "video_frames_lr"
    for clip in ("v_a", "v_b", "v_c"):
        os.makedirs(frames / clip)
    touch(frames, "v_d")  # a file, not a frame directory
    ann = write_jsonl(tmp_path / "anet_val1.jsonl", [
        {"clip_id": "v_a", "text": ["first.", "second."], "num_frame": 140},
        {"clip_id": "v_b", "text": "no hint"},
        {"clip_id": "v_c", "text": "bad hint", "num_frame": "many"},
        {"clip_id": "v_d", "text": "not a directory"},
        {"clip_id": "v_e", "text": "missing"},
    ])
    cfg = RetrievalDataConfig(format="activitynet", annotations=ann, video_root=str(frames), video_format="frames")
    assert cfg.resolved_paragraph() is True and cfg.resolved_num_frames() == 32
    items, skipped = read_items(cfg)
    assert items == [RetrievalItem("v_a", str(frames / "v_a"), ("first. second.",), 140),
                     RetrievalItem("v_b", str(frames / "v_b"), ("no hint",), None)]
    assert [k for k, _ in skipped] == ["v_c", "v_d", "v_e"]
    assert "num_frame" in skipped[0][1] and all("no frame directory" in r for _, r in skipped[1:])


def test_bad_rows_are_skipped_with_reasons(tmp_path):
    videos = touch(tmp_path / "videos", "ok.mp4", "dup.mp4", "empty.mp4", "blank.mp4", "num.mp4")
    ann = write_jsonl(tmp_path / "test.jsonl", [
        {"clip_id": "ok", "text": "fine"},
        '{"clip_id": "broken", "text": ',
        {"text": "no id"},
        "",
        {"clip_id": "dup", "text": "first"},
        {"clip_id": "dup", "text": "second"},
        {"clip_id": "empty", "text": "   "},
        {"clip_id": "blank", "text": ["", " "]},
        {"clip_id": "num", "text": 7},
        {"clip_id": "../ok", "text": "escape"},
        {"clip_id": "gone", "text": "no video"},
        ["not", "an", "object"],
    ])
    items, skipped = read_items(RetrievalDataConfig(annotations=ann, video_root=videos))
    assert [(i.clip_id, i.texts) for i in items] == [("ok", ("fine",)), ("dup", ("first",))]
    keys = [k for k, _ in skipped]
    assert keys == [2, 3, "dup", "empty", "blank", "num", "../ok", "gone", 12]
    reasons = dict(zip(map(str, keys), (r for _, r in skipped)))
    assert reasons["2"].startswith("bad JSON")
    assert reasons["dup"] == "duplicate clip_id at line 6 (first seen at line 5)"
    assert reasons["empty"] == "empty text (line 7)" and reasons["blank"] == "empty text (line 8)"
    assert "string or a list of strings" in reasons["num"]
    assert "plain file name" in reasons["../ok"]
    assert reasons["3"] == reasons["12"] == "no clip_id string"


def test_limit_keeps_first_usable_items(tmp_path):
    videos = touch(tmp_path / "videos", *(f"video{i}.mp4" for i in (0, 2, 3, 4)))
    ann = write_jsonl(tmp_path / "test.jsonl", [{"clip_id": f"video{i}", "text": f"t{i}"} for i in range(5)])
    items, skipped = read_items(RetrievalDataConfig(annotations=ann, video_root=videos, limit=2))
    assert [i.clip_id for i in items] == ["video0", "video2"]
    assert [k for k, _ in skipped] == ["video1"]


def test_nothing_left_names_the_file(tmp_path):
    videos = touch(tmp_path / "videos")
    ann = write_jsonl(tmp_path / "test1ka.jsonl", [{"clip_id": "video1", "text": "x"}])
    with pytest.raises(ValueError, match=r"test1ka\.jsonl: no usable items \(1 skipped: video1: no video file"):
        read_items(RetrievalDataConfig(annotations=ann, video_root=videos))
    with pytest.raises(ValueError, match="not a directory"):
        read_items(RetrievalDataConfig(annotations=ann, video_root=str(tmp_path / "nowhere")))


def test_synthetic_retrieval_set_reads(tmp_path):
    # The layout `pipeline.data.synthetic` writes: retrieval/test.jsonl + retrieval/videos/<clip_id>.mp4.
    root = tmp_path / "retrieval"
    videos = touch(root / "videos", "video0.mp4", "video1.mp4")
    ann = write_jsonl(root / "test.jsonl", [{"clip_id": "video0", "text": "a red circle moves left"},
                                            {"clip_id": "video1", "text": "a red circle moves right"}])
    items, _ = read_items(RetrievalDataConfig(annotations=ann, video_root=videos))
    assert [i.clip_id for i in items] == ["video0", "video1"]


def test_config_validation_messages():
    with pytest.raises(ConfigError, match=r"^data\.format: unknown 'x'"):
        RetrievalDataConfig(format="x", annotations="a.jsonl", video_root="v")
    with pytest.raises(ConfigError, match=r"^data\.limit: must be >= 1"):
        RetrievalDataConfig(annotations="a.jsonl", video_root="v", limit=0)
    with pytest.raises(ConfigError, match=r"^data\.num_frames"):
        RetrievalDataConfig(annotations="a.jsonl", video_root="v", num_frames=0)
    with pytest.raises(ConfigError, match=r"^data\.annotations"):
        RetrievalDataConfig(annotations="", video_root="v")
    assert RetrievalDataConfig(annotations="a", video_root="v", paragraph=True, num_frames=8).resolved_num_frames() == 8
    # Nested in a parent section, the loader rewrites "data." to the full dotted key.
    with pytest.raises(ConfigError, match=r"^eval\.data\.limit: must be >= 1"):
        build_dataclass(RetrievalDataConfig, {"annotations": "a", "video_root": "v", "limit": 0}, prefix="eval.data")
    with pytest.raises(ConfigError, match=r"^eval\.data\.format: must be one of"):
        build_dataclass(RetrievalDataConfig, {"annotations": "a", "video_root": "v", "format": "x"}, prefix="eval.data")


def test_order_pairs_become_item_indices_and_bad_files_are_named(tmp_path):
    videos = touch(tmp_path / "videos", *(f"video{k}.mp4" for k in range(4)))
    ann = write_jsonl(tmp_path / "test.jsonl", [{"clip_id": f"video{k}", "text": f"t{k}"} for k in (0, 1, 3)])
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([["video3", "video0"], ["video1", "video2"]]))  # video2 has no row: dropped
    cfg = RetrievalDataConfig(annotations=ann, video_root=videos, order_pairs=str(pairs))
    items, _ = read_items(cfg)
    assert order_pair_indices(cfg, items) == [(2, 0)]
    assert order_pair_indices(RetrievalDataConfig(annotations=ann, video_root=videos), items) == []
    for content, why in (('{"a": 1}', "must hold a JSON list"), ('[["video0", "video1", "video3"]]', "two distinct"),
                         ('[["video0", "video0"]]', "two distinct"), ('[["video0", "video2"]]', "no pair"),
                         ("not json", "cannot read")):
        pairs.write_text(content)
        with pytest.raises(ValueError, match=f"^data.order_pairs: .*{why}"):
            order_pair_indices(cfg, items)
    with pytest.raises(ValueError, match="^data.order_pairs: cannot read .*absent.json"):
        order_pair_indices(RetrievalDataConfig(annotations=ann, video_root=videos,
                                               order_pairs=str(tmp_path / "absent.json")), items)
