"""`prepare` end to end on local Ray: shard content, captions, resume, refusal, bad input zoo."""

from __future__ import annotations

import io
import json
import os

import pytest
from PIL import Image

from pipeline.config import PrepareJobConfig, load_config
from pipeline.data.build import RootConflict, run_prepare
from pipeline.data.captions import CaptionSetConflict
from pipeline.data.metadata import parse_timestamp
from tests.integration.conftest import parquet_tables


def prepare_cfg(sample, root, *extra):
    return load_config(PrepareJobConfig, None, [
        f"root={root}", f"data.metadata={sample.metadata_path}", f"data.video_root={sample.video_root}",
        f"data.subtitles={sample.subtitles_table}", "data.clips_per_shard=4",
        "frames.short_side_px=64", "frames.max_frames=8", "caption.model=builtin:tiny-blip",
        "caption.batch_size=4", "ray.progress_bars=false", *extra])


def read_shards(root, sub="frames"):
    """{"<part>/part-NNNNN.parquet": table} of a root's frame shards (or a caption set's parts)."""
    return parquet_tables(root, sub)


def metadata_spans(sample):
    spans = {}
    with open(sample.metadata_path) as f:
        for line in f:
            v = json.loads(line)
            for c in v["clip"]:
                spans[c["clip_id"]] = (parse_timestamp(c["span"][0]), parse_timestamp(c["span"][1]))
    return spans


@pytest.fixture(scope="module")
def prepared(ray_local, sample_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("prepared") / "root")
    summary = run_prepare(prepare_cfg(sample_data, root), log=lambda *_: None)
    return root, summary


def test_shard_content(prepared, sample_data):
    root, summary = prepared
    spans = metadata_spans(sample_data)
    subs = {}
    with open(sample_data.subtitles_table) as f:
        for line in f:
            r = json.loads(line)
            subs[r["clip_id"]] = r["text"]
    seen = []
    for name, table in read_shards(root).items():
        side = json.load(open(os.path.join(root, "frames", name.replace(".parquet", ".json"))))
        assert side["rows"] == table.num_rows
        for row in table.to_pylist():
            seen.append(row["clip_id"])
            start, end = spans[row["clip_id"]]
            assert (row["start_s"], row["end_s"]) == pytest.approx((start, end))
            assert row["subtitle"] == subs[row["clip_id"]]
            assert 1 <= len(row["frames"]) <= 8 and len(row["frames"]) == len(row["frame_times_s"])
            assert row["frame_times_s"] == sorted(row["frame_times_s"])
            assert all(start - 0.05 <= t < end + 0.05 for t in row["frame_times_s"])
            assert start <= row["middle_frame_time_s"] <= end
            assert abs(row["middle_frame_time_s"] - (start + end) / 2) < 0.1
            assert min(row["height"], row["width"]) == 64
            for jpeg in row["frames"][:2] + [row["middle_frame"]]:
                img = Image.open(io.BytesIO(jpeg))
                assert img.format == "JPEG" and img.size == (row["width"], row["height"])
    assert sorted(seen) == sorted(spans), "every clip exactly once"
    assert summary.clips_ok == len(spans) and summary.clips_quarantined == 0


def test_caption_set_aligned(prepared):
    root, summary = prepared
    frames = read_shards(root)
    caps = read_shards(root, "captions/default")
    assert set(caps) == set(frames)
    for name, table in frames.items():
        assert caps[name].column("clip_id").to_pylist() == table.column("clip_id").to_pylist()
        assert all(isinstance(c, str) and c for c in caps[name].column("caption").to_pylist())
    meta = json.load(open(os.path.join(root, "captions/default/caption_set.json")))
    assert meta["status"] == "complete" and meta["config"]["model"] == "builtin:tiny-blip"
    assert meta["captioner"][0]["revision"], "captioner identity records a revision"
    assert summary.captions_ok == summary.clips_ok


def test_manifest_counts(prepared):
    root, summary = prepared
    man = json.load(open(os.path.join(root, "manifest.json")))
    assert man["status"] == "complete"
    assert man["counts"]["clips_ok"] == summary.clips_ok
    assert man["counts"]["shards"] == len(read_shards(root)) == sum(p["units"] for p in man["parts"])
    assert [p["name"] for p in man["parts"]] == ["metadata"]  # the part's name: its file name


def test_rerun_skips_and_changed_config_refused(prepared, sample_data):
    root, first = prepared
    before = {n: t for n, t in read_shards(root).items()}
    mtimes = {n: os.path.getmtime(os.path.join(root, "frames", n)) for n in before}
    again = run_prepare(prepare_cfg(sample_data, root), log=lambda *_: None)
    assert again.units_skipped == again.units and again.clips_ok == first.clips_ok
    assert {n: os.path.getmtime(os.path.join(root, "frames", n)) for n in before} == mtimes
    with pytest.raises(RootConflict, match=r"frames\.fps: 3\.0 -> 2\.0"):
        run_prepare(prepare_cfg(sample_data, root, "frames.fps=2"), log=lambda *_: None)
    with pytest.raises(CaptionSetConflict, match="default"):
        run_prepare(prepare_cfg(sample_data, root, "caption.max_new_tokens=5"), log=lambda *_: None)


def test_vtt_subtitles_match_table(ray_local, sample_data, tmp_path):
    root = str(tmp_path / "vtt")
    run_prepare(prepare_cfg(sample_data, root, f"data.subtitles={sample_data.subtitles_dir}"), log=lambda *_: None)
    subs = {}
    with open(sample_data.subtitles_table) as f:
        for line in f:
            r = json.loads(line)
            subs[r["clip_id"]] = r["text"]
    rows = [r for t in read_shards(root).values() for r in t.select(["clip_id", "subtitle"]).to_pylist()]
    assert rows and all(r["subtitle"] == subs[r["clip_id"]] for r in rows)


def test_force_rebuilds(ray_local, sample_data, tmp_path):
    root = str(tmp_path / "force")
    run_prepare(prepare_cfg(sample_data, root), log=lambda *_: None)
    s = run_prepare(prepare_cfg(sample_data, root, "frames.max_frames=2", "data.force=true"), log=lambda *_: None)
    assert s.units_skipped == 0
    assert all(len(r) <= 2 for t in read_shards(root).values() for r in t.column("frames").to_pylist())
