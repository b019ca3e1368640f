"""pipeline/viz.py: image strips and grids, a dataset root read into caption and quarantine
tables (real Parquet files written with the project's own helpers), MLflow histories through a
stand-in client, top-k ranking."""

from __future__ import annotations

import io
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline import schema, viz
from pipeline.data.index import (FRAMES, IndexWriter, captions_kind, captions_row, compact_index, delete_index,
                                 frames_row)
from pipeline.data.root import DatasetRoot, Shard
from pipeline.data.shards import clip_ids_digest, write_table_atomic
from pipeline.utils import fs
from tests.conftest import ROOT

OPTS = fs.S3Options()


def jpeg(width: int, height: int, value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (value, value, value)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Images


def test_to_rgb_decodes_jpeg_and_keeps_aspect_when_resizing():
    assert viz.to_rgb(jpeg(40, 20)).shape == (20, 40, 3)
    out = viz.to_rgb(jpeg(40, 20, value=200), height_px=10)
    assert out.shape == (10, 20, 3) and out.dtype == np.uint8
    assert abs(int(out.mean()) - 200) <= 3


def test_to_rgb_accepts_arrays_and_rejects_other_dtypes():
    gray = np.full((4, 6), 7, np.uint8)
    assert viz.to_rgb(gray).shape == (4, 6, 3)
    assert viz.to_rgb(np.zeros((4, 6, 3), np.uint8), height_px=8).shape == (8, 12, 3)
    with pytest.raises(ValueError, match="uint8"):
        viz.to_rgb(np.zeros((4, 6, 3), np.float32))


def test_frame_strip_puts_frames_in_a_row_with_gaps():
    strip = viz.frame_strip([jpeg(20, 10, 0), np.zeros((5, 5, 3), np.uint8)], height_px=10, gap_px=3)
    assert strip.shape == (10, 20 + 3 + 10, 3)
    assert (strip[:, 20:23] == 255).all()  # the gap
    assert strip[:, :20].max() < 20 and strip[:, 23:].max() == 0
    assert viz.frame_strip([], height_px=10).shape == (10, 0, 3)


def test_frame_grid_stacks_rows_and_pads_short_ones():
    short, long_ = [jpeg(10, 10, 0)], [jpeg(10, 10, 0)] * 3
    grid = viz.frame_grid([short, long_], height_px=10, gap_px=2)
    assert grid.shape == (10 + 2 + 10, 10 * 3 + 2 * 2, 3)
    assert (grid[:10, 12:] == 255).all()  # padding right of the short row
    assert grid[12:, :10].max() < 20
    with pytest.raises(ValueError):
        viz.frame_grid([])


# ---------------------------------------------------------------------------------------------
# Dataset root


PART = "p0"


def write_root(root: str, shards: list[list[str]], sets: dict[str, dict[str, str | None]],
               quarantined: dict[int, int] | None = None, failed: dict[tuple[str, int], int] | None = None,
               part_issues: int = 0) -> DatasetRoot:
    """A minimal prepared root: manifest, frame shards (clip ids per shard), caption sets, and the
    shard indexes (with the quarantine and caption-failure counts that tell readers which
    quarantine files exist)."""
    droot = DatasetRoot(root)
    frames_rows, cap_rows = [], {name: [] for name in sets}
    for unit, clip_ids in enumerate(shards):
        shard = Shard(PART, unit)
        rows = [{"clip_id": c, "video_id": c.split(".")[0], "source_uri": f"/v/{c}", "start_s": 0.0, "end_s": 1.0,
                 "subtitle": f"sub {c}", "frames": [jpeg(8, 8)], "frame_times_s": [0.5], "middle_frame": jpeg(8, 8),
                 "middle_frame_time_s": 0.5, "height": 8, "width": 8, "source_fps": 30.0} for c in clip_ids]
        write_table_atomic(droot.frames_uri(shard), pa.Table.from_pylist(rows, schema.FRAME_SCHEMA), OPTS)
        q = (quarantined or {}).get(unit, 0)
        frames_rows.append(frames_row({"part": PART, "unit": unit, "videos": 1, "clips": len(clip_ids) + q,
                                       "rows": len(clip_ids), "quarantined": q, "frames": len(clip_ids), "bytes": 1,
                                       "sha256": "s", "clip_ids_sha256": clip_ids_digest(clip_ids)}))
        for name, captions in sets.items():
            caps = [{"clip_id": c, "caption": captions.get(c)} for c in clip_ids]
            write_table_atomic(droot.caption_uri(name, shard), pa.Table.from_pylist(caps, schema.CAPTION_SCHEMA), OPTS)
            n = (failed or {}).get((name, unit), 0)
            cap_rows[name].append(captions_row({"part": PART, "unit": unit, "rows": len(clip_ids), "captioned": 0,
                                                "failed": n, "bytes": 1, "sha256": "s",
                                                "clip_ids_sha256": clip_ids_digest(clip_ids)}))
    for kind, rows in [(FRAMES, frames_rows)] + [(captions_kind(n), r) for n, r in cap_rows.items()]:
        delete_index(droot, kind)  # a shard's row never changes; this helper rewrites roots
        writer = IndexWriter(droot, kind)
        for row in rows:
            writer.add(row)
        writer.flush()
        compact_index(droot, kind, [PART])
    for name in sets:
        fs.write_json_atomic(droot.caption_set_uri(name), {"name": name, "status": "complete"}, OPTS)
    droot.write_manifest({"schema_version": schema.SCHEMA_VERSION, "status": "complete", "caption_sets": sorted(sets),
                          "parts": [{"name": PART, "issues": part_issues}]})
    return droot


def test_caption_table_joins_sets_by_shard_position(tmp_path):
    root = str(tmp_path / "root")
    write_root(root, [["a.0", "a.1"], ["b.0"]],
               {"blip": {"a.0": "x", "a.1": "y", "b.0": "z"}, "git": {"a.0": "X", "b.0": "Z"}})
    table = viz.caption_table(root)
    assert table.column_names == ["shard", "clip_id", "video_id", "subtitle", "blip", "git"]
    assert table.to_pylist()[1] == {"shard": "p0/part-00000", "clip_id": "a.1", "video_id": "a", "subtitle": "sub a.1",
                                    "blip": "y", "git": None}
    assert table["shard"].to_pylist() == ["p0/part-00000", "p0/part-00000", "p0/part-00001"]
    assert viz.caption_table(root, sets=["git"]).column_names[-1] == "git"


def test_caption_table_refuses_a_misaligned_set(tmp_path):
    root = str(tmp_path / "root")
    droot = write_root(root, [["a.0", "a.1"]], {"blip": {}})
    caps = [{"clip_id": c, "caption": "c"} for c in ("a.1", "a.0")]
    write_table_atomic(droot.caption_uri("blip", Shard(PART, 0)), pa.Table.from_pylist(caps, schema.CAPTION_SCHEMA),
                       OPTS)
    with pytest.raises(ValueError, match="'blip' part p0/part-00000 is not aligned"):
        viz.caption_table(root)


def test_read_frame_rows_stops_at_the_limit(tmp_path):
    root = str(tmp_path / "root")
    write_root(root, [["a.0", "a.1"], ["b.0"]], {})
    rows = viz.read_frame_rows(root, columns=("clip_id", "frames"), limit=3)
    assert [r["clip_id"] for r in rows] == ["a.0", "a.1", "b.0"]
    assert set(rows[0]) == {"clip_id", "frames"} and isinstance(rows[0]["frames"][0], bytes)
    assert len(viz.read_frame_rows(root, limit=1)) == 1


def test_quarantine_reasons_are_counted_per_source_and_stage(tmp_path):
    root = str(tmp_path / "root")
    write_root(root, [["a.0"], ["b.0"]], {"blip": {"a.0": "x"}})
    assert viz.quarantine_table(root).num_rows == 0
    assert viz.count_reasons(viz.quarantine_table(root)).num_rows == 0

    def rows(*items):
        return pa.Table.from_pylist([{"clip_id": c, "video_id": "v", "stage": s, "error": e, "source_uri": "/v"}
                                     for c, s, e in items], schema.QUARANTINE_SCHEMA)

    droot = write_root(root, [["a.0"], ["b.0"]], {"blip": {"a.0": "x"}}, quarantined={0: 3},
                       failed={("blip", 1): 1}, part_issues=1)
    write_table_atomic(droot.quarantine_uri(Shard(PART, 0)), rows(
        ("q1", "span", "span 3.00-9.50 s starts after the video ends (5.00 s)"),
        ("q2", "span", "span 1.00-8.00 s starts after the video ends (0.50 s)"),
        ("q3", "open", "cannot open video: InvalidDataError: bad data in '/data/v/q3.mp4'")), OPTS)
    write_table_atomic(droot.metadata_quarantine_uri(PART),
                       rows(("", "metadata", "/data/meta.jsonl:7: not valid JSON: Expecting value at column 1")), OPTS)
    write_table_atomic(droot.caption_quarantine_uri("blip", Shard(PART, 1)),
                       rows(("b.0", "caption", "cannot decode JPEG")), OPTS)

    table = viz.quarantine_table(root)
    assert table.num_rows == 5
    assert table.column_names == ["source", "clip_id", "video_id", "stage", "reason", "error"]
    counts = viz.count_reasons(table).to_pylist()
    assert counts[0] == {"source": "prepare", "stage": "span", "reason": "span #-# s starts after the video ends (# s)",
                         "count": 2}
    assert {"source": "caption/blip", "stage": "caption", "reason": "cannot decode JPEG", "count": 1} in counts
    assert {"source": "prepare", "stage": "metadata", "reason": "<path>: not valid JSON: Expecting value at column #",
            "count": 1} in counts
    assert len(counts) == 4


def test_error_reason_drops_paths_and_numbers():
    assert viz.error_reason("s3://bucket/m.jsonl:12: clip[0]: bad span") == "<path>: clip[#]: bad span"
    assert viz.error_reason("no frames named x_<i>.jpg") == "no frames named x_<i>.jpg"


# ---------------------------------------------------------------------------------------------
# MLflow, through a stand-in with MlflowClient's method names


class FakeClient:
    def __init__(self, runs: list[tuple[str, str, int]], history: dict[tuple[str, str], list[tuple[int, int, float]]]):
        self.runs = runs  # (name, run_id, start_time)
        self.history = history  # (run_id, key) -> [(step, timestamp, value)]

    def get_experiment_by_name(self, name):
        return SimpleNamespace(experiment_id="1") if name == "exp" else None

    def search_runs(self, experiment_ids, order_by=()):
        assert experiment_ids == ["1"] and order_by == ["attributes.start_time DESC"]
        runs = sorted(self.runs, key=lambda r: -r[2])
        return [SimpleNamespace(info=SimpleNamespace(run_name=n, run_id=i, status="FINISHED")) for n, i, _ in runs]

    def get_metric_history(self, run_id, key):
        return [SimpleNamespace(step=s, timestamp=t, value=v) for s, t, v in self.history.get((run_id, key), [])]

    def get_run(self, run_id):
        keys = {k for r, k in self.history if r == run_id}
        return SimpleNamespace(data=SimpleNamespace(metrics={k: 0.0 for k in keys}))


def test_find_runs_keeps_the_newest_run_of_each_name():
    client = FakeClient([("demo-pretrain-a", "r1", 1), ("demo-pretrain-a", "r2", 5), ("demo-finetune-a", "r3", 2),
                         ("demo-pretrain-b", "r4", 3)], {})
    assert viz.find_runs(client, "exp", "demo-pretrain-") == [
        viz.RunRef("demo-pretrain-a", "r2", "FINISHED"), viz.RunRef("demo-pretrain-b", "r4", "FINISHED")]
    assert [r.name for r in viz.find_runs(client, "exp")] == ["demo-finetune-a", "demo-pretrain-a", "demo-pretrain-b"]
    assert viz.find_runs(client, "missing") == []


def test_metric_history_sorts_by_step_and_keeps_the_latest_duplicate():
    client = FakeClient([], {("r", "train/loss"): [(2, 10, 0.5), (1, 11, 0.9), (2, 30, 0.4), (2, 20, 0.45)],
                             ("r", "train/lr"): [(1, 1, 1e-3)]})
    steps, values = viz.metric_history(client, "r", "train/loss")
    assert steps.tolist() == [1, 2] and values.tolist() == [0.9, 0.4]
    empty = viz.metric_history(client, "r", "val/t2v/R1")
    assert empty[0].size == 0 and empty[1].size == 0
    assert list(viz.metric_histories(client, "r")) == ["train/loss", "train/lr"]
    assert list(viz.metric_histories(client, "r", ["train/lr"])) == ["train/lr"]


def test_group_metric_keys():
    keys = ["train/vsc_loss", "train/loss", "train/fc_loss", "train/lr", "train/grad_norm", "train/samples_per_s",
            "val/t2v/R1", "system/cpu_utilization_percentage", "train/step", "train/logit_scale"]
    groups = viz.group_metric_keys(keys)
    assert groups["loss"] == ["train/fc_loss", "train/loss", "train/vsc_loss"]
    assert groups["lr"] == ["train/lr"] and groups["grad_norm"] == ["train/grad_norm"]
    assert groups["samples_per_s"] == ["train/samples_per_s"] and groups["validation"] == ["val/t2v/R1"]
    assert groups["system"] == ["system/cpu_utilization_percentage"]
    assert groups["other"] == ["train/logit_scale", "train/step"]
    assert viz.group_metric_keys([])["system"] == []


# ---------------------------------------------------------------------------------------------
# Retrieval


def test_top_k_is_best_first_with_ties_by_index():
    idx, scores = viz.top_k(np.array([0.1, 0.9, 0.5, 0.9, 0.2]), 3)
    assert idx.tolist() == [1, 3, 2] and scores.tolist() == [0.9, 0.9, 0.5]
    assert viz.top_k(np.array([0.3, 0.1]), 5)[0].tolist() == [0, 1]
    with pytest.raises(ValueError):
        viz.top_k(np.zeros((2, 2)), 1)
    with pytest.raises(ValueError):
        viz.top_k(np.zeros(3), 0)


def test_importing_viz_pulls_in_no_heavy_framework():
    code = ("import sys, pipeline.viz; "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
