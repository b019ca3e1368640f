"""`clipvip plan` through the real CLI: a prepare recipe planned on a local Ray instance (nothing
written), a check that fails exits 3 naming it, pretrain and recaption recipes against a root."""

from __future__ import annotations

import json

from tests.integration.conftest import clipvip
from tests.integration.test_root_index import build_root


def plan(*args: str):
    proc = clipvip("plan", *args, timeout=300)
    report = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else None
    return proc, report


def sets(**kv: str) -> list[str]:
    return [a for k, v in kv.items() for a in ("--set", f"{k}={v}")]


def test_prepare_plan_writes_nothing_and_counts_the_job(sample_data, tmp_path):
    root = tmp_path / "root"
    base = sets(**{"root": str(root), "data.metadata": sample_data.metadata_path,
                   "data.video_root": sample_data.video_root, "data.subtitles": sample_data.subtitles_table,
                   "ray.num_cpus": "2"})
    proc, report = plan("--config", "jobs/configs/tiny.yaml", *base, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    clips = sum(len(json.loads(line)["clip"]) for line in open(sample_data.metadata_path))
    facts = report["facts"]
    assert facts["clips"] == clips and facts["units (shards)"] >= 1 and facts["units already done"] == 0
    assert report["fits"] and {c["name"] for c in report["checks"]} >= {"driver memory", "decode task memory"}
    assert not root.exists(), "a dry run writes nothing"
    proc, report = plan("--config", "jobs/configs/tiny.yaml", *base, "--set", "ray.decode_memory_gb=0.001")
    assert proc.returncode == 3
    assert "does not fit: decode task memory" in proc.stderr and "FAIL  decode task memory" in proc.stdout


def test_pretrain_and_recaption_plans_against_a_root(tmp_path):
    root = build_root("", str(tmp_path / "root"), {"part0": 12})  # 12 shards of 2 clips, local
    proc, _ = plan("--config", "jobs/configs/tiny_pretrain.yaml", *sets(**{"root": root.uri}))
    assert proc.returncode == 3 and "view 'tiny' not found" in proc.stderr and "clipvip pack" in proc.stderr
    packed = clipvip("pack", "--config", "jobs/configs/tiny_pack.yaml", *sets(root=root.uri, **{
        "view.caption_set": "default", "ray.progress_bars": "false"}))
    # This root's frames are stand-in bytes: no row decodes, and a view of nothing is refused.
    assert packed.returncode == 1 and "all 24 rows were left out" in packed.stderr, packed.stderr[-3000:]
    packed = clipvip("pack", "--config", "jobs/configs/tiny_pack.yaml", *sets(root=root.uri, **{
        "view.caption_set": "default", "ray.progress_bars": "false", "view.name": "raw", "view.image_size_px": "0"}))
    assert packed.returncode == 0, packed.stderr[-3000:]
    proc, report = plan("--config", "jobs/configs/tiny_pretrain.yaml", "--json",
                        *sets(**{"root": root.uri, "train.view": "raw"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = report["facts"]
    assert facts["clips"] == 24 and facts["global batch"] == 8 and facts["steps per epoch"] == 3
    assert facts["model parameters"] > 1_000_000 and report["estimates"]["checkpoint GB"]["value"] > 0
    proc, _ = plan("--config", "jobs/configs/tiny_pretrain.yaml", *sets(**{"root": str(tmp_path / "no")}))
    assert proc.returncode == 3 and "dataset opens" in proc.stderr and "no manifest.json" in proc.stderr
    proc, report = plan("--config", "jobs/configs/tiny_recaption.yaml", "--json", *sets(root=root.uri))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["facts"]["shards"] == 12 and report["facts"]["clips to caption"] == 24
