"""Training-loop costs that change with scale: the fixed per-step overhead of our step loop at two
model sizes, and peak memory per rank against the global batch with and without gradient caching.

Run:  cd /work/main && .venv/bin/python bench/train_scale.py [--quick]

Both parts run without Ray (bench/train.py measures the Ray Train path and the input pipeline);
batches are synthetic with the loader's layout (pipeline/data/loader.py), so nothing is decoded.

Overhead. For each model size, side by side in this process and alternating (bare, ours, bare,
ours, bare), on one torch thread:
  bare   `bench/train.py`'s single-process torch loop: the same task, AdamW groups, schedule, clip.
  ours   the workers' step loop (`steps.run_steps`) with DeepSpeed ZeRO-1 (gloo world of 1) and
         MLflow logging every step (sqlite), as a Ray Train worker runs it.
The overhead is ours' median step minus bare's, in ms. A cost that does not grow with the model
(Python, collectives, bookkeeping) stays put while the step grows, so the ratio rises with size.

Memory. One fresh process per (global batch G, micro batch m) at world 1, fp32, ZeRO-1: two steps
of the real loop on G rows; the peak resident set (ru_maxrss) minus the resident set once the
engine is built is what the step added (activations, the features, optimizer state on its first
step). m = G is one forward over the whole batch (no caching); m = 8 embeds in chunks of 8
(pipeline/train/gradcache.py): activations of one chunk, plus the features of all G rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import train as bench_train  # noqa: E402  (bench.train sets the environment before torch loads)
from bench.train import (  # noqa: E402
    CACHE_DIR,
    MAX_TEXT_LEN,
    MICRO_BATCH,
    NUM_FRAMES,
    SEED,
    SIZES,
    bare_round,
    ds_inprocess,
    gloo_world_of_one,
    job_config,
    log,
)

import torch  # noqa: E402

MEMORY_MICRO = 8


def ensure_model(name: str) -> str:
    """bench/train.py's model of size `name` (random init, saved once in HF format)."""
    bench_train.use_size(name)
    return bench_train.ensure_model()


def synthetic_batches(n: int, rows: int, px: int) -> list[dict[str, torch.Tensor]]:
    """`n` batches of `rows` clips in the loader's layout: random pixels, real BPE ids of distinct
    texts, distinct clip ids (every other row a negative)."""
    from pipeline.model.tokenizer import tokenize

    g = torch.Generator().manual_seed(SEED)
    out = []
    for b in range(n):
        ids = torch.arange(b * rows, (b + 1) * rows, dtype=torch.int64)
        sub_ids, sub_mask = tokenize([f"clip {i} says something about a red square" for i in ids.tolist()],
                                     MAX_TEXT_LEN)
        cap_ids, cap_mask = tokenize([f"a photo of object {i}" for i in ids.tolist()], MAX_TEXT_LEN)
        out.append({
            "frames": torch.randint(0, 256, (rows, NUM_FRAMES, px, px, 3), dtype=torch.uint8, generator=g),
            "middle_frame": torch.randint(0, 256, (rows, px, px, 3), dtype=torch.uint8, generator=g),
            "subtitle_ids": sub_ids, "subtitle_mask": sub_mask, "caption_ids": cap_ids, "caption_mask": cap_mask,
            "clip_id": ids, "position": ids.clone(), "step": torch.full((rows,), b, dtype=torch.int64),
            "skipped": torch.zeros(rows, dtype=torch.int64)})
    return out


def config_for(name: str, steps: int, micro: int = MICRO_BATCH, global_batch: int | None = None):
    import dataclasses

    cfg = job_config("unused", ensure_model(name), "/unused", "sqlite:////unused.db", 1, steps, f"scale-{name}")
    train = dataclasses.replace(cfg.train, image_size_px=SIZES[name][2], micro_batch_size=micro,
                                global_batch_size=global_batch)
    return dataclasses.replace(cfg, train=train)


def overhead(name: str, warmup: int, steps: int, rounds: int) -> dict[str, Any]:
    from pipeline.train.worker import build_task

    cfg = config_for(name, warmup + steps)
    batches = synthetic_batches(4, MICRO_BATCH, SIZES[name][2])
    params = sum(p.numel() for p in build_task(cfg).parameters())
    bare, ours = [], []
    for r in range(rounds):
        bare.append(bare_round(cfg, batches, warmup, steps, 1)["median_step_s"])
        if r < rounds - 1:
            ours.append(ds_inprocess(cfg, batches, warmup, steps, 1, "sqlite")["median_step_s"])
        log(f"{name}: round {r + 1}/{rounds}: bare {bare[-1] * 1e3:.0f} ms"
            + (f", ours {ours[-1] * 1e3:.0f} ms" if r < rounds - 1 else ""))
    b, o = statistics.median(bare), statistics.median(ours)
    return {"size": name, "params_m": params / 1e6, "bare_ms": b * 1e3, "ours_ms": o * 1e3,
            "overhead_ms": (o - b) * 1e3, "ratio": b / o, "bare_spread_ms": (max(bare) - min(bare)) * 1e3}


