"""`evaluate` and `finetune` through the real CLI on the synthetic retrieval splits.

evaluate: two models side by side (CLIP-ViP and the mean-pooling baseline), a corrupt video
reported and left out (exactly the decodable N ranked), results.json + MLflow.
finetune: 2 CPU workers, DeepSpeed ZeRO-1 on gloo, validation picks the best weights; the job is
killed after its first checkpoint and resubmitted: it resumes there, finishes, and MLflow holds
each step once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, kill_job
from tests.integration.conftest import CHECKPOINT_SNAPSHOT, checkpoint_committed, clipvip

ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
TINY = ["model.preset=tiny", "model.max_text_len=16"]


def sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


@pytest.fixture(scope="module")
def split(sample_data, tmp_path_factory):
    """The synthetic retrieval set, with one test video replaced by garbage."""
    root = tmp_path_factory.mktemp("retrieval")
    videos = shutil.copytree(sample_data.retrieval_video_root, root / "videos")
    test_rows = [json.loads(line) for line in open(sample_data.retrieval_jsonl, encoding="utf-8")]
    (videos / f"{test_rows[0]['clip_id']}.mp4").write_bytes(b"\x00\x00\x00 this is not an mp4")
    return {"videos": str(videos), "test": sample_data.retrieval_jsonl, "train": sample_data.retrieval_train_jsonl,
            "val": sample_data.retrieval_val_jsonl, "pairs": sample_data.retrieval_train_pairs,
            "test_pairs": sample_data.retrieval_test_pairs,
            "val_pairs": os.path.join(os.path.dirname(sample_data.retrieval_val_jsonl), "val_pairs.json"),
            "bad": test_rows[0]["clip_id"], "n_test": len(test_rows)}


def test_evaluate_two_models_side_by_side(ray_local, split, tmp_path):
    """In-process on the session's Ray (the CLI path is the next test): encode tasks + actors."""
    from pipeline.config import EvaluateJobConfig, load_config
    from pipeline.eval.evaluate import resolve_paths, run_evaluate

    out, db = tmp_path / "eval", tmp_path / "mlflow.db"
    cfg = resolve_paths(load_config(EvaluateJobConfig, None, [
        "run_name=smoke", "eval.data.format=msrvtt", f"eval.data.annotations={split['test']}",
        f"eval.data.video_root={split['videos']}", "eval.data.num_frames=4", "eval.image_size_px=32",
        f"eval.data.order_pairs={split['test_pairs']}",
        f"eval.out={out}", f"tracking.tracking_uri=sqlite:///{db}", "ray.progress_bars=false",
        "eval.models=[{name: clip-vip, model: {preset: tiny, max_text_len: 16}}, {name: meanpool, model: {preset: tiny, "
        "max_text_len: 16, add_cls_num: 0, use_temporal_embed: false, video_pooling: mean}}]"]))
    summary = run_evaluate(cfg, log=lambda *_: None)
    text = summary.render()
    n = split["n_test"] - 1
    assert f"{n} of {split['n_test']} videos ranked" in text
    assert f"undecodable {split['bad']}" in text
    for row in ("clip-vip ", "clip-vip+dsl", "meanpool ", "chance"):
        assert row in text, text
    doc = json.load(open(out / "smoke" / "results.json", encoding="utf-8"))
    assert doc["num_evaluated"] == n and set(doc["results"]) == {"clip-vip", "clip-vip+dsl", "meanpool", "meanpool+dsl"}
    assert doc["chance"]["t2v/R1"] == pytest.approx(100 / n)
    sims = np.load(out / "smoke" / "sim_clip-vip.npz")
    assert sims["sim_TV"].shape == (n, n) and split["bad"] not in sims["clip_ids"].tolist()
    assert not np.allclose(np.load(out / "smoke" / "sim_meanpool.npz")["sim_TV"], sims["sim_TV"])  # two models
    # Order awareness over the test pairs whose both clips decoded: mean pooling sees a clip and its
    # reversed twin as the same frames, so it is exactly at the order-blind 50.
    assert doc["results"]["meanpool"]["order/aware"] == 50.0 and "order/aware" not in doc["results"]["meanpool+dsl"]
    assert 0.0 <= doc["results"]["clip-vip"]["order/aware"] <= 100.0 and doc["chance"]["order/aware"] == 50.0
    assert "order-aware %" in text

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("clipvip").experiment_id])
    assert run.data.metrics["clip-vip/t2v/R1"] == pytest.approx(doc["results"]["clip-vip"]["t2v/R1"])
    assert "meanpool/dsl/t2v/R1" in run.data.metrics and run.data.metrics["meanpool/order/aware"] == 50.0


