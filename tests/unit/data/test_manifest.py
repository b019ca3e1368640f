"""HD-VILA metadata reading, subtitle attachment, work-unit planning, and S3 inputs."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.manifest import (
    ClipSpec,
    MetadataIssue,
    VideoEntry,
    WorkUnit,
    attach_subtitle_table,
    inputs_digest,
    parse_timestamp,
    plan_units,
    read_metadata,
)
from pipeline.data.subtitles import SubtitleTable, find_cue_file, load_subtitle_table, read_cue_file
from pipeline.schema import QUARANTINE_SCHEMA, STAGE_METADATA, STAGE_SPAN, STAGE_SUBTITLE
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
# Metadata


@pytest.fixture
def zoo(tmp_path: Path) -> tuple[str, str]:
    """Two metadata files: good lines mixed with every kind of bad line."""
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


def test_read_metadata_zoo(zoo: tuple[str, str]) -> None:
    a, b = zoo
    videos, issues = read_metadata([a, b])
    url = "https://youtu.be/x"
    assert videos == [
        VideoEntry("v1", url, (
            ClipSpec("v1.0.mp4", 0.0, 5.5), ClipSpec("v1.1.mp4", 5.5, 9.0), ClipSpec("v1.2.mp4", 9.0, 12.0),
        )),
        VideoEntry("v4", url, (
            ClipSpec("v4.0.mp4", 0.0, 2.5),
            ClipSpec("v4.2.mp4", 5.0, 3.0, error_stage=STAGE_SPAN, error="span end 3.000s is not after start 5.000s"),
            ClipSpec("v4.3.mp4", -1.0, 2.0, error_stage=STAGE_SPAN, error="span start -1.000s is negative"),
            ClipSpec("v4.7.mp4", 60.0, 64.25),
        )),
        VideoEntry("v8", "", (ClipSpec("v8.0.mp4", 0.0, 1.0),)),
        VideoEntry("v6", url, (ClipSpec("v6.0.mp4", 0.0, 3.0),)),
        VideoEntry("v9", url, ()),
    ]
    fmt = "expected seconds or [[HH:]MM:]SS[.mmm]"
    assert issues == [
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
        MetadataIssue(f"{a}:9", "v1.0.mp4", "v1", f"duplicate clip_id, first seen at {a}:1"),
        MetadataIssue(f"{a}:11", "", "", "'video_id' must be a non-empty string, got 7"),
        MetadataIssue(f"{b}:1", "v1.1.mp4", "v6", f"duplicate clip_id, first seen at {a}:1"),
    ]


def test_metadata_issue_quarantine_row(zoo: tuple[str, str]) -> None:
    _, issues = read_metadata(list(zoo))
    rows = [i.to_quarantine_row() for i in issues]
    table = pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)
    assert table.num_rows == len(issues)
    assert set(table.column("stage").to_pylist()) == {STAGE_METADATA}
    assert rows[-1]["source_uri"] == zoo[1]
    assert rows[-1]["error"] == f"{zoo[1]}:1: duplicate clip_id, first seen at {zoo[0]}:1"


def test_read_metadata_gzip_directory_and_missing(tmp_path: Path) -> None:
    meta = tmp_path / "meta"
    meta.mkdir()
    with gzip.open(meta / "part0.jsonl.gz", "wb") as f:
        f.write(_line("g", [_clip("g.0.mp4", 0, 1)]) + b"\n")
    (meta / "part1.jsonl").write_bytes(_line("h", [_clip("h.0.mp4", 0, 1)]) + b"\n")
    (meta / "notes.txt").write_text("not metadata")
    videos, issues = read_metadata([str(meta / "part0.jsonl.gz"), str(meta)])
    assert [v.video_id for v in videos] == ["g", "h"]
    assert issues == []
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_metadata([str(tmp_path / "missing.jsonl")])


def test_attach_subtitle_table() -> None:
    videos = [
        VideoEntry("v", "u", (
            ClipSpec("v.0", 0, 1),
            ClipSpec("v.1", 1, 2),
            ClipSpec("v.2", 2, 3),
            ClipSpec("v.3", 3, 3, error_stage=STAGE_SPAN, error="span end"),
            ClipSpec("v.4", 4, 5),
        )),
    ]
    table = SubtitleTable(
        texts={"v.0": "zero", "v.3": "three"},
        errors={"v.1": "subtitle is not valid UTF-8 at byte 3 of t.jsonl:2", "v.4": "empty subtitle"},
    )
    (out,) = attach_subtitle_table(videos, table)
    assert out.clips == (
        ClipSpec("v.0", 0, 1, subtitle="zero"),
        ClipSpec("v.1", 1, 2, error_stage=STAGE_SUBTITLE, error="subtitle is not valid UTF-8 at byte 3 of t.jsonl:2"),
        ClipSpec("v.2", 2, 3, error_stage=STAGE_SUBTITLE, error="no subtitle for clip"),
        ClipSpec("v.3", 3, 3, error_stage=STAGE_SPAN, error="span end"),  # first error wins
        ClipSpec("v.4", 4, 5, error_stage=STAGE_SUBTITLE, error="empty subtitle"),
    )


# --------------------------------------------------------------------------------------------
# Planning


def _videos(sizes: list[int], prefix: str = "vid") -> list[VideoEntry]:
    return [
        VideoEntry(f"{prefix}{i}", "", tuple(ClipSpec(f"{prefix}{i}.{j}.mp4", j, j + 1.0) for j in range(n)))
        for i, n in enumerate(sizes)
    ]


def test_plan_units_packs_whole_videos_in_order() -> None:
    videos = _videos([3, 2, 5, 1, 0, 4, 12, 2])
    units = plan_units(videos, clips_per_shard=5)
    assert [u.index for u in units] == [0, 1, 2, 3, 4]
    assert [[v.video_id for v in u.videos] for u in units] == [
        ["vid0", "vid1"], ["vid2"], ["vid3", "vid5"], ["vid6"], ["vid7"],
    ]
    assert [u.num_clips() for u in units] == [5, 5, 5, 12, 2]
    # Every clip of a non-empty video lands in exactly one unit, in input order.
    planned = [c.clip_id for u in units for v in u.videos for c in v.clips]
    assert planned == [c.clip_id for v in videos for c in v.clips]
    assert plan_units(videos, 5) == units  # a pure function: same input, same plan
    reversed_units = plan_units(list(reversed(videos)), 5)
    assert reversed_units[0].videos[0].video_id == "vid7"  # input order, not sorted
    assert plan_units(videos, 1000)[0].num_clips() == 29
    assert plan_units([], 5) == []
    first_huge = plan_units(_videos([7, 1]), 5)  # an oversized first video: no empty unit before it
    assert [[v.video_id for v in u.videos] for u in first_huge] == [["vid0"], ["vid1"]]
    with pytest.raises(ValueError, match="clips_per_shard"):
        plan_units(videos, 0)


def test_work_unit_dict_round_trip() -> None:
    unit = WorkUnit(7, (
        VideoEntry("v", "https://youtu.be/v", (
            ClipSpec("v.0.mp4", 0.0, 1.5, subtitle="caf\u00e9"),
            ClipSpec("v.1.mp4", 3.0, 2.0, error_stage=STAGE_SPAN, error="span end 2.000s is not after start 3.000s"),
        )),
        VideoEntry("w", "", (ClipSpec("w.0.mp4", 10.125, 20.0),)),
    ))
    wire = json.loads(json.dumps(unit.to_dict()))
    assert WorkUnit.from_dict(wire) == unit
    assert "subtitle" not in wire["videos"][1]["clips"][0]  # None fields stay off the wire
    assert unit.num_clips() == 3


def test_inputs_digest(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl.gz"
    data = gzip.compress(b'{"video_id": "v"}\n')
    path.write_bytes(data)
    assert inputs_digest([str(path)]) == {str(path): hashlib.sha256(data).hexdigest()}
    with pytest.raises(FileNotFoundError, match="nope"):
        inputs_digest([str(tmp_path / "nope.jsonl")])
    with pytest.raises(IsADirectoryError):
        inputs_digest([str(tmp_path)])


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
    for given in ([uri], ["s3://hdvila/meta"]):  # a file, and a prefix expanded to its *.jsonl
        videos, issues = read_metadata(given, opts)
        assert videos == [VideoEntry("v1", "https://youtu.be/x", (
            ClipSpec("v1.0.mp4", 0.0, 2.0),
            ClipSpec("v1.1.mp4", 2.0, 1.0, error_stage=STAGE_SPAN, error="span end 1.000s is not after start 2.000s"),
        ))]
        assert issues == [MetadataIssue(f"{uri}:2", "", "", "not valid JSON: Expecting property name enclosed in "
                                        "double quotes at column 2")]
    assert inputs_digest([uri], opts) == {uri: hashlib.sha256(meta).hexdigest()}
    with pytest.raises(FileNotFoundError, match="s3://hdvila/meta/missing.jsonl"):
        read_metadata(["s3://hdvila/meta/missing.jsonl"], opts)

    assert load_subtitle_table("s3://hdvila/subs/table.jsonl", opts).texts == {"v1.0.mp4": "hi"}
    assert load_subtitle_table("s3://hdvila/subs/table.parquet", opts).texts == {"v1.0.mp4": "from parquet"}
    found = find_cue_file("s3://hdvila/vtt", "v1", opts)
    assert found == "s3://hdvila/vtt/v1.vtt"
    assert find_cue_file("s3://hdvila/vtt", "v2", opts) is None
    assert [c.text for c in read_cue_file(found, opts)] == ["hey"]
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
