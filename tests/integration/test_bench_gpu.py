"""`bench/gpu.py` is the check run whenever a GPU is at hand; its CPU smoke mode runs here so that
the script cannot rot: every part measures through the project's own code at tiny sizes, one part
through the per-part child process the GPU run uses, and a failing part is recorded while the
others still run. (The bf16 pretrain part runs in test_pretrain.py, on that module's root.)"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def gpu_check(tmp_path, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return proc, json.loads(out.read_text())


def test_smoke_runs_every_part_through_the_project_code(tmp_path):
    proc, report = gpu_check(tmp_path, "--parts", "env,train_b32,train_b16,attention,captioner,ingest")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = report["parts"]
    assert {k: v["status"] for k, v in parts.items()} == dict.fromkeys(parts, "ok"), parts
    assert report["meta"]["mode"] == "smoke" and parts["env"]["result"]["libraries"]["deepspeed"]
    for name in ("train_b32", "train_b16"):
        res = parts[name]["result"]
        assert res["engine"].startswith("deepspeed") and res["backend"] == "gloo" and res["precision"] == "bf16"
        assert res["micro_batch"] == 4 and [p["micro_batch"] for p in res["probe"]] == [2, 4]
        assert res["clips_per_s"] > 0 and res["gflops_per_clip"] > 0 and res["losses_finite"]
        assert res["mfu"] is None  # no peak known for a CPU: not guessed
    rows = parts["attention"]["result"]["rows"]
    assert [(r["scope"], r["path"]) for r in rows] == [(s, p) for s in ("core", "attention")
                                                      for p in ("sparse", "dense", "dense-math")]
    assert all(r["ms"] > 0 and r["peak_mib"] > 0 and r["kernels"] for r in rows), rows
    assert all(r["kernels"] == ["math"] for r in rows if r["path"] == "dense-math"), rows
    cap = parts["captioner"]["result"]
    assert {(r["captioner"], r["dtype"], r["batch"]) for r in cap["rows"]} == {
        (c, d, b) for c in ("tiny-blip", "tiny-git") for d in ("float32", "bfloat16") for b in (1, 4)}
    assert all(r["images_per_s"] > 0 for r in cap["rows"])
    ingest = parts["ingest"]["result"]
    assert ingest["clips_per_s_one_core"] > 0 and ingest["clips_per_s_all_cores"] > 0
    assert ingest["gpu_jpeg"]["status"] == "unavailable"
    assert "train_b32" in proc.stdout and "MFU" in proc.stdout  # the printed table


def test_train_part_on_the_plain_torch_engine(tmp_path):
    """The engine a bare GPU box without DeepSpeed falls back to, and the baseline of the ratio."""
    proc, report = gpu_check(tmp_path, "--parts", "train_b32", "--engine", "torch")
    res = report["parts"]["train_b32"]["result"]
    assert proc.returncode == 0 and res["engine"].startswith("torch AdamW"), report
    assert res["clips_per_s"] > 0 and res["losses_finite"]


def test_a_failed_part_is_reported_and_the_others_still_run(tmp_path):
    proc, report = gpu_check(tmp_path, "--isolate", "--parts", "pretrain,env", "--root", str(tmp_path / "missing"))
    assert proc.returncode == 1, proc.stdout[-3000:]
    parts = report["parts"]
    assert parts["pretrain"]["status"] == "failed" and "pretrain refused" in parts["pretrain"]["error"], parts
    assert parts["env"]["status"] == "ok" and parts["env"]["result"]["torch"]
