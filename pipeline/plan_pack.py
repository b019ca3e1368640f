"""`clipvip plan` of a pack recipe: the view it would write, what that costs, whether it fits.

Reads what `pack` reads before Ray (the root's manifest, the caption set and the shard indexes,
`view.json` when the name exists) and writes nothing; the rates come from bench/ingest.py.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.plan import Check, Report, Resources, resources_from

PACK_CLIPS_PER_CORE_S = 16.0
"""bench/ingest.py: a clip of 32 frames of 426x240 q90 decoded, resized to 224 and re-encoded at q95
on one core (2-core VM, 2026-12-06)."""
PACKED_FRAME_BYTES = 19.4 * 1024
"""bench/ingest.py: a 224 px q95 JPEG of the synthetic scenes (a 426x240 q90 one is ~33 KiB)."""


def build_pack_report(cfg: Any, rows: int, shards: int, frames_per_clip: float, task_memory: int,
                      refused: str | None, res: Resources) -> Report:
    """The pack report from gathered facts (pure)."""
    v = cfg.view
    rep = Report("pack", cfg.run_name)
    tasks = math.ceil(shards / v.rows_per_group)
    per_task = rows / tasks if tasks else 0
    rep.facts += [("root", cfg.root), ("view", v.name), ("caption set", v.caption_set), ("frame shards", shards),
                  ("clips", rows), ("tasks", tasks), ("view shards", tasks * math.ceil(per_task / v.rows_per_shard)),
                  ("row group", f"{v.rows_per_group} clips of {v.rows_per_group} shards"),
                  ("frames", f"{v.image_size_px} px, q{v.jpeg_quality}" if v.image_size_px else "as stored")]
    out = rows * (frames_per_clip + 1) * PACKED_FRAME_BYTES
    rep.estimates += [("output TB", round(out / 1e12, 3), f"{frames_per_clip:.0f} frames + middle at "
                                                          f"{PACKED_FRAME_BYTES / 1024:.1f} KiB"),
                      ("pack CPU-hours", round(rows / PACK_CLIPS_PER_CORE_S / 3600, 1) if v.image_size_px else 0.0,
                       f"{PACK_CLIPS_PER_CORE_S} clips/s/core, bench/ingest.py"),
                      ("task memory GiB", round(task_memory / 2**30, 2),
                       f"{v.rows_per_group} input row groups + 2 view shards of the largest row")]
    rep.checks.append(Check("root, caption set and view", refused is None, refused or "pack accepts this view"))
    rep.checks.append(Check("clips to pack", rows > 0, f"{rows:,} clips with a caption"))
    node = res.cpu_node_memory_gb or res.gpu_node_memory_gb
    if node:
        rep.checks.append(Check("pack task memory", task_memory / 2**30 <= node,
                                f"~{task_memory / 2**30:.2f} GiB needed of {node:.1f} GiB ({res.source})"))
    return rep


def plan_pack(cfg: Any, results_dir: str, connected: bool) -> Report:
    from pipeline.data import view as views  # noqa: PLC0415
    from pipeline.data.dataset_index import DatasetIndex  # noqa: PLC0415
    from pipeline.data.index import FRAMES, read_index  # noqa: PLC0415
    from pipeline.data.pack import task_memory_bytes  # noqa: PLC0415
    from pipeline.data.root import DatasetRoot  # noqa: PLC0415
    from pipeline.plan import _nodes  # noqa: PLC0415
    from pipeline.utils import fs  # noqa: PLC0415

    res = resources_from(cfg.ray, _nodes() if connected else None)
    opts = fs.S3Options.of(cfg.storage)
    try:
        index = DatasetIndex.open(cfg.root, cfg.view.caption_set, opts)
    except (ValueError, OSError) as e:
        return build_pack_report(cfg, 0, 0, 0, 0, str(e), res)
    root = DatasetRoot(cfg.root, opts)
    frames = read_index(root, FRAMES, list(index.part_names), pending=False)
    settings = views.view_settings(cfg.view, index.capset, index.fingerprint, len(index.layout.shard_ids))
    meta = fs.read_json_or_none(root.view_uri(cfg.view.name), opts)
    refused = None
    if meta is not None and meta.get("settings") != settings:
        refused = f"view {cfg.view.name!r} exists with other settings or was packed before the root grew; pack a new view.name"
    clips = max(1, sum(frames.column("clips").to_pylist()))
    per_clip = sum(frames.column("frames").to_pylist()) / clips
    return build_pack_report(cfg, index.num_rows, len(index.layout.shard_ids), per_clip,
                             task_memory_bytes(frames, cfg.view), refused, res)
