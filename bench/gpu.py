"""GPU check: one command that measures what CPUs cannot, and leaves its numbers in a JSON.

Run on a machine with one CUDA GPU and the project installed (the cluster image, cluster/Dockerfile):
    python bench/gpu.py                             # all parts, <= 8 min; bench/results/gpu-<date>-<gpu>.json
    python bench/gpu.py --parts train_b32,attention --budget-s 300
    python bench/gpu.py --smoke --out /tmp/gpu.json # CPU, tiny sizes, < 1 min (what the tests run)

Parts (each reports on its own: a part that fails is recorded with its error and the rest still
run; on a GPU each runs in its own process with a time limit, so a crash or a hang costs one part):
  env        torch/CUDA/NCCL versions, GPU name, memory, the libraries present, the bf16 peak used for MFU
  train_b32  CLIP-ViP B/32 (random init, real size), 12 frames at 224 px, text 70, bf16, through the
             pretrain worker's DeepSpeed engine (ZeRO-1) on a one-rank NCCL group: the largest micro
             batch that fits (doubling from 8), then clips/s, step time, peak memory, model FLOPs
             per clip (pipeline/model/flops.py) and MFU
  train_b16  the same for B/16
  attention  proxy-guided two-branch SDPA against dense masked SDPA and the math backend at B/16
             shapes (bf16, forward + backward): time, peak memory, and which SDPA kernel each runs
  captioner  BLIP-large and GIT-large shapes (builtin:random-*-large), fp16 and bf16, images/s and
             peak memory at batch 1-64 through FrameCaptioner
  ingest     the training transform's clips/s on one core and on all cores of this machine, and GPU
             JPEG decoding (torchvision's nvJPEG) where the stack provides it
  pretrain   `clipvip pretrain` of a tiny synthetic root for 20 steps with train.precision=bf16 on
             the GPU through Ray Train (NCCL): it finishes and its loss stays finite
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))

PARTS = ("env", "train_b32", "train_b16", "attention", "captioner", "ingest", "pretrain")
# Longest a part may run on a GPU (its process is killed after that); the whole run also stops
# starting parts once the budget is spent.
PART_LIMIT_S = {"env": 60, "train_b32": 150, "train_b16": 180, "attention": 60, "captioner": 150, "ingest": 60,
                "pretrain": 240}
# --smoke's pretrain on a CPU: 40 s on a quiet 2-core machine, but a local Ray start slows down
# more than the CPUs do on a busy one (over 240 s beside two busy processes).
SMOKE_PRETRAIN_LIMIT_S = 780  # under the tests' 900 s a test
LIBRARIES = ("torch", "deepspeed", "ray", "transformers", "torchvision", "mlflow", "pyarrow", "av", "decord")


def part_env(peak_override: float | None) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    from pipeline.model.flops import peak_tflops

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "cpus": len(os.sched_getaffinity(0))}
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = md.version("eva-decord" if lib == "decord" else lib)
        except md.PackageNotFoundError:
            versions[lib] = None
    out["libraries"] = versions
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   gpu_mem_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                   nccl=".".join(map(str, torch.cuda.nccl.version())),
                   bf16=torch.cuda.is_bf16_supported(), peak_bf16_tflops=peak_tflops(props.name, peak_override))
    return out


def run_part(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one part in this process; returns its result dict (exceptions propagate)."""
    from bench import gpu_data, gpu_parts

    sz = gpu_parts.SMOKE if args.smoke else gpu_parts.FULL
    if name == "env":
        return part_env(args.peak_tflops)
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            raise gpu_parts.Unavailable("no CUDA GPU visible (use --smoke on a CPU)")
    if name in sz.train_presets:
        return gpu_parts.part_train(sz, sz.train_presets[name], args.peak_tflops, args.engine)
    if name == "attention":
        return gpu_parts.part_attention(sz)
    if name == "captioner":
        return gpu_data.part_captioner(sz)
    if name == "ingest":
        return gpu_data.part_ingest(sz)
    if name == "pretrain":
        import importlib.util

        missing = [m for m in ("ray", "deepspeed", "mlflow", "av") if importlib.util.find_spec(m) is None]
        if missing:
            raise gpu_parts.Unavailable(f"needs the project's environment; missing {', '.join(missing)}")
        with tempfile.TemporaryDirectory(prefix="gpu-check-pretrain-") as work:
            limit = SMOKE_PRETRAIN_LIMIT_S if args.smoke else PART_LIMIT_S["pretrain"]
            return gpu_data.part_pretrain(sz, work, args.root, args.view, limit)
    raise ValueError(f"unknown part {name!r}")


def guarded(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """{"status": ok | unavailable | failed, "result" or "reason" or "error"} of one part, in process."""
    from bench.gpu_parts import Unavailable

    try:
        return {"status": "ok", "result": run_part(name, args)}
    except Unavailable as e:
        return {"status": "unavailable", "reason": str(e)}
    except Exception as e:  # noqa: BLE001  a failed part is a result too
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000],
                "traceback": traceback.format_exc()[-4000:]}


