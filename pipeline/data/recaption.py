"""The `recaption` plan: a new caption set for a prepared dataset root, frames untouched.

    driver   open the root (manifest.json: a complete prepare root), read the frames index and
             the set's index; open or check caption_set.json: covering every frame shard with
             the same fingerprint -> nothing to do; another fingerprint -> refused
    Stage 1  caption (actor pool, GPU when present, 1 shard -> 1 row) the shards the set lacks:
             read clip_id + middle_frame (+ frames when frames_per_clip > 1) of the frame shard,
             caption, write the caption part, its quarantine rows, then its sidecar (done marker)
    driver   progress line per shard, index rows as fragments; the compacted set index, then
             caption_set.json (complete, written last) and every complete set in manifest.json

The stage is prepare's own caption actor (`caption_stage.ShardCaptionStage` around
`captions.caption_shard`), so both jobs caption, resume and quarantine the same way. Frames are
only read, never decoded from video or rewritten. Resume is "run the same command again": parts
whose sidecars exist are skipped. A root grown by later prepare runs is caught up: only its new
shards are captioned. The caller owns `ray.init`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline import schema
from pipeline.config import RecaptionJobConfig, to_dict
from pipeline.data import captions as capsets
from pipeline.data.index import FRAMES, IndexWriter, captions_kind, captions_row, read_index
from pipeline.data.progress import JobProgress, Progressed
from pipeline.data.root import DatasetRoot, RootNotReady
from pipeline.tracking import log_job_totals, open_job_run, run_link
from pipeline.utils import fs

__all__ = ["RecaptionSummary", "RootNotReady", "open_recaption", "run_recaption"]


@dataclass(slots=True)
class RecaptionSummary:
    root: str
    caption_set: str
    model: str
    frames_per_clip: int
    shards: int = 0
    shards_skipped: int = 0
    rows: int = 0
    captioned: int = 0
    failed: int = 0
    frame_captions: int = 0
    frame_captions_failed: int = 0
    bytes_read: int = 0
    rows_this_run: int = 0
    caption_s: float = 0.0
    wall_s: float = 0.0
    noop: bool = False
    """True when the set was already complete and nothing was run."""
    caption_sets: list[str] = field(default_factory=list)
    mlflow_run: str | None = None
    """`<run id> at <tracking uri>` of the job's MLflow run (None: tracking off)."""

    def totals(self) -> dict[str, float]:
        """The set's final counts, as the job's MLflow run keeps them."""
        return {"recaption/total/rows": self.rows, "recaption/total/captioned": self.captioned,
                "recaption/total/failed": self.failed, "recaption/total/frame_captions": self.frame_captions,
                "recaption/total/frame_captions_failed": self.frame_captions_failed, "recaption/wall_s": self.wall_s}

    def render(self) -> str:
        where = DatasetRoot(self.root).caption_set_dir(self.caption_set)
        if self.noop:
            return (f"recaption: caption set {self.caption_set!r} at {where} is already complete "
                    f"({self.captioned} captioned, {self.failed} failed, model {self.model}); nothing to do"
                    + (f" (MLflow run {self.mlflow_run})" if self.mlflow_run else ""))
        rate = self.rows_this_run / self.wall_s if self.wall_s > 0 else 0.0
        lines = [
            "recaption summary",
            f"  caption set     {self.caption_set!r} at {where}",
            f"  captioner       {self.model}, frames_per_clip={self.frames_per_clip}",
            f"  shards          {self.shards} ({self.shards_skipped} already done before this run)",
            f"  captions        {self.captioned} ok, {self.failed} failed (quarantined, stage caption)",
        ]
        if self.frames_per_clip > 1:
            lines.append(f"  frame captions  {self.frame_captions} ok, {self.frame_captions_failed} failed")
        lines += [
            f"  read            {self.bytes_read / 1e6:.2f} MB of frame shards (frames untouched)",
            f"  throughput      {rate:.2f} clips/s over {self.wall_s:.1f} s ({self.rows_this_run} clips this run)",
            f"  root sets       {', '.join(self.caption_sets)}",
        ] + ([f"  MLflow run      {self.mlflow_run}"] if self.mlflow_run else [])
        return "\n".join(lines)


