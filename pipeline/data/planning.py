"""Planning `prepare` on the cluster: metadata parts -> unit descriptors, subtitle table -> units.

    driver   parts to plan (new, or without a finished plan), table chunks      [parts, chunks]
    Stage 1  plan tasks, one per part (metadata.plan_part): write plan/<part>/units.parquet,
             quarantine/<part>/metadata.parquet, then plan/<part>/part.json (done marker);
             with a subtitle table also return the part's clip keys (object store)   [1 per part]
    Stage 2  (table only) one task sorts the keys of the parts being joined into a lookup;
             chunk tasks parse the table (byte ranges / row groups) and keep the rows whose
             clip is planned, tagged with its unit; Ray Data groups them by unit and writes
             plan/<part>/subtitles/part-NNNNN.parquet; then plan/<part>/subtitles.json [1 per unit]
    driver   reads each part's units.parquet: unit descriptors only                 [1 per part]

The driver never holds clips or subtitles: part summaries, unit descriptors (a few numbers each)
and object references. A part's plan is reused while the part is unchanged, so a grown root
plans only its new parts. Every file is written atomically with deterministic content, so a
killed plan is simply redone. The caller owns `ray.init`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import schema
from pipeline.data.metadata import UnitSpec, clip_key, plan_part
from pipeline.data.root import DatasetRoot, Shard
from pipeline.data.subtitles import TableChunk, duplicate_issue, read_table_chunk, row_source, table_chunks
from pipeline.utils import fs

PLAN_VERSION = 1  # bump when plan files change meaning: older plans are then made again
UNITS_SCHEMA = pa.schema([
    pa.field("part", pa.string(), nullable=False), pa.field("unit", pa.int32(), nullable=False),
    pa.field("byte_start", pa.int64(), nullable=False), pa.field("byte_end", pa.int64(), nullable=False),
    pa.field("line_start", pa.int64(), nullable=False), pa.field("videos", pa.int32(), nullable=False),
    pa.field("clips", pa.int32(), nullable=False), pa.field("dropped", pa.string(), nullable=False),
    pa.field("only", pa.string(), nullable=False),  # JSON list: a retry unit's clips (retry.py)
])
SUBTITLE_ROWS_SCHEMA = pa.schema([
    pa.field("clip_id", pa.string(), nullable=False), pa.field("text", pa.string(), nullable=True),
    pa.field("error", pa.string(), nullable=True),
])


@dataclass(frozen=True, slots=True)
class PartInput:
    """A metadata part as the driver sees it before planning: name, location, cheap identity."""

    name: str
    uri: str
    size: int
    version: str
    sha256: str | None = None
    """Known when the driver had to hash the part (its version tag changed)."""


@dataclass(slots=True)
class InputPlan:
    parts: list[dict[str, Any]]
    """Each part's plan summary (name, uri, sha256, size, lines, videos, clips, units, issues)."""
    units: list[UnitSpec]
    planned_now: list[str] = field(default_factory=list)
    table_issues: int = 0
    subtitle_duplicates: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)
    """Wall time of each planning step of this run (plan, join, units)."""

    @property
    def clips(self) -> int:
        return sum(p["clips"] for p in self.parts)

    @property
    def issues(self) -> int:
        return sum(p["issues"] for p in self.parts) + self.table_issues + self.subtitle_duplicates


def table_bytes(table: pa.Table, row_group_rows: int = 1 << 16) -> bytes:
    sink = pa.BufferOutputStream()
    import pyarrow.parquet as pq  # noqa: PLC0415

    pq.write_table(table, sink, compression="zstd", row_group_size=max(1, row_group_rows))
    return sink.getvalue().to_pybytes()


def units_table(units: list[UnitSpec]) -> pa.Table:
    rows = []
    for u in units:
        d = u.to_dict()
        rows.append(dict(d, dropped=json.dumps(d["dropped"]), only=json.dumps(d["only"])))
    return pa.Table.from_pylist(rows, schema=UNITS_SCHEMA)


def read_units(root: DatasetRoot, part: str) -> list[UnitSpec]:
    """A part's unit descriptors from its plan (one read)."""
    return [UnitSpec.from_dict(dict(d, dropped=json.loads(d["dropped"]), only=json.loads(d.get("only") or "[]")))
            for d in _read_parquet(root.plan_units_uri(part), root.opts).to_pylist()]


def _read_parquet(uri: str, opts: fs.S3Options) -> pa.Table:
    return fs.read_parquet(uri, opts)


