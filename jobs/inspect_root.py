"""`clipvip inspect ROOT`: what a dataset root holds: shards, caption sets, clip counts.

    clipvip inspect out/tiny/dataset
    clipvip inspect s3://bucket/hdvila/v1 --set storage.s3_endpoint_url=http://127.0.0.1:9000
Reads the manifest, the shard indexes and the caption_set.json files: a constant number of reads
whatever the number of shards; never a shard or a sidecar.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jobs.common import load_or_exit
from pipeline.config import InspectConfig
from pipeline.utils import fs

MAX_SHARD_LINES = 20


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """Left-aligned text table, columns as wide as their widest cell."""
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _short(text: Any, width: int = 24) -> str:
    text = "-" if text in (None, "") else str(text)
    return text if len(text) <= width else text[:width - 3] + "..."


def render(root: str, opts: fs.S3Options) -> str:
    """The root's manifest, parts, shards, caption sets and views, from the manifest, the shard
    indexes and the sets' and views' json (a constant number of reads, whatever the number of shards)."""
    from pipeline.data.captions import describe_caption_sets  # noqa: PLC0415
    from pipeline.data.index import FRAMES, read_index  # noqa: PLC0415
    from pipeline.data.retry import effective_counts  # noqa: PLC0415
    from pipeline.data.root import DatasetRoot  # noqa: PLC0415
    from pipeline.data.view import describe_views  # noqa: PLC0415

    droot = DatasetRoot(root, opts)
    manifest = droot.open(require_complete=False)
    order = droot.parts(manifest)
    index = read_index(droot, FRAMES, order, pending=manifest.get("status") != "complete")
    rows = index.to_pylist()
    planned = sum(p["units"] for p in manifest.get("parts", []))
    eff = effective_counts(index)
    counts = manifest.get("counts", {})
    by_stage = ", ".join(f"{k}={v}" for k, v in sorted(eff["quarantined_by_stage"].items())) or "none"
    out = [
        f"dataset root {root}",
        f"  status        {manifest.get('status')} (schema {manifest.get('schema_version')}, "
        f"fingerprint {manifest.get('fingerprint')})",
        f"  clips         {eff['clips_ok']} ok, {eff['clips_quarantined']} quarantined "
        f"by stage: {by_stage}; {counts.get('metadata_issues', sum(p['issues'] for p in manifest.get('parts', [])))} "
        "malformed input lines",
        f"  retryable     {eff['retryable']} clips (stage read: storage kept failing)"
        + (": prepare again with --set data.retry_quarantined=true" if eff["retryable"] else "")
        + (f"; {eff['retries']} retry shards so far" if eff["retries"] else ""),
        f"  frames        {sum(r['frames'] for r in rows)} in {len(rows)} shards, "
        f"{sum(r['bytes'] for r in rows) / 1e6:.2f} MB",
        "",
        f"metadata parts ({len(order)})",
    ]
    done_by_part: dict[str, int] = {}
    for r in rows:
        done_by_part[r["part"]] = done_by_part.get(r["part"], 0) + 1
    out.append(table(["part", "videos", "clips", "units done", "malformed", "source"],
                     [[p["name"], p["videos"], p["clips"], f"{done_by_part.get(p['name'], 0)}/{p['units']}",
                       p["issues"], _short(p["uri"], 48)] for p in manifest.get("parts", [])]))
    out += ["", f"shards ({len(rows)}/{planned} done)"]
    shard_rows = [[f"{r['part']}/part-{r['unit']:05d}", r["rows"], r["quarantined"], r["frames"],
                   f"{r['bytes'] / 1e6:.2f}"] for r in rows]
    out.append(table(["shard", "clips", "quarantined", "frames", "MB"], shard_rows[:MAX_SHARD_LINES]))
    if len(shard_rows) > MAX_SHARD_LINES:
        out.append(f"  ... {len(shard_rows) - MAX_SHARD_LINES} more shards")
    sets = describe_caption_sets(droot, order)
    listed = set(manifest.get("caption_sets", []))
    out += ["", f"caption sets ({len(sets)})"]
    set_rows = []
    for m in sets:
        cfg, c = m.get("config", {}), m.get("counts", {})
        revs = {i.get("revision") for i in m.get("captioner", [])} or {cfg.get("revision")}
        set_rows.append([m["name"], _short(cfg.get("model"), 40), _short(",".join(sorted(map(str, revs))), 20),
                         _short(cfg.get("prompt"), 16), m.get("frames_per_clip", 1),
                         c.get("captioned", "-"), c.get("failed", "-"), f"{m['parts_done']}/{len(rows)}",
                         m.get("status"), "yes" if m["name"] in listed else "no"])
    out.append(table(["name", "model", "revision", "prompt", "k", "captioned", "failed", "parts", "status",
                      "in manifest"], set_rows))
    views = describe_views(droot)
    out += ["", f"training views ({len(views)})"]
    view_rows = []
    for m in views:
        st, c = m.get("settings", {}), m.get("counts", {})
        stale = " (root grew since)" if st.get("frame_shards") not in (None, len(rows)) else ""
        view_rows.append([m["name"], st.get("caption_set"), st.get("image_size_px") or "stored",
                          st.get("rows_per_group"), c.get("rows", "-"), c.get("shards", "-"),
                          f"{c['bytes'] / 1e6:.2f}" if "bytes" in c else "-", f"{m.get('status')}{stale}"])
    out.append(table(["name", "caption set", "px", "group", "clips", "shards", "MB", "status"], view_rows))
    return "\n".join(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clipvip inspect", description=__doc__.splitlines()[0])
    parser.add_argument("root", help="dataset root (local path or s3://bucket/prefix)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="storage.s3_endpoint_url=URL / storage.s3_region=NAME (repeatable)")
    args = parser.parse_args(argv)
    cfg = load_or_exit(InspectConfig, argparse.Namespace(config=None, overrides=args.overrides))
    opts = fs.S3Options.of(cfg.storage)
    from pipeline.data.root import RootNotReady  # noqa: PLC0415

    try:
        print(render(args.root, opts))
    except RootNotReady as e:
        print(f"inspect: {e}", file=sys.stderr)
        return 2
    return 0
