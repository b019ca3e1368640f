"""The `prepare` job: metadata parts -> planned units -> Ray Data stages -> one dataset root.

    driver   (before Ray) list and stat the metadata parts; refuse changed settings, changed or
             missing parts, a caption-set conflict                              [1-2 requests a part]
    plan     planning.plan_inputs: Ray tasks cut new parts into units and join the subtitle
             table to them; the driver keeps part summaries and unit descriptors   [planning.py]
    Stage 1  decode  (CPU tasks, 1 unit -> 1 row)   read the unit's metadata lines, decode each
                                                    video once, write the frame shard, quarantine
                                                    rows, sidecar (done marker)
    Stage 2  caption (actor pool, GPU when present, 1 shard -> 1 row)  read middle frames,
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
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline import schema
from pipeline.config import CaptionConfig, PrepareJobConfig, fingerprint, to_dict
from pipeline.data import captions as capsets
from pipeline.data import retry
from pipeline.data.index import FRAMES, IndexWriter, captions_kind, captions_row, compact_index, frames_row, read_index
from pipeline.data.metadata import UnitSpec, expand_parts, read_unit
from pipeline.data.planning import InputPlan, PartInput, plan_inputs, read_units
from pipeline.data.root import DatasetRoot, RootConflict, base_part, diff_settings, part_name_of
from pipeline.data.shards import UnitContext, find_video, process_unit
from pipeline.utils import fs
from pipeline.utils.s3 import TransientS3Error

__all__ = ["EmptyInput", "PrepareSummary", "RootConflict", "open_root", "run_prepare"]


class EmptyInput(ValueError):
    """The inputs yield nothing at all (no clip, no video); the message names the key."""


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
              "run again with --set data.retry_quarantined=true"] if self.retryable else []))


# ---------------------------------------------------------------------------------------------
# Before Ray: inputs, settings, refusals


@dataclass(slots=True)
class Inputs:
    """What a prepare run is about to do to its root, resolved before Ray starts."""

    root: DatasetRoot
    manifest: dict[str, Any] | None
    parts: list[PartInput]
    """Registered parts first (registration order), then new ones in `data.metadata` order."""
    settings: dict[str, Any]
    fingerprint: str
    table: dict[str, Any] | None
    """The subtitle table's identity (uri, size, version, sha256 when known), None for cue files."""


def prepare_settings(cfg: PrepareJobConfig) -> dict[str, Any]:
    """Everything that shapes the bytes of a root, keyed as in the config (`frames.fps`, ...)."""
    frames = to_dict(cfg.frames)
    frames.pop("decode_threads")  # threads change speed, not bytes
    return {"data": {"clips_per_shard": cfg.data.clips_per_shard, "video_root": cfg.data.video_root,
                     "video_extensions": list(cfg.data.video_extensions), "subtitles": cfg.data.subtitles},
            "frames": frames}


def _settings_fingerprint(settings: dict[str, Any]) -> str:
    return fingerprint({"schema_version": schema.SCHEMA_VERSION, **settings})


def _list_parts(cfg: PrepareJobConfig, root: DatasetRoot, manifest: dict[str, Any] | None) -> dict[str, PartInput]:
    """name -> PartInput of every listed part, stat'ed (one request each), in listed order."""
    uris = expand_parts(cfg.data.metadata, root.opts)
    if not uris:
        raise FileNotFoundError(f"data.metadata: no *.jsonl parts in {list(cfg.data.metadata)}")
    registered = {p["name"] for p in (manifest or {}).get("parts", []) if not p.get("retry_of")}
    listed: dict[str, PartInput] = {}
    for uri in uris:
        name = part_name_of(uri)
        if name in listed:
            raise RootConflict(f"data.metadata: {listed[name].uri} and {uri} have the same part name {name!r}; "
                               "rename one")
        try:
            st = fs.stat(uri, root.opts)
        except FileNotFoundError:
            if name in registered:
                raise RootConflict(f"data.metadata: part {name!r} is registered in {root.uri} but {uri} is "
                                   "missing") from None
            raise FileNotFoundError(f"data.metadata: {uri} does not exist") from None
        listed[name] = PartInput(name, uri, st.size, st.version)
    return listed