# ---------------------------------------------------------------------------------------------
# Memory: one child process per (G, m)


def _status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident since start or the last reset), in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _reset_peak() -> None:
    """Start VmHWM again from the current resident set (Linux >= 4.0), so the engine's build is not
    counted in the steps' peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _Stop(Exception):
    pass


def memory_child(global_batch: int, micro: int) -> None:
    """Two steps of the real loop at world 1 on `global_batch` rows in chunks of `micro`; prints JSON."""
    import contextlib
    import io


    from pipeline.config import to_dict
    from pipeline.train.checkpoint import TrainState
    from pipeline.train.session import RunLog, Session, build_engine, skip_cpu_shm_build
    from pipeline.train.steps import StepLoop, run_steps
    from pipeline.train.worker import build_task, log_step
    torch.set_num_threads(1)
    gloo_world_of_one()
    skip_cpu_shm_build()
    cfg = config_for("small", 2, micro, global_batch)
    batches = synthetic_batches(2, global_batch, SIZES["small"][2])
    with contextlib.redirect_stdout(io.StringIO()):
        engine = build_engine(cfg, build_task(cfg), 1)
    chunks = cfg.train.chunks(1)
    before = _status_mb("VmRSS")
    _reset_peak()

    class Quiet:
        run_id = None

        def __getattr__(self, _: str) -> Any:
            return lambda *a, **k: None

    def two_steps(epoch: int, start: int):
        yield from batches
        raise _Stop  # before the run's last step, whose checkpoint is not what is measured

    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(_Stop):
        log_ = RunLog(engine, Quiet(), rank=0, world=1, total=3, run_name="mem")
        session = Session(rank=0, world=1, engine=engine, state=TrainState(world_size=1), tracker=Quiet(),
                          chunks=chunks)
        run_steps(session, cfg, {"job": to_dict(cfg)}, log_, 10, StepLoop(two_steps, log_step))
    peak = _status_mb("VmHWM")
    print(json.dumps({"global_batch": global_batch, "micro": micro, "chunks": chunks, "engine_mb": before,
                      "peak_mb": peak, "step_mb": peak - before}))


def memory(global_batches: list[int]) -> list[dict[str, Any]]:
    rows = []
    for g in global_batches:
        for micro in (g, MEMORY_MICRO):
            if micro == MEMORY_MICRO and g == MEMORY_MICRO and rows and rows[-1]["micro"] == g:
                continue  # G = 8: caching and not are the same run
            out = subprocess.run([sys.executable, __file__, "--memory-child", str(g), str(micro)], cwd=ROOT,
                                 capture_output=True, text=True, timeout=1800)
            if out.returncode != 0:
                raise RuntimeError(f"memory child G={g} m={micro} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            log(f"memory: G {g:4d}, micro {micro:4d} ({r['chunks']} chunks): +{r['step_mb']:.0f} MB over the "
                f"built engine ({r['engine_mb']:.0f} MB)")
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and batch sizes (~10 min)")
    ap.add_argument("--memory-child", nargs=2, type=int, metavar=("G", "M"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        memory_child(*args.memory_child)
        return 0
    warmup, steps, rounds = (2, 8, 3) if args.quick else (3, 15, 5)
    batches = [8, 32, 64] if args.quick else [8, 16, 32, 64, 128]
    os.makedirs(CACHE_DIR, exist_ok=True)
    tempfile.tempdir = tempfile.mkdtemp(prefix="bench-scale-")
    log(f"cores {os.cpu_count()}, load avg {os.getloadavg()[0]:.2f}; micro batch {MICRO_BATCH}, "
        f"{NUM_FRAMES} frames, fp32, ZeRO-1, one torch thread")
    sizes = [overhead(name, warmup, steps, rounds) for name in SIZES]
    mem = memory(batches)
    print("\nPer-step cost of our loop (DeepSpeed ZeRO-1 + MLflow every step) over the bare torch loop:")
    print(f"  {'size':8s} {'params':>8s} {'bare ms':>8s} {'ours ms':>8s} {'overhead ms':>12s} {'ratio':>6s}")
    for s in sizes:
        print(f"  {s['size']:8s} {s['params_m']:7.1f}M {s['bare_ms']:8.0f} {s['ours_ms']:8.0f} "
              f"{s['overhead_ms']:12.0f} {s['ratio']:6.2f}   (bare spread {s['bare_spread_ms']:.0f} ms)")
    print("\nPeak memory a step adds per rank (world 1, small model), by global batch G:")
    print(f"  {'G':>5s} {'one forward':>12s} {'gradcache m=8':>14s}")
    for g in batches:
        full = next(r["step_mb"] for r in mem if r["global_batch"] == g and r["micro"] == g)
        cached = next(r["step_mb"] for r in mem if r["global_batch"] == g and r["micro"] == min(g, MEMORY_MICRO))
        print(f"  {g:5d} {full:10.0f}MB {cached:12.0f}MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
