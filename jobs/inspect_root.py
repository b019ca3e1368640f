"""`clipvip inspect ROOT`: what a dataset root holds: shards, caption sets, clip counts.

    clipvip inspect out/tiny/dataset
    clipvip inspect s3://bucket/hdvila/v1 --set storage.s3_endpoint_url=http://127.0.0.1:9000
Reads only JSON (manifest, sidecars, caption_set.json files); never a Parquet shard.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from jobs.common import load_or_exit
from pipeline.config import StorageConfig
from pipeline.utils import fs

MAX_SHARD_LINES = 20


@dataclass(frozen=True, kw_only=True, slots=True)
class InspectConfig:
    storage: StorageConfig = field(default_factory=StorageConfig)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """Left-aligned text table, columns as wide as their widest cell."""
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _short(text: Any, width: int = 24) -> str:
    text = "-" if text in (None, "") else str(text)
    return text if len(text) <= width else text[:width - 3] + "..."


def render(root: str, opts: fs.S3Options) -> str:
    from pipeline.data.captions import describe_caption_sets  # noqa: PLC0415
    from pipeline.data.shards import frames_sidecar_uri  # noqa: PLC0415

    manifest = fs.read_json(fs.join(root, "manifest.json"), opts)
    counts = manifest.get("counts", {})
    units = int(manifest.get("num_units", 0))
    with ThreadPoolExecutor(max_workers=16) as pool:  # sidecar reads are latency-bound on S3
        sides = list(pool.map(lambda u: fs.read_json(frames_sidecar_uri(root, u), opts)
                              if fs.exists(frames_sidecar_uri(root, u), opts) else None, range(units)))
    stages = ", ".join(f"{k}={v}" for k, v in sorted(counts.get("quarantined_by_stage", {}).items())) or "none"
    out = [
        f"dataset root {root}",
        f"  status        {manifest.get('status')} (schema {manifest.get('schema_version')}, "
        f"fingerprint {manifest.get('fingerprint')})",
        f"  clips         {counts.get('clips_ok', '?')} ok, {counts.get('clips_quarantined', '?')} quarantined "
        f"by stage: {stages}; {counts.get('metadata_issues', 0)} malformed input lines",
        f"  frames        {counts.get('frames', '?')} in {units} shards, "
        f"{counts.get('frame_bytes', 0) / 1e6:.2f} MB",
        "",
        f"shards ({sum(s is not None for s in sides)}/{units} done)",
    ]
    rows = [[f"part-{u:05d}", s["rows"], s["quarantined"], s["frames"], f"{s['bytes'] / 1e6:.2f}", "done"]
            if s else [f"part-{u:05d}", "-", "-", "-", "-", "missing"] for u, s in enumerate(sides)]
    out.append(table(["shard", "clips", "quarantined", "frames", "MB", "status"], rows[:MAX_SHARD_LINES]))
    if len(rows) > MAX_SHARD_LINES:
        out.append(f"  ... {len(rows) - MAX_SHARD_LINES} more shards")
    sets = describe_caption_sets(root, opts)
    listed = set(manifest.get("caption_sets", []))
    out += ["", f"caption sets ({len(sets)})"]
    set_rows = []
    for m in sets:
        cfg, c = m.get("config", {}), m.get("counts", {})
        revs = {i.get("revision") for i in m.get("captioner", [])} or {cfg.get("revision")}
        set_rows.append([m["name"], _short(cfg.get("model"), 40), _short(",".join(sorted(map(str, revs))), 20),
                         _short(cfg.get("prompt"), 16), m.get("frames_per_clip", 1),
                         c.get("captioned", "-"), c.get("failed", "-"), f"{m['parts_done']}/{units}",
                         m.get("status"), "yes" if m["name"] in listed else "no"])
    out.append(table(["name", "model", "revision", "prompt", "k", "captioned", "failed", "parts", "status",
                      "in manifest"], set_rows))
    return "\n".join(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clipvip inspect", description=__doc__.splitlines()[0])
    parser.add_argument("root", help="dataset root (local path or s3://bucket/prefix)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="storage.s3_endpoint_url=URL / storage.s3_region=NAME (repeatable)")
    args = parser.parse_args(argv)
    cfg = load_or_exit(InspectConfig, argparse.Namespace(config=None, overrides=args.overrides))
    opts = fs.S3Options.of(cfg.storage)
    if not fs.exists(fs.join(args.root, "manifest.json"), opts):
        print(f"inspect: {args.root} has no manifest.json (not a dataset root written by prepare)", file=sys.stderr)
        return 2
    print(render(args.root, opts))
    return 0
