"""The measurements of `bench/gpu.py`, one function per part; each returns a JSON-able dict.

Every part takes a `Sizes` (the full GPU shapes, or the tiny CPU smoke shapes) and measures with
the project's own code: the pretrain task and DeepSpeed config of `pipeline.train.worker`, the
ViP attention layer, `FrameCaptioner` over the builtin real-size random captioners, the loader's
`transform_clip`, and the `clipvip` CLI. Raise `Unavailable` for a part the machine cannot run
(a missing library, no GPU JPEG decoder); any other exception marks the part failed.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

EOT_ID = 49407  # CLIP's <|endoftext|>, also the pad id (pipeline.model.tokenizer)


class Unavailable(RuntimeError):
    """The part cannot run on this machine (reported as `unavailable`, not as a failure)."""


@dataclass(frozen=True)
class Sizes:
    """Shapes of one run: `FULL` on a GPU, `SMOKE` on a CPU in under a minute."""

    device: str
    train_presets: dict[str, str]
    num_frames: int
    image_px: int
    text_len: int
    precision: str
    micro_batches: tuple[int, ...]
    """Probed in order until one does not fit; the largest that fits is timed."""
    warmup_steps: int
    timed_steps: int
    attention: dict[str, int]
    captioners: tuple[str, ...]
    caption_dtypes: tuple[str, ...]
    caption_batches: tuple[int, ...]
    caption_new_tokens: int
    ingest_clips: int
    pretrain_steps: int


FULL = Sizes(
    device="cuda", train_presets={"train_b32": "b32", "train_b16": "b16"}, num_frames=12, image_px=224, text_len=70,
    precision="bf16", micro_batches=(8, 16, 32, 64, 128, 256, 512), warmup_steps=3, timed_steps=10,
    attention=dict(batch=8, frames=12, image_px=224, patch=16, width=768, heads=12, repeats=10),
    captioners=("random-blip-large", "random-git-large"), caption_dtypes=("float16", "bfloat16"),
    caption_batches=(1, 2, 4, 8, 16, 32, 64), caption_new_tokens=20, ingest_clips=64, pretrain_steps=20)
SMOKE = Sizes(
    device="cpu", train_presets={"train_b32": "tiny", "train_b16": "tiny"}, num_frames=4, image_px=32, text_len=16,
    precision="bf16", micro_batches=(2, 4), warmup_steps=1, timed_steps=2,
    attention=dict(batch=1, frames=4, image_px=32, patch=8, width=32, heads=4, repeats=2),
    captioners=("tiny-blip", "tiny-git"), caption_dtypes=("float32", "bfloat16"), caption_batches=(1, 4),
    caption_new_tokens=4, ingest_clips=4, pretrain_steps=3)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float:
    """Peak GPU memory allocated since `reset_peak`, or the process's peak RSS on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


# ---------------------------------------------------------------------------------------------
# Training step through the pretrain worker's DeepSpeed engine


def synthetic_batch(m: int, sz: Sizes, device: str) -> dict[str, torch.Tensor]:
    """A pretrain micro batch of the loader's layout: uint8 frames, CLIP-style token rows."""
    g = torch.Generator().manual_seed(m)
    T, px, N = sz.num_frames, sz.image_px, sz.text_len

    def texts() -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(1, EOT_ID - 1, (m, N), generator=g)
        lengths = torch.randint(2, N + 1, (m,), generator=g)
        pos = torch.arange(N)
        ids[pos >= lengths[:, None]] = EOT_ID
        ids[torch.arange(m), lengths - 1] = EOT_ID
        return ids, (pos < lengths[:, None]).long()

    sub_ids, sub_mask = texts()
    cap_ids, cap_mask = texts()
    batch = {"frames": torch.randint(0, 256, (m, T, px, px, 3), dtype=torch.uint8, generator=g),
             "middle_frame": torch.randint(0, 256, (m, px, px, 3), dtype=torch.uint8, generator=g),
             "subtitle_ids": sub_ids, "subtitle_mask": sub_mask, "caption_ids": cap_ids, "caption_mask": cap_mask,
             "clip_id": torch.arange(m, dtype=torch.int64), "skipped": torch.zeros(m, dtype=torch.int64)}
    return {k: v.to(device) for k, v in batch.items()}