def isolated(name: str, args: argparse.Namespace, limit_s: float) -> dict[str, Any]:
    """The part in a child process of this script, killed after `limit_s`."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--run-part", name, "--part-out", out]
    for flag, value in (("--peak-tflops", args.peak_tflops), ("--root", args.root), ("--engine", args.engine),
                        ("--view", args.view)):
        if value is not None:
            cmd += [flag, str(value)]
    cmd += ["--smoke"] if args.smoke else []
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
        if os.path.getsize(out):
            with open(out, encoding="utf-8") as f:
                return json.load(f)
        return {"status": "failed", "error": f"part process exited {proc.returncode} without a result",
                "traceback": (proc.stderr or proc.stdout)[-4000:]}
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {limit_s:.0f} s (killed)"}
    finally:
        os.unlink(out)


def default_out(smoke: bool, gpu: str | None) -> str:
    if smoke:
        return os.path.join(ROOT, "out", "gpu-smoke.json")
    slug = "".join(c if c.isalnum() else "-" for c in (gpu or "nogpu")).strip("-").lower()
    return os.path.join(ROOT, "bench", "results", f"gpu-{datetime.date.today():%Y%m%d}-{slug}.json")


def summary_line(name: str, res: dict[str, Any]) -> str:
    if name == "env":
        libs = ", ".join(f"{k} {v}" for k, v in res["libraries"].items() if v)
        return f"{res.get('gpu', 'no GPU')} ({res.get('gpu_mem_gib', '-')} GiB), torch {res['torch']}; {libs}"
    if name.startswith("train"):
        mfu = "-" if res["mfu"] is None else f"{100 * res['mfu']:.1f}%"
        return (f"{res['preset']} micro batch {res['micro_batch']}: {res['clips_per_s']} clips/s, "
                f"step {res['step_s']} s, peak {res['peak_mem_gib']} GiB, {res['gflops_per_clip']} GFLOP/clip, "
                f"MFU {mfu} ({res['engine']})")
    if name == "attention":
        parts = [f"{r['scope']} {r['path']} {r.get('ms', 'OOM')} ms {r.get('kernels', '')}" for r in res["rows"]]
        return "; ".join(parts)
    if name == "captioner":
        return "; ".join(f"{k}: {v['images_per_s']} img/s at batch {v['batch']}" for k, v in res["best"].items())
    if name == "ingest":
        g = res["gpu_jpeg"]
        gpu = f"{g['images_per_s']} img/s" if g["status"] == "ok" else g["reason"]
        return (f"transform {res['clips_per_s_one_core']} clips/s on 1 core, {res['clips_per_s_all_cores']} on "
                f"{res['cores']} cores; GPU JPEG: {gpu}")
    if name == "pretrain":
        return (f"{res['steps']} {res['precision']} steps on {res['backend']}: loss {res['first_loss']} -> "
                f"{res['final_loss']}, {res['samples_per_s']} samples/s")
    return json.dumps(res)[:200]


def render(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [f"GPU check ({meta['mode']}) {meta['date']} on {meta.get('gpu') or 'CPU'}, torch {meta['torch']}",
             f"{'part':<10} {'status':<11} {'s':>5}  result"]
    for name, part in report["parts"].items():
        what = (summary_line(name, part["result"]) if part["status"] == "ok"
                else part.get("reason") or part.get("error", ""))
        lines.append(f"{name:<10} {part['status']:<11} {part.get('seconds', 0):>5.0f}  {what}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, parts in this process (< 1 min)")
    ap.add_argument("--isolate", action="store_true", help="each part in its own process (the default on a GPU)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--out", help="JSON to write (default bench/results/gpu-<date>-<gpu>.json)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting parts after this many seconds")
    ap.add_argument("--peak-tflops", type=float, help="bf16 peak for MFU when the GPU is not in the table")
    ap.add_argument("--engine", choices=("auto", "deepspeed", "torch"), default="auto",
                    help="train parts: DeepSpeed (auto: when installed) or a plain torch loop, for the ratio")
    ap.add_argument("--root", help="pretrain part: an existing prepared root instead of making one")
    ap.add_argument("--view", default="tiny", help="pretrain part: the training view of --root (`clipvip pack`)")
    ap.add_argument("--run-part", help=argparse.SUPPRESS)
    ap.add_argument("--part-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_part:  # child process of `isolated`
        result = guarded(args.run_part, args)
        with open(args.part_out, "w", encoding="utf-8") as f:
            json.dump(result, f)
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    out = args.out or default_out(args.smoke, gpu)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    report: dict[str, Any] = {"meta": {"mode": "smoke" if args.smoke else "full", "date": f"{datetime.date.today()}",
                                       "gpu": gpu, "torch": torch.__version__, "host": platform.node(),
                                       "commit": commit.strip(), "command": " ".join(sys.argv)},
                              "parts": {}}
    t_start = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for name in parts:
        left = args.budget_s - (time.perf_counter() - t_start)
        t0 = time.perf_counter()
        if left < 10:
            part = {"status": "skipped", "reason": f"time budget of {args.budget_s:.0f} s spent"}
        elif args.smoke and not args.isolate:
            part = guarded(name, args)
        else:
            part = isolated(name, args, min(PART_LIMIT_S[name], left))
        part["seconds"] = round(time.perf_counter() - t0, 1)
        report["parts"][name] = part
        print(f"[gpu] {name}: {part['status']} in {part['seconds']:.0f} s", flush=True)
        with open(out, "w", encoding="utf-8") as f:  # after every part: a killed run keeps what it measured
            json.dump(report, f, indent=2)
    print(render(report))
    print(f"results: {out}")
    return 1 if any(p["status"] == "failed" for p in report["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
