"""The `prepare` job: metadata parts -> planned units -> Ray Data stages -> one dataset root.

    driver   (before Ray) list and stat the metadata parts; refuse changed settings, changed or
             missing parts, a caption-set conflict                   [inputs.py; 1-2 requests a part]
    plan     planning.plan_inputs: Ray tasks cut new parts into units and join the subtitle
             table to them; the driver keeps part summaries and unit descriptors   [planning.py]
    Stage 1  decode  (CPU tasks, 1 unit -> 1 row)   read the unit's metadata lines, decode each
                                                    video once, write the frame shard, quarantine
                                                    rows, sidecar (done marker)
    Stage 2  caption (actor pool, caption_stage.py, 1 shard -> 1 row)  read middle frames,
                                                    caption, write caption part + sidecar
    driver   progress line per shard; index rows as fragments as units finish; at the end the
             compacted indexes, caption_set.json and manifest.json (last)

Resume is "run the same command again": units in the index are not scheduled, units with
sidecars pass through both stages without work. Adding parts to `data.metadata` grows the root:
only the new parts are planned and processed. The caller owns `ray.init`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline import schema
from pipeline.config import PrepareJobConfig, to_dict
from pipeline.data import captions as capsets
from pipeline.data import retry
from pipeline.data.caption_stage import WaitingForGpus, add_caption_stage, caption_pool
from pipeline.data.index import (
    FRAMES,
    IndexWriter,
    captions_kind,
    captions_row,
    compact_index,
    frames_row,
    read_index,
)
from pipeline.data.inputs import EmptyInput, Inputs, open_root
from pipeline.data.memory import decode_reservation
from pipeline.data.metadata import UnitSpec, read_unit
from pipeline.data.planning import InputPlan, plan_inputs, read_units
from pipeline.data.progress import JobProgress, Progressed
from pipeline.data.root import (
    RootConflict,
    base_part,
)
from pipeline.data.shards import UnitContext, find_video, process_unit
from pipeline.tracking import log_job_totals, open_job_run, run_link
from pipeline.utils import fs
from pipeline.utils.s3 import TransientS3Error

__all__ = ["EmptyInput", "PrepareSummary", "RootConflict", "open_root", "run_prepare"]


@dataclass(slots=True)
class PrepareSummary:
    root: str
    caption_set: str
    parts: int = 0
    parts_planned: int = 0
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
    clips_this_run: int = 0
    retryable: int = 0
    wall_s: float = 0.0
    mlflow_run: str | None = None
    """`<run id> at <tracking uri>` of the job's MLflow run (None: tracking off)."""

    def clips_per_s(self) -> float:
        return self.clips_this_run / self.wall_s if self.wall_s > 0 else 0.0

    def render(self) -> str:
        stages = ", ".join(f"{k}={v}" for k, v in sorted(self.quarantined_by_stage.items())) or "none"
        return "\n".join([
            "prepare summary",
            f"  output          {self.root}",
            f"  metadata parts  {self.parts} ({self.parts_planned} planned in this run)",
            f"  shards          {self.units} ({self.units_skipped} already done before this run)",
            f"  clips           {self.clips_ok} ok, {self.clips_quarantined} quarantined ({stages}); "
            f"{self.metadata_issues} malformed input lines",
            f"  frames          {self.frames} ({self.bytes / 1e6:.1f} MB of frame shards)",
            f"  captions        {self.captions_ok} in set {self.caption_set!r}, {self.captions_failed} failed",
            f"  throughput      {self.clips_per_s():.2f} clips/s over {self.wall_s:.1f} s "
            f"({self.clips_this_run} clips this run)",
        ] + ([f"  retryable       {self.retryable} clips quarantined at stage read (storage kept failing): "
              "run again with --set data.retry_quarantined=true"] if self.retryable else [])
            + ([f"  MLflow run      {self.mlflow_run}"] if self.mlflow_run else []))

    def totals(self) -> dict[str, float]:
        """The root's final counts, as the job's MLflow run keeps them."""
        out = {"prepare/total/clips_ok": self.clips_ok, "prepare/total/clips_quarantined": self.clips_quarantined,
               "prepare/total/frames": self.frames, "prepare/total/frame_bytes": self.bytes,
               "prepare/total/captions": self.captions_ok, "prepare/total/captions_failed": self.captions_failed,
               "prepare/total/metadata_issues": self.metadata_issues, "prepare/wall_s": self.wall_s}
        out.update({f"prepare/total/quarantined/{k}": v for k, v in self.quarantined_by_stage.items()})
        return out


# ---------------------------------------------------------------------------------------------
# Ray stages (thin wrappers around shards.process_unit; the caption stage is caption_stage.py)