@dataclass(slots=True)
class Opened:
    """A recaption's view of its root, read before Ray starts (a constant number of requests)."""

    root: DatasetRoot
    manifest: dict[str, Any]
    frames: Any
    """The frames index (pyarrow Table), one row per frame shard."""
    capset: dict[str, Any]
    done: set[tuple[str, int]]
    """Shards the set already has (its index, pending fragments included)."""

    @property
    def todo(self) -> list[tuple[str, int]]:
        return [k for k in zip(self.frames.column("part").to_pylist(), self.frames.column("unit").to_pylist())
                if k not in self.done]

    @property
    def part_order(self) -> list[str]:
        return self.root.parts(self.manifest)


def open_recaption(cfg: RecaptionJobConfig) -> Opened:
    """Driver-side checks that need no Ray; creates `caption_set.json` (in_progress) for a new set.

    Raises:
        RootNotReady: no root, not a prepare root, prepare unfinished, another schema version.
        CaptionSetConflict: a set of this name exists with another captioner/config/frames.
    """
    root = DatasetRoot(cfg.root, fs.S3Options.of(cfg.storage))
    try:
        manifest = root.open()
    except RootNotReady as e:
        raise RootNotReady(f"root: {e}") from None
    order = root.parts(manifest)
    frames = read_index(root, FRAMES, order, pending=False)
    capset = capsets.open_caption_set(root, cfg.caption, str(manifest["fingerprint"]),
                                      frames_per_clip=cfg.frames_per_clip)
    done: set[tuple[str, int]] = set()
    if not capsets.covers(capset, frames.num_rows):
        index = read_index(root, captions_kind(cfg.caption.set_name), order)
        done = set(zip(index.column("part").to_pylist(), index.column("unit").to_pylist()))
    else:
        done = set(zip(frames.column("part").to_pylist(), frames.column("unit").to_pylist()))
    return Opened(root, manifest, frames, capset, done)


def _noop_summary(cfg: RecaptionJobConfig, capset: dict[str, Any], sets: list[str]) -> RecaptionSummary:
    counts = capset.get("counts", {})
    return RecaptionSummary(root=cfg.root, caption_set=cfg.caption.set_name, model=capset["config"]["model"],
                            frames_per_clip=int(capset.get("frames_per_clip", 1)), noop=True,
                            shards=int(counts.get("shards", 0)), rows=int(counts.get("rows", 0)),
                            captioned=int(counts.get("captioned", 0)), failed=int(counts.get("failed", 0)),
                            caption_sets=sets)


def run_recaption(cfg: RecaptionJobConfig, log=print, opened: Opened | None = None) -> RecaptionSummary:
    """Run (or resume, or catch up) a recaption on the connected Ray cluster; a no-op on a set
    that covers the root.

    Raises:
        RootNotReady, CaptionSetConflict: before any work (see `open_recaption`).
        RuntimeError: parts still missing at the end (rerun to resume).
    """
    t0 = time.perf_counter()
    opened = opened or open_recaption(cfg)
    root, capset = opened.root, opened.capset
    tracker = open_job_run(cfg.tracking, "recaption", cfg.run_name, root.uri, capset["fingerprint"], to_dict(cfg))
    try:
        summary = _run(cfg, opened, t0, log, tracker)
    except BaseException:
        tracker.close("FAILED")
        raise
    summary.mlflow_run = run_link(tracker)
    log_job_totals(tracker, summary.totals(), opened.frames.num_rows)
    tracker.close("FINISHED")
    return summary