def _check_parts(root: DatasetRoot, manifest: dict[str, Any], listed: dict[str, PartInput]) -> list[PartInput]:
    """The registered parts, each still listed and unchanged (size, then version tag, then sha256)."""
    out = []
    for rec in manifest.get("parts", []):
        if rec.get("retry_of"):
            continue  # a retry attempt (retry.py), not a metadata file
        name = rec["name"]
        if name not in listed:
            raise RootConflict(f"data.metadata: part {name!r} ({rec['uri']}) is registered in {root.uri} but not "
                               "listed; a root only grows: list every part it was made from")
        part = listed[name]
        sha = None
        if part.size != rec["size"] or part.version != rec["version"]:
            sha = fs.sha256_of(part.uri, root.opts) if part.size == rec["size"] else None
            if sha != rec["sha256"]:
                raise RootConflict(f"data.metadata: part {name!r} ({part.uri}) changed since it was prepared into "
                                   f"{root.uri} (size {rec['size']} -> {part.size}, sha256 {rec['sha256'][:12]}... -> "
                                   f"{(sha or 'different')[:12]}); put new data in a new part")
        out.append(PartInput(name, part.uri, part.size, part.version, sha))
    return out


def _check_table(root: DatasetRoot, manifest: dict[str, Any] | None, uri: str) -> dict[str, Any]:
    try:
        st = fs.stat(uri, root.opts)
    except FileNotFoundError:
        raise FileNotFoundError(f"data.subtitles: {uri} does not exist") from None
    rec = (manifest or {}).get("subtitles_table")
    table = {"uri": uri, "size": st.size, "version": st.version, "sha256": None}
    if rec is None:
        return table
    if st.size == rec["size"] and st.version == rec["version"]:
        return dict(table, sha256=rec["sha256"])
    sha = fs.sha256_of(uri, root.opts)
    if sha != rec["sha256"]:
        raise RootConflict(f"data.subtitles: the table {uri} changed since {root.uri} was prepared (sha256 "
                           f"{rec['sha256'][:12]}... -> {sha[:12]}...); use a new data.root, or data.force=true")
    return dict(table, sha256=sha)


def open_root(cfg: PrepareJobConfig, dry_run: bool = False) -> Inputs:
    """Resolve the inputs and check them against the root; no Ray, a few requests per part.

    With data.force a conflicting root is deleted here (unless `dry_run`: `clipvip plan` only
    reports what the run would do).

    Raises:
        FileNotFoundError: data.metadata lists nothing, a listed file is missing, data.video_root
            or data.subtitles does not exist (each names its key).
        RootConflict: other settings (each key with its old and new value), a registered part
            changed, missing or no longer listed, or two parts with one name.
        CaptionSetConflict: caption.set_name exists with another captioner.
    """
    root = DatasetRoot(cfg.data.root, fs.S3Options.of(cfg.storage))
    opts = root.opts
    manifest = root.read_manifest()
    listed = _list_parts(cfg, root, manifest)
    if not fs.is_dir(cfg.data.video_root, opts):
        raise FileNotFoundError(f"data.video_root: {cfg.data.video_root} is not a directory")
    subs = cfg.data.subtitles
    if not fs.exists(subs, opts) and not fs.is_dir(subs, opts):
        raise FileNotFoundError(f"data.subtitles: {subs} does not exist")
    settings = prepare_settings(cfg)
    if manifest is not None and manifest.get("schema_version") != schema.SCHEMA_VERSION:
        raise RootConflict(f"{root.uri} has schema_version {manifest.get('schema_version')}; this code writes "
                           f"{schema.SCHEMA_VERSION} (one root per corpus). Use a new data.root, or data.force=true")
    parts: list[PartInput] = []
    try:
        if manifest is not None and manifest.get("settings") != settings:
            changed = "; ".join(diff_settings(manifest.get("settings", {}), settings))
            raise RootConflict(f"{root.uri} was prepared with other settings: {changed}. Use a new data.root, or set "
                               "data.force=true to delete its frames, captions, quarantine, plans and index and rebuild.")
        parts = _check_parts(root, manifest, listed) if manifest is not None else []
        table = None if fs.is_dir(subs, opts) else _check_table(root, manifest, subs)
    except RootConflict:
        if not cfg.data.force:
            raise
        if not dry_run:
            for sub in ("frames", "captions", "quarantine", "plan", "index"):
                fs.delete_dir(root.path(sub), opts)
            fs.delete_file(root.manifest_uri, opts)
        manifest, parts = None, []
        table = None if fs.is_dir(subs, opts) else _check_table(root, None, subs)
    registered = {p.name for p in parts}
    parts += [p for name, p in listed.items() if name not in registered]
    inputs = Inputs(root, manifest, parts, settings, _settings_fingerprint(settings), table)
    _check_caption_set(root, cfg.caption, inputs.fingerprint)
    return inputs