def make_decode_fn(ctx: UnitContext):
    """Row function for stage 1: {"unit": json, "part_uri"} -> sidecar summary of that unit."""

    def decode(row: dict[str, Any]) -> dict[str, Any]:
        spec = UnitSpec.from_dict(json.loads(row["unit"]))
        side = process_unit(spec, row["part_uri"], ctx)
        return {"unit": row["unit"], "frames_json": json.dumps(side)}

    return decode


def check_videos(cfg: PrepareJobConfig, inputs: Inputs, plan: InputPlan, sample: int = 16) -> None:
    """Fail fast when data.video_root holds none of the first listed videos.

    Raises:
        EmptyInput: none of up to `sample` videos of the first units is found (the message shows
            what the video root does hold).
    """
    uris = {p.name: p.uri for p in inputs.parts}
    ctx = UnitContext(root=cfg.root, video_root=cfg.data.video_root, video_extensions=cfg.data.video_extensions,
                      subtitles=None, subtitles_dir=None, frames=cfg.frames, s3=inputs.root.opts, fingerprint="")
    tried: list[str] = []
    for spec in plan.units:
        for video in read_unit(uris[spec.part], spec, inputs.root.opts):
            try:
                if find_video(ctx, video.video_id) is not None:
                    return
            except TransientS3Error:
                continue  # unreachable now, not known missing: its decode task retries and decides
            tried.append(video.video_id)
            if len(tried) >= sample:
                break
        if len(tried) >= sample:
            break
    if not tried:
        return  # every sampled video was unreachable: the decode tasks retry and decide
    held = [u.rsplit("/", 1)[-1] for u in fs.list_files(cfg.data.video_root, inputs.root.opts)[:3]]
    raise EmptyInput(f"data.video_root: none of the first {len(tried)} listed videos (e.g. {tried[0]}."
                     f"{{{','.join(cfg.data.video_extensions)}}}) is under {cfg.data.video_root}, which holds "
                     f"{held or 'nothing'}")


# ---------------------------------------------------------------------------------------------
# The job


def run_prepare(cfg: PrepareJobConfig, log=print, inputs: Inputs | None = None) -> PrepareSummary:
    """Run (or resume, or grow, or retry) the prepare job on the connected Ray cluster.

    Raises:
        EmptyInput: the parts hold no usable clip, or the video root none of their videos.
        (and what `open_root` raises, when `inputs` is not given)
    """
    t0 = time.perf_counter()
    inputs = inputs or open_root(cfg)
    root = inputs.root
    # The job's MLflow run opens before any Ray work: a submitted job's working directory (its cwd,
    # which MLflow's sqlite store resolves against when a client is made) may be gone after its
    # first tasks have run. Every later call goes through this tracker's client.
    tracker = open_job_run(cfg.tracking, "prepare", cfg.run_name, root.uri, inputs.fingerprint, to_dict(cfg))
    for written in [root.path(d) for d in ("frames", "quarantine", "plan", "index")] + [
            root.caption_set_dir(cfg.caption.set_name)]:
        fs.remove_stale_temp_files(written)  # a killed run's half-written files
    try:
        summary = _prepare(cfg, log, inputs, tracker, t0)
    except BaseException:
        tracker.close("FAILED")
        raise
    log_job_totals(tracker, summary.totals(), summary.units)
    tracker.close("FINISHED")
    return summary


