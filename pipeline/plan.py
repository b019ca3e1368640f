"""`clipvip plan`: what a job would do, what it would cost, and whether the cluster fits it.

A dry run for prepare, recaption and pretrain recipes: nothing is decoded, captioned, trained or
written. The facts come from the job's own code (the metadata parts cut into units by the same
`plan_part` the job runs, the root's manifest and shard indexes, the model built on the meta
device); the costs from the per-clip rates that `bench/` measures (constants below, each with its
source; a `bench/gpu.py` result under bench/results/ replaces the GPU ones); the fit checks
compare them with the connected cluster, the recipe's `ray.cluster`, or this machine.

`build_*_report` functions are pure: they take gathered facts and return a `Report`; the
`plan_*` functions gather those facts (reading the root, planning parts on the connected Ray)
and build the report. The caller owns `ray.init`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.config import ClusterShape
from pipeline.data.caption_stage import caption_pool
from pipeline.data.memory import decode_reservation, frame_bytes

# ---- per-clip costs, measured -----------------------------------------------------------------
DECODE_CLIPS_PER_CORE_S = 2.15
"""bench/decode.py (full, corpus shape): a 7-minute 720p H.264 video of 31 clips of 13 s, 3 fps,
<= 32 frames, 240p JPEG, one core (2026-12-06)."""
TRANSFORM_CLIPS_PER_CORE_S = 310.0
"""bench/ingest.py: the training transform at 12 frames + middle on a view's 224 px q95 frames, one
core, libjpeg-turbo into the batch (2026-12-06, 300-321 over three runs; ~43 on the 240p frames
prepare stores, as training decoded them before views)."""
VIDEO_BYTES = 76e6
"""HD-VILA-100M: ~250 TB over 3.3M videos (720p)."""
DRIVER_BASE_GIB, DRIVER_BYTES_PER_UNIT = 0.6, 4096
"""prepare driver: Ray + pyarrow + the unit descriptors and block references (bench/plan.py)."""
ASSUMED_MFU, ASSUMED_PEAK_TFLOPS = 0.35, 989.4
"""When no GPU result exists: an H100's dense bf16 peak at 35% MFU, labelled as assumed."""
CHECKPOINT_BYTES_PER_PARAM = 16
"""fp32 master (4) + AdamW moments (8) + bf16/fp32 module weights (2-4), over all ranks."""


@dataclass(slots=True)
class Check:
    name: str
    ok: bool | None
    """True fits, False does not (the job would fail or be refused), None unknown."""
    detail: str


@dataclass(slots=True)
class Report:
    kind: str
    run_name: str
    facts: list[tuple[str, Any]] = field(default_factory=list)
    estimates: list[tuple[str, Any, str]] = field(default_factory=list)
    """(what, value, basis)."""
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "run_name": self.run_name, "facts": dict(self.facts),
                "estimates": {k: {"value": v, "basis": b} for k, v, b in self.estimates},
                "checks": [asdict(c) for c in self.checks], "fits": not self.failed}

    def render(self) -> str:
        width = max([len(k) for k, *_ in self.facts + self.estimates] + [len(c.name) for c in self.checks] + [8])
        out = [f"plan: {self.kind} {self.run_name!r}", "", "what it would do"]
        out += [f"  {k:<{width}}  {_fmt(v)}" for k, v in self.facts]
        out += ["", "estimates"]
        out += [f"  {k:<{width}}  {_fmt(v)}  ({b})" for k, v, b in self.estimates]
        out += ["", "fit checks"]
        marks = {True: "ok  ", False: "FAIL", None: "?   "}
        out += [f"  {marks[c.ok]}  {c.name:<{width}}  {c.detail}" for c in self.checks]
        verdict = "fits" if not self.failed else f"does NOT fit: {', '.join(c.name for c in self.failed)}"
        return "\n".join(out + ["", f"verdict: {verdict}"])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 1e6 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


# ---------------------------------------------------------------------------------------------
# What runs it: the connected cluster, the recipe's declared shape, or this machine


@dataclass(frozen=True, kw_only=True, slots=True)
class Resources(ClusterShape):
    """A cluster shape, where it came from, and the GPUs in it when known."""

    source: str
    total_gpus: int | None = None


