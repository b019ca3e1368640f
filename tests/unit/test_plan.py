"""`clipvip plan`'s reports from gathered facts (pure): HD-VILA-100M shapes, the fit checks that
must fail for the recipes as shipped, the cluster shape from `ray.nodes()`, GPU results."""

from __future__ import annotations

import json

import pytest

from pipeline import plan
from pipeline.config import PrepareJobConfig, PretrainJobConfig, load_config

HDVILA_PARTS = [{"name": f"hdvila_part{i}", "uri": f"s3://b/meta/hdvila_part{i}.jsonl", "videos": 300_000,
                 "clips": 9_363_636, "units": 18_289, "issues": 12, "clip_seconds": 9_363_636 * 13.4,
                 "max_unit_clips": 560, "size": 690_000_000} for i in range(11)]


def prepare_cfg(*extra):
    return load_config(PrepareJobConfig, None, [
        "root=s3://b/root", "data.metadata=s3://b/meta", "data.video_root=s3://b/videos",
        "data.subtitles=s3://b/subs.parquet", "data.clips_per_shard=512", "frames.max_frames=48",
        "caption.model=Salesforce/blip-image-captioning-large", "ray.cluster.head_memory_gb=32",
        "ray.cluster.cpu_node_cpus=32", "ray.cluster.cpu_node_memory_gb=64", "ray.cluster.gpu_node_cpus=64",
        "ray.cluster.gpu_node_gpus=8", "ray.cluster.gpu_node_memory_gb=480", *extra])


def checks(report):
    return {c.name: c.ok for c in report.checks}


def test_prepare_at_corpus_scale():
    cfg = prepare_cfg()
    res = plan.resources_from(cfg.ray)
    rep = plan.build_prepare_report(cfg, HDVILA_PARTS, done_units=1000, refused=None, res=res, gpu={})
    facts = dict(rep.facts)
    assert facts["clips"] == 11 * 9_363_636 and facts["units (shards)"] == 11 * 18_289
    assert facts["frames stored a clip"] == 41  # 13.4 s at 3 fps, + the middle frame
    est = {k: v for k, v, _ in rep.estimates}
    assert est["output TB"] == pytest.approx(11 * 9_363_636 * 41 * 25_000 / 1e12)  # ~106 TB of 240p JPEG
    assert est["caption GPU-hours"] == "unknown"
    ok = checks(rep)
    assert ok["driver memory"] is True and ok["inputs and root"] is True and ok["GPUs for captioning"] is True
    # Unset, the reservation follows the largest unit: 560 clips x 49 frames at most x 25 KB held,
    # 0.35 GiB + 2.8x that + a 64 MiB video read whole = 2.20 GiB, reserved as 2.25.
    assert est["decode task memory GiB"] == 2.25 and ok["decode task memory"] is True
    assert ok["decode task on a CPU node"] is True and not rep.failed
    small = plan.build_prepare_report(prepare_cfg("ray.decode_memory_gb=1"), HDVILA_PARTS, 0, None, res, {})
    assert [c.name for c in small.failed] == ["decode task memory"] and "raise it to 2.25" in small.failed[0].detail
    fits = plan.build_prepare_report(prepare_cfg("ray.decode_memory_gb=2.5"), HDVILA_PARTS, 0, None, res, {})
    assert not fits.failed
    assert json.loads(json.dumps(fits.to_json()))["fits"] is True
    assert "verdict: fits" in fits.render()


def test_refusal_and_empty_input_fail():
    cfg = prepare_cfg()
    rep = plan.build_prepare_report(cfg, [], 0, "frames.fps: 3.0 -> 2.0", plan.resources_from(cfg.ray), {})
    assert {c.name for c in rep.failed} == {"inputs and root", "clips to prepare"}
    assert "does NOT fit" in rep.render()