def _prepare(cfg: PrepareJobConfig, log, inputs: Inputs, tracker: Any, t0: float) -> PrepareSummary:
    import ray  # noqa: PLC0415
    import ray.data  # noqa: PLC0415

    root = inputs.root
    ray.data.DataContext.get_current().enable_progress_bars = cfg.ray.progress_bars
    if inputs.table is not None and inputs.table["sha256"] is None:
        inputs.table["sha256"] = ray.get(ray.remote(fs.sha256_of).remote(inputs.table["uri"], root.opts))
    plan = plan_inputs(root, inputs.parts, cfg.data.clips_per_shard, inputs.table, log)
    if plan.clips == 0:
        lines = sum(p["lines"] for p in plan.parts)
        raise EmptyInput(f"data.metadata: the {len(plan.parts)} part(s) hold no usable clip ({lines} lines, "
                         f"{plan.issues} malformed); see {root.path('quarantine')}/<part>/metadata.parquet")
    # Retry attempts registered by earlier runs always finish; new ones only when asked for.
    attempts = [r for r in (inputs.manifest or {}).get("parts", []) if r.get("retry_of")]
    order = [p.name for p in inputs.parts] + [r["name"] for r in attempts]
    units = plan.units + [u for r in attempts for u in read_units(root, r["name"])]
    frames_index = read_index(root, FRAMES, order)
    if cfg.data.retry_quarantined:
        new, retry_units = retry.plan_retries(root, plan.parts + attempts, frames_index, plan.units,
                                              {p.name: p.uri for p in inputs.parts})
        attempts, units = attempts + new, units + retry_units
        order += [r["name"] for r in new]
        log(f"[prepare] retrying {sum(u.clips for u in retry_units)} clips quarantined at a retryable stage "
            f"in {len(retry_units)} new shards" if retry_units else "[prepare] no retryable clip to retry")
    root.write_manifest(_manifest(inputs, plan, attempts, "in_progress"))  # parts before their shards
    done = set(zip(frames_index.column("part").to_pylist(), frames_index.column("unit").to_pylist()))
    if not done:
        check_videos(cfg, inputs, plan)
    capset = capsets.open_caption_set(root, cfg.caption, inputs.fingerprint, force=cfg.data.force)
    cap_kind = captions_kind(cfg.caption.set_name)
    cap_index = read_index(root, cap_kind, order)
    cap_done = set(zip(cap_index.column("part").to_pylist(), cap_index.column("unit").to_pylist()))
    todo = [u for u in units if (u.part, u.unit) not in done or (u.part, u.unit) not in cap_done]
    log(f"[prepare] {len(units)} shards from {plan.clips} clips in {len(plan.parts)} part(s); "
        f"{len(units) - len(todo)} done before, {len(todo)} to do; {plan.issues} malformed input lines")

    summary = PrepareSummary(root=root.uri, caption_set=cfg.caption.set_name, parts=len(plan.parts),
                             parts_planned=len(plan.planned_now), units=len(units), units_skipped=len(units) - len(todo))
    summary.mlflow_run = run_link(tracker)
    if todo:
        frames_writer, cap_writer = IndexWriter(root, FRAMES), IndexWriter(root, cap_kind)
        _run_stages(cfg, inputs, capset, todo, done, cap_done, frames_writer, cap_writer, summary, t0, log,
                    Progressed(tracker, JobProgress("prepare"), len(units) - len(todo)))
        frames_writer.flush()
        cap_writer.flush()
    _finish(root, capset, inputs, plan, attempts, order, cap_kind, summary, time.perf_counter() - t0)
    return summary


def _finish(root: Any, capset: dict[str, Any], inputs: Inputs, plan: InputPlan, attempts: list[dict[str, Any]],
            order: list[str], cap_kind: str, summary: PrepareSummary, wall_s: float) -> None:
    """Indexes compacted, the caption set and the manifest written complete, the summary's totals."""
    summary.wall_s = wall_s
    units = summary.units
    frames_index = compact_index(root, FRAMES, order)
    missing = units - frames_index.num_rows
    if missing:
        raise RuntimeError(f"prepare finished with {missing} shards not done; run the same command again to resume")
    capsets.finish_caption_set(root, capset, frames_index, order, wall_s=summary.wall_s)
    root.write_manifest(_manifest(inputs, plan, attempts, "complete", frames_index=frames_index,
                                  caption_sets=capsets.complete_caption_sets(root)))
    _totals(summary, frames_index, compact_index(root, cap_kind, order), plan)


MAX_UNIT_BLOCKS = 4096
"""Blocks of the unit dataset: one unit per block up to this many units, then several units per
block. Each block is an object the driver owns: 200K one-unit blocks took 188 s and 0.8 GiB of
driver memory to create, 4096 blocks 4.5 s and 64 MB (a 2-core VM)."""


def unit_dataset(units: list[UnitSpec], part_uris: dict[str, str]) -> Any:
    """The decode stage's input: one row per unit descriptor (JSON), with its part's location."""
    import ray.data  # noqa: PLC0415

    items = [{"unit": json.dumps(u.to_dict()), "part_uri": part_uris[u.part]} for u in units]
    return ray.data.from_items(items, override_num_blocks=min(len(items), MAX_UNIT_BLOCKS))


def _run_stages(cfg: PrepareJobConfig, inputs: Inputs, capset: dict[str, Any], todo: list[UnitSpec],
                done: set, cap_done: set, frames_writer: IndexWriter, cap_writer: IndexWriter,
                summary: PrepareSummary, t0: float, log, progressed: Progressed) -> None:
    import ray  # noqa: PLC0415
    import ray.data  # noqa: PLC0415

    root = inputs.root
    kind = "table" if inputs.table is not None else "dir"
    ctx = UnitContext(root=root.uri, video_root=cfg.data.video_root, video_extensions=cfg.data.video_extensions,
                      subtitles=kind, subtitles_dir=cfg.data.subtitles if kind == "dir" else None,
                      frames=cfg.frames, s3=root.opts, fingerprint=inputs.fingerprint)
    uris = {p.name: p.uri for p in inputs.parts}
    ds = unit_dataset(todo, {u.part: uris[base_part(u.part)] for u in todo})
    # A memory reservation sized for one unit's decode; as the stages' remote args differ it
    # also keeps Ray from fusing decode into the caption actors: decode must scale on CPU
    # tasks, independently of how many captioner actors (GPUs) exist. Ray's default task
    # retries cover a killed worker (a redone unit rewrites identical bytes).
    memory = decode_reservation(cfg, max(u.clips for u in todo))
    ds = ds.map(make_decode_fn(ctx), num_cpus=cfg.ray.decode_cpus_per_task, memory=memory)
    pool = caption_pool(cfg.caption, float(ray.cluster_resources().get("GPU", 0)))
    log(f"[prepare] decode tasks reserve {memory / 2**30:.2f} GiB each"
        f"{'' if cfg.ray.decode_memory_gb else ' (sized from the largest unit, ' + str(max(u.clips for u in todo)) + ' clips)'}"
        f"; {pool.describe()}")
    ds = add_caption_stage(ds, cfg.caption, pool, root, capset["fingerprint"])
    with WaitingForGpus(pool, log, "prepare") as watch:
        _drain(ds, todo, done, cap_done, frames_writer, cap_writer, summary, t0, log, watch, progressed)