def resources_from(ray_cfg: Any, nodes: list[dict[str, Any]] | None = None) -> Resources:
    """From `ray.nodes()` of a connected cluster, else the recipe's `ray.cluster`, else this machine."""
    if nodes:
        alive = [n for n in nodes if n.get("Alive")]
        head = next((n for n in alive if n.get("Resources", {}).get("node:__internal_head__")), alive[0])
        gpu = [n for n in alive if n.get("Resources", {}).get("GPU")]
        cpu = [n for n in alive if not n.get("Resources", {}).get("GPU") and n is not head] or [head]
        mem = lambda n: n.get("Resources", {}).get("memory", 0) / 2**30  # noqa: E731
        gpu_shape = {}
        if gpu:
            gpu_shape = {"gpu_node_cpus": int(gpu[0]["Resources"].get("CPU", 0)),
                         "gpu_node_gpus": int(gpu[0]["Resources"]["GPU"]), "gpu_node_memory_gb": mem(gpu[0])}
        return Resources(source=f"connected cluster ({len(alive)} nodes)", head_memory_gb=mem(head),
                         cpu_node_cpus=int(cpu[0]["Resources"].get("CPU", 0)), cpu_node_memory_gb=mem(cpu[0]),
                         total_gpus=int(sum(n["Resources"]["GPU"] for n in gpu)), **gpu_shape)
    if ray_cfg.cluster is not None:
        return Resources(source="the recipe's ray.cluster", **{f.name: getattr(ray_cfg.cluster, f.name)
                                                                for f in dataclasses.fields(ClusterShape)})
    import psutil  # noqa: PLC0415

    memory, cpus = psutil.virtual_memory().total / 2**30, os.cpu_count() or 1
    return Resources(source="this machine (no ray.address, no ray.cluster)", head_memory_gb=memory,
                     cpu_node_cpus=ray_cfg.num_cpus or cpus, cpu_node_memory_gb=memory, total_gpus=0)


def measured_gpu(results_dir: str) -> dict[str, Any]:
    """The newest `bench/gpu.py` result (full mode) under `results_dir`, flattened; {} when none."""
    files = sorted(glob.glob(os.path.join(results_dir, "gpu-*.json")))
    for path in reversed(files):
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
        if report.get("meta", {}).get("mode") != "full":
            continue
        parts = {k: v.get("result", {}) for k, v in report.get("parts", {}).items() if v.get("status") == "ok"}
        out: dict[str, Any] = {"gpu": report["meta"].get("gpu"), "file": os.path.basename(path)}
        for name in ("train_b32", "train_b16"):
            if name in parts:
                out[name] = parts[name]["clips_per_s"]
        best = parts.get("captioner", {}).get("best", {})
        if "random-blip-large bfloat16" in best:
            out["caption_images_per_s"] = best["random-blip-large bfloat16"]["images_per_s"]
        if "ingest" in parts:
            out["transform_clips_per_s_per_core"] = parts["ingest"]["clips_per_s_per_core_loaded"]
        return out
    return {}


# ---------------------------------------------------------------------------------------------
# prepare