# ---------------------------------------------------------------------------------------------
# Stage 1: one part


def plan_one_part(root_uri: str, opts: dict[str, Any], part: dict[str, Any], clips_per_shard: int,
                  with_keys: bool) -> tuple[dict[str, Any], Any]:
    """Plan one part and write its plan files (summary last); returns (summary, keys or None)."""
    o = fs.S3Options(**opts)
    root = DatasetRoot(root_uri, o)
    plan = plan_part(part["uri"], part["name"], clips_per_shard, o, with_keys=with_keys)
    units = units_table(plan.units)
    fs.write_bytes_atomic(root.plan_units_uri(part["name"]), table_bytes(units), o)
    if plan.issues:
        rows = pa.Table.from_pylist([i.to_quarantine_row() for i in plan.issues], schema=schema.QUARANTINE_SCHEMA)
        fs.write_bytes_atomic(root.metadata_quarantine_uri(part["name"]), table_bytes(rows), o)
    summary = dict(plan.summary(), version=part["version"], clips_per_shard=clips_per_shard, plan_version=PLAN_VERSION)
    fs.write_json_atomic(root.plan_summary_uri(part["name"]), summary, o)
    keys = (plan.key_hashes, plan.key_units) if with_keys else None
    return summary, keys


def _plan_usable(summary: dict[str, Any] | None, part: PartInput, clips_per_shard: int) -> bool:
    if summary is None or summary.get("plan_version") != PLAN_VERSION:
        return False
    if summary.get("clips_per_shard") != clips_per_shard or summary.get("size") != part.size:
        return False
    return summary.get("version") == part.version or (part.sha256 is not None and summary["sha256"] == part.sha256)


# ---------------------------------------------------------------------------------------------
# Stage 2: the subtitle table


