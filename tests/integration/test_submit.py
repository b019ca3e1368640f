"""`clipvip submit` / `clipvip job` against a real two-node Ray cluster on loopback.

One cluster for the module: `ray start --head` (dashboard + Jobs API on 127.0.0.1) and a second
node that joins it. Through the Jobs API: prepare on the synthetic dataset, then pretrain, stopped
after its first checkpoint and resubmitted, which resumes the same run. Credentials planted in
the environment of the cluster and of the submitting process must not appear in any log, MLflow
row, config or checkpoint, and no process of the cluster may listen on a non-loopback address.

Ray's `ray start` rewrites 127.0.0.1 to the machine's routable address on Linux
(`services.resolve_ip_for_localhost`) and then binds its gRPC servers to all interfaces. Keeping
the cluster on loopback therefore takes RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the nodes'
environment (node address stays 127.0.0.1, servers bind it) and, for the joining node, Ray's
own `ray start` entry point with that rewrite switched off (the CLI refuses to join otherwise).
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import io
import ipaddress
import json
import os
import shutil
import sqlite3
import time
import uuid

import psutil
import pytest

from tests.conftest import ROOT
from tests.raycluster import TIMEOUT_S, LocalCluster, wait_for

TOKEN = uuid.uuid4().hex[:12]
PLANTED = {
    "AWS_SECRET_ACCESS_KEY": f"planted-aws-secret-{TOKEN}",
    "AWS_SESSION_TOKEN": f"planted-session-token-{TOKEN}",
    "MLFLOW_TRACKING_PASSWORD": f"planted-mlflow-password-{TOKEN}",
    "MLFLOW_TRACKING_URI": f"http://planted-user:planted-uri-pass-{TOKEN}@127.0.0.1:9/",
}
NEEDLES = [v for k, v in PLANTED.items() if k != "MLFLOW_TRACKING_URI"] + [f"planted-uri-pass-{TOKEN}"]
# The first job is stopped once step CKPT_EVERY + 1 is logged (report() is a barrier, so the step
# CKPT_EVERY checkpoint is committed): the ~40 quick steps left keep it from finishing first.
STEPS, CKPT_EVERY = 50, 10


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def clipvip(command: str, *args: str) -> tuple[int, str]:
    """`clipvip submit|job ...` in this process (its environment holds the planted secrets), through
    the same module `main(argv)` the console script dispatches to; rc + output."""
    main = importlib.import_module({"submit": "jobs.submit", "job": "jobs.job_control"}[command]).main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = main(list(args))
        except SystemExit as e:  # argparse errors
            rc = int(e.code or 0)
    return rc, buf.getvalue()


def sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


@pytest.fixture(scope="module")
def cluster():
    lc = LocalCluster(extra_env=PLANTED)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in PLANTED.items():
            mp.setenv(k, v)
        try:
            lc.start(dashboard=True)
            yield lc
        finally:
            lc.stop()
            shutil.rmtree(lc.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("submit")


def small_metadata(sample_data, workdir) -> str:
    """The sample dataset's two smallest videos (decoding its 720p ones is what costs): enough clips
    for a batch, a fraction of the decode time."""
    lines = [ln for ln in open(sample_data.metadata_path, encoding="utf-8") if ln.strip()]

    def size(line: str) -> int:
        vid = json.loads(line)["video_id"]
        paths = glob.glob(os.path.join(sample_data.video_root, vid + ".*"))
        return os.path.getsize(paths[0]) if paths else 1 << 60

    path = str(workdir / "metadata.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(sorted(lines, key=size)[:2])
    return path


@pytest.fixture(scope="module")
def prepared(cluster, sample_data, workdir):
    root = str(workdir / "root")
    run = f"prep-{TOKEN}"
    t0 = time.monotonic()
    overrides = sets(f"run_name={run}", f"root={root}", f"data.metadata={small_metadata(sample_data, workdir)}",
                     f"data.video_root={sample_data.video_root}", f"data.subtitles={sample_data.subtitles_table}",
                     "data.clips_per_shard=3", "frames.short_side_px=64", "frames.max_frames=8",
                     "ray.progress_bars=false", f"tracking.tracking_uri=sqlite:///{workdir / 'data-jobs.db'}")
    rc, out = clipvip("submit", os.path.join(ROOT, "jobs", "configs", "tiny.yaml"), "--address", cluster.address,
                      "--follow", *overrides)
    print(f"[submit] prepare job ended in {time.monotonic() - t0:.1f}s (rc {rc})")
    if rc == 0:  # the training view pretrain reads, submitted like any job (kind inferred: pack)
        rc, packed = clipvip("submit", os.path.join(ROOT, "jobs", "configs", "tiny_pack.yaml"), "--address",
                             cluster.address, "--follow", *sets(f"run_name=pack-{TOKEN}", f"root={root}",
                                                                "view.rows_per_group=2", "ray.progress_bars=false",
                                                                f"tracking.tracking_uri=sqlite:///{workdir / 'data-jobs.db'}"))
        out += packed
    return {"root": root, "run": run, "rc": rc, "out": out}


def pretrain_sets(root: str, storage: str, db: str, run: str) -> list[str]:
    return sets(f"run_name={run}", f"root={root}", f"train.storage_path={storage}",
                f"tracking.tracking_uri=sqlite:///{db}", "tracking.system_metrics=false", "model.max_text_len=16",
                "val=null",  # the recipe's zero-shot split is the demo's sample data, not made here
                "train.view=tiny", "train.micro_batch_size=2", f"train.max_steps={STEPS}",
                f"train.checkpoint_every_steps={CKPT_EVERY}", "train.keep_checkpoints=1", "train.num_frames=4",
                "train.warmup_ratio=0.2", "train.loader.cpus_per_task=0.5",
                # One Train worker: resume across ranks is test_pretrain's business; here it is the
                # Jobs API round trip, and a second worker costs ~20 s per job on 2 cores.
                "train.num_workers=1")


@pytest.fixture(scope="module")
def pretrained(cluster, prepared, workdir):
    """pretrain submitted, stopped after its first checkpoint, resubmitted: the resumed run."""
    from ray.job_submission import JobSubmissionClient

    assert prepared["rc"] == 0, prepared["out"][-6000:]
    storage, db, run = str(workdir / "runs"), str(workdir / "mlflow.db"), f"pt-{TOKEN}"
    args = [os.path.join(ROOT, "jobs", "configs", "tiny_pretrain.yaml"), "--address", cluster.address,
            *pretrain_sets(prepared["root"], storage, db, run)]
    client = JobSubmissionClient(cluster.address)
    t0 = time.monotonic()
    rc, first = clipvip("submit", *args)
    assert rc == 0, first
    first_id = f"pretrain-{run}"
    again_rc, again = clipvip("submit", *args)  # while the first is PENDING/RUNNING
    listening = []

    def checkpointed():
        status = str(client.get_job_status(first_id).value)
        logs = client.get_job_logs(first_id)
        assert status in ("PENDING", "RUNNING"), f"{status} before its first checkpoint:\n{logs[-6000:]}"
        if not listening and "[pretrain] step 1/" in logs:
            listening.extend(cluster.listening())  # mid-training: Train workers and their store are up
        return f"[pretrain] step {CKPT_EVERY + 1}/" in logs

    wait_for(checkpointed, TIMEOUT_S, "the first checkpoint", poll_s=0.2)
    print(f"[submit] first pretrain job checkpointed step {CKPT_EVERY} after {time.monotonic() - t0:.1f}s")
    rc_stop, stopped = clipvip("job", "stop", first_id, "--address", cluster.address)
    first_logs = client.get_job_logs(first_id)
    t1 = time.monotonic()
    rc2, second = clipvip("submit", *args, "--follow")
    print(f"[submit] stopped at {t1 - t0:.1f}s; resubmitted job ended after {time.monotonic() - t1:.1f}s (rc {rc2})")
    return {"storage": storage, "db": db, "run": run, "first_id": first_id, "first": first, "again": (again_rc, again),
            "stop": (rc_stop, stopped), "first_logs": first_logs, "second": (rc2, second), "listening": listening,
            "client": client, "address": cluster.address}


def test_cluster_listens_on_loopback_only(cluster, pretrained):
    rows = cluster.listening() + pretrained["listening"]
    assert rows, "no listening sockets found: the process scan is broken"
    assert {name for name, _, _ in rows} >= {"gcs_server", "raylet"}
    assert any(port == cluster.dashboard_port for _, _, port in rows), "the Jobs API is one of them"
    bad = sorted({r for r in rows if not is_loopback(r[1])})
    # torch.distributed's rendezvous store (TCPStore, hosted by rank 0 of the training group) binds
    # the wildcard address and torch has no option to change that; its clients use MASTER_ADDR,
    # which is 127.0.0.1 here. It is the only exception, and it must be exactly that one socket.
    # (The process title carries the running task: "ray::RayTrainWorker.poll_status" and the like.)
    store = [r for r in bad if r[0].startswith("ray::RayTrainWorker") and r[1] in ("::", "0.0.0.0")]
    assert len(store) <= 1 and sorted(set(bad) - set(store)) == [], f"listening beyond loopback: {bad}"


def test_prepare_runs_through_the_jobs_api(prepared, cluster):
    from ray.job_submission import JobSubmissionClient

    assert prepared["rc"] == 0, prepared["out"][-6000:]
    job_id = f"prepare-{prepared['run']}"
    assert f"as job {job_id}" in prepared["out"]
    assert "prepare summary" in prepared["out"], prepared["out"][-3000:]
    frames = os.path.join(prepared["root"], "frames")
    assert any(f.endswith(".json") for part in os.listdir(frames) for f in os.listdir(os.path.join(frames, part))), \
        "sidecars written by the job"
    info = JobSubmissionClient(cluster.address).get_job_info(job_id)
    assert info.metadata["clipvip.kind"] == "prepare" and info.metadata["clipvip.run_name"] == prepared["run"]
    assert info.entrypoint.startswith("clipvip prepare --config jobs/configs/tiny.yaml --set ")
    assert info.runtime_env["working_dir"].startswith("gcs://"), "the project travelled as the working_dir"
    rc, status = clipvip("job", "status", job_id, "--address", cluster.address)
    assert rc == 0 and "SUCCEEDED" in status


def test_stopped_job_resubmitted_resumes_the_run(pretrained):
    from mlflow.tracking import MlflowClient

    p = pretrained
    assert p["again"][0] == 2 and "already" in p["again"][1], p["again"][1]
    assert p["stop"][0] == 0 and "STOPPED" in p["stop"][1], p["stop"][1]
    assert str(p["client"].get_job_status(p["first_id"]).value) == "STOPPED"
    assert f"[pretrain] step {STEPS}/" not in p["first_logs"], "the first job was stopped before the end"
    rc2, second = p["second"]
    second_id = f"pretrain-{p['run']}.2"
    logs = p["client"].get_job_logs(second_id)
    assert rc2 == 0, second[-6000:]
    assert f"as job {second_id}" in second
    assert "resumed at step" in logs and f"[pretrain] step {STEPS}/" in logs, logs[-4000:]
    assert os.path.exists(os.path.join(p["storage"], p["run"] + "-export", "model.safetensors"))
    client = MlflowClient(f"sqlite:///{p['db']}")
    exp = client.get_experiment_by_name("clipvip-tiny")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.runName` = '{p['run']}'")
    assert len(runs) == 1, "the resubmitted job logs into the same MLflow run"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert steps == list(range(1, STEPS + 1)), f"each step logged exactly once across stop + resubmit: {steps}"
    rc, listed = clipvip("job", "list", "--address", p["address"])
    assert rc == 0 and p["first_id"] in listed and second_id in listed
    rc, printed = clipvip("job", "logs", second_id, "--address", p["address"])
    assert rc == 0 and "resumed at step" in printed


def _has_planted_secret(p: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return p.environ().get("AWS_SECRET_ACCESS_KEY") == PLANTED["AWS_SECRET_ACCESS_KEY"]
    return False


def _files_under(*roots: str):
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for f in files:
                yield os.path.join(dirpath, f)


def test_planted_credentials_are_never_written(cluster, prepared, pretrained):
    # The secrets did reach the cluster (else this test would prove nothing).
    assert any(_has_planted_secret(p) for p in cluster.processes())
    client = pretrained["client"]
    hits = []
    texts = {"submit output": prepared["out"] + pretrained["first"] + pretrained["second"][1],
             "job infos": json.dumps([j.dict() if hasattr(j, "dict") else str(j) for j in client.list_jobs()],
                                     default=str)}
    for job in client.list_jobs():
        texts[f"logs of {job.submission_id}"] = client.get_job_logs(job.submission_id)
    for what, text in texts.items():
        hits += [f"{what}: {n[:24]}..." for n in NEEDLES if n in text]
    db = pretrained["db"]
    with sqlite3.connect(db) as con:
        for table, in con.execute("select name from sqlite_master where type='table'").fetchall():
            dump = json.dumps(con.execute(f"select * from {table}").fetchall(), default=str)  # noqa: S608
            hits += [f"mlflow {table}" for n in NEEDLES if n in dump]
    scanned = 0
    for path in _files_under(cluster.temp_dir, pretrained["storage"], prepared["root"], os.path.dirname(db)):
        with contextlib.suppress(OSError):
            with open(path, "rb") as f:
                data = f.read()
            scanned += 1
            hits += [f"{path}" for n in NEEDLES if n.encode() in data]
    assert scanned > 50, "logs, checkpoints and shards were scanned"
    assert not hits, "planted credentials found:\n" + "\n".join(sorted(set(hits)))