def build_prepare_report(cfg: Any, parts: list[dict[str, Any]], done_units: int, refused: str | None,
                         res: Resources, gpu: dict[str, Any]) -> Report:
    """Args: parts: each part's plan summary (planning.part summary); done_units: shards in the index."""
    rep = Report("prepare", cfg.run_name)
    clips = sum(p["clips"] for p in parts)
    units = sum(p["units"] for p in parts)
    todo_units = max(units - done_units, 0)
    todo_clips = clips * todo_units / units if units else 0
    seconds = sum(p.get("clip_seconds", 0.0) for p in parts)
    mean_s = seconds / clips if clips else 0.0
    frames = min(cfg.frames.max_frames, max(1, round(mean_s * cfg.frames.fps))) + 1  # + the middle frame
    fb = frame_bytes(cfg.frames.short_side_px)
    videos = sum(p["videos"] for p in parts)
    rep.facts += [("metadata parts", len(parts)), ("videos", videos), ("clips", clips),
                  ("malformed lines", sum(p["issues"] for p in parts)), ("units (shards)", units),
                  ("units already done", done_units), ("mean clip length s", round(mean_s, 2)),
                  ("frames stored a clip", frames), ("root", cfg.root)]
    video_mb = VIDEO_BYTES / 1e6
    todo_videos = videos * todo_units / units if units else 0
    st = cfg.storage
    whole = VIDEO_BYTES <= st.whole_read_max_mb * 2**20
    gets = 1 if whole else math.ceil(VIDEO_BYTES / (st.read_block_mb * 2**20))
    requests = todo_units * 10 + todo_videos * (1 + gets)
    rep.estimates += [
        ("output TB", round(clips * frames * fb / 1e12, 4), f"{frames} frames x {fb / 1e3:.0f} KB a clip"),
        ("decode CPU-hours", round(todo_clips / DECODE_CLIPS_PER_CORE_S / 3600, 1),
         f"{DECODE_CLIPS_PER_CORE_S} clips/s/core, bench/decode.py"),
        ("S3 requests", float(f"{requests:.3g}"), f"~{video_mb:.0f} MB a video: a HEAD and "
         + ("one GET (read whole)" if whole else f"{gets} GETs of {st.read_block_mb:g} MiB") + "; ~10 a unit"),
    ]
    rate = gpu.get("caption_images_per_s")
    rep.estimates.append(("caption GPU-hours", round(todo_clips / rate / 3600, 1) if rate else "unknown",
                          f"{rate} img/s/GPU, {gpu.get('file')}" if rate else "no bench/gpu.py result yet"))
    driver = DRIVER_BASE_GIB + gib(units * DRIVER_BYTES_PER_UNIT)
    max_unit = max((p.get("max_unit_clips", 0) for p in parts), default=0)
    decode = gib(decode_reservation(dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, decode_memory_gb=None)),
                                    max_unit))
    reserved = cfg.ray.decode_memory_gb if cfg.ray.decode_memory_gb is not None else decode
    plan_task = 0.25 + 1.5 * gib(max((p.get("size", 0) for p in parts), default=0))
    rep.estimates += [("driver memory GiB", round(driver, 2), f"{DRIVER_BASE_GIB} + {DRIVER_BYTES_PER_UNIT} B a unit"),
                      ("decode task memory GiB", round(decode, 2), f"largest unit {max_unit} clips x "
                       f"{cfg.frames.max_frames + 1} frames at most, + the video read buffer"),
                      ("plan task memory GiB", round(plan_task, 2), "largest part")]
    rep.checks.append(Check("inputs and root", refused is None, refused or "the root accepts this run"))
    rep.checks.append(Check("clips to prepare", clips > 0, f"{clips:,} clips" if clips else "the parts hold no clip"))
    rep.checks.append(_fits("driver memory", driver, res.head_memory_gb, f"head node, {res.source}"))
    if cfg.ray.decode_memory_gb is None:
        rep.checks.append(Check("decode task memory", True, f"each decode task reserves {decode:.2f} GiB "
                                "(sized from the largest unit; ray.decode_memory_gb unset)"))
    else:
        rep.checks.append(Check("decode task memory", decode <= reserved,
                                f"~{decode:.2f} GiB needed, ray.decode_memory_gb={reserved}"
                                + ("" if decode <= reserved else f": raise it to {decode:.2f} or unset it")))
    rep.checks.append(_fits("decode task on a CPU node", reserved, res.cpu_node_memory_gb or res.head_memory_gb,
                            "decode node"))
    node_mem = max(res.cpu_node_memory_gb, res.gpu_node_memory_gb, res.head_memory_gb)
    rep.checks.append(_fits("plan task memory", plan_task, node_mem, "largest node"))
    _caption_checks(rep, cfg.caption, res)
    return rep


def _caption_checks(rep: Report, caption: Any, res: Resources) -> None:
    gpus = res.total_gpus if res.total_gpus is not None else res.gpu_node_gpus
    rep.facts.append(("caption actors", caption_pool(caption, float(gpus or 0)).describe()))
    if not caption.model.startswith("builtin:"):
        rep.checks.append(Check("GPUs for captioning", bool(gpus) if gpus is not None else None,
                                f"{gpus} GPUs ({res.source})" if gpus else f"no GPU ({res.source}): "
                                f"{caption.model} would caption on CPU actors"))


def _fits(name: str, need: float, have: float, where: str) -> Check:
    if not have:
        return Check(name, None, f"~{need:.2f} GiB needed; {where} unknown")
    return Check(name, need <= have, f"~{need:.2f} GiB needed of {have:.1f} GiB ({where})")


# ---------------------------------------------------------------------------------------------
# recaption


