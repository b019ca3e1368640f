"""The `prepare` plan: HD-VILA metadata -> work units -> Ray Data stages -> dataset root.

    driver   read metadata + subtitles, plan deterministic units, check/init manifest.json
    Stage 1  decode  (CPU tasks, 1 unit -> 1 row)   decode each video once, write frame shard,
                                                    quarantine rows, sidecar (done marker)
    Stage 2  caption (actor pool, GPU when present, 1 shard -> 1 row)  read middle frames,
                                                    caption, write caption part + sidecar
    driver   progress line per shard; aggregate sidecars into manifest.json + caption_set.json

Resume is "run the same command again": units whose sidecars exist pass through both stages
without work. The caller owns `ray.init` (library code never starts Ray).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from pipeline import schema
from pipeline.config import CaptionConfig, PrepareJobConfig, fingerprint, to_dict
from pipeline.data import captions as capsets
from pipeline.data.manifest import (
    WorkUnit,
    attach_subtitle_table,
    expand_uris,
    inputs_digest,
    plan_units,
    read_metadata,
)
from pipeline.data.shards import UnitContext, frames_sidecar_uri, process_unit, write_table_atomic
from pipeline.data.subtitles import load_subtitle_table
from pipeline.utils import fs


class RootConflict(ValueError):
    """The dataset root was built from other inputs or settings."""


@dataclass(slots=True)
class PrepareSummary:
    root: str
    caption_set: str
    units: int = 0
    units_skipped: int = 0
    clips: int = 0
    clips_ok: int = 0
    clips_quarantined: int = 0
    quarantined_by_stage: dict[str, int] = field(default_factory=dict)
    metadata_issues: int = 0
    frames: int = 0
    bytes: int = 0
    captions_ok: int = 0
    captions_failed: int = 0
    wall_s: float = 0.0

    def clips_per_s(self) -> float:
        return self.clips / self.wall_s if self.wall_s > 0 else 0.0

    def render(self) -> str:
        stages = ", ".join(f"{k}={v}" for k, v in sorted(self.quarantined_by_stage.items())) or "none"
        return "\n".join([
            "prepare summary",
            f"  output          {self.root}",
            f"  shards          {self.units} ({self.units_skipped} already done before this run)",
            f"  clips           {self.clips_ok} ok, {self.clips_quarantined} quarantined ({stages}); "
            f"{self.metadata_issues} malformed input lines",
            f"  frames          {self.frames} ({self.bytes / 1e6:.1f} MB of frame shards)",
            f"  captions        {self.captions_ok} in set {self.caption_set!r}, {self.captions_failed} failed",
            f"  throughput      {self.clips_per_s():.2f} clips/s over {self.wall_s:.1f} s",
        ])


# ---------------------------------------------------------------------------------------------
# Driver-side planning


@dataclass(slots=True)
class Plan:
    units: list[WorkUnit]
    issues: list[dict[str, str]]
    """Quarantine rows for malformed metadata lines and subtitle-table rows (file:line in error)."""
    subtitles_dir: str | None
    fingerprint: str
    identity: dict[str, Any]


def check_inputs(cfg: PrepareJobConfig) -> list[str]:
    """Fail fast, naming the key, when an input path is missing; returns the metadata files."""
    opts = s3_options(cfg)
    for uri in cfg.data.metadata:
        if not fs.exists(uri, opts) and not fs.is_dir(uri, opts):
            raise FileNotFoundError(f"data.metadata: {uri} does not exist")
    metadata = expand_uris(cfg.data.metadata, opts)  # a directory means its *.jsonl parts
    if not metadata:
        raise FileNotFoundError(f"data.metadata: no *.jsonl files in {list(cfg.data.metadata)}")
    if not fs.is_dir(cfg.data.video_root, opts):
        raise FileNotFoundError(f"data.video_root: {cfg.data.video_root} is not a directory")
    subs = cfg.data.subtitles
    if subs is not None and not fs.exists(subs, opts) and not fs.is_dir(subs, opts):
        raise FileNotFoundError(f"data.subtitles: {cfg.data.subtitles} does not exist")
    return metadata


def make_plan(cfg: PrepareJobConfig) -> Plan:
    """Read inputs and cut them into units; the fingerprint names everything that shapes output."""
    opts = s3_options(cfg)
    metadata = check_inputs(cfg)
    videos, meta_issues = read_metadata(metadata, opts)
    table_issues: list[dict[str, str]] = []
    subtitles_dir, subtitles_id = None, None
    if cfg.data.subtitles is not None:
        if fs.is_dir(cfg.data.subtitles, opts):
            subtitles_dir, subtitles_id = cfg.data.subtitles, {"dir": cfg.data.subtitles}
        else:
            table = load_subtitle_table(cfg.data.subtitles, opts)
            videos = attach_subtitle_table(videos, table)
            table_issues = [{"clip_id": "", "video_id": "", "stage": schema.STAGE_SUBTITLE,
                             "error": f"{src}: {err}", "source_uri": cfg.data.subtitles}
                            for src, err in table.issues]
            subtitles_id = {"table": inputs_digest([cfg.data.subtitles], opts)}
    units = plan_units(videos, cfg.data.clips_per_shard)
    frames_cfg = to_dict(cfg.frames)
    frames_cfg.pop("decode_threads")  # threads change speed, not bytes
    identity = {
        "schema_version": schema.SCHEMA_VERSION,
        "metadata": inputs_digest(metadata, opts),
        "subtitles": subtitles_id,
        "video_root": cfg.data.video_root,
        "video_extensions": list(cfg.data.video_extensions),
        "clips_per_shard": cfg.data.clips_per_shard,
        "frames": frames_cfg,
    }
    issues = [i.to_quarantine_row() for i in meta_issues] + table_issues
    return Plan(units, issues, subtitles_dir, fingerprint(identity), identity)


def s3_options(cfg: PrepareJobConfig) -> fs.S3Options:
    return fs.S3Options.of(cfg.storage)


def manifest_uri(root: str) -> str:
    return fs.join(root, "manifest.json")


def open_root(cfg: PrepareJobConfig, plan: Plan) -> None:
    """Refuse a root built from other inputs/settings (unless data.force); record the plan."""
    opts = s3_options(cfg)
    uri = manifest_uri(cfg.data.root)
    if fs.exists(uri, opts):
        old = fs.read_json(uri, opts)
        if old.get("fingerprint") != plan.fingerprint:
            if not cfg.data.force:
                changed = sorted(k for k in plan.identity if old.get("inputs", {}).get(k) != plan.identity[k])
                raise RootConflict(
                    f"{cfg.data.root} was prepared with other inputs or frame settings "
                    f"(changed: {', '.join(changed) or 'unknown'}). Use a new data.root, or set "
                    f"data.force=true to delete its frames, captions and quarantine and rebuild.")
            for sub in ("frames", "captions", "quarantine"):
                fs.delete_dir(fs.join(cfg.data.root, sub), opts)
    fs.write_json_atomic(uri, {
        "schema_version": schema.SCHEMA_VERSION,
        "status": "in_progress",
        "fingerprint": plan.fingerprint,
        "inputs": plan.identity,
        "num_units": len(plan.units),
    }, opts)
    if plan.issues:
        write_table_atomic(fs.join(cfg.data.root, "quarantine", "metadata.parquet"),
                           pa.Table.from_pylist(plan.issues, schema=schema.QUARANTINE_SCHEMA), opts)


# ---------------------------------------------------------------------------------------------
# Ray stages (thin wrappers around shards.process_unit / captions.caption_shard)


def make_decode_fn(ctx: UnitContext):
    """Row function for stage 1: {"unit": json} -> sidecar summary of that unit."""

    def decode(row: dict[str, Any]) -> dict[str, Any]:
        unit = WorkUnit.from_dict(json.loads(row["unit"]))
        side = process_unit(unit, ctx)
        return {"unit": unit.index, "frames_json": json.dumps(side)}

    return decode


class ShardCaptionStage:
    """Caption actor (prepare stage 2, recaption's only stage): loads the captioner once, then
    captions whole shards (batch_size=1); input columns pass through, `caption_json` is added."""

    def __init__(self, caption_cfg: dict[str, Any], root: str, set_fp: str, s3: dict[str, Any],
                 frames_per_clip: int = 1) -> None:
        from pipeline.config import CaptionConfig, build_dataclass  # noqa: PLC0415
        from pipeline.data.captioner import FrameCaptioner  # noqa: PLC0415  heavy: torch/transformers

        self.cfg = build_dataclass(CaptionConfig, caption_cfg)
        self.root, self.set_fp, self.s3 = root, set_fp, fs.S3Options(**s3)
        self.frames_per_clip = frames_per_clip
        self.captioner = FrameCaptioner(self.cfg)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = []
        for index in batch["unit"]:
            side = capsets.caption_shard(self.root, self.cfg.set_name, int(index), self.captioner,
                                         self.set_fp, self.s3, frames_per_clip=self.frames_per_clip)
            out.append(json.dumps(side))
        return dict(batch, caption_json=out)


def caption_resources(caption: CaptionConfig) -> tuple[dict[str, Any], int]:
    """(remote args, max actors): GPUs when the cluster has them, else one CPU actor."""
    import ray  # noqa: PLC0415

    gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus > 0:
        per = caption.num_gpus_per_actor
        return {"num_gpus": per}, caption.max_actors or max(1, int(gpus / per))
    return {"num_cpus": 1}, caption.max_actors or 1


def run_prepare(cfg: PrepareJobConfig, log=print) -> PrepareSummary:
    """Run (or resume) the prepare job on the connected Ray cluster."""
    import ray  # noqa: PLC0415
    import ray.data  # noqa: PLC0415

    t0 = time.perf_counter()
    opts = s3_options(cfg)
    plan = make_plan(cfg)
    open_root(cfg, plan)
    capset = capsets.open_caption_set(cfg.data.root, cfg.caption, plan.fingerprint, opts, force=cfg.data.force)
    log(f"[prepare] {len(plan.units)} shards planned from {sum(u.num_clips() for u in plan.units)} clips; "
        f"{len(plan.issues)} malformed input lines quarantined")

    ctx = UnitContext(root=cfg.data.root, video_root=cfg.data.video_root,
                      video_extensions=cfg.data.video_extensions, subtitles_dir=plan.subtitles_dir,
                      frames=cfg.frames, s3=opts, fingerprint=plan.fingerprint)
    summary = PrepareSummary(root=cfg.data.root, caption_set=cfg.caption.set_name, units=len(plan.units),
                             metadata_issues=len(plan.issues))
    if plan.units:
        ctx_data = ray.data.DataContext.get_current()
        ctx_data.enable_progress_bars = cfg.ray.progress_bars
        items = [{"unit": json.dumps(u.to_dict())} for u in plan.units]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        # A memory reservation sized for one unit's decode; as the stages' remote args differ it
        # also keeps Ray from fusing decode into the caption actors: decode must scale on CPU
        # tasks, independently of how many captioner actors (GPUs) exist. Ray's default task
        # retries cover a killed worker (a redone unit rewrites identical bytes).
        ds = ds.map(make_decode_fn(ctx), num_cpus=cfg.ray.decode_cpus_per_task,
                    memory=cfg.ray.decode_memory_gb * 2**30)
        remote_args, max_actors = caption_resources(cfg.caption)
        ds = ds.map_batches(
            ShardCaptionStage,
            fn_constructor_kwargs={"caption_cfg": to_dict(cfg.caption), "root": cfg.data.root,
                                   "set_fp": capset["fingerprint"], "s3": asdict(opts)},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
            **remote_args,
        )
        done = 0
        for row in ds.iter_rows():
            done += 1
            frames_side = json.loads(row["frames_json"])
            cap_side = json.loads(row["caption_json"])
            _accumulate(summary, frames_side, cap_side)
            elapsed = time.perf_counter() - t0
            rate = summary.clips / elapsed if elapsed > 0 else 0.0
            eta = (len(plan.units) - done) * elapsed / done
            log(f"[prepare] shard {frames_side['unit']:5d} {'(resumed) ' if frames_side.get('skipped') else ''}"
                f"{done}/{len(plan.units)}: {frames_side['rows']} ok, {frames_side['quarantined']} quarantined "
                f"| {rate:.2f} clips/s, ETA {eta:.0f} s")
    summary.wall_s = time.perf_counter() - t0
    finish_root(cfg, plan, summary, capset)
    return summary


def _accumulate(summary: PrepareSummary, frames_side: dict[str, Any], cap_side: dict[str, Any]) -> None:
    summary.units_skipped += int(bool(frames_side.get("skipped")) and bool(cap_side.get("skipped")))
    summary.clips += frames_side["clips"]
    summary.clips_ok += frames_side["rows"]
    summary.clips_quarantined += frames_side["quarantined"]
    for k, v in frames_side.get("quarantined_by_stage", {}).items():
        summary.quarantined_by_stage[k] = summary.quarantined_by_stage.get(k, 0) + v
    summary.frames += frames_side["frames"]
    summary.bytes += frames_side["bytes"]
    summary.captions_ok += cap_side["captioned"]
    summary.captions_failed += cap_side["failed"]


def finish_root(cfg: PrepareJobConfig, plan: Plan, summary: PrepareSummary, capset: dict[str, Any]) -> None:
    """Verify every unit is done, then write caption_set.json and manifest.json (last)."""
    opts = s3_options(cfg)
    missing = [u.index for u in plan.units if not fs.exists(frames_sidecar_uri(cfg.data.root, u.index), opts)]
    if missing:
        raise RuntimeError(f"prepare finished with {len(missing)} shards not done (first: {missing[:5]}); "
                           "run the same command again to resume")
    capsets.finish_caption_set(cfg.data.root, capset, len(plan.units), opts, wall_s=summary.wall_s)
    counts = {
        "shards": summary.units, "clips": summary.clips, "clips_ok": summary.clips_ok,
        "clips_quarantined": summary.clips_quarantined, "quarantined_by_stage": summary.quarantined_by_stage,
        "metadata_issues": summary.metadata_issues, "frames": summary.frames, "frame_bytes": summary.bytes,
    }
    fs.write_json_atomic(manifest_uri(cfg.data.root), {
        "schema_version": schema.SCHEMA_VERSION,
        "status": "complete",
        "fingerprint": plan.fingerprint,
        "inputs": plan.identity,
        "num_units": len(plan.units),
        "counts": counts,
        # Every complete set on the root (recaptioned ones too), not only this job's.
        "caption_sets": capsets.complete_caption_sets(cfg.data.root, opts),
    }, opts)