def _check_caption_set(root: DatasetRoot, caption: CaptionConfig, frames_fp: str) -> None:
    meta = fs.read_json_or_none(root.caption_set_uri(caption.set_name), root.opts)
    if meta is not None and meta.get("fingerprint") != capsets.set_fingerprint(caption, frames_fp):
        capsets.open_caption_set(root, caption, frames_fp)  # raises the conflict with its full message


# ---------------------------------------------------------------------------------------------
# Ray stages (thin wrappers around shards.process_unit / captions.caption_shard)


def make_decode_fn(ctx: UnitContext):
    """Row function for stage 1: {"unit": json, "part_uri"} -> sidecar summary of that unit."""

    def decode(row: dict[str, Any]) -> dict[str, Any]:
        spec = UnitSpec.from_dict(json.loads(row["unit"]))
        side = process_unit(spec, row["part_uri"], ctx)
        return {"unit": row["unit"], "frames_json": json.dumps(side)}

    return decode


class ShardCaptionStage:
    """Caption actor (prepare stage 2, recaption's only stage): loads the captioner once, then
    captions whole shards (batch_size=1); input columns pass through, `caption_json` is added."""

    def __init__(self, caption_cfg: dict[str, Any], root: str, set_fp: str, s3: dict[str, Any],
                 frames_per_clip: int = 1) -> None:
        from pipeline.config import CaptionConfig, build_dataclass  # noqa: PLC0415
        from pipeline.data.captioner import FrameCaptioner  # noqa: PLC0415  heavy: torch/transformers

        self.cfg = build_dataclass(CaptionConfig, caption_cfg)
        self.root, self.set_fp = DatasetRoot(root, fs.S3Options(**s3)), set_fp
        self.frames_per_clip = frames_per_clip
        self.captioner = FrameCaptioner(self.cfg)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from pipeline.data.root import Shard  # noqa: PLC0415

        out = []
        for unit in batch["unit"]:
            d = json.loads(unit)
            side = capsets.caption_shard(self.root, self.cfg.set_name, Shard(d["part"], int(d["unit"])),
                                         self.captioner, self.set_fp, frames_per_clip=self.frames_per_clip)
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


def check_videos(cfg: PrepareJobConfig, inputs: Inputs, plan: InputPlan, sample: int = 16) -> None:
    """Fail fast when data.video_root holds none of the first listed videos.

    Raises:
        EmptyInput: none of up to `sample` videos of the first units is found (the message shows
            what the video root does hold).
    """
    uris = {p.name: p.uri for p in inputs.parts}
    ctx = UnitContext(root=cfg.data.root, video_root=cfg.data.video_root, video_extensions=cfg.data.video_extensions,
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
    import ray  # noqa: PLC0415
    import ray.data  # noqa: PLC0415

    t0 = time.perf_counter()
    inputs = inputs or open_root(cfg)
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
    if todo:
        frames_writer, cap_writer = IndexWriter(root, FRAMES), IndexWriter(root, cap_kind)
        _run_stages(cfg, inputs, capset, todo, done, cap_done, frames_writer, cap_writer, summary, t0, log)
        frames_writer.flush()
        cap_writer.flush()
    summary.wall_s = time.perf_counter() - t0
    frames_index = compact_index(root, FRAMES, order)
    missing = len(units) - frames_index.num_rows
    if missing:
        raise RuntimeError(f"prepare finished with {missing} shards not done; run the same command again to resume")
    capsets.finish_caption_set(root, capset, frames_index, order, wall_s=summary.wall_s)
    root.write_manifest(_manifest(inputs, plan, attempts, "complete", frames_index=frames_index,
                                  caption_sets=capsets.complete_caption_sets(root)))
    _totals(summary, frames_index, compact_index(root, cap_kind, order), plan)
    return summary


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
                summary: PrepareSummary, t0: float, log) -> None:
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
    ds = ds.map(make_decode_fn(ctx), num_cpus=cfg.ray.decode_cpus_per_task, memory=cfg.ray.decode_memory_gb * 2**30)
    remote_args, max_actors = caption_resources(cfg.caption)
    ds = ds.map_batches(
        ShardCaptionStage,
        fn_constructor_kwargs={"caption_cfg": to_dict(cfg.caption), "root": root.uri,
                               "set_fp": capset["fingerprint"], "s3": asdict(root.opts)},
        batch_size=1, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors), **remote_args)
    for n, row in enumerate(ds.iter_rows(), start=1):
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