def build_recaption_report(cfg: Any, shards: int, rows: int, done: int, shard_bytes: int, refused: str | None,
                           res: Resources, gpu: dict[str, Any]) -> Report:
    rep = Report("recaption", cfg.run_name)
    todo = shards - done
    todo_rows = rows * todo / shards if shards else 0
    images = todo_rows * (1 + (cfg.frames_per_clip if cfg.frames_per_clip > 1 else 0))
    rep.facts += [("root", cfg.root), ("caption set", cfg.caption.set_name), ("captioner", cfg.caption.model),
                  ("shards", shards), ("shards already captioned", done), ("clips to caption", round(todo_rows)),
                  ("images to caption", round(images))]
    rate = gpu.get("caption_images_per_s")
    rep.estimates += [
        ("caption GPU-hours", round(images / rate / 3600, 2) if rate else "unknown",
         f"{rate} img/s/GPU, {gpu.get('file')}" if rate else "no bench/gpu.py result yet"),
        ("GB read", round(shard_bytes * todo / max(shards, 1) * 0.1 / 1e9, 3), "middle frames: ~10% of the shards"),
    ]
    rep.checks.append(Check("root and caption set", refused is None, refused or "the root accepts this set"))
    _caption_checks(rep, cfg.caption, res)
    return rep


# ---------------------------------------------------------------------------------------------
# pretrain


def build_pretrain_report(cfg: Any, rows: int | None, open_error: str | None, params: int, flops_per_clip: float,
                          res: Resources, gpu: dict[str, Any]) -> Report:
    t = cfg.train
    rep = Report("pretrain", cfg.run_name)
    world = t.num_workers
    global_batch = t.global_batch()
    spe = (rows or 0) // global_batch
    total = t.max_steps or spe * t.epochs
    rep.facts += [("dataset root", cfg.root), ("view", t.view),
                  ("clips", rows if rows is not None else "unknown"), ("workers (ranks)", world),
                  ("GPUs", world if t.use_gpu else 0), ("global batch", global_batch),
                  ("forwards a worker a step", f"{t.chunks(world)} of {t.micro_batch_size} clips"
                   + (" (gradient caching)" if t.chunks(world) > 1 else "")), ("steps per epoch", spe),
                  ("steps", total), ("model parameters", params), ("precision / ZeRO", f"{t.precision} / {t.zero_stage}")]
    ckpt = params * CHECKPOINT_BYTES_PER_PARAM
    rep.estimates += [("checkpoint GB", round(ckpt / 1e9, 2), f"{CHECKPOINT_BYTES_PER_PARAM} B a parameter"),
                      ("checkpoint storage GB", round(ckpt * t.keep_checkpoints / 1e9, 2), f"{t.keep_checkpoints} kept"),
                      ("model TFLOP a clip", round(flops_per_clip / 1e12, 3), "pipeline/model/flops.py")]
    key = f"train_{cfg.model.preset}"
    per_gpu, basis = gpu.get(key), f"{gpu.get('file')}, measured"
    if not per_gpu and t.use_gpu:
        per_gpu = ASSUMED_PEAK_TFLOPS * 1e12 * ASSUMED_MFU / flops_per_clip
        basis = f"assumed: H100 bf16 peak at {ASSUMED_MFU:.0%} MFU"
    if per_gpu:
        hours = total * global_batch / (per_gpu * world) / 3600
        rep.estimates += [("clips/s per GPU", round(per_gpu, 1), basis), ("wall hours", round(hours, 1), basis)]
    rep.checks.append(Check("dataset opens", open_error is None, open_error or f"{rows:,} clips, 2 object reads"))
    if rows is not None:
        rep.checks.append(Check("one global batch", spe >= 1, f"{rows:,} clips for a global batch of {global_batch:,}"))
    if t.use_gpu and per_gpu:
        transform = gpu.get("transform_clips_per_s_per_core", TRANSFORM_CLIPS_PER_CORE_S)
        need = per_gpu / transform
        if res.gpu_node_gpus:
            have = res.gpu_node_cpus / res.gpu_node_gpus - t.cpus_per_worker
            rep.checks.append(Check("loader CPUs per GPU", need <= have,
                                    f"~{need:.1f} cores for {per_gpu:.0f} clips/s at {transform:.0f} clips/s/core; "
                                    f"{have:.1f} left per GPU ({res.source})"))
        else:
            rep.checks.append(Check("loader CPUs per GPU", None, f"~{need:.1f} cores needed; no GPU node known"))
    return rep


