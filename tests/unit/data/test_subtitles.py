"""Subtitle tables (jsonl, Parquet), WebVTT/SRT cue parsing and span text selection."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.subtitles import (
    EMPTY_SUBTITLE,
    NO_SUBTITLE,
    Cue,
    SubtitleError,
    find_cue_file,
    load_subtitle_table,
    read_table_chunk,
    table_chunks,
    parse_srt,
    parse_vtt,
    read_cue_file,
    subtitle_for_span,
)

# YouTube ASR style: inline word timings, cue settings, a NOTE and a STYLE block, header
# metadata, and rolling cues (each repeats the previous last line; 10 ms cues repeat it alone).
YOUTUBE_VTT = """WEBVTT
Kind: captions
Language: en

STYLE
::cue { color: white; }

NOTE this note
spans two lines

00:00:00.000 --> 00:00:02.500 align:start position:0%
 
hello<00:00:00.500><c> world</c>

00:00:02.500 --> 00:00:02.510 align:start position:0%
hello world
 

00:00:02.510 --> 00:00:05.000 align:start position:0%
hello world
this<00:00:03.000><c> is</c><00:00:03.500><c> &amp;&nbsp;fine</c>

00:00:05.000 --> 00:00:05.010 align:start position:0%
this is & fine
 

cue-id-7
00:05.010 --> 00:08.000 align:start position:0%
this is & fine
<v Speaker>goodbye</v>
"""


def test_parse_vtt_strips_tags_and_collapses_rolling_lines() -> None:
    cues = parse_vtt(YOUTUBE_VTT)
    assert [c.text for c in cues] == ["hello world", "this is & fine", "goodbye"]
    assert [(c.start_s, c.end_s) for c in cues] == [(0.0, 2.5), (2.51, 5.0), (5.01, 8.0)]


def test_parse_vtt_rejects_garbage() -> None:
    with pytest.raises(SubtitleError, match="WEBVTT header"):
        parse_vtt("1\n00:00:01,000 --> 00:00:02,000\nhi\n")
    with pytest.raises(SubtitleError, match="bad cue timing"):
        parse_vtt("WEBVTT\n\n00:00:xx.000 --> 00:00:02.000\nhi\n")
    assert parse_vtt("\ufeffWEBVTT\n\nNOTE nothing here\n") == []


def test_parse_srt_comma_millis_crlf_and_tags() -> None:
    text = (
        "1\r\n00:00:01,000 --> 00:00:02,500\r\n<i>first</i> line\r\nsecond line\r\n\r\n"
        "2\r\n00:00:02,500 --> 00:00:04,000\r\nsecond line\r\nthird\r\n\r\n"
        "3\r\n01:00:00,250 --> 01:00:01,000\r\nlate\r\n"
    )
    cues = parse_srt(text)
    assert cues == [
        Cue(1.0, 2.5, "first line second line"),
        Cue(2.5, 4.0, "third"),
        Cue(3600.25, 3601.0, "late"),
    ]


def test_parse_srt_rejects_text_without_timing() -> None:
    with pytest.raises(SubtitleError, match="no cue timing"):
        parse_srt("just some text\n")
    with pytest.raises(SubtitleError, match="bad cue timing"):
        parse_srt("1\n00:00:01,000 --> soon\nhi\n")


def test_subtitle_for_span_assigns_straddling_cues_to_one_clip() -> None:
    cues = [
        Cue(0.0, 4.0, "a"),      # inside clip 1
        Cue(3.0, 7.0, "b"),      # 2 s in clip 1, 2 s in clip 2: exact half -> clip it starts in
        Cue(5.5, 6.5, "c"),      # 0.5 s in clip 1, 0.5 s in clip 2 -> clip 1
        Cue(8.0, 12.0, "d"),     # 1 s in clip 2, 3 s in clip 3 -> clip 3
        Cue(9.0, 9.0, "e"),      # zero length, inside clip 2
        Cue(9.0, 9.5, "e"),      # same text again: collapsed
        Cue(30.0, 31.0, "far"),  # in no clip
    ]
    assert subtitle_for_span(cues, 0.0, 6.0) == "a b c"
    assert subtitle_for_span(cues, 6.0, 9.0 + 0.5) == "e"
    assert subtitle_for_span(cues, 9.5, 20.0) == "d"
    assert subtitle_for_span(cues, 20.0, 25.0) == ""
    # A clip shorter than a cue still gets it when it holds most of it.
    assert subtitle_for_span([Cue(0.0, 10.0, "long")], 2.0, 8.0) == "long"
    assert subtitle_for_span([Cue(0.0, 10.0, "long")], 5.0, 9.0) == ""


def test_vtt_spans_from_parsed_youtube_file() -> None:
    cues = parse_vtt(YOUTUBE_VTT)
    assert subtitle_for_span(cues, 0.0, 5.0) == "hello world this is & fine"
    assert subtitle_for_span(cues, 5.0, 8.0) == "goodbye"


def test_read_and_find_cue_files(tmp_path: Path) -> None:
    (tmp_path / "vid1.vtt").write_text(YOUTUBE_VTT, encoding="utf-8")
    (tmp_path / "vid2.srt").write_bytes(b"1\r\n00:00:00,000 --> 00:00:01,000\r\nhola\r\n")
    (tmp_path / "vid3.vtt").write_bytes(b"WEBVTT\n\n00:00.000 --> 00:01.000\nbad \xff byte\n")
    (tmp_path / "vid4.srt").write_text("no timing here\n", encoding="utf-8")
    assert find_cue_file(str(tmp_path), "vid1") == str(tmp_path / "vid1.vtt")
    assert find_cue_file(str(tmp_path), "vid2") == str(tmp_path / "vid2.srt")
    assert find_cue_file(str(tmp_path), "missing") is None
    assert [c.text for c in read_cue_file(str(tmp_path / "vid1.vtt"))][-1] == "goodbye"
    assert read_cue_file(str(tmp_path / "vid2.srt")) == [Cue(0.0, 1.0, "hola")]
    with pytest.raises(SubtitleError, match=r"vid3\.vtt: subtitle file is not valid UTF-8 at byte 36"):
        read_cue_file(str(tmp_path / "vid3.vtt"))
    with pytest.raises(SubtitleError, match=r"vid4\.srt: not an SRT file"):
        read_cue_file(str(tmp_path / "vid4.srt"))
    with pytest.raises(SubtitleError, match="not found"):
        read_cue_file(str(tmp_path / "nope.vtt"))


def test_jsonl_table_records_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "subs.jsonl"
    lines = [
        json.dumps({"clip_id": "v.0.mp4", "text": "  hello\n world "}).encode(),
        json.dumps({"clip_id": "v.1.mp4", "subtitle": "alias works"}).encode(),
        b'{"clip_id": "v.2.mp4", "text": "caf\xe9"}',       # Latin-1 byte: not UTF-8
        json.dumps({"clip_id": "v.3.mp4"}).encode(),          # no text
        json.dumps({"clip_id": "v.4.mp4", "text": "   "}).encode(),
        b"",
        b"{not json",
        json.dumps({"clip_id": "v.0.mp4", "text": "duplicate"}).encode(),
        json.dumps({"text": "who?"}).encode(),
        b'{"clip_id": "v.\xff", "text": "x"}',               # bad byte in the id itself
        json.dumps({"clip_id": "v.5.mp4", "text": "\ud800"}).encode(),  # lone surrogate escape
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    table = load_subtitle_table(str(path))
    src = str(path)
    assert table.texts == {"v.0.mp4": "hello world", "v.1.mp4": "alias works"}
    assert table.errors == {
        "v.2.mp4": f"subtitle is not valid UTF-8 at byte 35 of {src}:3",
        "v.3.mp4": f"subtitle row has no 'text' ({src}:4)",
        "v.4.mp4": EMPTY_SUBTITLE,
        "v.5.mp4": f"subtitle is not valid UTF-8: contains an unencodable character at index 0 ({src}:11)",
    }
    assert table.issues == [
        (f"{src}:7", "not valid JSON: Expecting property name enclosed in double quotes at column 2"),
        (f"{src}:8", "duplicate clip_id 'v.0.mp4' in subtitle table, later row ignored"),
        (f"{src}:9", "missing or bad clip_id: None"),
        (f"{src}:10", "line is not valid UTF-8 at byte 15"),
    ]
    assert table.lookup("v.1.mp4") == ("alias works", None)
    assert table.lookup("v.4.mp4") == (None, EMPTY_SUBTITLE)
    assert table.lookup("other") == (None, NO_SUBTITLE)


def test_parquet_table_checks_utf8_and_nulls(tmp_path: Path) -> None:
    path = tmp_path / "subs.parquet"
    # Parquet does not validate UTF-8 on write or read: a string column can hold bad bytes.
    text = pa.array([b"fine", b"bad \xff", None, b"", b"dup"], pa.binary()).view(pa.string())
    ids = pa.array(["a", "b", "c", "d", "a"])
    pq.write_table(pa.table({"clip_id": ids, "text": text}), path)
    table = load_subtitle_table(str(path))
    src = str(path)
    assert table.texts == {"a": "fine"}
    assert table.errors == {
        "b": f"subtitle is not valid UTF-8 at byte 4 of {src}:row 1",
        "c": f"subtitle row has a null text ({src}:row 2)",
        "d": EMPTY_SUBTITLE,
    }
    assert table.issues == [(f"{src}:row 4", "duplicate clip_id 'a' in subtitle table, later row ignored")]


def test_table_errors_for_wrong_files(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": ["a"], "caption": ["x"]}), tmp_path / "wrong.parquet")
    with pytest.raises(SubtitleError, match="needs columns clip_id and text"):
        load_subtitle_table(str(tmp_path / "wrong.parquet"))
    with pytest.raises(SubtitleError, match="not found"):
        load_subtitle_table(str(tmp_path / "missing.jsonl"))
    with pytest.raises(SubtitleError, match=r"must be \.jsonl or \.parquet"):
        load_subtitle_table(str(tmp_path / "subs.csv"))


def test_table_chunks_cover_every_row_once(tmp_path: Path) -> None:
    """Chunks (byte ranges of jsonl, row groups of Parquet) read by separate tasks give exactly the
    rows of one whole read: no row lost or doubled at a boundary, order = position in the file."""
    rows = [{"clip_id": f"c{i}", "text": f"text number {i} " * (1 + i % 5)} for i in range(200)]
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b"{broken\n")
    whole = read_table_chunk(table_chunks(str(path), chunk_bytes=1 << 40)[0])
    for chunk_bytes in (1, 37, 500, 4096):
        chunks = table_chunks(str(path), chunk_bytes=chunk_bytes)
        parts = [read_table_chunk(c) for c in chunks]
        assert sum((p.clip_ids for p in parts), []) == whole.clip_ids == [r["clip_id"] for r in rows]
        assert sum((p.order for p in parts), []) == whole.order
        assert sum(len(p.issues) for p in parts) == 1
    pq_path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pq_path, row_group_size=16)
    chunks = table_chunks(str(pq_path), chunk_bytes=1)
    assert len(chunks) == 13 and chunks[1].first_row == 16
    parts = [read_table_chunk(c) for c in chunks]
    assert sum((p.clip_ids for p in parts), []) == [r["clip_id"] for r in rows]
    assert sum((p.order for p in parts), []) == list(range(200))
