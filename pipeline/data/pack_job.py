"""The `pack` job's driver: open, plan tasks, run them on Ray, write the view index (see pack.py).

The driver holds the task descriptors (a few shard keys each) and one sidecar per view shard;
every byte of frames is read and written by the Ray tasks. The caller owns `ray.init`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import PackJobConfig, to_dict
from pipeline.data import view as views
from pipeline.data.dataset_index import DatasetIndex
from pipeline.data.index import FRAMES, read_index
from pipeline.data.pack import PackTask, pack_task, plan_tasks, task_item, task_memory_bytes, task_of
from pipeline.data.progress import JobProgress, Progressed
from pipeline.data.root import DatasetRoot
from pipeline.tracking import log_job_totals, open_job_run, run_link
from pipeline.utils import fs


class EmptyView(ValueError):
    """Every row was left out (no frame decodes): a view of nothing is an error, not a success."""


@dataclass(slots=True)
class PackSummary:
    root: str
    view: str
    caption_set: str
    tasks: int = 0
    tasks_skipped: int = 0
    shards: int = 0
    rows: int = 0
    row_groups: int = 0
    videos_per_group: float = 0.0
    """Mean distinct videos in a row group (c when every group holds c videos)."""
    dropped: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    rows_this_run: int = 0
    wall_s: float = 0.0
    noop: bool = False
    views: list[str] = field(default_factory=list)
    mlflow_run: str | None = None
    """`<run id> at <tracking uri>` of the job's MLflow run (None: tracking off)."""

    def totals(self) -> dict[str, float]:
        """The view's final counts, as the job's MLflow run keeps them."""
        return {"pack/total/rows": self.rows, "pack/total/shards": self.shards,
                "pack/total/row_groups": self.row_groups, "pack/total/videos_per_group": self.videos_per_group,
                "pack/total/dropped": self.dropped, "pack/total/bytes_written": self.bytes_written,
                "pack/wall_s": self.wall_s}

    def render(self) -> str:
        where = DatasetRoot(self.root).path("views", self.view)
        if self.noop:
            return (f"pack: view {self.view!r} at {where} is already complete ({self.rows} rows in {self.shards} "
                    f"shards, caption set {self.caption_set!r}); nothing to do"
                    + (f" (MLflow run {self.mlflow_run})" if self.mlflow_run else ""))
        rate = self.rows_this_run / self.wall_s if self.wall_s > 0 else 0.0
        return "\n".join([
            "pack summary",
            f"  view            {self.view!r} at {where} (caption set {self.caption_set!r})",
            f"  tasks           {self.tasks} ({self.tasks_skipped} done before this run)",
            f"  view shards     {self.shards}: {self.rows} rows in {self.row_groups} row groups, "
            f"{self.videos_per_group:.2f} videos a row group on average",
            f"  left out        {self.dropped} rows whose frames do not decode (listed in the shards' sidecars)",
            f"  bytes           {self.bytes_read / 1e6:.2f} MB read, {self.bytes_written / 1e6:.2f} MB written",
            f"  throughput      {rate:.2f} clips/s over {self.wall_s:.1f} s ({self.rows_this_run} clips this run)",
            f"  root views      {', '.join(self.views)}",
        ] + ([f"  MLflow run      {self.mlflow_run}"] if self.mlflow_run else []))


def open_pack(cfg: PackJobConfig) -> tuple[DatasetIndex, dict[str, Any], Any]:
    """Driver checks before Ray: the root, the caption set, the view's settings (6 reads).

    Returns:
        (index, view metadata, frames index).

    Raises:
        RootNotReady, ValueError: root or caption set unusable (see `DatasetIndex.open`).
        ViewConflict: a view of this name exists with other settings.
    """
    opts = fs.S3Options.of(cfg.storage)
    index = DatasetIndex.open(cfg.root, cfg.view.caption_set, opts)
    if index.num_rows == 0:
        raise ValueError(f"{cfg.root}: caption set {cfg.view.caption_set!r} has no row with a caption; nothing to pack")
    root = DatasetRoot(cfg.root, opts)
    frames = read_index(root, FRAMES, list(index.part_names), pending=False)
    settings = views.view_settings(cfg.view, index.capset, index.fingerprint, len(index.layout.shard_ids))
    return index, views.open_view(root, cfg.view.name, settings), frames


def run_pack(cfg: PackJobConfig, log: Any = print, opened: tuple | None = None) -> PackSummary:
    """Run (or resume) a pack on the connected Ray cluster; a no-op on a complete view.

    Raises:
        (what `open_pack` raises), RuntimeError: shards missing at the end (rerun to resume).
        EmptyView: no row of the root decodes.
    """
    t0 = time.perf_counter()
    index, meta, frames = opened or open_pack(cfg)
    uri = DatasetRoot(cfg.root, index.opts).uri
    tracker = open_job_run(cfg.tracking, "pack", cfg.run_name, uri, meta["fingerprint"], to_dict(cfg))
    try:
        summary = _pack(cfg, index, meta, frames, t0, log, Progressed(tracker, JobProgress("pack"), 0))
    except BaseException:
        tracker.close("FAILED")
        raise
    summary.mlflow_run = run_link(tracker)
    log_job_totals(tracker, summary.totals(), summary.tasks or summary.shards)
    tracker.close("FINISHED")
    return summary


