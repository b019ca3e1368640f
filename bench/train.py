"""Pretrain benchmark: our Ray Train + DeepSpeed loop vs a bare torch loop, and the input pipeline
vs the training loop's consumption rate.

Run:  .venv/bin/python bench/train.py [--quick] [--verbose] [--size small|medium]

Data (made once, cached under .cache/bench/train/): synthetic HD-VILA-format videos (320x240,
~300 clips of 4-8 s) -> `run_prepare` with `builtin:tiny-blip` captions, frames at 3 fps stored as
JPEG with short side 72. Model: a CLIP-ViP bigger than the `tiny` preset so that compute is not
negligible next to per-step overhead (vision 128 wide x 4 layers, patch 16, 12 frames at 64 px =
196 vision tokens; text 128 x 2; ~7.7M parameters, most of them the 49408-token embedding),
saved once in HF format and loaded by both sides through `model.pretrained` (`--size medium`:
vision 256 x 6 at 96 px, text 256 x 4, 20.8M parameters, its own 96 px view). Micro batch 8,
fp32, ZeRO-1, the project's AdamW groups, the `lr_at` schedule, grad clip 5.

What is timed, side by side in this one process, alternating (bare, ray, bare, ray, ..., bare):
  bare      single-process torch loop: `build_task` + `make_adamw(param_groups(...))`, batches from
            the project's loader materialised in memory first (compute only), set_lr / forward /
            backward / clip_grad_norm_ / step / zero_grad / float(loss); torch threads = what a Ray
            Train worker with 1 CPU gets (OMP_NUM_THREADS=1, checked with a probe actor).
  ray-1w    the real `make_trainer(cfg, run_id).fit()` -> `train_loop_per_worker`, 1 worker
            (1 CPU), loader streaming from Ray Data on the other CPU, MLflow (sqlite, temp dir)
            logging every step. Steady state from the metrics the worker logs: at step k rank 0
            logs train/samples_per_s = k*m*W / (t_k - t_start) (perf_counter, full float
            precision), so t_k - t_start = k*m*W / rate_k exactly; step intervals after the warm-up
            steps, excluding the first step of each epoch (pipeline restart), give steps/s.
            The MLflow metric timestamps (ms) of the same steps are a cross-check.
  ray-2w    (full only) the same with 2 workers on a Ray instance of 4 logical CPUs.
  pipeline  `iter_rank_batches` alone on the driver with the worker's LoaderConfig: samples/s
            after the first batch of each epoch; (idle) Ray has 2 CPUs free for loader tasks;
            (contended) a Ray actor holding 1 CPU runs the bare loop meanwhile, as the trainer
            would on this 2-core machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CACHE_DIR = os.path.join(ROOT, ".cache", "bench", "train")
# Must be set before Ray starts (workers inherit it): report() otherwise waits ~2 s per call.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")  # a loaded shared machine starts raylets slowly
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))
os.environ.setdefault("CLIPVIP_CACHE_DIR", os.path.join(CACHE_DIR, "clipvip_cache"))

import torch  # noqa: E402

from pipeline.config import ModelConfig, PrepareJobConfig, PretrainJobConfig, load_config  # noqa: E402

DATA_VERSION = "v2"  # v2: the one-root-per-corpus layout (schema 2)
MICRO_BATCH = 8
NUM_FRAMES = 12
MAX_TEXT_LEN = 32
SEED = 42
# name -> (vision width, layers, image px; text width, layers): 7.7M and 20.8M parameters.
SIZES = {
    "small": (128, 4, 64, 128, 2),
    "medium": (256, 6, 96, 256, 4),
}


def model_shape(size: str) -> dict[str, Any]:
    """CLIPViPConfig keyword arguments of a SIZES entry (heads of width 32, MLP 4x, patch 16)."""
    vw, vl, px, tw, tl = SIZES[size]
    return dict(
        text_config=dict(vocab_size=49408, hidden_size=tw, intermediate_size=4 * tw, num_hidden_layers=tl,
                         num_attention_heads=tw // 32, max_position_embeddings=77),
        vision_config=dict(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl,
                           num_attention_heads=vw // 32, image_size=px, patch_size=16),
        projection_dim=128)


def use_size(size: str) -> None:
    """Point the benchmark at a SIZES entry: its model, its frame size, its training view."""
    global SIZE, IMAGE_PX, VIEW
    SIZE, IMAGE_PX = size, SIZES[size][2]
    VIEW = "default" if IMAGE_PX == 64 else f"px{IMAGE_PX}"  # the 64 px view keeps its cached name


use_size("small")
TARGET_LOOP = 0.85
TARGET_PIPELINE = 2.0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Data and model (cached)


def ensure_data() -> str:
    """Synthetic videos + prepare (tiny-blip captions); returns the dataset root. Needs Ray up."""
    from pipeline.data.build import run_prepare
    from pipeline.data.synthetic import SampleDataSpec, make_sample_dataset

    base = os.path.join(CACHE_DIR, f"data-{DATA_VERSION}")
    root = os.path.join(base, "root")
    man = os.path.join(root, "manifest.json")
    view = os.path.join(root, "views", VIEW, "view.json")
    if os.path.exists(view) and json.loads(Path(view).read_text()).get("status") == "complete":
        return root
    t0 = time.perf_counter()
    spec = SampleDataSpec(num_videos=60, min_duration_s=30.0, max_duration_s=45.0, resolutions=((320, 240),),
                          clips_per_video=(4, 6), clip_duration_s=(4.0, 8.0), num_retrieval=2)
    sample_dir = os.path.join(base, "sample")
    meta = os.path.join(sample_dir, "sample_data.json")
    if not os.path.exists(meta):
        log("generating synthetic videos (once) ...")
        sample = make_sample_dataset(sample_dir, seed=0, spec=spec)
        metadata, videos, subs = sample.metadata_path, sample.video_root, sample.subtitles_table
    else:
        metadata, videos = os.path.join(sample_dir, "metadata.jsonl"), os.path.join(sample_dir, "videos")
        subs = os.path.join(sample_dir, "subtitles.jsonl")
    log("prepare (once): frames at 3 fps, short side 72, builtin:tiny-blip captions ...")
    cfg = load_config(PrepareJobConfig, None, [
        f"root={root}", f"data.metadata={metadata}", f"data.video_root={videos}", f"data.subtitles={subs}",
        "data.clips_per_shard=32", "frames.short_side_px=72", "frames.max_frames=32",
        "caption.model=builtin:tiny-blip", "ray.progress_bars=false"])
    if not (os.path.exists(man) and json.loads(Path(man).read_text()).get("status") == "complete"):
        summary = run_prepare(cfg, log=lambda *_: None)
        log(f"prepared in {time.perf_counter() - t0:.0f} s: {summary.clips_ok} clips, {summary.units} shards")
    from pipeline.config import PackJobConfig
    from pipeline.data.pack_job import run_pack

    run_pack(load_config(PackJobConfig, None, [
        f"root={root}", f"view.name={VIEW}", "view.caption_set=default", f"view.image_size_px={IMAGE_PX}",
        f"view.rows_per_group={MICRO_BATCH}", f"view.rows_per_shard={MICRO_BATCH * 16}", "ray.progress_bars=false"]),
        log=lambda *_: None)
    log(f"data ready in {time.perf_counter() - t0:.0f} s (view {VIEW!r} packed)")
    return root


def ensure_model() -> str:
    """The benchmark's CLIP-ViP shape, random init (seeded), saved in HF format once."""
    from pipeline.model.clip_vip import CLIPViPConfig, CLIPViPModel, vip_extras

    vw, vl, px, tw, tl = SIZES[SIZE]
    path = os.path.join(CACHE_DIR, f"model-{DATA_VERSION}-v{vw}x{vl}-t{tw}x{tl}-p16-{px}px")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        shape = model_shape(SIZE)
        cfg = CLIPViPConfig(text_config=shape["text_config"], vision_config=shape["vision_config"],
                            projection_dim=shape["projection_dim"],
                            **vip_extras(ModelConfig(max_text_len=MAX_TEXT_LEN)))
        CLIPViPModel(cfg).save_pretrained(path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def job_config(root: str, model_dir: str, storage: str, tracking_uri: str, workers: int, max_steps: int,
               run_name: str) -> PretrainJobConfig:
    return load_config(PretrainJobConfig, None, [
        f"run_name={run_name}", f"model.pretrained={model_dir}", f"model.max_text_len={MAX_TEXT_LEN}",
        "loss.variant=vsc_fc", f"root={root}", f"train.view={VIEW}",
        f"train.num_workers={workers}", f"train.micro_batch_size={MICRO_BATCH}", f"train.max_steps={max_steps}",
        "train.lr=1e-4", "train.weight_decay=0.05", "train.warmup_ratio=0.05", "train.grad_clip=5.0",
        "train.zero_stage=1", "train.precision=fp32", f"train.num_frames={NUM_FRAMES}",
        f"train.image_size_px={IMAGE_PX}", f"train.seed={SEED}", "train.checkpoint_every_steps=1000000",
        "train.keep_checkpoints=1", f"train.storage_path={storage}", "train.max_failures=0",
        f"tracking.tracking_uri={tracking_uri}", "tracking.experiment=bench-train",
        "tracking.system_metrics=false", "tracking.register_model=null"])


@dataclasses.dataclass(frozen=True)
class Loading:
    """What `train_loop_per_worker` hands the loader for rank 0 of `workers`: the batch spec and
    the job's `train.loader` knobs."""

    spec: Any
    loader: Any

    @property
    def micro_batch(self) -> int:
        return self.spec.global_batch


def loader_config(cfg: PretrainJobConfig) -> Loading:
    """Exactly the BatchSpec `train_loop_per_worker` builds from the job config (world 1)."""
    from pipeline.data.loader import BatchSpec

    t = cfg.train
    return Loading(BatchSpec(global_batch=t.micro_batch_size, num_frames=t.num_frames, image_size_px=t.image_size_px,
                             max_text_len=cfg.model.max_text_len), t.loader)


# ---------------------------------------------------------------------------------------------
# Input pipeline


def time_pipeline(index, lcfg, epochs: list[int], keep: bool = False) -> dict[str, Any]:
    """iter_rank_batches (rank 0 of 1) for each epoch: samples / wall of the whole epoch.

    Not "after the first batch": Ray Data packs a task's yields into blocks of up to
    DataContext.target_max_block_size (128 MiB), so a whole task (16 micro batches here) arrives
    at once and the time after the first batch measures only the hand-over. Callers warm the
    Ray worker processes (imports, tokenizer) with one epoch first, so this is the warm rate,
    including each epoch's plan + task start (conservative).
    """
    from pipeline.data.loader import iter_rank_batches

    kept: list[dict[str, torch.Tensor]] = []
    n, wall, firsts, gaps = 0, 0.0, [], []
    for epoch in epochs:
        t0 = time.perf_counter()
        stamps = []
        for batch in iter_rank_batches(index, lcfg.spec, lcfg.loader, SEED, epoch, 0, 1):
            stamps.append(time.perf_counter())
            if keep:
                kept.append({k: v.clone() for k, v in batch.items()})
        firsts.append(stamps[0] - t0)
        gaps.append(max(b - a for a, b in zip([t0] + stamps[:-1], stamps, strict=True)))
        n += len(stamps)
        wall += stamps[-1] - t0
    return {"samples_s": n * lcfg.micro_batch / wall, "batches": n, "first_batch_s": statistics.median(firsts),
            "max_gap_s": max(gaps), "kept": kept}


# ---------------------------------------------------------------------------------------------
# Bare loop


class BareLoop:
    """The minimal single-process loop on the same task, optimizer groups, schedule and clipping."""

    def __init__(self, cfg: PretrainJobConfig, total_steps: int) -> None:
        from pipeline.train.optim import make_adamw, param_groups
        from pipeline.train.worker import build_task

        self.cfg = cfg
        self.task = build_task(cfg)
        self.opt = make_adamw(param_groups(self.task.named_parameters(), cfg.train.weight_decay), lr=cfg.train.lr)
        self.total = total_steps
        self.step_no = 0

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        from pipeline.train.optim import lr_at, set_lr

        t = self.cfg.train
        set_lr(self.opt, lr_at(self.step_no % self.total, t.lr, self.total, t.warmup_ratio))
        loss, _ = self.task(batch)
        loss.backward()
        if t.grad_clip > 0:  # DeepSpeed's gradient_clipping 0 means off, too
            torch.nn.utils.clip_grad_norm_(self.task.parameters(), t.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1
        return float(loss.detach())

    def run(self, batches: list, warmup: int, steps: int) -> dict[str, Any]:
        for _ in range(warmup):
            self.step(batches[(self.step_no) % len(batches)])
        durs = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self.step(batches[self.step_no % len(batches)])
            durs.append(time.perf_counter() - t0)
        return {"steps_s": len(durs) / sum(durs), "median_step_s": statistics.median(durs)}


def bare_round(cfg, batches, warmup: int, steps: int, threads: int) -> dict[str, Any]:
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loop = BareLoop(cfg, total_steps=warmup + steps)
        return loop.run(batches, warmup, steps)
    finally:
        torch.set_num_threads(prev)


class _Stop(Exception):
    pass


class _RecordingTracker:
    """Tracker stand-in: keeps what `_log_step` logs; optionally forwards to a real MlflowTracker."""

    run_id = None

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner
        self.rate: dict[int, float] = {}
        self.wait: dict[int, float] = {}

    def log_metrics(self, metrics, step: int) -> None:
        self.rate[step] = metrics["train/samples_per_s"]
        self.wait[step] = metrics["train/data_wait_frac"]
        if self.inner is not None:
            self.inner.log_metrics(metrics, step)

    def log_params(self, *a: Any) -> None:
        pass

    def log_dict(self, *a: Any) -> None:
        pass

    def log_artifacts(self, *a: Any) -> None:
        pass

    def flush(self) -> None:
        if self.inner is not None:
            self.inner.flush()

    def close(self, *a: Any) -> None:
        if self.inner is not None:
            self.inner.close()


def steady_from_rates(rate: dict[int, float], wait: dict[int, float], per_step: int, first: int, last: int,
                      skip: set[int] = frozenset()) -> dict[str, float]:
    """Step intervals from the worker's cumulative samples/s: t_k - t_start = k * per_step / rate_k."""
    el = {k: k * per_step / rate[k] for k in rate}
    keep = [k for k in range(first + 1, last + 1) if k not in skip]
    dts = [el[k] - el[k - 1] for k in keep]
    waited = sum(wait[k] * el[k] - wait[k - 1] * el[k - 1] for k in keep)
    return {"steps_s": len(dts) / sum(dts), "median_step_s": statistics.median(dts), "wait_frac": waited / sum(dts),
            "steps_measured": len(dts), "elapsed": el}


def ds_inprocess(cfg: PretrainJobConfig, batches: list, warmup: int, steps: int, threads: int,
                 mlflow_uri: str | None = None) -> dict[str, Any]:
    """The workers' own step loop (`steps.run_steps`) + DeepSpeed engine (ds_config, ZeRO-1, gloo world of 1) in this
    process, fed from memory: the loop's per-step cost without Ray, the loader or a second process.
    With `mlflow_uri`, rank 0's MlflowTracker logs every step into a sqlite DB as in the real run."""
    import io


    from pipeline.config import to_dict
    from pipeline.train.checkpoint import TrainState
    from pipeline.train.session import RunLog, Session, build_engine, skip_cpu_shm_build
    from pipeline.train.steps import StepLoop, run_steps
    from pipeline.train.worker import build_task, log_step

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gloo_world_of_one()
        skip_cpu_shm_build()
        task = build_task(cfg)
        with contextlib.redirect_stdout(io.StringIO()):
            engine = build_engine(cfg, task, cfg.train.num_workers)
        n = warmup + steps  # steps done before _Stop; total n + 1 keeps the final-step checkpoint out
        inner = None
        tmp = None
        if mlflow_uri == "sqlite":
            from pipeline.tracking import MlflowTracker, create_run

            tmp = tempfile.mkdtemp(prefix="bench-train-ds-")
            uri = "sqlite:///" + os.path.join(tmp, "mlflow.db")
            inner = MlflowTracker(uri, create_run(uri, "bench-train", "ds-inprocess"))
        tracker = _RecordingTracker(inner)

        def from_memory(epoch, start_step):
            for i in range(start_step, n):
                yield batches[i % len(batches)]
            raise _Stop

        spe = 10**6
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                log = RunLog(engine, tracker, rank=0, world=1, total=n + 1, run_name=cfg.run_name)
                session = Session(rank=0, world=1, engine=engine, state=TrainState(world_size=1), tracker=tracker,
                                  chunks=1)
                run_steps(session, cfg, {"job": to_dict(cfg)}, log, spe, StepLoop(from_memory, log_step))
        except _Stop:
            pass
        finally:
            tracker.close()
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        res = steady_from_rates(tracker.rate, tracker.wait, MICRO_BATCH, warmup, n)
        res.pop("elapsed")
        return res
    finally:
        torch.set_num_threads(prev)


def gloo_world_of_one() -> None:
    """This process as rank 0 of a gloo group of 1 on loopback (what DeepSpeed needs), once."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)


def _consumer_actor_cls():
    import ray

    @ray.remote(num_cpus=1, max_concurrency=2)
    class Consumer:
        """The bare loop in a Ray actor holding 1 CPU (the trainer's share), run until halted."""

        def __init__(self, cfg_dict: dict, batches: list) -> None:
            from pipeline.config import build_dataclass

            self.loop = BareLoop(build_dataclass(PretrainJobConfig, cfg_dict), total_steps=10**6)
            self.batches = batches
            self.stop = threading.Event()

        def warm(self, n: int) -> int:
            for _ in range(n):
                self.loop.step(self.batches[self.loop.step_no % len(self.batches)])
            return torch.get_num_threads()

        def run(self) -> list[float]:
            stamps = [time.perf_counter()]
            while not self.stop.is_set():
                self.loop.step(self.batches[self.loop.step_no % len(self.batches)])
                stamps.append(time.perf_counter())
            return stamps

        def halt(self) -> None:
            self.stop.set()

    return Consumer


def pipeline_contended(cfg, index, lcfg, batches, epochs: list[int]) -> dict[str, Any]:
    import ray
    from pipeline.config import to_dict

    actor = _consumer_actor_cls().remote(to_dict(cfg), batches)
    threads = ray.get(actor.warm.remote(3))
    run_ref = actor.run.remote()
    try:
        # One untimed epoch first: the task worker process may be a fresh one (Ray's idle-worker pool
        # changed during the Train runs), and a cold worker's imports + tokenizer take ~20-30 s here.
        time_pipeline(index, lcfg, [0])
        res = time_pipeline(index, lcfg, epochs)
    finally:
        actor.halt.remote()
        stamps = ray.get(run_ref)
        ray.kill(actor)
    steps = len(stamps) - 1
    res["consumer_samples_s"] = steps * lcfg.micro_batch / (stamps[-1] - stamps[0]) if steps else 0.0
    res["consumer_threads"] = threads
    return res


def worker_threads() -> int:
    """torch threads in a Ray process holding 1 CPU (Ray sets OMP_NUM_THREADS from num_cpus)."""
    import ray

    @ray.remote(num_cpus=1)
    def probe() -> tuple[int, str | None]:
        import torch as t

        return t.get_num_threads(), os.environ.get("OMP_NUM_THREADS")

    n, env = ray.get(probe.remote())
    log(f"a Ray process with 1 CPU runs torch with {n} thread(s) (OMP_NUM_THREADS={env})")
    return n


# ---------------------------------------------------------------------------------------------
# Ray Train + DeepSpeed


def ray_run(root: str, model_dir: str, workers: int, warmup: int, steps: int, tag: str) -> dict[str, Any]:
    """One real `make_trainer(...).fit()`; steady-state numbers from the metrics rank 0 logged."""
    from pipeline.tracking import create_run, metric_history
    from pipeline.train.launch import make_trainer

    tmp = tempfile.mkdtemp(prefix=f"bench-train-{tag}-")
    try:
        uri = "sqlite:///" + os.path.join(tmp, "mlflow.db")
        total = warmup + steps
        cfg = job_config(root, model_dir, os.path.join(tmp, "runs"), uri, workers, total, f"bench-{tag}")
        run_id = create_run(uri, cfg.tracking.experiment, cfg.run_name)
        t0 = time.perf_counter()
        make_trainer(cfg, run_id).fit()
        wall = time.perf_counter() - t0
        rate = {s: v for s, (v, _) in metric_history(uri, run_id, "train/samples_per_s").items()}
        wait = {s: v for s, (v, _) in metric_history(uri, run_id, "train/data_wait_frac").items()}
        stamp = {s: t for s, (_, t) in metric_history(uri, run_id, "train/step").items()}
        if sorted(rate) != list(range(1, total + 1)):
            raise RuntimeError(f"{tag}: expected metrics for steps 1..{total}, got {sorted(rate)}")
        from pipeline.data.loader import ViewIndex

        spe = ViewIndex.open(root, VIEW).layout.steps(workers * MICRO_BATCH)
        # interval k = (t_{k-1}, t_k]; drop warm-up and each epoch's first step (pipeline restart)
        skip = {k for k in range(2, total + 1) if (k - 1) % spe == 0}
        res = steady_from_rates(rate, wait, MICRO_BATCH * workers, warmup, total, skip)
        el = res.pop("elapsed")
        keep = [k for k in range(warmup + 1, total + 1) if k not in skip]
        res.update({
            "steps_s_mlflow_ts": len(keep) / (sum(stamp[k] - stamp[k - 1] for k in keep) / 1000),
            "steps_s_incl_boundaries": (total - warmup) / (el[total] - el[warmup]),
            "boundary_step_s": [el[k] - el[k - 1] for k in sorted(skip) if k > warmup],
            "first_step_s": el[1],
            "fit_wall_s": wall,
            "spe": spe,
        })
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Main


def init_ray(num_cpus: int, verbose: bool) -> None:
    import ray
    import ray.data

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=verbose)
    ray.data.DataContext.get_current().enable_progress_bars = False


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one Ray Train run, no 2-worker run (a few minutes)")
    ap.add_argument("--verbose", action="store_true", help="show the Ray workers' output")
    ap.add_argument("--size", choices=sorted(SIZES), default="small",
                    help="the model: small 7.7M parameters at 64 px (default), medium 20.8M at 96 px")
    args = ap.parse_args(argv)
    use_size(args.size)
    quick = args.quick
    ray_runs = 1 if quick else 3
    warm_ray, steps_ray = (5, 20) if quick else (5, 40)
    warm_bare, steps_bare = (3, 20) if quick else (3, 30)
    pipe_epochs = [1] if quick else [1, 2]

    import ray

    t_all = time.perf_counter()
    os.makedirs(CACHE_DIR, exist_ok=True)
    init_ray(2, args.verbose)
    root = ensure_data()
    model_dir = ensure_model()
    threads = worker_threads()

    from pipeline.data.loader import ViewIndex

    index = ViewIndex.open(root, VIEW)
    cfg1 = job_config(root, model_dir, "/unused", "sqlite:////unused.db", 1, warm_ray + steps_ray, "bench")
    lcfg = loader_config(cfg1)
    log(f"{index.num_rows} clips; micro batch {MICRO_BATCH}, {NUM_FRAMES} frames at {IMAGE_PX} px; "
        f"cores: {os.cpu_count()}; load avg {os.getloadavg()[0]:.2f}")

    # Pipeline, trainer idle. Epoch 0 warms the Ray worker processes and its batches become the
    # in-memory data of the bare and in-process loops; later epochs are timed.
    warm_pipe = time_pipeline(index, lcfg, [0], keep=True)
    batches = warm_pipe.pop("kept")
    log(f"pipeline cold epoch: {warm_pipe['samples_s']:.1f} samples/s (first batch {warm_pipe['first_batch_s']:.1f} s)")
    idle = time_pipeline(index, lcfg, pipe_epochs)
    log(f"pipeline idle: {idle['samples_s']:.1f} samples/s over {idle['batches']} batches "
        f"(first batch {idle['first_batch_s']:.1f} s, longest wait {idle['max_gap_s']:.1f} s)")

    loops: dict[str, list[dict[str, Any]]] = {"bare": [], "ds": [], "ds_mlflow": []}

    def local_round() -> None:
        loops["bare"].append(bare_round(cfg1, batches, warm_bare, steps_bare, threads))
        loops["ds"].append(ds_inprocess(cfg1, batches, warm_bare, steps_bare, threads))
        loops["ds_mlflow"].append(ds_inprocess(cfg1, batches, warm_bare, steps_bare, threads, "sqlite"))
        log("local round steps/s: " + ", ".join(f"{k} {v[-1]['steps_s']:.3f}" for k, v in loops.items()))

    ray1 = []
    local_round()
    for i in range(ray_runs):
        ray1.append(ray_run(root, model_dir, 1, warm_ray, steps_ray, f"1w-{i}"))
        r = ray1[-1]
        log(f"ray 1 worker: {r['steps_s']:.3f} steps/s steady (MLflow ts {r['steps_s_mlflow_ts']:.3f}), "
            f"data wait {r['wait_frac']:.1%}, fit {r['fit_wall_s']:.0f} s, first step at {r['first_step_s']:.1f} s")
        local_round()
    bare = loops["bare"]
    # Ratio per Ray run against the mean of the bare rounds just before and after it.
    ratios = [r["steps_s"] / ((bare[i]["steps_s"] + bare[i + 1]["steps_s"]) / 2) for i, r in enumerate(ray1)]

    cont = pipeline_contended(cfg1, index, lcfg, batches, pipe_epochs)
    log(f"pipeline contended: {cont['samples_s']:.1f} samples/s; training actor meanwhile "
        f"{cont['consumer_samples_s']:.1f} samples/s ({cont['consumer_threads']} thread)")

    ray2 = None
    bare2 = None
    if not quick:
        ray.shutdown()
        init_ray(4, args.verbose)  # 2 workers + their loader tasks, as jobs/configs/tiny_pretrain.yaml
        ray2 = ray_run(root, model_dir, 2, 5, 25, "2w")
        log(f"ray 2 workers: {ray2['steps_s']:.3f} steps/s steady, data wait {ray2['wait_frac']:.1%}")
        bare2 = bare_round(cfg1, batches, warm_bare, steps_bare, threads)
        log(f"bare: {bare2['steps_s']:.3f} steps/s")
    ray.shutdown()

    med = {k: statistics.median(x["steps_s"] for x in v) for k, v in loops.items()}
    bare_steps = med["bare"]
    ray_steps = statistics.median(r["steps_s"] for r in ray1)
    ratio = statistics.median(ratios)
    consume = bare_steps * MICRO_BATCH
    rows = [
        ("bare torch loop, 1 thread, batches in memory", consume, bare_steps, None, None),
        ("  worker run_steps + DeepSpeed, in-process, mem", med["ds"] * MICRO_BATCH, med["ds"],
         med["ds"] / bare_steps, None),
        ("  same + MLflow sqlite logging every step", med["ds_mlflow"] * MICRO_BATCH, med["ds_mlflow"],
         med["ds_mlflow"] / bare_steps, None),
        ("Ray Train + DeepSpeed, 1 worker (per worker)", ray_steps * MICRO_BATCH, ray_steps, ratio, TARGET_LOOP),
    ]
    if ray2 is not None:
        ref = (bare[-1]["steps_s"] + bare2["steps_s"]) / 2
        rows.append(("Ray Train + DeepSpeed, 2 workers (per worker)", ray2["steps_s"] * MICRO_BATCH,
                     ray2["steps_s"], ray2["steps_s"] / ref, None))
        rows.append(("  2 workers, aggregate (2 cores shared)", ray2["steps_s"] * MICRO_BATCH * 2,
                     ray2["steps_s"], None, None))
    rows += [
        ("input pipeline, trainer busy (1 CPU held)", cont["samples_s"], cont["samples_s"] / MICRO_BATCH,
         cont["samples_s"] / consume, TARGET_PIPELINE),
        ("input pipeline, trainer idle (2 CPUs)", idle["samples_s"], idle["samples_s"] / MICRO_BATCH,
         idle["samples_s"] / consume, TARGET_PIPELINE),
        ("  training actor while pipeline runs", cont["consumer_samples_s"],
         cont["consumer_samples_s"] / MICRO_BATCH, None, None),
    ]
    print()
    vw, vl, _, tw, tl = SIZES[SIZE]
    print(f"Pretrain benchmark ({'quick' if quick else 'full'}): CLIP-ViP v{vw}x{vl}/t{tw}x{tl}, {NUM_FRAMES}x{IMAGE_PX}px, "
          f"micro batch {MICRO_BATCH}, fp32, ZeRO-1, torch threads per trainer {threads}")
    w = 48
    print(f"{'what':<{w}} {'samples/s':>10} {'steps/s':>8} {'ratio':>7} {'target':>7} {'met?':>5}")
    print("-" * (w + 43))
    for what, sps, st, rt, tg in rows:
        met = "-" if tg is None else ("yes" if rt >= tg else "NO")
        tgs = "-" if tg is None else (f">={tg:.2f}" if tg < 1 else f">={tg:.0f}x")
        print(f"{what:<{w}} {sps:>10.1f} {st:>8.3f} {fmt(rt):>7} {tgs:>7} {met:>5}")
    print()
    print("ratios: loop rows = Ray steps/s / bare steps/s (mean of the bare rounds before and after each Ray run; "
          "median over runs); pipeline rows = pipeline samples/s / bare-loop samples/s (consumption rate).")
    all_bare = bare + ([bare2] if bare2 else [])
    print("bare rounds steps/s: " + ", ".join(format(b["steps_s"], ".3f") for b in all_bare))
    for k in ("ds", "ds_mlflow"):
        print(f"{k} rounds steps/s: " + ", ".join(format(b["steps_s"], ".3f") for b in loops[k]))
    for i, r in enumerate(ray1):
        print(f"ray 1w run {i}: steady {r['steps_s']:.3f} steps/s over {r['steps_measured']} steps "
              f"(median step {r['median_step_s'] * 1000:.0f} ms; MLflow-timestamp cross-check "
              f"{r['steps_s_mlflow_ts']:.3f}; incl. epoch restarts {r['steps_s_incl_boundaries']:.3f}), "
              f"ratio {ratios[i]:.3f}, data wait {r['wait_frac']:.1%}, first step {r['first_step_s']:.1f} s "
              f"after loop start, fit() {r['fit_wall_s']:.0f} s, epoch = {r['spe']} steps")
    if ray2 is not None:
        print(f"ray 2w: steady {ray2['steps_s']:.3f} steps/s/worker over {ray2['steps_measured']} steps "
              f"(MLflow ts {ray2['steps_s_mlflow_ts']:.3f}), data wait {ray2['wait_frac']:.1%}, "
              f"epoch = {ray2['spe']} steps, epoch-restart steps {[round(x, 2) for x in ray2['boundary_step_s']]} s, "
              f"fit() {ray2['fit_wall_s']:.0f} s")
    print(f"pipeline (whole warm epochs, {idle['batches']} batches): first batch {idle['first_batch_s']:.1f} s idle, "
          f"{cont['first_batch_s']:.1f} s busy; longest wait between batches {idle['max_gap_s']:.1f} s idle, "
          f"{cont['max_gap_s']:.1f} s busy; cold first epoch {warm_pipe['samples_s']:.1f} samples/s")
    print(f"total wall {time.perf_counter() - t_all:.0f} s; load avg now {os.getloadavg()[0]:.2f} "
          "(2 shared cores: compare rows of this run only)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