def test_pretrain_loader_cpus_per_gpu():
    cfg = load_config(PretrainJobConfig, "jobs/configs/hdvila_b32.yaml", [])
    res = plan.resources_from(cfg.ray)
    rep = plan.build_pretrain_report(cfg, rows=100_000_000, open_error=None, params=151_000_000,
                                     flops_per_clip=0.371e12, res=res, gpu={})
    facts, est = dict(rep.facts), {k: v for k, v, _ in rep.estimates}
    assert facts["global batch"] == 1024 and facts["steps"] == 3 * (100_000_000 // 1024)
    assert est["checkpoint GB"] == 2.42 and "clips/s per GPU" in est
    loader = next(c for c in rep.checks if c.name == "loader CPUs per GPU")
    assert loader.ok is True and "6.0 left per GPU" in loader.detail  # at the assumed MFU, just
    # The transform on the 240p frames prepare stores (what training decoded before views) does not fit.
    before = plan.build_pretrain_report(cfg, 100_000_000, None, 151_000_000, 0.371e12, res,
                                        {"transform_clips_per_s_per_core": 47.0})
    assert next(c for c in before.checks if c.name == "loader CPUs per GPU").ok is False
    measured = plan.build_pretrain_report(cfg, 100_000_000, None, 151_000_000, 0.371e12, res,
                                          {"train_b32": 120.0, "file": "gpu-x.json"})
    assert next(c for c in measured.checks if c.name == "loader CPUs per GPU").ok is True
    missing = plan.build_pretrain_report(cfg, None, "no manifest.json", 151_000_000, 0.371e12, res, {})
    assert [c.name for c in missing.failed] == ["dataset opens"]


def test_resources_from_ray_nodes_and_this_machine():
    nodes = [{"Alive": True, "Resources": {"CPU": 0, "memory": 32 * 2**30, "node:__internal_head__": 1}},
             {"Alive": True, "Resources": {"CPU": 32, "memory": 64 * 2**30}},
             {"Alive": True, "Resources": {"CPU": 64, "GPU": 8, "memory": 480 * 2**30}},
             {"Alive": False, "Resources": {"CPU": 64, "GPU": 8, "memory": 480 * 2**30}}]
    cfg = prepare_cfg()
    res = plan.resources_from(cfg.ray, nodes)
    assert (res.head_memory_gb, res.cpu_node_cpus, res.gpu_node_cpus, res.gpu_node_gpus, res.total_gpus) == \
        (pytest.approx(32), 32, 64, 8, 8)
    local = plan.resources_from(load_config(PrepareJobConfig, None, [
        "root=r", "data.metadata=m", "data.video_root=v", "data.subtitles=s"]).ray)
    assert local.source.startswith("this machine") and local.head_memory_gb > 0


def test_measured_gpu_reads_the_newest_full_result(tmp_path):
    def write(name, mode, blip):
        report = {"meta": {"mode": mode, "gpu": "NVIDIA H100"}, "parts": {
            "train_b32": {"status": "ok", "result": {"clips_per_s": 900.0}},
            "captioner": {"status": "ok", "result": {"best": {"random-blip-large bfloat16": {"images_per_s": blip}}}},
            "ingest": {"status": "failed", "error": "x"}}}
        (tmp_path / name).write_text(json.dumps(report))

    assert plan.measured_gpu(str(tmp_path)) == {}
    write("gpu-20261201-h100.json", "full", 100.0)
    write("gpu-20261205-h100.json", "full", 150.0)
    write("gpu-20261206-smoke.json", "smoke", 1.0)
    got = plan.measured_gpu(str(tmp_path))
    assert got["caption_images_per_s"] == 150.0 and got["train_b32"] == 900.0 and "transform_clips_per_s_per_core" not in got


def test_pack_report_at_corpus_scale():
    from pipeline.config import PackJobConfig
    from pipeline.plan_pack import build_pack_report

    cfg = load_config(PackJobConfig, "jobs/configs/hdvila_pack.yaml", [])
    res = plan.resources_from(cfg.ray)
    rep = build_pack_report(cfg, rows=103_000_000, shards=201_172, frames_per_clip=32.0, task_memory=3 << 30,
                            refused=None, res=res)
    facts, est = dict(rep.facts), {k: v for k, v, _ in rep.estimates}
    assert facts["tasks"] == 12_574 and facts["view shards"] == 12_574 * 8
    assert 60 < est["output TB"] < 75 and est["pack CPU-hours"] > 1000
    assert not rep.failed
    refused = build_pack_report(cfg, 0, 0, 0, 0, "caption set 'x' not found", res)
    assert [c.name for c in refused.failed] == ["root, caption set and view", "clips to pack"]