def _run(cfg: RecaptionJobConfig, opened: Opened, t0: float, log, tracker: Any) -> RecaptionSummary:
    root, capset = opened.root, opened.capset
    if capsets.covers(capset, opened.frames.num_rows):
        # Also repairs a manifest whose update was cut off after the set completed.
        return _noop_summary(cfg, capset, capsets.refresh_manifest_caption_sets(root))

    todo = opened.todo
    summary = RecaptionSummary(root=cfg.root, caption_set=cfg.caption.set_name, model=cfg.caption.model,
                               frames_per_clip=cfg.frames_per_clip, shards=opened.frames.num_rows,
                               shards_skipped=opened.frames.num_rows - len(todo))
    log(f"[recaption] {len(todo)} of {opened.frames.num_rows} shards of {cfg.root} -> caption set "
        f"{cfg.caption.set_name!r} ({cfg.caption.model}, frames_per_clip={cfg.frames_per_clip})")
    fs.remove_stale_temp_files(root.caption_set_dir(cfg.caption.set_name))  # a killed run's half-written files
    if todo:
        writer = IndexWriter(root, captions_kind(cfg.caption.set_name))
        _caption(cfg, root, capset, todo, writer, summary, t0, log,
                 Progressed(tracker, JobProgress("recaption"), opened.frames.num_rows - len(todo)))
        writer.flush()
    summary.wall_s = time.perf_counter() - t0
    final = capsets.finish_caption_set(root, capset, opened.frames, opened.part_order, wall_s=summary.wall_s)
    _totals(summary, final)
    summary.caption_sets = capsets.refresh_manifest_caption_sets(root)
    return summary


def _caption(cfg: RecaptionJobConfig, root: DatasetRoot, capset: dict[str, Any], todo: list[tuple[str, int]],
             writer: IndexWriter, summary: RecaptionSummary, t0: float, log, progressed: Progressed) -> None:
    import ray  # noqa: PLC0415
    import ray.data  # noqa: PLC0415

    from pipeline.data.build import MAX_UNIT_BLOCKS  # noqa: PLC0415
    from pipeline.data.caption_stage import WaitingForGpus, add_caption_stage, caption_pool  # noqa: PLC0415

    ray.data.DataContext.get_current().enable_progress_bars = cfg.ray.progress_bars
    items = [{"unit": json.dumps({"part": p, "unit": u})} for p, u in todo]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_UNIT_BLOCKS))
    pool = caption_pool(cfg.caption, float(ray.cluster_resources().get("GPU", 0)))
    log(f"[recaption] {pool.describe()}")
    ds = add_caption_stage(ds, cfg.caption, pool, root, capset["fingerprint"], cfg.frames_per_clip)
    with WaitingForGpus(pool, log, "recaption") as watch:
        _drain(ds, todo, writer, summary, t0, log, watch, progressed)


def _drain(ds: Any, todo: list[tuple[str, int]], writer: IndexWriter, summary: RecaptionSummary, t0: float, log,
           watch: Any, progressed: Progressed) -> None:
    """Index rows and progress lines from the caption stage's results, as they arrive."""
    rows = 0
    for done, row in enumerate(ds.iter_rows(), start=1):
        watch.seen()
        side = json.loads(row["caption_json"])
        writer.add(captions_row(side))
        rows += side["rows"]
        if side.get("skipped"):  # done by a run killed before its index rows were written
            summary.shards_skipped += 1
        else:
            summary.rows_this_run += side["rows"]
            summary.bytes_read += side.get("bytes_read", 0)
            summary.caption_s += side.get("timings_s", {}).get("caption", 0.0)
        progressed.progress.add_captions(side)
        progressed.progress.add_rows(0 if side.get("skipped") else side["rows"])
        progressed.shard(done)
        elapsed = time.perf_counter() - t0
        log(f"[recaption] shard {side['part']}/{schema.part_name(int(side['unit']))} "
            f"{'(resumed) ' if side.get('skipped') else ''}{done}/{len(todo)}: {side['captioned']} captioned, "
            f"{side['failed']} failed | {rows / elapsed:.2f} clips/s, ETA {(len(todo) - done) * elapsed / done:.0f} s")


def _totals(summary: RecaptionSummary, capset: dict[str, Any]) -> None:
    counts = capset.get("counts", {})
    summary.rows = int(counts.get("rows", 0))
    summary.captioned = int(counts.get("captioned", 0))
    summary.failed = int(counts.get("failed", 0))
    summary.frame_captions = int(counts.get("frame_captions", 0))
    summary.frame_captions_failed = int(counts.get("frame_captions_failed", 0))
