"""`pretrain` end to end through the real CLI: 2 CPU workers, DeepSpeed ZeRO-1/2 on gloo, the tiny
model, shards made by `prepare`. Resume after a killed worker and after a killed job must give
final weights bit-identical to an uninterrupted run; MLflow runs against a real `mlflow server`
on loopback; checkpoints go to a local S3 server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import PrepareJobConfig, RecaptionJobConfig, load_config
from pipeline.data.build import run_prepare
from pipeline.data.recaption import run_recaption
from tests.conftest import ROOT, free_port, kill_job
from tests.integration.conftest import CHECKPOINT_SNAPSHOT, checkpoint_committed, clipvip, pack_view

ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@pytest.fixture(scope="module")
def root(ray_local, sample_data, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pt") / "root")
    cfg = load_config(PrepareJobConfig, None, [
        f"root={path}", f"data.metadata={sample_data.metadata_path}", f"data.video_root={sample_data.video_root}",
        f"data.subtitles={sample_data.subtitles_table}", "data.clips_per_shard=3", "frames.short_side_px=64",
        "frames.max_frames=8", "caption.model=builtin:tiny-blip", "ray.progress_bars=false"])
    run_prepare(cfg, log=lambda *_: None)
    # Every pretrain run below trains on a second caption set made by `recaption` (issue 5:
    # pretrain selects a recaptioned set by name).
    recap = load_config(RecaptionJobConfig, None, [f"root={path}", "caption.set_name=git",
                                                  "caption.model=builtin:tiny-git", "ray.progress_bars=false"])
    run_recaption(recap, log=lambda *_: None)
    pack_view(path, "git", "git")
    return path


def pretrain_args(root, storage, tracking_uri, run_name, *extra):
    sets = [f"run_name={run_name}", f"root={root}", f"train.storage_path={storage}",
            f"tracking.tracking_uri={tracking_uri}", "tracking.system_metrics=false", "model.preset=tiny",
            "model.max_text_len=16", "train.view=git", "train.num_workers=2",
            "train.micro_batch_size=2", "train.max_steps=5", "train.checkpoint_every_steps=2",
            "train.num_frames=4", "train.image_size_px=32", "train.precision=fp32", "train.lr=1e-3",
            "train.warmup_ratio=0.2", "ray.num_cpus=4", *extra]
    return ["pretrain"] + [a for s in sets for a in ("--set", s)]


def final_weights(storage, run_name):
    return load_file(os.path.join(storage, run_name + "-export", "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback (sqlite backend, local artifact store)."""
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{d}/mlflow.db", "--artifacts-destination", f"file://{d}/artifacts",
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("mlflow server did not start")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:  # a busy machine: the server's workers are slow to stop
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def reference_zero1(root, mlflow_server, tmp_path_factory):
    storage = str(tmp_path_factory.mktemp("ref1"))
    proc = clipvip(*pretrain_args(root, storage, mlflow_server, "ref-z1", "train.zero_stage=1",
                                  "train.log_sample_ids=true", "train.peak_tflops=0.5",
                                  "train.profile_steps=[2, 3]"), env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return storage, proc


def test_uninterrupted_run_logs_to_mlflow_server(reference_zero1, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    storage, proc = reference_zero1
    assert "pretrain summary" in proc.stdout
    assert re.search(r"throughput +[\d.]+ samples/s, [\d.]+ per worker, [\d.e-]+ model TFLOP/s per worker, "
                     r"MFU [\d.]+%", proc.stdout), proc.stdout[-2000:]
    assert "caption set 'git'" in proc.stdout
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("clipvip")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`mlflow.runName` = 'ref-z1'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["train.zero_stage"] == "1" and run.data.params["loss.variant"] == "vsc_fc"
    for key in ("train/loss", "train/vsc_loss", "train/fc_loss", "train/logit_scale", "train/lr",
                "train/grad_norm", "train/samples_per_s", "train/data_wait_frac", "train/data_wait_s",
                "train/step_time_s", "train/skipped_rows", "train/epoch", "train/samples_per_s_per_worker",
                "train/tflops_per_worker", "train/mfu"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == [1, 2, 3, 4, 5], (key, steps)
    trace = client.download_artifacts(run.info.run_id, "profiles/steps_2-3.json", str(tmp_path))
    assert json.load(open(trace))["traceEvents"], "the profile of steps 2-3 opens and holds events"
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert {"config/job.json", "config/deepspeed.json"} <= arts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {"model/config.json",
                                                                                  "model/model.safetensors"}
    versions = client.search_model_versions("name = 'clip-vip'")
    assert any(v.run_id == run.info.run_id for v in versions)
    weights = final_weights(storage, "ref-z1")
    assert any(k.endswith("added_cls") for k in weights)


def _descendants(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def test_worker_killed_resumes_bit_identical(root, sample_data, reference_zero1, mlflow_server, tmp_path):
    """A training worker killed after step 3: the group restarts from the step-2 checkpoint and
    ends with the uninterrupted run's weights, bit for bit, though this run also validates
    zero-shot every 2 steps (validation must not touch training), and logs each step's training
    and validation metrics once."""
    ref_storage, _ = reference_zero1
    storage = str(tmp_path / "runs")
    args = pretrain_args(root, storage, mlflow_server, "kill-worker", "train.zero_stage=1",
                         f"val.annotations={sample_data.retrieval_jsonl}",
                         f"val.video_root={sample_data.retrieval_video_root}", "train.val_every_steps=2")
    log = open(tmp_path / "driver.log", "w+")  # a file, not a pipe: a full pipe would stall the run
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=dict(os.environ, **ENV),
                            stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed = None
    deadline = time.time() + 800  # an event wait; the bound is for a run that never gets there
    while time.time() < deadline and proc.poll() is None and killed is None:
        # Step 3 logged means the step-2 checkpoint is committed (report() is a barrier).
        if "[pretrain] step 3/" in open(tmp_path / "driver.log").read():
            for p in _descendants(proc.pid):
                try:
                    if "RayTrainWorker" in " ".join(p.cmdline()):
                        p.kill()
                        killed = p.pid
                        break
                except psutil.Error:
                    continue
        time.sleep(0.05)
    proc.wait(timeout=600)
    out = open(tmp_path / "driver.log").read()
    assert killed, "no training worker was killed"
    assert proc.returncode == 0, out[-4000:]
    lines = [ln[-160:] for ln in out.splitlines() if "[pretrain]" in ln or "rror" in ln]
    assert "resumed at step" in out, "the group restarted from a checkpoint:\n" + "\n".join(lines[-30:])
    assert_same_weights(final_weights(storage, "kill-worker"), final_weights(ref_storage, "ref-z1"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("clipvip")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`mlflow.runName` = 'kill-worker'")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4, 5], f"each step logged exactly once across the restart: {steps}"
    for key in ("val/t2v/R1", "val/v2t/R5", "val/t2v/MdR", "val/num_videos"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == [2, 4, 5], f"{key}: validated every 2 steps and at the end, once each: {steps}"
    assert re.search(r"zero-shot val +t2v R@1 best [\d.]+ at step [245] ", out), out[-3000:]


def test_job_killed_and_resubmitted_zero2_on_s3(root, sample_data, reference_zero1, s3_server, tmp_path):
    """ZeRO-2 with checkpoints on S3, the whole job killed and resubmitted. With 2 fp32 ranks ZeRO-2
    (reduce-scatter) and ZeRO-1 (all-reduce) do the same arithmetic, so the uninterrupted ZeRO-1
    run is the reference (checked bit-identical when this test was written). The run validates
    zero-shot every 2 steps: each validated step is logged once across the kill."""
    import boto3

    ref_storage, _ = reference_zero1
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="runs")
    db = f"sqlite:///{tmp_path}/mlflow.db"
    common = ("train.zero_stage=2", f"storage.s3_endpoint_url={s3_server}", "train.val_every_steps=2",
              f"val.annotations={sample_data.retrieval_jsonl}", f"val.video_root={sample_data.retrieval_video_root}")

    args = pretrain_args(root, "s3://runs/kill", db, "kill-job", *common)
    first_log = open(tmp_path / "first.log", "w+")  # a file, not a pipe: a full pipe would stall the run
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=dict(os.environ, **ENV),
                            stdout=first_log, stderr=subprocess.STDOUT, start_new_session=True)
    s3 = boto3.client("s3", endpoint_url=s3_server)

    def snapshot() -> str | None:
        try:
            return s3.get_object(Bucket="runs", Key=f"kill/kill-job/{CHECKPOINT_SNAPSHOT}")["Body"].read().decode()
        except s3.exceptions.NoSuchKey:
            return None

    deadline = time.time() + 800  # an event wait; the bound is for a run that never gets there
    while time.time() < deadline and proc.poll() is None and not checkpoint_committed(snapshot()):
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + open(tmp_path / "first.log").read()[-3000:]
    kill_job(proc)

    again = clipvip(*args, env=ENV, timeout=840)  # beside two busy processes a resubmission took over 600 s
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed at step" in again.stdout + again.stderr

    def s3_weights(prefix):
        local = tmp_path / prefix.replace("/", "_")
        local.mkdir()
        path = str(local / "model.safetensors")
        s3.download_file("runs", f"{prefix}/model.safetensors", path)
        return load_file(path)

    assert_same_weights(s3_weights("kill/kill-job-export"), final_weights(ref_storage, "ref-z1"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(db)
    (run,) = client.search_runs([client.get_experiment_by_name("clipvip").experiment_id],
                                filter_string="tags.`mlflow.runName` = 'kill-job'")
    for key in ("train/loss", "val/t2v/R1"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        want = [1, 2, 3, 4, 5] if key == "train/loss" else [2, 4, 5]
        assert steps == want, f"{key}: each step once across the kill and resubmission: {steps}"


def test_bf16_pretrain_through_the_gpu_check(root, tmp_path):
    """bench/gpu.py's pretrain part, the one a GPU runs on NCCL, here on gloo: `clipvip pretrain`
    with train.precision=bf16 (the recipes' precision) through Ray Train + DeepSpeed, loss finite
    at every step (read back from MLflow)."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--parts", "pretrain", "--root", root,
                           "--view", "git", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=840)
    part = json.loads(out.read_text())["parts"]["pretrain"]
    assert proc.returncode == 0 and part["status"] == "ok", part
    res = part["result"]
    assert res["precision"] == "bf16" and res["backend"] == "gloo" and res["steps"] == 3
    assert res["final_loss"] == res["final_loss"] and res["samples_per_s"] > 0


def test_finish_survives_a_kill_at_each_point_bf16_zero3(root, mlflow_server, tmp_path):
    """The finish (pipeline/train/finish.py) killed with kill -9 at each of its points and the job
    resubmitted each time: the run ends with its export, its artifacts and one registered version,
    each done once. bf16 with ZeRO-3 on 2 ranks: the recipes' precision, and the stage that gathers
    the weights to export them."""
    from mlflow.tracking import MlflowClient

    storage = str(tmp_path / "runs")
    model_name = "clipvip-finish-test"
    args = pretrain_args(root, storage, mlflow_server, "finish", "train.zero_stage=3", "train.precision=bf16",
                         "train.max_steps=2", f"tracking.register_model={model_name}")
    client = MlflowClient(mlflow_server)
    export = os.path.join(storage, "finish-export")
    for point in ("checkpoint", "export", "artifacts"):
        marker = tmp_path / f"paused-at-{point}"
        log = open(tmp_path / f"{point}.log", "w+")
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT,
                                env=dict(os.environ, **ENV, CLIPVIP_PAUSE_AT=f"{point}:{marker}"),
                                stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.time() + 800
        while time.time() < deadline and proc.poll() is None and not marker.exists():
            time.sleep(0.1)
        assert marker.exists(), f"never paused at {point}:\n" + open(tmp_path / f"{point}.log").read()[-3000:]
        kill_job(proc)
        run_id = client.search_runs([client.get_experiment_by_name("clipvip").experiment_id],
                                    filter_string="tags.`mlflow.runName` = 'finish'")[0].info.run_id
        tags = client.get_run(run_id).data.tags
        done = sorted(k.split("clipvip.finish.")[1] for k in tags if k.startswith("clipvip.finish."))
        # What each kill left: nothing of the finish, then the export alone, then the artifacts too.
        assert os.path.exists(export + ".done.json") == (point != "checkpoint"), point
        assert done == {"checkpoint": [], "export": [], "artifacts": ["artifacts.model"]}[point], (point, done)

    final = clipvip(*args, env=ENV, timeout=840)
    assert final.returncode == 0, final.stderr[-4000:]
    out = final.stdout + final.stderr
    assert "weights of step 2 already at" in out, "the export was recorded done and not redone"
    tags = client.get_run(run_id).data.tags
    assert tags["clipvip.finish.artifacts.model"] == "done" and "clipvip.finish.registered.model" in tags
    artifacts = {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"model/model.safetensors", "model/config.json"} <= artifacts
    versions = client.search_model_versions(f"name = '{model_name}'")
    assert [v.run_id for v in versions] == [run_id], "one registered version, of this run"
    weights = final_weights(storage, "finish")
    assert weights and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())


def test_one_worker_with_gradient_caching_trains_the_two_worker_run(root, reference_zero1, mlflow_server, tmp_path):
    """Global negatives on fewer GPUs: 1 worker embedding the global batch of 4 in 2 chunks of 2
    (train.global_batch_size) trains what 2 workers with micro batch 2 train: the same samples
    each step (the view order is one of global batches), the same losses, the same weights up to
    fp32 rounding."""
    from mlflow.tracking import MlflowClient

    ref_storage, _ = reference_zero1
    storage = str(tmp_path / "runs")
    proc = clipvip(*pretrain_args(root, storage, mlflow_server, "gradcache", "train.zero_stage=1",
                                  "train.num_workers=1", "train.global_batch_size=4"), env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "global batch 4 (workers 1 x chunks 2 x micro batch 2)" in proc.stdout + proc.stderr
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("clipvip")

    def losses(name):
        (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.runName` = '{name}'")
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}

    ref, got = losses("ref-z1"), losses("gradcache")
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4, 5]
    assert all(abs(got[s] - ref[s]) <= 1e-5 * abs(ref[s]) for s in ref), (got, ref)
    a, b = final_weights(storage, "gradcache"), final_weights(ref_storage, "ref-z1")
    num = sum(float((a[k] - b[k]).float().norm() ** 2) for k in b) ** 0.5
    den = sum(float(b[k].float().norm() ** 2) for k in b) ** 0.5
    assert num / den <= 1e-5, num / den


def committed_steps(snapshot_path) -> list[int]:
    """Steps whose checkpoints Ray Train has recorded (a resubmission resumes from the last)."""
    try:
        text = open(snapshot_path).read()
    except FileNotFoundError:
        return []
    if not checkpoint_committed(text):
        return []
    return [r["metrics"]["step"] for r in json.loads(text)["checkpoint_results"]]


def test_resumed_on_one_worker_and_back_on_two(root, reference_zero1, mlflow_server, tmp_path):
    """Resume on another GPU count: 2 workers killed after their first recorded checkpoint, the
    job resubmitted on 1 worker (gradient caching keeps the global batch of 4) and killed after
    its own first checkpoint, then resubmitted on 2 to the end. Every step trains the clips the uninterrupted 2-worker
    run trained (logged ids equal), each step is logged once, and the final weights are within
    1e-5 of that run's."""
    from mlflow.tracking import MlflowClient

    ref_storage, _ = reference_zero1
    storage = str(tmp_path / "runs")
    snapshot = os.path.join(storage, "reshape", CHECKPOINT_SNAPSHOT)

    def args(workers: int) -> list[str]:
        return pretrain_args(root, storage, mlflow_server, "reshape", "train.zero_stage=1", "train.global_batch_size=4",
                             "train.log_sample_ids=true", f"train.num_workers={workers}")

    logs = []
    for workers in (2, 1):
        log_path = tmp_path / f"on{workers}.log"
        # Unbuffered: the run is killed, and a buffered driver would lose what it printed.
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args(workers)], cwd=ROOT,
                                env=dict(os.environ, **ENV, PYTHONUNBUFFERED="1"), stdout=open(log_path, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        before = max(committed_steps(snapshot), default=0)
        deadline = time.time() + 800  # an event wait; the bound is for a run that never gets there
        # Killed once it has recorded a checkpoint of its own: which step that is depends on the
        # machine's speed (Ray Train records checkpoints asynchronously), so the test reads it.
        while time.time() < deadline and proc.poll() is None and max(committed_steps(snapshot), default=0) <= before:
            time.sleep(0.1)
        # The 1-worker run may finish its last step before the kill lands: then the 2-worker
        # resubmission reshapes the final checkpoint instead, which is as good a test.
        assert proc.poll() is None or (workers == 1 and proc.returncode == 0), open(log_path).read()[-3000:]
        kill_job(proc)
        logs.append(open(log_path).read())
    final = clipvip(*args(2), env=ENV, timeout=840)
    assert final.returncode == 0, final.stderr[-4000:]
    # The step each resume starts from is the last one Ray Train recorded before the kill, which
    # the machine's speed decides; what is checked is that each resume crossed worker counts.
    assert re.search(r"\[resume\] step \d+ was written by 2 workers; resuming on 1", logs[1]), logs[1][-3000:]
    out = final.stdout + final.stderr
    assert re.search(r"\[resume\] step \d+ was written by 1 workers; resuming on 2", out), out[-3000:]

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("clipvip")

    def run_of(name):
        (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.runName` = '{name}'")
        return run.info.run_id

    def sample_ids(name):
        d = client.download_artifacts(run_of(name), "samples", str(tmp_path / f"samples-{name}"))
        merged: dict[str, list[int]] = {}
        for f in sorted(os.listdir(d)):
            part = json.load(open(os.path.join(d, f)))
            assert not merged.keys() & part.keys(), f"steps logged twice: {sorted(merged.keys() & part.keys())}"
            merged.update(part)
        return merged

    ref_ids, got_ids = sample_ids("ref-z1"), sample_ids("reshape")
    assert sorted(ref_ids, key=int) == ["1", "2", "3", "4", "5"] and all(len(v) == 4 for v in ref_ids.values())
    assert got_ids == ref_ids, "the same clips at every step"
    steps = [m.step for m in client.get_metric_history(run_of("reshape"), "train/loss")]
    assert steps == [1, 2, 3, 4, 5], f"each step logged exactly once across the resumes: {steps}"
    a, b = final_weights(storage, "reshape"), final_weights(ref_storage, "ref-z1")
    num = sum(float((a[k] - b[k]).float().norm() ** 2) for k in b) ** 0.5
    den = sum(float(b[k].float().norm() ** 2) for k in b) ** 0.5
    assert num / den <= 1e-5, num / den