# ---------------------------------------------------------------------------------------------
# Gathering the facts (reads only; parts are planned on Ray without writing their plans)


def _nodes() -> list[dict[str, Any]] | None:
    import ray  # noqa: PLC0415

    return ray.nodes() if ray.is_initialized() else None


def plan_prepare(cfg: Any, results_dir: str, connected: bool) -> Report:
    from pipeline.data.index import FRAMES, read_index  # noqa: PLC0415
    from pipeline.data.inputs import open_root  # noqa: PLC0415
    from pipeline.data.planning import summarize_parts  # noqa: PLC0415

    refused, done = None, 0
    try:
        inputs = open_root(cfg, dry_run=True)
    except (ValueError, OSError) as e:  # OSError: an input S3 refuses (credentials, access)
        refused = str(e)
        return build_prepare_report(cfg, [], 0, refused, resources_from(cfg.ray, _nodes() if connected else None),
                                    measured_gpu(results_dir))
    parts = summarize_parts(inputs.root, inputs.parts, cfg.data.clips_per_shard)
    if inputs.manifest is not None:
        done = read_index(inputs.root, FRAMES, [p.name for p in inputs.parts]).num_rows
    return build_prepare_report(cfg, parts, done, refused, resources_from(cfg.ray, _nodes() if connected else None),
                                measured_gpu(results_dir))


def plan_recaption(cfg: Any, results_dir: str, connected: bool) -> Report:
    from pipeline.data import captions as capsets  # noqa: PLC0415
    from pipeline.data.index import FRAMES, captions_kind, read_index  # noqa: PLC0415
    from pipeline.data.root import DatasetRoot  # noqa: PLC0415
    from pipeline.utils import fs  # noqa: PLC0415

    res, gpu = resources_from(cfg.ray, _nodes() if connected else None), measured_gpu(results_dir)
    root = DatasetRoot(cfg.root, fs.S3Options.of(cfg.storage))
    try:
        manifest = root.open()
    except ValueError as e:
        return build_recaption_report(cfg, 0, 0, 0, 0, f"root: {e}", res, gpu)
    order = root.parts(manifest)
    frames = read_index(root, FRAMES, order, pending=False)
    refused = None
    meta = fs.read_json_or_none(root.caption_set_uri(cfg.caption.set_name), root.opts)
    want = capsets.set_fingerprint(cfg.caption, str(manifest["fingerprint"]), cfg.frames_per_clip)
    if meta is not None and meta.get("fingerprint") != want:
        refused = (f"caption set {cfg.caption.set_name!r} exists with another captioner or config "
                   f"(model {meta.get('config', {}).get('model')!r}); choose another caption.set_name")
    done = read_index(root, captions_kind(cfg.caption.set_name), order).num_rows if meta is not None else 0
    rows = int(sum(frames.column("rows").to_pylist()))
    return build_recaption_report(cfg, frames.num_rows, rows, done, int(sum(frames.column("bytes").to_pylist())),
                                  refused, res, gpu)


def plan_pretrain(cfg: Any, results_dir: str, connected: bool) -> Report:
    import torch  # noqa: PLC0415

    from pipeline.data.loader import ViewIndex  # noqa: PLC0415
    from pipeline.model.clip_vip import CLIPViPModel, config_from_model_cfg  # noqa: PLC0415
    from pipeline.model.flops import train_flops_per_clip  # noqa: PLC0415
    from pipeline.model.losses import build_loss  # noqa: PLC0415
    from pipeline.utils import fs  # noqa: PLC0415

    rows, error = None, None
    try:
        index = ViewIndex.open(cfg.root, cfg.train.view, fs.S3Options.of(cfg.storage))
        index.check_size(cfg.train.image_size_px)
        rows = index.num_rows
    except (ValueError, OSError) as e:  # OSError: an input S3 refuses (credentials, access)
        error = str(e)
    config = config_from_model_cfg(cfg.model)
    with torch.device("meta"):  # shapes only: no memory, no init, nothing downloaded
        params = sum(p.numel() for p in CLIPViPModel(config).parameters())
    flops = train_flops_per_clip(config, cfg.train.num_frames, cfg.model.max_text_len,
                                 build_loss(cfg.loss).sources).total
    return build_pretrain_report(cfg, rows, error, params, flops,
                                 resources_from(cfg.ray, _nodes() if connected else None), measured_gpu(results_dir))