def init_single_rank(device: str) -> str:
    """A one-rank process group: NCCL on a GPU (what the cluster runs), gloo on a CPU."""
    import socket

    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          LOCAL_WORLD_SIZE="1")
        if backend == "nccl":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, rank=0, world_size=1)
    return backend


StepFn = Callable[[dict[str, torch.Tensor]], float]


def make_engine(cfg: Any, device: str, engine: str = "auto") -> tuple[StepFn, Any, str]:
    """(step function, task module, engine name): the pretrain worker's DeepSpeed engine (same
    task, AdamW groups and `ds_config`), or plain torch (fp32 weights, bf16 autocast, the same
    AdamW and clipping) when asked for or when DeepSpeed is missing ("auto")."""
    import importlib.metadata
    import importlib.util

    from pipeline.train.optim import make_adamw, param_groups
    from pipeline.train.session import build_engine, skip_cpu_shm_build
    from pipeline.train.worker import build_task

    task = build_task(cfg)
    have_deepspeed = engine != "torch" and importlib.util.find_spec("deepspeed") is not None
    if engine == "deepspeed" and not have_deepspeed:
        raise Unavailable("deepspeed is not installed")
    if have_deepspeed:
        if not device.startswith("cuda"):
            skip_cpu_shm_build()
        with io.StringIO() as quiet, contextlib.redirect_stdout(quiet):
            engine = build_engine(cfg, task, cfg.train.num_workers)

        def ds_step(batch: dict[str, torch.Tensor]) -> float:
            loss, _ = engine(batch)
            engine.backward(loss)
            engine.step()
            return float(loss.detach())

        version = importlib.metadata.version("deepspeed")
        return ds_step, engine.module, f"deepspeed {version} ZeRO-{cfg.train.zero_stage}"
    optimizer = make_adamw(param_groups(task.named_parameters(), cfg.train.weight_decay), lr=cfg.train.lr)
    task.to(device)
    amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")

    def torch_step(batch: dict[str, torch.Tensor]) -> float:
        with amp:
            loss, _ = task(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    why = "asked for" if engine == "torch" else "deepspeed not installed"
    return torch_step, task, f"torch AdamW + bf16 autocast ({why})"


def train_config(preset: str, sz: Sizes, micro_batch: int, device: str) -> Any:
    from pipeline.config import PretrainJobConfig, load_config

    return load_config(PretrainJobConfig, None, [
        f"model.preset={preset}", f"model.max_text_len={sz.text_len}", "root=unused",
        f"train.precision={sz.precision}", "train.zero_stage=1", f"train.num_frames={sz.num_frames}",
        f"train.image_size_px={sz.image_px}", f"train.micro_batch_size={micro_batch}",
        f"train.use_gpu={str(device.startswith('cuda')).lower()}"])


def part_train(sz: Sizes, preset: str, peak_override: float | None, engine: str = "auto") -> dict[str, Any]:
    """Largest micro batch that fits (doubling), then clips/s, step time, peak memory and MFU there."""
    from pipeline.model.flops import mfu, peak_tflops, train_flops_per_clip

    device = sz.device
    backend = init_single_rank(device)
    step, task, engine_name = make_engine(train_config(preset, sz, sz.micro_batches[0], device), device, engine)
    probe: list[dict[str, Any]] = []
    best, oom = None, False
    for m in sz.micro_batches:
        batch = synthetic_batch(m, sz, device)
        try:
            step(batch)
            sync(device)
            t0 = time.perf_counter()
            loss = step(batch)
            sync(device)
            probe.append({"micro_batch": m, "step_s": round(time.perf_counter() - t0, 4), "loss": loss})
            best = m
        except Exception as e:  # only out-of-memory ends the probe quietly
            if not is_oom(e):
                raise
            probe.append({"micro_batch": m, "status": "out of memory"})
            oom = True
            break
        finally:
            del batch
    if best is None:
        raise RuntimeError(f"not even micro batch {sz.micro_batches[0]} fits: {probe}")
    if oom:  # an engine that ran out of memory mid-step is rebuilt before timing
        del step, task
        reset_peak(device)
        step, task, engine_name = make_engine(train_config(preset, sz, best, device), device, engine)
    batch = synthetic_batch(best, sz, device)
    for _ in range(sz.warmup_steps):
        step(batch)
    sync(device)
    reset_peak(device)
    times, losses = [], []
    for _ in range(sz.timed_steps):
        t0 = time.perf_counter()
        losses.append(step(batch))
        sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    clips_s = best / step_s
    model = task.model
    flops = train_flops_per_clip(model.config, sz.num_frames, sz.text_len, task.loss.sources)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    peak = peak_tflops(name, peak_override)
    return {"preset": preset, "engine": engine_name, "backend": backend, "precision": sz.precision,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2), "frames": sz.num_frames,
            "image_px": sz.image_px, "text_len": sz.text_len, "probe": probe, "micro_batch": best,
            "step_s": round(step_s, 4), "clips_per_s": round(clips_s, 2), "peak_mem_gib": round(peak_gib(device), 2),
            "gflops_per_clip": round(flops.total / 1e9, 2), "achieved_tflops": round(flops.total * clips_s / 1e12, 2),
            "peak_tflops": peak, "mfu": None if peak is None else round(mfu(flops.total, clips_s, peak), 4),
            "losses_finite": all(math.isfinite(x) for x in losses)}


