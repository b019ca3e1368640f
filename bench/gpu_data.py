"""The data-side parts of `bench/gpu.py`: captioner throughput, ingest transform, bf16 pretrain.

See `bench/gpu_parts.py` for `Sizes` and the training/attention parts.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

from bench.gpu_parts import Sizes, is_oom, peak_gib, reset_peak, sync

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORED_FRAMES = 32  # what prepare keeps per clip at its defaults (3 fps, max_frames 32)


def make_jpegs(count: int, seed: int = 0, size: tuple[int, int] = (426, 240)) -> list[bytes]:
    """Seeded scenes (gradient, discs, sensor-like noise) as JPEG q90, ~20-40 KB at 426x240,
    the size of the frames `prepare` stores (short side 240)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    out = []
    for _ in range(count):
        grad = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1.0, 3)
        base = np.broadcast_to(grad, (h, w, 3)) + rng.normal(0, 12, (h, w, 3))
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0, d = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40)), int(rng.integers(20, 120))
            draw.ellipse([x0, y0, x0 + d, y0 + d], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# ---------------------------------------------------------------------------------------------
# Captioner


def part_captioner(sz: Sizes) -> dict[str, Any]:
    """Images/s and peak memory of `FrameCaptioner` (JPEG decode + processor + generate), per
    captioner, dtype and batch size; random weights never stop early, so every image costs
    exactly `caption_new_tokens` decoder steps (real captions stop at ~10-15 tokens)."""
    from pipeline.config import CaptionConfig
    from pipeline.data.captioner import FrameCaptioner
    from pipeline.data.captioner_builtin import builtin_model_dir

    device = sz.device
    images = make_jpegs(16, seed=1)
    rows = []
    for name in sz.captioners:
        t0 = time.perf_counter()
        builtin_model_dir(name)  # materialised once (seeded), then loaded like any local model
        build_s = time.perf_counter() - t0
        for dtype in sz.caption_dtypes:
            t0 = time.perf_counter()
            cap = FrameCaptioner(CaptionConfig(model=f"builtin:{name}", dtype=dtype,
                                               max_new_tokens=sz.caption_new_tokens), device=device)
            load_s = time.perf_counter() - t0
            param = next(cap._model.parameters())  # noqa: SLF001  where the weights really are
            if param.device.type != torch.device(device).type or str(param.dtype) != f"torch.{dtype}":
                raise RuntimeError(f"{name} {dtype}: weights on {param.device} in {param.dtype}, "
                                   f"expected {device} / {dtype}")
            for bs in sz.caption_batches:
                row = {"captioner": name, "dtype": dtype, "batch": bs, "load_s": round(load_s + build_s, 1)}
                cap.cfg = dataclasses.replace(cap.cfg, batch_size=bs)
                batch = (images * (2 * bs // len(images) + 1))[:2 * bs]
                try:
                    cap.caption(batch[:bs])  # warm-up (allocator, kernels)
                    sync(device)
                    reset_peak(device)
                    t0 = time.perf_counter()
                    out = cap.caption(batch)
                    sync(device)
                    secs = time.perf_counter() - t0
                except Exception as e:
                    if not is_oom(e):
                        raise
                    rows.append(dict(row, status="out of memory"))
                    break
                failed = sum(r.caption is None for r in out)
                if failed:
                    raise RuntimeError(f"{name} {dtype} batch {bs}: {failed} images failed: {out[0].error}")
                rows.append(dict(row, images_per_s=round(len(batch) / secs, 2),
                                 peak_mem_gib=round(peak_gib(device), 2)))
            del cap
            reset_peak(device)
    best = {}
    for r in rows:
        key = f"{r['captioner']} {r['dtype']}"
        if "images_per_s" in r and r["images_per_s"] > best.get(key, {}).get("images_per_s", 0):
            best[key] = {"batch": r["batch"], "images_per_s": r["images_per_s"]}
    return {"new_tokens": sz.caption_new_tokens, "rows": rows, "best": best}


# ---------------------------------------------------------------------------------------------
# Ingest: the training transform on this machine's CPUs, and GPU JPEG decoding


def transform_rate(num_clips: int, num_frames: int, image_px: int) -> float:
    """Clips/s of the loader's transform (jittered sampling + JPEG decode) on one core, on frames as a
    training view stores them (`clipvip pack`: resized to the training size once)."""
    torch.set_num_threads(1)
    from pipeline.data.pack import resize_jpeg
    from pipeline.data.sampling import jitter_rng, transform_clip

    frames = [resize_jpeg(f, image_px, 95) for f in make_jpegs(STORED_FRAMES, seed=2)]
    transform_clip(frames, frames[STORED_FRAMES // 2], num_frames, image_px, True, jitter_rng(0, 0, 0))
    t0 = time.process_time()
    for i in range(num_clips):
        transform_clip(frames, frames[STORED_FRAMES // 2], num_frames, image_px, True, jitter_rng(0, 0, i))
    return num_clips / (time.process_time() - t0)


def gpu_jpeg_decode(sz: Sizes) -> dict[str, Any]:
    """torchvision's nvJPEG batch decode + resize to the training size, images/s and clips/s."""
    if not sz.device.startswith("cuda"):
        return {"status": "unavailable", "reason": "no GPU"}
    try:
        from torchvision.io import decode_jpeg
    except ImportError as e:
        return {"status": "unavailable", "reason": f"torchvision not importable ({e})"}
    jpegs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in make_jpegs(32, seed=3)]
    per_clip = sz.num_frames + 1
    batch = (jpegs * (32 * per_clip // len(jpegs) + 1))[:32 * per_clip]  # 32 clips' worth

    def run() -> None:
        decoded = decode_jpeg(batch, device=sz.device)
        for img in decoded:
            torch.nn.functional.interpolate(img[None].float(), size=(sz.image_px, sz.image_px), mode="bilinear",
                                            antialias=True)

    run()
    sync(sz.device)
    t0 = time.perf_counter()
    for _ in range(3):
        run()
    sync(sz.device)
    images_s = 3 * len(batch) / (time.perf_counter() - t0)
    return {"status": "ok", "images_per_s": round(images_s, 1), "clips_per_s": round(images_s / per_clip, 1)}


def part_ingest(sz: Sizes) -> dict[str, Any]:
    """The training transform's clips/s on one core and on every core at once (spawned
    processes, one torch thread each), and GPU JPEG decoding where the stack provides it."""
    cores = len(os.sched_getaffinity(0))
    n = sz.ingest_clips
    one = transform_rate(n, sz.num_frames, sz.image_px)
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        rates = pool.starmap(transform_rate, [(n, sz.num_frames, sz.image_px)] * cores)
    frame_kib = sum(len(b) for b in make_jpegs(8, seed=2)) / 8 / 1024
    return {"frames_per_clip": sz.num_frames, "image_px": sz.image_px, "stored_frame_kib": round(frame_kib, 1),
            "clips_per_s_one_core": round(one, 2), "cores": cores, "clips_per_s_all_cores": round(sum(rates), 2),
            "clips_per_s_per_core_loaded": round(sum(rates) / cores, 2), "gpu_jpeg": gpu_jpeg_decode(sz)}


# ---------------------------------------------------------------------------------------------
# A real bf16 pretrain through the CLI (Ray Train, NCCL on a GPU)


def _cli(args: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"clipvip {args[0]} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-3000:]}")
    return proc


def make_tiny_root(workdir: str, env: dict[str, str], timeout_s: float) -> tuple[str, str]:
    """`clipvip sample-data` + `clipvip prepare` + `clipvip pack` with the tiny recipes; returns (root, view)."""
    sample, root = os.path.join(workdir, "sample"), os.path.join(workdir, "root")
    tracking = "sqlite:///" + os.path.join(workdir, "mlflow.db")  # the data jobs' runs, beside the check's
    _cli(["sample-data", "--out", sample, "--num-videos", "4"], env, timeout_s)
    _cli(["prepare", "--config", "jobs/configs/tiny.yaml", "--set", f"root={root}",
          "--set", f"data.metadata=[{sample}/metadata.jsonl]", "--set", f"data.video_root={sample}/videos",
          "--set", f"data.subtitles={sample}/subtitles.jsonl", "--set", "ray.progress_bars=false",
          "--set", f"tracking.tracking_uri={tracking}"], env, timeout_s)
    _cli(["pack", "--config", "jobs/configs/tiny_pack.yaml", "--set", f"root={root}", "--set", "ray.progress_bars=false",
          "--set", f"tracking.tracking_uri={tracking}"], env, timeout_s)
    return root, "tiny"


def part_pretrain(sz: Sizes, workdir: str, root: str | None, view: str, timeout_s: float) -> dict[str, Any]:
    """`clipvip pretrain` of the tiny recipe for `pretrain_steps` steps with train.precision=bf16,
    one Ray Train worker on the GPU (NCCL) or a CPU (gloo); the loss must stay finite."""
    from pipeline.tracking import find_run, metric_history

    env = dict(os.environ, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.1", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="disabled", HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))
    t0 = time.perf_counter()
    if root is None:
        root, view = make_tiny_root(workdir, env, timeout_s)
    made_s = time.perf_counter() - t0
    uri = "sqlite:///" + os.path.join(workdir, "mlflow.db")
    gpu = sz.device.startswith("cuda")
    t0 = time.perf_counter()
    proc = _cli(["pretrain", "--config", "jobs/configs/tiny_pretrain.yaml", "--set", "run_name=gpu-check-bf16",
                 "--set", f"root={root}", "--set", f"train.view={view}", "--set", "val=null",
                 "--set", "train.precision=bf16", "--set", f"train.use_gpu={str(gpu).lower()}",
                 "--set", "train.num_workers=1", "--set", f"train.max_steps={sz.pretrain_steps}",
                 "--set", "train.checkpoint_every_steps=1000", "--set", f"train.storage_path={workdir}/runs",
                 "--set", f"tracking.tracking_uri={uri}", "--set", "tracking.experiment=gpu-check",
                 "--set", "tracking.register_model=null", "--set", "ray.num_cpus=4"], env, timeout_s)
    wall = time.perf_counter() - t0
    run_id = find_run(uri, "gpu-check", "gpu-check-bf16")
    losses = {s: v for s, (v, _) in metric_history(uri, run_id, "train/loss").items()}
    if sorted(losses) != list(range(1, sz.pretrain_steps + 1)):
        raise RuntimeError(f"expected train/loss at steps 1..{sz.pretrain_steps}, got {sorted(losses)}")
    bad = [s for s, v in losses.items() if not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"bf16 pretrain loss is not finite at steps {bad}")
    rate = metric_history(uri, run_id, "train/samples_per_s")
    return {"steps": sz.pretrain_steps, "precision": "bf16", "backend": "nccl" if gpu else "gloo",
            "first_loss": round(losses[1], 4), "final_loss": round(losses[sz.pretrain_steps], 4),
            "samples_per_s": round(rate[max(rate)][0], 2), "pretrain_wall_s": round(wall, 1),
            "root_made_s": round(made_s, 1), "summary": json.dumps(proc.stdout.splitlines()[-6:])}
