"""HD-VILA metadata: line parsing, cutting a part into units, reading a unit back, S3 inputs."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.metadata import (
    ClipSpec,
    MetadataIssue,
    UnitSpec,
    VideoEntry,
    clip_key,
    expand_parts,
    parse_timestamp,
    plan_part,
    read_unit,
)
from pipeline.data.subtitles import find_cue_file, load_subtitle_table, read_cue_file
from pipeline.schema import QUARANTINE_SCHEMA, STAGE_METADATA, STAGE_SPAN
from pipeline.utils.fs import S3Options


def _line(video_id: object, clips: object, url: object = "https://youtu.be/x") -> bytes:
    return json.dumps({"video_id": video_id, "url": url, "clip": clips}).encode()


def _clip(clip_id: str, start: object, end: object) -> dict:
    return {"clip_id": clip_id, "span": [start, end]}


# --------------------------------------------------------------------------------------------
# Timestamps


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("00:00:01.500", 1.5),
        ("01:02:03.250", 3723.25),
        ("00:00:00", 0.0),
        ("02:03.5", 123.5),
        ("75:00.000", 4500.0),  # the leading field is not a clock field
        ("3.25", 3.25),
        ("12", 12.0),
        (" 00:00:07.000 ", 7.0),
        (5, 5.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_timestamp_accepts(value: str | int | float, seconds: float) -> None:
    assert parse_timestamp(value) == pytest.approx(seconds, abs=1e-9)


@pytest.mark.parametrize(
    "value",
    ["1:2:3:4", "abc", "-1", "-00:00:01.000", -1, -0.5, "00:75:00", "00:00:60.0", "1.2.3", "", ":5",
     ".5", "1e3", "1,5", float("nan"), float("inf"), True, None],
)
def test_parse_timestamp_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="bad timestamp") as info:
        parse_timestamp(value)  # type: ignore[arg-type]
    assert repr(value) in str(info.value)


# --------------------------------------------------------------------------------------------
# One part: issues, units, reading a unit back


@pytest.fixture
def zoo(tmp_path: Path) -> tuple[str, str]:
    """Two metadata parts: good lines mixed with every kind of bad line."""
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a_lines = [
        _line("v1", [_clip("v1.0.mp4", "00:00:00.000", "00:00:05.500"),
                     _clip("v1.1.mp4", "00:00:05.500", "00:00:09.000")]),
        b"",
        b'{"video_id": "vX", "clip": [',
        json.dumps({"video_id": "v2", "url": "u"}).encode(),
        _line("v3", {"clip_id": "v3.0.mp4", "span": [0, 1]}),
        _line("v4", [
            _clip("v4.0.mp4", 0, 2.5),
            _clip("v4.1.mp4", "abc", "00:00:03.000"),
            _clip("v4.2.mp4", "00:00:05.000", "00:00:03.000"),
            _clip("v4.3.mp4", "-1", "2"),
            {"span": [1, 2]},
            "v4.5.mp4",
            {"clip_id": "v4.6.mp4", "span": [1]},
            _clip("v4.7.mp4", "01:00.000", "01:04.250"),
            _clip("v4.8.mp4", "3", "1:2:3:4"),
        ]),
        b'{"video_id": "v5", "url": "caf\xe9", "clip": [{"clip_id": "v5.0.mp4", "span": [0, 1]}]}',
        b"[1, 2]",
        _line("v1", [_clip("v1.2.mp4", 9, 12), _clip("v1.0.mp4", 20, 30)]),
        b"   \r",
        _line(7, [_clip("v7.0.mp4", 0, 1)]),
        json.dumps({"video_id": "v8", "clip": [_clip("v8.0.mp4", 0, 1)]}).encode(),  # no url: kept
    ]
    a.write_bytes(b"\n".join(a_lines) + b"\n")
    b_lines = [
        _line("v6", [_clip("v6.0.mp4", 0, 3), _clip("v1.1.mp4", 3, 6)]),
        _line("v9", []),
    ]
    b.write_bytes(b"\r\n".join(b_lines))  # CRLF and no final newline
    return str(a), str(b)


def read_all(uri: str, plan) -> list[VideoEntry]:
    return [v for spec in plan.units for v in read_unit(uri, spec)]


def test_plan_part_zoo(zoo: tuple[str, str]) -> None:
    a, b = zoo
    plan = plan_part(a, "a", clips_per_shard=1000)
    url = "https://youtu.be/x"
    # A video id on two lines is two entries; the repeated clip id keeps its first occurrence.
    assert read_all(a, plan) == [
        VideoEntry("v1", url, (ClipSpec("v1.0.mp4", 0.0, 5.5), ClipSpec("v1.1.mp4", 5.5, 9.0))),
        VideoEntry("v4", url, (
            ClipSpec("v4.0.mp4", 0.0, 2.5),
            ClipSpec("v4.2.mp4", 5.0, 3.0, error_stage=STAGE_SPAN, error="span end 3.000s is not after start 5.000s"),
            ClipSpec("v4.3.mp4", -1.0, 2.0, error_stage=STAGE_SPAN, error="span start -1.000s is negative"),
            ClipSpec("v4.7.mp4", 60.0, 64.25),
        )),
        VideoEntry("v1", url, (ClipSpec("v1.2.mp4", 9.0, 12.0),)),
        VideoEntry("v8", "", (ClipSpec("v8.0.mp4", 0.0, 1.0),)),
    ]
    fmt = "expected seconds or [[HH:]MM:]SS[.mmm]"
    assert plan.issues == [
        MetadataIssue(f"{a}:3", "", "", "not valid JSON: Expecting value at column 29"),
        MetadataIssue(f"{a}:4", "", "v2", "missing key 'clip'"),
        MetadataIssue(f"{a}:5", "", "v3", "'clip' must be a list, got dict"),
        MetadataIssue(f"{a}:6", "v4.1.mp4", "v4", f"clip[1]: bad span start: bad timestamp 'abc': {fmt}"),
        MetadataIssue(f"{a}:6", "", "v4", "clip[4]: missing or bad clip_id: None"),
        MetadataIssue(f"{a}:6", "", "v4", "clip[5]: expected an object, got str"),
        MetadataIssue(f"{a}:6", "v4.6.mp4", "v4", "clip[6]: 'span' must be a list [start, end], got [1]"),
        MetadataIssue(f"{a}:6", "v4.8.mp4", "v4", f"clip[8]: bad span end: bad timestamp '1:2:3:4': {fmt}"),
        MetadataIssue(f"{a}:7", "", "v5", "line is not valid UTF-8 at byte 30"),
        MetadataIssue(f"{a}:8", "", "", "expected a JSON object, got list"),
        MetadataIssue(f"{a}:9", "v1.0.mp4", "v1", "duplicate clip_id (an earlier line of this part has it)"),
        MetadataIssue(f"{a}:11", "", "", "'video_id' must be a non-empty string, got 7"),
    ]
    assert (plan.lines, plan.videos, plan.clips, len(plan.units)) == (12, 4, 8, 1)
    assert plan.units[0].dropped == ((9, 1),)
    assert plan.sha256 == hashlib.sha256(open(a, "rb").read()).hexdigest() and plan.size == os.path.getsize(a)
    # Parts are independent: b's duplicate of a's v1.1.mp4 is its own clip; v9 has no clip.
    plan_b = plan_part(b, "b", 1000)
    assert read_all(b, plan_b) == [VideoEntry("v6", url, (ClipSpec("v6.0.mp4", 0.0, 3.0), ClipSpec("v1.1.mp4", 3.0, 6.0)))]
    assert plan_b.issues == [] and plan_b.lines == 2


def test_metadata_issue_quarantine_row(zoo: tuple[str, str]) -> None:
    issues = plan_part(zoo[0], "a", 1000).issues
    rows = [i.to_quarantine_row() for i in issues]
    table = pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)
    assert table.num_rows == len(issues)
    assert set(table.column("stage").to_pylist()) == {STAGE_METADATA}
    assert rows[-1]["source_uri"] == zoo[0]
    assert rows[-1]["error"] == f"{zoo[0]}:11: 'video_id' must be a non-empty string, got 7"


def _part(path: Path, sizes: list[int], dup_lines: dict[int, str] | None = None) -> str:
    """A part with one video per line, sizes[i] clips; dup_lines puts an extra line (a repeat of
    the given clip id alone) before line i."""
    lines = []
    for i, n in enumerate(sizes):
        if dup_lines and i in dup_lines:
            lines.append(_line("dup", [_clip(dup_lines[i], 0, 1)]))
        lines.append(_line(f"vid{i}", [_clip(f"vid{i}.{j}.mp4", j, j + 1.0) for j in range(n)]))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_plan_part_packs_whole_videos_in_order(tmp_path: Path) -> None:
    uri = _part(tmp_path / "p.jsonl", [3, 2, 5, 1, 0, 4, 12, 2])
    plan = plan_part(uri, "p", clips_per_shard=5)
    assert [u.unit for u in plan.units] == [0, 1, 2, 3, 4]
    videos = [[v.video_id for v in read_unit(uri, u)] for u in plan.units]
    assert videos == [["vid0", "vid1"], ["vid2"], ["vid3", "vid5"], ["vid6"], ["vid7"]]
    assert [u.clips for u in plan.units] == [5, 5, 5, 12, 2] and [u.videos for u in plan.units] == [2, 1, 2, 1, 1]
    planned = [c.clip_id for u in plan.units for v in read_unit(uri, u) for c in v.clips]
    assert planned == [f"vid{i}.{j}.mp4" for i, n in enumerate([3, 2, 5, 1, 0, 4, 12, 2]) for j in range(n)]
    assert plan_part(uri, "p", 5).units == plan.units  # a pure function of the bytes
    assert plan_part(uri, "p", 1000).units[0].clips == 29
    first_huge = plan_part(_part(tmp_path / "h.jsonl", [7, 1]), "h", 5)
    assert [u.clips for u in first_huge.units] == [7, 1]  # an oversized first video: no empty unit
    with pytest.raises(ValueError, match="clips_per_shard"):
        plan_part(uri, "p", 0)


def test_duplicates_inside_and_between_units_are_skipped_on_read(tmp_path: Path) -> None:
    # A line holding only a duplicate lies inside unit 0's byte range (before vid1) and between
    # units 0 and 1 (before vid2): the re-read must give exactly the planned clips either way.
    uri = _part(tmp_path / "d.jsonl", [2, 2, 3], dup_lines={1: "vid0.0.mp4", 2: "vid0.1.mp4"})
    plan = plan_part(uri, "d", clips_per_shard=4)
    assert [(u.videos, u.clips) for u in plan.units] == [(2, 4), (1, 3)]
    assert plan.units[0].dropped == ((2, 0),) and plan.units[1].dropped == ()
    assert [[c.clip_id for v in read_unit(uri, u) for c in v.clips] for u in plan.units] == [
        ["vid0.0.mp4", "vid0.1.mp4", "vid1.0.mp4", "vid1.1.mp4"], ["vid2.0.mp4", "vid2.1.mp4", "vid2.2.mp4"]]
    assert len([i for i in plan.issues if "duplicate" in i.error]) == 2


def test_read_unit_refuses_a_changed_part(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    uri = _part(path, [2, 2])
    spec = plan_part(uri, "c", 10).units[0]
    path.write_bytes(path.read_bytes().replace(b'"vid1.1.mp4"', b'"vid1.1.mp4", "x": 1}, {"nope": 1'))
    with pytest.raises(RuntimeError, match="changed after planning"):
        read_unit(uri, spec)


def test_keys_and_unit_spec_round_trip(tmp_path: Path) -> None:
    uri = _part(tmp_path / "k.jsonl", [2, 3, 1])
    plan = plan_part(uri, "k", 3, with_keys=True)
    ids = [f"vid{i}.{j}.mp4" for i, n in enumerate([2, 3, 1]) for j in range(n)]
    assert plan.key_hashes.tolist() == [clip_key(c) for c in ids]
    assert plan.key_units.tolist() == [0, 0, 1, 1, 1, 2]
    spec = UnitSpec("k", 7, 10, 90, 3, 2, 5, ((4, 1), (5, 0)))
    assert UnitSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_expand_parts_directory_glob_and_compressed(tmp_path: Path) -> None:
    meta = tmp_path / "meta"
    meta.mkdir()
    for name in ("part1.jsonl", "part0.jsonl", "other.jsonl"):
        (meta / name).write_bytes(_line("h", [_clip("h.0.mp4", 0, 1)]) + b"\n")
    (meta / "notes.txt").write_text("not metadata")
    d = str(meta)
    assert expand_parts([d]) == [f"{d}/other.jsonl", f"{d}/part0.jsonl", f"{d}/part1.jsonl"]
    assert expand_parts([f"{d}/part*.jsonl", f"{d}/part0.jsonl"]) == [f"{d}/part0.jsonl", f"{d}/part1.jsonl"]
    with pytest.raises(ValueError, match="compressed"):
        plan_part(f"{d}/part0.jsonl.gz", "part0", 5)
    with pytest.raises(FileNotFoundError):
        plan_part(str(tmp_path / "missing.jsonl"), "missing", 5)


# --------------------------------------------------------------------------------------------
# S3, through a real S3 endpoint on loopback


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="hdvila")
        try:
            yield endpoint
        finally:
            server.stop()


def test_s3_metadata_and_subtitles(s3_endpoint: str, tmp_path: Path) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    meta = _line("v1", [_clip("v1.0.mp4", "00:00:00.000", "00:00:02.000"), _clip("v1.1.mp4", 2, 1)]) + b"\n{oops\n"
    s3.put_object(Bucket="hdvila", Key="meta/part0.jsonl", Body=meta)
    s3.put_object(Bucket="hdvila", Key="subs/table.jsonl", Body=b'{"clip_id": "v1.0.mp4", "text": "hi"}\n')
    local = tmp_path / "t.parquet"
    pq.write_table(pa.table({"clip_id": ["v1.0.mp4"], "text": ["from parquet"]}), local)
    s3.put_object(Bucket="hdvila", Key="subs/table.parquet", Body=local.read_bytes())
    s3.put_object(Bucket="hdvila", Key="vtt/v1.vtt", Body=b"WEBVTT\n\n00:00.000 --> 00:01.000\nhey\n")
    opts = S3Options(endpoint_url=s3_endpoint)

    uri = "s3://hdvila/meta/part0.jsonl"
    assert expand_parts(["s3://hdvila/meta"], opts) == [uri]
    assert expand_parts(["s3://hdvila/meta/part*.jsonl"], opts) == [uri]
    plan = plan_part(uri, "part0", 10, opts)
    assert [v for u in plan.units for v in read_unit(uri, u, opts)] == [VideoEntry("v1", "https://youtu.be/x", (
        ClipSpec("v1.0.mp4", 0.0, 2.0),
        ClipSpec("v1.1.mp4", 2.0, 1.0, error_stage=STAGE_SPAN, error="span end 1.000s is not after start 2.000s"),
    ))]
    assert plan.issues == [MetadataIssue(f"{uri}:2", "", "", "not valid JSON: Expecting property name enclosed in "
                                         "double quotes at column 2")]
    assert plan.sha256 == hashlib.sha256(meta).hexdigest()
    with pytest.raises(FileNotFoundError):
        plan_part("s3://hdvila/meta/missing.jsonl", "missing", 10, opts)

    assert load_subtitle_table("s3://hdvila/subs/table.jsonl", opts).texts == {"v1.0.mp4": "hi"}
    assert load_subtitle_table("s3://hdvila/subs/table.parquet", opts).texts == {"v1.0.mp4": "from parquet"}
    found = find_cue_file("s3://hdvila/vtt", "v1", opts)
    assert found == "s3://hdvila/vtt/v1.vtt"
    assert find_cue_file("s3://hdvila/vtt", "v2", opts) is None
    assert [c.text for c in read_cue_file(found, opts)] == ["hey"]
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