def _drain(ds: Any, todo: list[UnitSpec], done: set, cap_done: set, frames_writer: IndexWriter,
           cap_writer: IndexWriter, summary: PrepareSummary, t0: float, log, watch: WaitingForGpus,
           progressed: Progressed) -> None:
    """Index rows and progress lines from the stages' results, as they arrive."""
    for n, row in enumerate(ds.iter_rows(), start=1):
        watch.seen()
        frames_side, cap_side = json.loads(row["frames_json"]), json.loads(row["caption_json"])
        key = (frames_side["part"], int(frames_side["unit"]))
        if key not in done:
            frames_writer.add(frames_row(frames_side))
        if key not in cap_done:
            cap_writer.add(captions_row(cap_side))
        if not frames_side.get("skipped"):
            summary.clips_this_run += frames_side["clips"]
        elif cap_side.get("skipped"):  # done by a run killed before its index rows were written
            summary.units_skipped += 1
        progressed.progress.add_frames(frames_side)
        progressed.progress.add_captions(cap_side)
        progressed.shard(n)
        elapsed = time.perf_counter() - t0
        rate = summary.clips_this_run / elapsed if elapsed > 0 else 0.0
        log(f"[prepare] shard {key[0]}/{schema.part_name(key[1])} {'(resumed) ' if frames_side.get('skipped') else ''}"
            f"{n}/{len(todo)}: {frames_side['rows']} ok, {frames_side['quarantined']} quarantined "
            f"| {rate:.2f} clips/s, ETA {(len(todo) - n) * elapsed / n:.0f} s")


def _manifest(inputs: Inputs, plan: InputPlan, attempts: list[dict[str, Any]], status: str, frames_index: Any = None,
              caption_sets: list[str] | None = None) -> dict[str, Any]:
    stats = {p.name: p for p in inputs.parts}
    parts = [dict(p, version=stats[p["name"]].version) for p in plan.parts] + attempts
    manifest: dict[str, Any] = {
        "schema_version": schema.SCHEMA_VERSION, "status": status, "fingerprint": inputs.fingerprint,
        "settings": inputs.settings, "parts": parts, "subtitles_table": inputs.table,
        "caption_sets": caption_sets if caption_sets is not None else (inputs.manifest or {}).get("caption_sets", []),
        "views": (inputs.manifest or {}).get("views", []),  # a grown root keeps its views (each covers its own state)
    }
    if frames_index is not None:
        manifest["counts"] = _frame_counts(frames_index, plan)
    return manifest


def _frame_counts(frames_index: Any, plan: InputPlan) -> dict[str, Any]:
    import pyarrow.compute as pc  # noqa: PLC0415

    counts = retry.effective_counts(frames_index)
    counts.update(shards=frames_index.num_rows, metadata_issues=plan.issues,
                  frames=int(pc.sum(frames_index.column("frames")).as_py() or 0),
                  frame_bytes=int(pc.sum(frames_index.column("bytes")).as_py() or 0))
    return counts


def _totals(summary: PrepareSummary, frames_index: Any, cap_index: Any, plan: InputPlan) -> None:
    import pyarrow.compute as pc  # noqa: PLC0415

    counts = _frame_counts(frames_index, plan)
    summary.clips, summary.clips_ok = counts["clips"], counts["clips_ok"]
    summary.clips_quarantined, summary.quarantined_by_stage = counts["clips_quarantined"], counts["quarantined_by_stage"]
    summary.retryable = counts["retryable"]
    summary.metadata_issues = plan.issues
    summary.frames, summary.bytes = counts["frames"], counts["frame_bytes"]
    summary.captions_ok = int(pc.sum(cap_index.column("captioned")).as_py() or 0)
    summary.captions_failed = int(pc.sum(cap_index.column("failed")).as_py() or 0)