def _pack(cfg: PackJobConfig, index: DatasetIndex, meta: dict[str, Any], frames: Any, t0: float, log: Any,
          progressed: Progressed) -> PackSummary:
    root = DatasetRoot(cfg.root, index.opts)
    summary = PackSummary(root=cfg.root, view=cfg.view.name, caption_set=cfg.view.caption_set)
    if meta.get("status") == "complete":
        counts = meta.get("counts", {})
        summary.noop, summary.shards, summary.rows = True, int(counts.get("shards", 0)), int(counts.get("rows", 0))
        summary.views = views.refresh_manifest_views(root)
        return summary
    tasks = plan_tasks(index, cfg.view)
    summary.tasks = len(tasks)
    expected = sum(t.pieces(cfg.view.rows_per_shard) for t in tasks)
    log(f"[pack] {index.num_rows} rows of {len(index.layout.shard_ids)} frame shards (caption set "
        f"{cfg.view.caption_set!r}) -> view {cfg.view.name!r}: {len(tasks)} tasks, {expected} view shards, "
        f"row groups of {cfg.view.rows_per_group}, frames at {cfg.view.image_size_px or 'stored'} px")
    fs.remove_stale_temp_files(root.path("views", cfg.view.name))  # a killed run's half-written files
    sidecars = _run_tasks(cfg, index, tasks, task_memory_bytes(frames, cfg.view), summary, t0, log, progressed)
    if not any(s["rows"] for s in sidecars):
        first = next((d for s in sidecars for d in s.get("dropped", [])), {})
        raise EmptyView(f"view {cfg.view.name!r}: all {index.num_rows} rows were left out because their frames do "
                        f"not decode (first: {first.get('clip_id')}: {first.get('error')}); the view stays unfinished")
    summary.wall_s = time.perf_counter() - t0
    final = views.finish_view(root, meta, sidecars, expected, summary.wall_s)
    counts = final["counts"]
    summary.shards, summary.rows, summary.row_groups = counts["shards"], counts["rows"], counts["row_groups"]
    summary.bytes_written = counts["bytes"]
    summary.videos_per_group = sum(s["group_videos"] for s in sidecars) / max(1, counts["row_groups"])
    summary.dropped = sum(len(s.get("dropped", [])) for s in sidecars)
    summary.views = views.refresh_manifest_views(root)
    return summary


def _run_tasks(cfg: PackJobConfig, index: DatasetIndex, tasks: list[PackTask], memory: int, summary: PackSummary,
               t0: float, log: Any, progressed: Progressed) -> list[dict[str, Any]]:
    import ray.data  # noqa: PLC0415

    from pipeline.data.build import MAX_UNIT_BLOCKS  # noqa: PLC0415

    ray.data.DataContext.get_current().enable_progress_bars = cfg.ray.progress_bars
    root_uri, opts, view_cfg = cfg.root, index.opts, cfg.view

    def run(batch: dict[str, Any]) -> dict[str, list[str]]:
        out = []
        for item in batch["task"]:
            out.append(json.dumps(pack_task(task_of({"task": item}), root_uri, opts, view_cfg)))
        return {"sidecars": out}

    items = [task_item(t) for t in tasks]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_UNIT_BLOCKS))
    ds = ds.map_batches(run, batch_size=1, num_cpus=1, memory=memory)

    sidecars: list[dict[str, Any]] = []
    for done, row in enumerate(ds.iter_rows(), start=1):
        sides = json.loads(row["sidecars"])
        sidecars.extend(sides)
        rows = sum(s["rows"] for s in sides)
        if all(s.get("skipped") for s in sides):
            summary.tasks_skipped += 1
        else:
            summary.rows_this_run += sum(s["rows"] for s in sides if not s.get("skipped"))
            summary.bytes_read += int(sides[0].get("bytes_read", 0))
            progressed.progress.add_rows(sum(s["rows"] for s in sides if not s.get("skipped")))
        progressed.shard(done)  # a step per pack task: every task of the view comes back, done before or not
        elapsed = time.perf_counter() - t0
        log(f"[pack] task {done}/{len(tasks)}: {rows} rows in {len(sides)} view shard(s)"
            f"{' (done before)' if all(s.get('skipped') for s in sides) else ''} | "
            f"{summary.rows_this_run / elapsed:.2f} clips/s, ETA {(len(tasks) - done) * elapsed / done:.0f} s")
    return sidecars
