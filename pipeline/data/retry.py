"""Retrying quarantined clips without rebuilding anything (`--set data.retry_quarantined=true`).

Clips quarantined at stage `read` (storage kept failing through the retry budget) are
retryable; every other stage is a verdict on the data. A retry is an attempt: attempt k of part
P is the pseudo-part `P~rk`, registered in the manifest, whose unit u re-decodes exactly the
clips of unit u that attempt k-1 quarantined at stage `read` (the same metadata lines, filtered:
`UnitSpec.only`). Its shards land beside the others (`frames/P~rk/part-0000u.parquet`), get index
rows and caption parts like any shard, and clips that fail again are quarantined there, so the
next retry starts from them. Attempt k's plan (`plan/P~rk/units.parquet`) lists the rows it
supersedes; readers count a superseded row nowhere, so every clip stays in exactly one place,
frames or quarantine. An attempt is planned once and then resumed like any unit, so a retry
killed anywhere finishes with the same bytes when run again.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from pipeline import schema
from pipeline.data.metadata import UnitSpec
from pipeline.data.planning import read_units, table_bytes, units_table
from pipeline.data.root import RETRY, DatasetRoot, Shard, attempt_of, base_part
from pipeline.utils import fs

RETRYABLE_STAGES = (schema.STAGE_READ,)


def retryable(stages_json: str) -> int:
    stages = json.loads(stages_json)
    return sum(int(stages.get(s, 0)) for s in RETRYABLE_STAGES)


def effective_counts(frames_index: pa.Table) -> dict[str, Any]:
    """Totals of a root counting each clip once: a retry row's `clips` were quarantined at stage
    read by the attempt before it, and are counted where the retry put them instead."""
    rows = frames_index.to_pylist()
    superseded = sum(r["clips"] for r in rows if RETRY in r["part"])
    by_stage: dict[str, int] = {}
    for r in rows:
        for k, v in json.loads(r["quarantined_by_stage"]).items():
            by_stage[k] = by_stage.get(k, 0) + v
    if superseded:
        by_stage[schema.STAGE_READ] = by_stage.get(schema.STAGE_READ, 0) - superseded
    by_stage = {k: v for k, v in by_stage.items() if v}
    return {"clips": sum(r["clips"] for r in rows if RETRY not in r["part"]), "clips_ok": sum(r["rows"] for r in rows),
            "clips_quarantined": sum(r["quarantined"] for r in rows) - superseded, "quarantined_by_stage": by_stage,
            "retryable": by_stage.get(schema.STAGE_READ, 0), "retries": sum(1 for r in rows if RETRY in r["part"])}


def superseded_clips(root: DatasetRoot, parts: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(part that quarantined it, clip_id) of every quarantine row a later attempt replaced."""
    out: set[tuple[str, str]] = set()
    for rec in parts:
        if rec.get("retry_of"):
            prev = _attempt_name(rec["retry_of"], rec["attempt"] - 1)
            out |= {(prev, c) for u in read_units(root, rec["name"]) for c in u.only}
    return out


def _attempt_name(part: str, attempt: int) -> str:
    return part if attempt == 0 else f"{part}{RETRY}{attempt}"


def plan_retries(root: DatasetRoot, records: list[dict[str, Any]], frames_index: pa.Table,
                 units: list[UnitSpec], part_uris: dict[str, str]) -> tuple[list[dict[str, Any]], list[UnitSpec]]:
    """New attempts: for each part whose latest attempt is finished and left clips quarantined at
    a retryable stage, the next attempt's records and units (written to its plan). An unfinished
    attempt is not retried again: its units run like any planned unit.

    Args:
        records: the manifest's part records, retry attempts included.
        units: the planned units of the metadata parts (their line ranges).
        part_uris: metadata part name -> its location.
    """
    done = set(zip(frames_index.column("part").to_pylist(), frames_index.column("unit").to_pylist()))
    by_unit = {(u.part, u.unit): u for u in units}
    rows = frames_index.to_pylist()
    latest: dict[str, int] = {}
    for rec in records:
        base = base_part(rec["name"])
        latest[base] = max(latest.get(base, 0), attempt_of(rec["name"]))
    todo: list[UnitSpec] = []
    new: list[dict[str, Any]] = []
    for base in [r["name"] for r in records if not r.get("retry_of")]:
        attempt = latest.get(base, 0)
        name = _attempt_name(base, attempt)
        if attempt and any((u.part, u.unit) not in done for u in read_units(root, name)):
            continue
        sources = [r for r in rows if r["part"] == name and retryable(r["quarantined_by_stage"])]
        if not sources:
            continue
        nxt = _attempt_name(base, attempt + 1)
        retry_units = [_retry_unit(root, nxt, Shard(name, r["unit"]), by_unit[(base, r["unit"])], part_uris[base])
                       for r in sources]
        fs.write_bytes_atomic(root.plan_units_uri(nxt), table_bytes(units_table(retry_units)), root.opts)
        summary = {"name": nxt, "retry_of": base, "attempt": attempt + 1, "uri": part_uris[base],
                   "units": len(retry_units), "videos": sum(u.videos for u in retry_units),
                   "clips": sum(u.clips for u in retry_units), "issues": 0, "lines": 0}
        fs.write_json_atomic(root.plan_summary_uri(nxt), summary, root.opts)
        new.append(summary)
        todo += retry_units
    return new, todo


def _retry_unit(root: DatasetRoot, name: str, source: Shard, unit: UnitSpec, part_uri: str) -> UnitSpec:
    """Unit `source.unit` of attempt `name`: the clips `source` quarantined at a retryable stage."""
    from pipeline.data.metadata import read_unit  # noqa: PLC0415

    table = fs.read_parquet(root.quarantine_uri(source), root.opts, ["clip_id", "stage"])
    picked = tuple(sorted(c for c, s in zip(table.column("clip_id").to_pylist(), table.column("stage").to_pylist())
                          if s in RETRYABLE_STAGES))
    spec = UnitSpec(name, unit.unit, unit.byte_start, unit.byte_end, unit.line_start, 0, 0, unit.dropped, picked)
    videos = read_unit(part_uri, spec, root.opts, check=False)  # counted the way the decode task reads them
    return UnitSpec(name, unit.unit, unit.byte_start, unit.byte_end, unit.line_start, len(videos),
                    sum(len(v.clips) for v in videos), unit.dropped, picked)