def build_lookup(*keys: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(sorted clip keys, their unit keys `part_ordinal << 32 | unit`) of the parts being joined;
    the argument order is the part ordinal."""
    hashes = np.concatenate([k[0] for k in keys]) if keys else np.zeros(0, np.uint64)
    ukeys = np.concatenate([(np.uint64(i) << np.uint64(32)) | k[1].astype(np.uint64) for i, k in enumerate(keys)]
                           ) if keys else np.zeros(0, np.uint64)
    order = np.argsort(hashes, kind="stable")
    return hashes[order], ukeys[order]


def join_table_chunk(root_uri: str, opts: dict[str, Any], chunk: dict[str, Any],
                     lookup: tuple[np.ndarray, np.ndarray]) -> tuple[dict[str, Any], pa.Table]:
    """Parse one table chunk; keep the rows whose clip key is planned, tagged with the unit key.

    Writes the chunk's unusable rows to quarantine/subtitles/chunk-NNNNN.parquet (once: a later
    join against the same table finds the file). Returns (counts, matched rows).
    """
    o = fs.S3Options(**opts)
    root = DatasetRoot(root_uri, o)
    spec = TableChunk(**chunk)
    rows = read_table_chunk(spec, o)
    if rows.issues:
        uri = root.subtitle_quarantine_uri(f"chunk-{spec.index:05d}")
        if not fs.exists(uri, o):
            table = pa.Table.from_pylist([{"clip_id": "", "video_id": "", "stage": schema.STAGE_SUBTITLE,
                                           "error": f"{src}: {err}", "source_uri": spec.uri}
                                          for src, err, _ in rows.issues], schema=schema.QUARANTINE_SCHEMA)
            fs.write_bytes_atomic(uri, table_bytes(table), o)
    sorted_hashes, sorted_ukeys = lookup
    keys = np.fromiter((clip_key(c) for c in rows.clip_ids), dtype=np.uint64, count=len(rows.clip_ids))
    pos = np.searchsorted(sorted_hashes, keys)
    pos_c = np.minimum(pos, max(len(sorted_hashes) - 1, 0))
    hit = (pos < len(sorted_hashes)) & (sorted_hashes[pos_c] == keys) if len(sorted_hashes) else np.zeros(len(keys), bool)
    idx = np.flatnonzero(hit)
    matched = pa.table({
        "ukey": pa.array(sorted_ukeys[pos_c[idx]], pa.uint64()),
        "clip_id": pa.array([rows.clip_ids[i] for i in idx], pa.string()),
        "text": pa.array([rows.texts[i] for i in idx], pa.string()),
        "error": pa.array([rows.errors[i] for i in idx], pa.string()),
        "order": pa.array([rows.order[i] for i in idx], pa.int64()),
        "line": pa.array([rows.lines[i] for i in idx], pa.int64()),
        "chunk": pa.array(np.full(len(idx), spec.index, np.int32)),
    })
    return {"rows": len(rows.clip_ids), "matched": int(len(idx)), "issues": len(rows.issues)}, matched


def make_unit_subtitle_writer(root_uri: str, opts: dict[str, Any], part_names: list[str], table_uri: str,
                              table_kind: str):
    """map_groups function: one unit's matched table rows -> plan/<part>/subtitles/part-NNNNN.parquet.

    Rows sorted by clip id; of several rows for one clip the first in the table wins and the
    others become quarantine rows. Returns one summary row per unit.
    """

    def write(group: pa.Table) -> pa.Table:
        import pyarrow.compute as pc  # noqa: PLC0415

        o = fs.S3Options(**opts)
        root = DatasetRoot(root_uri, o)
        ukey = int(group.column("ukey")[0].as_py())
        shard = Shard(part_names[ukey >> 32], ukey & 0xFFFFFFFF)
        group = group.sort_by([("clip_id", "ascending"), ("order", "ascending")])
        ids = group.column("clip_id").combine_chunks()
        first = pc.not_equal(ids[1:], ids[:-1]) if len(ids) > 1 else pa.array([], pa.bool_())
        keep = pa.concat_arrays([pa.array([True]), first]) if len(ids) else pa.array([], pa.bool_())
        out = group.filter(keep).select(["clip_id", "text", "error"]).cast(SUBTITLE_ROWS_SCHEMA)
        fs.write_bytes_atomic(root.subtitles_uri(shard), table_bytes(out), o)
        dups = group.filter(pc.invert(keep))
        if dups.num_rows:
            sources = [row_source(TableChunk(table_uri, table_kind, int(k), 1 if k else 0, 0), int(n), int(o))
                       for k, n, o in zip(*(dups.column(c).to_pylist() for c in ("chunk", "line", "order")))]
            table = pa.Table.from_pylist([{"clip_id": "", "video_id": "", "stage": schema.STAGE_SUBTITLE,
                                           "error": f"{src}: {duplicate_issue(c)}", "source_uri": table_uri}
                                          for c, src in zip(dups.column("clip_id").to_pylist(), sources)],
                                         schema=schema.QUARANTINE_SCHEMA)
            fs.write_bytes_atomic(root.subtitle_quarantine_uri(f"{shard.part}-{schema.part_name(shard.unit)}"),
                                  table_bytes(table), o)
        return pa.table({"ukey": [ukey], "rows": [out.num_rows], "duplicates": [dups.num_rows]})

    return write


def join_subtitle_table(root: DatasetRoot, table_uri: str, identity: dict[str, Any], parts: list[str],
                        keys: list[Any], chunk_bytes: int = 64 << 20) -> tuple[int, int]:
    """Attach the table's rows to the units of `parts` (keys: their plan tasks' key refs);
    returns (table issues, duplicate rows). Writes plan/<part>/subtitles.json last per part."""
    import ray  # noqa: PLC0415
    import ray.data  # noqa: PLC0415

    opts = asdict(root.opts)
    lookup = ray.remote(build_lookup).remote(*keys)
    join = ray.remote(num_returns=2)(join_table_chunk)
    chunks = table_chunks(table_uri, root.opts, chunk_bytes)
    outs = [join.remote(root.uri, opts, c.to_dict(), lookup) for c in chunks]
    counts = ray.get([o[0] for o in outs])
    issues = sum(c["issues"] for c in counts)
    per_part = {p: {"units_with_rows": 0, "rows": 0, "duplicates": 0} for p in parts}
    if sum(c["matched"] for c in counts):
        ds = ray.data.from_arrow_refs([o[1] for o in outs])
        # One reduce partition per ~64 units: Ray's default of 200 costs more than it spreads.
        partitions = max(1, min(200, len(counts) * 4, sum(c["matched"] for c in counts) // (64 * 512) + 1))
        writer = make_unit_subtitle_writer(root.uri, opts, parts, table_uri, chunks[0].kind)
        ds = ds.groupby("ukey", num_partitions=partitions).map_groups(writer, batch_format="pyarrow")
        for row in ds.iter_rows():
            stats = per_part[parts[int(row["ukey"]) >> 32]]
            stats["units_with_rows"] += 1
            stats["rows"] += int(row["rows"])
            stats["duplicates"] += int(row["duplicates"])
    for part, stats in per_part.items():
        fs.write_json_atomic(root.subtitles_done_uri(part), dict(stats, table=identity, table_issues=issues),
                             root.opts)
    return issues, sum(s["duplicates"] for s in per_part.values())


# ---------------------------------------------------------------------------------------------
# Driver


def plan_inputs(root: DatasetRoot, parts: list[PartInput], clips_per_shard: int,
                table: dict[str, Any] | None = None, log=print) -> InputPlan:
    """Plan every part (reusing finished plans of unchanged parts) and join the subtitle table
    to the units of parts that have not been joined with it yet.

    Args:
        parts: in registration order.
        table: the subtitle table's identity ({"uri", "size", "version", "sha256"}) or None.
    """
    import ray  # noqa: PLC0415

    opts = asdict(root.opts)
    summaries = {p.name: fs.read_json_or_none(root.plan_summary_uri(p.name), root.opts) for p in parts}
    joined: dict[str, dict[str, Any]] = {}
    if table is not None:
        for p in parts:
            done = fs.read_json_or_none(root.subtitles_done_uri(p.name), root.opts)
            if done is not None and done.get("table", {}).get("sha256") == table["sha256"]:
                joined[p.name] = done
    todo = [p for p in parts if not _plan_usable(summaries[p.name], p, clips_per_shard)
            or (table is not None and p.name not in joined)]
    task = ray.remote(num_returns=2)(plan_one_part)
    refs = {}
    for p in todo:
        # The task keeps a set of clip-key hashes (~70 B a clip, ~1 clip per 70 B of metadata).
        memory = int(256 * 2**20 + 1.5 * p.size)
        refs[p.name] = task.options(memory=memory).remote(root.uri, opts, {"name": p.name, "uri": p.uri,
                                                                           "version": p.version},
                                                          clips_per_shard, table is not None)
    if todo:
        log(f"[plan] planning {len(todo)} metadata part(s) on the cluster: {', '.join(p.name for p in todo)}")
    t0 = time.perf_counter()
    for name, (summary_ref, _) in refs.items():
        summaries[name] = ray.get(summary_ref)
    timings = {"plan": time.perf_counter() - t0}
    table_issues = duplicates = 0
    if table is not None and refs:
        names = list(refs)
        table_issues, duplicates = join_subtitle_table(root, table["uri"], table, names, [refs[n][1] for n in names])
        timings["join"] = time.perf_counter() - t0 - timings["plan"]
    # Parts joined in earlier runs keep the counts recorded in their done markers.
    earlier = [d for name, d in joined.items() if name not in refs]
    duplicates += sum(int(d.get("duplicates", 0)) for d in earlier)
    if not refs and earlier:
        table_issues = int(earlier[0].get("table_issues", 0))
    t1 = time.perf_counter()
    units = [u for p in parts for u in read_units(root, p.name)]
    timings["units"] = time.perf_counter() - t1
    return InputPlan(parts=[summaries[p.name] for p in parts], units=units, planned_now=[p.name for p in todo],
                     table_issues=table_issues, subtitle_duplicates=duplicates,
                     timings_s={k: round(v, 2) for k, v in timings.items()})


def _summary_only(uri: str, name: str, clips_per_shard: int, opts: dict[str, Any]) -> dict[str, Any]:
    return plan_part(uri, name, clips_per_shard, fs.S3Options(**opts)).summary()


def summarize_parts(root: DatasetRoot, parts: list[PartInput], clips_per_shard: int) -> list[dict[str, Any]]:
    """Each part's plan summary without writing anything (`clipvip plan`): a finished plan of an
    unchanged part is read, the others are planned on the connected Ray and thrown away."""
    import ray  # noqa: PLC0415

    opts = asdict(root.opts)
    summaries = {p.name: fs.read_json_or_none(root.plan_summary_uri(p.name), root.opts) for p in parts}
    task = ray.remote(_summary_only)
    refs = {p.name: task.options(memory=int(256 * 2**20 + 1.5 * p.size)).remote(p.uri, p.name, clips_per_shard, opts)
            for p in parts if not _plan_usable(summaries[p.name], p, clips_per_shard)}
    for name, ref in refs.items():
        summaries[name] = ray.get(ref)
    return [summaries[p.name] for p in parts]
