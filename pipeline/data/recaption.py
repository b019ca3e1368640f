"""The `recaption` plan: a new caption set for a prepared dataset root, frames untouched.

    driver   check manifest.json (a complete prepare root), open or check caption_set.json:
             complete with the same fingerprint -> nothing to do; another fingerprint -> refused
    Stage 1  caption (actor pool, GPU when present, 1 shard -> 1 row): read clip_id +
             middle_frame (+ frames when frames_per_clip > 1) of the frame shard, caption,
             write the caption part, its quarantine rows, then its sidecar (done marker)
    driver   progress line per shard; aggregate the sidecars into caption_set.json (complete,
             written last), then list every complete set of the root in manifest.json

The stage is prepare's own caption actor (`build.ShardCaptionStage` around
`captions.caption_shard`), so both jobs caption, resume and quarantine the same way. Frames are
only read, never decoded from video or rewritten. Resume is "run the same command again": parts
whose sidecars exist are skipped. The caller owns `ray.init`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline import schema
from pipeline.config import RecaptionJobConfig, to_dict
from pipeline.data import captions as capsets
from pipeline.utils import fs


class RootNotReady(ValueError):
    """The dataset root is missing, not a prepare root, or its prepare is not complete."""


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
    caption_s: float = 0.0
    wall_s: float = 0.0
    noop: bool = False
    """True when the set was already complete and nothing was run."""
    caption_sets: list[str] = field(default_factory=list)

    def render(self) -> str:
        where = capsets.set_dir(self.root, self.caption_set)
        if self.noop:
            return (f"recaption: caption set {self.caption_set!r} at {where} is already complete "
                    f"({self.captioned} captioned, {self.failed} failed, model {self.model}); nothing to do")
        rate = self.rows / self.wall_s if self.wall_s > 0 else 0.0
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
            f"  throughput      {rate:.2f} clips/s over {self.wall_s:.1f} s",
            f"  root sets       {', '.join(self.caption_sets)}",
        ]
        return "\n".join(lines)


def s3_options(cfg: RecaptionJobConfig) -> fs.S3Options:
    return fs.S3Options.of(cfg.storage)


def check_root(root: str, opts: fs.S3Options) -> dict[str, Any]:
    """The root's manifest, if the root is a complete prepare root.

    Raises:
        RootNotReady: no manifest.json, prepare unfinished, or another schema version.
    """
    uri = fs.join(root, "manifest.json")
    if not fs.exists(uri, opts):
        what = "does not exist" if not fs.is_dir(root, opts) else "has no manifest.json"
        raise RootNotReady(f"root: {root} {what}; recaption needs a dataset root written by `clipvip prepare`")
    manifest = fs.read_json(uri, opts)
    if manifest.get("status") != "complete":
        raise RootNotReady(f"root: {root} is not a complete prepare root (manifest status "
                           f"{manifest.get('status')!r}); rerun its prepare command to finish it first")
    if manifest.get("schema_version") != schema.SCHEMA_VERSION:
        raise RootNotReady(f"root: {root} has schema_version {manifest.get('schema_version')}, "
                           f"this code reads {schema.SCHEMA_VERSION}")
    return manifest


def open_recaption(cfg: RecaptionJobConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Driver-side checks that need no Ray: (manifest, caption set metadata).

    Creates `caption_set.json` (in_progress) for a new set. A returned set with status
    "complete" means there is nothing to do.

    Raises:
        RootNotReady: see `check_root`.
        CaptionSetConflict: a set of this name exists with another captioner/config/frames.
    """
    opts = s3_options(cfg)
    manifest = check_root(cfg.root, opts)
    capset = capsets.open_caption_set(cfg.root, cfg.caption, str(manifest["fingerprint"]), opts,
                                      frames_per_clip=cfg.frames_per_clip)
    return manifest, capset


def _noop_summary(cfg: RecaptionJobConfig, capset: dict[str, Any], sets: list[str]) -> RecaptionSummary:
    counts = capset.get("counts", {})
    return RecaptionSummary(root=cfg.root, caption_set=cfg.caption.set_name, model=capset["config"]["model"],
                            frames_per_clip=int(capset.get("frames_per_clip", 1)), noop=True,
                            shards=int(counts.get("shards", 0)), rows=int(counts.get("rows", 0)),
                            captioned=int(counts.get("captioned", 0)), failed=int(counts.get("failed", 0)),
                            caption_sets=sets)


def run_recaption(cfg: RecaptionJobConfig, log=print) -> RecaptionSummary:
    """Run (or resume) a recaption on the connected Ray cluster; a no-op on a complete set.

    Raises:
        RootNotReady, CaptionSetConflict: before any work (see `open_recaption`).
        RuntimeError: parts still missing at the end (rerun to resume).
    """
    import ray  # noqa: PLC0415
    import ray.data  # noqa: PLC0415

    from pipeline.data.build import ShardCaptionStage, caption_resources  # noqa: PLC0415

    t0 = time.perf_counter()
    opts = s3_options(cfg)
    manifest, capset = open_recaption(cfg)
    if capset.get("status") == "complete":
        # Also repairs a manifest whose update was cut off after the set completed.
        return _noop_summary(cfg, capset, capsets.refresh_manifest_caption_sets(cfg.root, opts))

    num_units = int(manifest["num_units"])
    summary = RecaptionSummary(root=cfg.root, caption_set=cfg.caption.set_name, model=cfg.caption.model,
                               frames_per_clip=cfg.frames_per_clip, shards=num_units)
    log(f"[recaption] {num_units} shards of {cfg.root} -> caption set {cfg.caption.set_name!r} "
        f"({cfg.caption.model}, frames_per_clip={cfg.frames_per_clip})")
    if num_units:
        ray.data.DataContext.get_current().enable_progress_bars = cfg.ray.progress_bars
        ds = ray.data.from_items([{"unit": u} for u in range(num_units)], override_num_blocks=num_units)
        remote_args, max_actors = caption_resources(cfg.caption)
        ds = ds.map_batches(
            ShardCaptionStage,
            fn_constructor_kwargs={"caption_cfg": to_dict(cfg.caption), "root": cfg.root,
                                   "set_fp": capset["fingerprint"], "s3": asdict(opts),
                                   "frames_per_clip": cfg.frames_per_clip},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
            **remote_args,
        )
        for done, row in enumerate(ds.iter_rows(), start=1):
            side = json.loads(row["caption_json"])
            _accumulate(summary, side)
            elapsed = time.perf_counter() - t0
            eta = (num_units - done) * elapsed / done
            log(f"[recaption] shard {side['unit']:5d} {'(resumed) ' if side.get('skipped') else ''}"
                f"{done}/{num_units}: {side['captioned']} captioned, {side['failed']} failed "
                f"| {summary.rows / elapsed:.2f} clips/s, ETA {eta:.0f} s")
    summary.wall_s = time.perf_counter() - t0
    capsets.finish_caption_set(cfg.root, capset, num_units, opts, wall_s=summary.wall_s)
    summary.caption_sets = capsets.refresh_manifest_caption_sets(cfg.root, opts)
    return summary


def _accumulate(summary: RecaptionSummary, side: dict[str, Any]) -> None:
    summary.shards_skipped += int(bool(side.get("skipped")))
    summary.rows += side["rows"]
    summary.captioned += side["captioned"]
    summary.failed += side["failed"]
    summary.frame_captions += side.get("frame_captions", 0)
    summary.frame_captions_failed += side.get("frame_captions_failed", 0)
    if not side.get("skipped"):
        summary.bytes_read += side.get("bytes_read", 0)
        summary.caption_s += side.get("timings_s", {}).get("caption", 0.0)