# ---------------------------------------------------------------------------------------------
# Attention kernels


_KERNELS = (("cudnn", "cudnn"), ("flash", "flash"), ("efficient", "memory-efficient"), ("math", "math"))


def sdpa_kernels(run: Callable[[], None]) -> list[str]:
    """Which SDPA implementations a pass dispatched to (flash, memory-efficient, cudnn, math),
    from the aten op names the profiler records (forward and backward)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_fds(), profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    names = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key or "attention" in e.key}
    return sorted({label for key, label in _KERNELS for n in names if key in n and n.startswith("aten::_")})


@contextlib.contextmanager
def _quiet_fds() -> Iterator[None]:
    """Silence the process's stdout/stderr file descriptors: the profiler's C++ side (kineto)
    prints start/stop lines there that Python's redirects cannot catch."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def part_attention(sz: Sizes) -> dict[str, Any]:
    """Proxy-guided two-branch SDPA against dense masked SDPA (and the math backend), fwd+bwd."""
    from transformers import CLIPVisionConfig

    from bench.attention import PeakTensorBytes, make_pass
    from pipeline.model.clip_vip import CLIPViPEncoderLayer

    a, device = sz.attention, sz.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config = CLIPVisionConfig(hidden_size=a["width"], intermediate_size=4 * a["width"], num_attention_heads=a["heads"],
                              num_hidden_layers=1, image_size=a["image_px"], patch_size=a["patch"])
    M, T, L = 4, a["frames"], (a["image_px"] // a["patch"]) ** 2
    layer = CLIPViPEncoderLayer(config, "sparse").to(device, dtype)
    x = torch.randn(a["batch"], M + T * L, a["width"], generator=torch.Generator().manual_seed(0)).to(device, dtype)
    rows = []
    for what in ("core", "attention"):
        for path in ("sparse", "dense", "dense-math"):
            run = make_pass(layer, x, what, path, num_proxies=M, num_frames=T)
            row: dict[str, Any] = {"scope": what, "path": path}
            try:
                run()
                sync(device)
                times = []
                for _ in range(a["repeats"]):
                    t0 = time.perf_counter()
                    run()
                    sync(device)
                    times.append(time.perf_counter() - t0)
                if device.startswith("cuda"):
                    reset_peak(device)
                    base = torch.cuda.memory_allocated()
                    run()
                    mem = torch.cuda.max_memory_allocated() - base
                else:
                    with PeakTensorBytes() as counter:
                        run()
                    mem = counter.peak
                row.update(ms=round(1000 * statistics.median(times), 3), peak_mib=round(mem / 2**20, 1),
                           kernels=sdpa_kernels(run))
            except Exception as e:  # dense-math at full size may not fit; say so
                if not is_oom(e):
                    raise
                row["status"] = "out of memory"
            rows.append(row)
            reset_peak(device)
    for row in rows:
        ours = next(r for r in rows if r["scope"] == row["scope"] and r["path"] == "sparse")
        if "ms" in row and "ms" in ours:
            row["time_vs_ours"] = round(row["ms"] / ours["ms"], 2)
            row["mem_vs_ours"] = round(row["peak_mib"] / ours["peak_mib"], 2) if ours["peak_mib"] else None
    return {"dtype": str(dtype).replace("torch.", ""), "shape": dict(a, proxies=M, tokens=M + T * L), "rows": rows}