def test_evaluate_refuses_a_missing_split(tmp_path):
    proc = clipvip("evaluate", *sets(f"eval.data.annotations={tmp_path}/none.jsonl", f"eval.data.video_root={tmp_path}",
                                     "eval.models=[{name: m}]"), env=ENV)
    assert proc.returncode == 2 and "none.jsonl" in proc.stderr


def finetune_args(split, storage, db, run_name, *extra):
    return ["finetune", *sets(
        f"run_name={run_name}", *TINY, f"train.storage_path={storage}", f"tracking.tracking_uri=sqlite:///{db}",
        "tracking.system_metrics=false", "tracking.register_model=null", "train.num_workers=2",
        "train.micro_batch_size=2", "train.max_steps=6", "train.checkpoint_every_steps=2", "train.num_frames=4",
        "train.image_size_px=32", "train.precision=fp32", "train.lr=1e-3", "train.grad_clip=1.0",
        f"data.train.annotations={split['train']}", f"data.train.video_root={split['videos']}",
        f"data.val.annotations={split['val']}", f"data.val.video_root={split['videos']}",
        f"data.val.order_pairs={split['val_pairs']}", "train.val_every_steps=3", "data.cache_decoded_mb=64", f"data.batch_groups={split['pairs']}",
        "ray.num_cpus=4", *extra)]


def test_finetune_killed_and_resubmitted_resumes(split, tmp_path):
    storage, db = tmp_path / "runs", tmp_path / "mlflow.db"
    args = finetune_args(split, storage, db, "ft")
    first_log = open(tmp_path / "first.log", "w+")  # a file, not a pipe: a full pipe would stall the run
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=dict(os.environ, **ENV),
                            stdout=first_log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 800  # an event wait; the bound is for a run that never checkpoints
    snapshot = storage / "ft" / CHECKPOINT_SNAPSHOT

    def committed() -> bool:
        return snapshot.exists() and checkpoint_committed(snapshot.read_text())

    while time.time() < deadline and proc.poll() is None and not committed():
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + open(tmp_path / "first.log").read()[-3000:]
    assert committed(), "no checkpoint recorded within 800 s"
    kill_job(proc)

    again = clipvip(*args, env=ENV, timeout=840)
    assert again.returncode == 0, again.stderr[-4000:]
    log = again.stdout + again.stderr
    assert "[finetune] resumed at step " in log, log[-3000:]
    assert "[finetune] done: 6 steps" in log
    assert (storage / "ft-best" / "model.safetensors").exists()
    assert (storage / "ft-export" / "model.safetensors").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("clipvip").experiment_id])
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert loss_steps == sorted(set(loss_steps)) and loss_steps[-1] == 6, loss_steps
    for key in ("train/lr", "train/samples_per_s", "train/epoch", "train/grad_norm", "train/data_wait_s",
                "train/skipped_videos", "train/logit_scale"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == loss_steps, (key, steps)
    for key in ("val/t2v/R1", "val/order/aware"):
        val_steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert val_steps == [3, 6], (key, val_steps)
    assert run.data.params["data.select_metric"] == "t2v/R1"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "best_model"} <= artifacts, artifacts


def test_finetune_refuses_unreadable_batch_groups(split, tmp_path):
    bad = tmp_path / "groups.json"
    bad.write_text('{"not": "a list"}')
    for path, why in ((tmp_path / "absent.json", "cannot read"), (bad, "must hold a JSON list")):
        proc = clipvip(*finetune_args(split, tmp_path / "runs", tmp_path / "db", "g", f"data.batch_groups={path}"))
        assert proc.returncode == 2 and "data.batch_groups" in proc.stderr and why in proc.stderr, proc.stderr
        assert not (tmp_path / "runs").exists()
