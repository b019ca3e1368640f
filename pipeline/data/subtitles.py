"""Subtitle inputs of the `prepare` job: clip_id->text tables and per-video WebVTT/SRT cues.

Two sources are supported (DESIGN.md, Inputs):
- a table, jsonl rows `{"clip_id", "text"}` ("subtitle" is accepted for "text") or a Parquet file
  with `clip_id` + `text` columns, read once by the driver into a `SubtitleTable`;
- a directory of per-video `<video_id>.vtt` / `<video_id>.srt` files (YouTube ASR), read by the
  decode task of the video's work unit; `subtitle_for_span` cuts a clip's text out of the cues.

Everything here is pure Python + pyarrow (no Ray); paths may be local or `s3://`.
"""

from __future__ import annotations

import html
import io
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.utils import fs
from pipeline.utils.fs import S3Options

NO_SUBTITLE = "no subtitle for clip"
EMPTY_SUBTITLE = "empty subtitle"

_TEXT_KEYS = ("text", "subtitle")
_TAG_RE = re.compile(r"<[^>]*>")
# WebVTT allows mm:ss.ttt or hh:mm:ss.ttt; SRT writes hh:mm:ss,ttt. Both are accepted for both.
_CUE_TIME_RE = re.compile(r"^(?:(\d+):)?(\d{1,2}):(\d{1,2})[.,](\d{1,3})$")
# WebVTT ends a cue only at an empty line: YouTube writes a line holding one space as a cue's
# first payload line. SRT writers are sloppier, so whitespace-only lines separate there.
_VTT_SPLIT_RE = re.compile(r"\n{2,}")
_SRT_SPLIT_RE = re.compile(r"\n[ \t]*\n")


class SubtitleError(ValueError):
    """A subtitle file or table cannot be used; the message names the file and the reason."""


@dataclass(frozen=True, slots=True)
class Cue:
    """One subtitle cue: text shown from `start_s` to `end_s` (tags stripped, one line)."""

    start_s: float
    end_s: float
    text: str


@dataclass(slots=True)
class SubtitleTable:
    """A clip_id->text table, with what could not be used.

    Attributes:
        texts: clip_id -> subtitle text (whitespace collapsed, never empty).
        errors: clip_id -> why that clip's row is unusable (not valid UTF-8, no text, empty).
        issues: (source, error) for rows that name no usable clip_id (bad JSON, duplicates, ...);
            source is "<uri>:<line>" for jsonl (1-based) and "<uri>:row <i>" for Parquet (0-based).
    """

    texts: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    issues: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts) + len(self.errors)

    def lookup(self, clip_id: str) -> tuple[str | None, str | None]:
        """Return (text, None) for a usable subtitle, else (None, reason)."""
        err = self.errors.get(clip_id)
        if err is not None:
            return None, err
        text = self.texts.get(clip_id)
        if text is None:
            return None, NO_SUBTITLE
        return text, None



def normalize_text(text: str) -> str:
    """Collapse runs of whitespace (newlines included) to one space and strip the ends."""
    return " ".join(text.split())


def utf8_error(text: str) -> str | None:
    """Why `text` cannot be written as UTF-8 (a lone surrogate from a JSON escape), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"contains an unencodable character at index {e.start}"
    return None


# --------------------------------------------------------------------------------------------
# clip_id -> text tables, read in chunks (byte ranges of a jsonl file, row groups of a Parquet file)


@dataclass(frozen=True, slots=True)
class TableChunk:
    """A piece of a subtitle table that one task parses: the jsonl lines that start in bytes
    [start, end), or the Parquet row groups [start, end) whose first row is `first_row`."""

    uri: str
    kind: str  # "jsonl" | "parquet"
    index: int
    start: int
    end: int
    first_row: int = 0

    def to_dict(self) -> dict:
        return {"uri": self.uri, "kind": self.kind, "index": self.index, "start": self.start, "end": self.end,
                "first_row": self.first_row}


@dataclass(slots=True)
class ChunkRows:
    """What a chunk holds: per usable clip id its text or its error, in file order.

    `order` is the row's position in the file (byte offset of a jsonl line, row number in
    Parquet), so "first row wins" among duplicates holds across chunks.
    """

    clip_ids: list[str] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    order: list[int] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    """jsonl: line number within the chunk; Parquet: row number (what `row_source` names)."""
    issues: list[tuple[str, str, int]] = field(default_factory=list)
    """(source, error, order) of rows that name no usable clip id."""

    def add(self, clip_id: str, text: str | None, error: str | None, order: int, line: int) -> None:
        if error is None:
            text = normalize_text(text or "")
            if not text:
                text, error = None, EMPTY_SUBTITLE
        self.clip_ids.append(clip_id)
        self.texts.append(text)
        self.errors.append(error)
        self.order.append(order)
        self.lines.append(line)


def _table_kind(uri: str) -> str:
    name = uri.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    raise SubtitleError(f"{uri}: subtitle table must be .jsonl or .parquet")


def table_chunks(uri: str, opts: S3Options | None = None, chunk_bytes: int = 64 << 20) -> list[TableChunk]:
    """Cut a subtitle table into chunks of about `chunk_bytes` (one request: a HEAD for jsonl,
    the footer for Parquet).

    Raises:
        SubtitleError: missing file, unknown extension, compressed jsonl (chunks are byte
            ranges), or a Parquet file without clip_id and text columns.
    """
    kind = _table_kind(uri)
    try:
        if kind == "jsonl":
            if uri.lower().endswith(".gz"):
                raise SubtitleError(f"{uri}: a compressed subtitle table cannot be read in chunks; decompress it")
            size = fs.stat(uri, opts).size
            return [TableChunk(uri, kind, i, a, min(a + chunk_bytes, size))
                    for i, a in enumerate(range(0, max(size, 1), chunk_bytes))]
        with fs.open_ranges(uri, opts) as f:
            meta = pq.ParquetFile(f).metadata
            names = set(meta.schema.to_arrow_schema().names)
    except FileNotFoundError:
        raise SubtitleError(f"{uri}: subtitle table not found") from None
    if "clip_id" not in names or not any(k in names for k in _TEXT_KEYS):
        raise SubtitleError(f"{uri}: subtitle Parquet needs columns clip_id and text, has {sorted(names)}")
    chunks, group, row, size = [], 0, 0, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        if size >= chunk_bytes or g == meta.num_row_groups - 1:
            chunks.append(TableChunk(uri, kind, len(chunks), group, g + 1, row))
            row += sum(meta.row_group(i).num_rows for i in range(group, g + 1))
            group, size = g + 1, 0
    return chunks


def read_table_chunk(chunk: TableChunk, opts: S3Options | None = None) -> ChunkRows:
    """Parse one chunk; bad rows are recorded in it, never raised. jsonl sources are
    "<uri>:<line>" for the first chunk and "<uri>@<byte offset>" for the others (their line
    numbers would need every earlier byte); Parquet sources are "<uri>:row <i>"."""
    out = ChunkRows()
    if chunk.kind == "parquet":
        _read_parquet_chunk(chunk, opts, out)
        return out
    for number, offset, raw in _chunk_lines(chunk, opts):
        if raw.strip():
            _add_jsonl_row(out, raw, row_source(chunk, number, offset), offset, number)
    return out


def row_source(chunk: TableChunk, line: int, order: int) -> str:
    """Where a row is, for messages: see `read_table_chunk`."""
    if chunk.kind == "parquet":
        return f"{chunk.uri}:row {order}"
    return f"{chunk.uri}:{line}" if chunk.start == 0 else f"{chunk.uri}@{order}"


def _chunk_lines(chunk: TableChunk, opts: S3Options | None) -> Iterator[tuple[int, int, bytes]]:
    """(line number within the chunk, byte offset, raw line) of the lines starting in [start, end)."""
    with fs.open_read(chunk.uri, opts) as f:
        pos = max(chunk.start - 1, 0)
        f.seek(pos)
        reader = io.BufferedReader(f, buffer_size=1 << 20)
        if chunk.start > 0:
            pos += len(reader.readline())  # the line holding byte start - 1 belongs to the chunk before
        number = 0
        while pos < chunk.end:
            line = reader.readline()
            if not line:
                break
            number += 1
            yield number, pos, line.rstrip(b"\r\n")
            pos += len(line)


def _add_jsonl_row(out: ChunkRows, raw: bytes, source: str, order: int, number: int) -> None:
    bad_byte: int | None = None
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        # Decode anyway so the clip_id can still be named: the clip then gets a subtitle
        # error (a quarantine row) instead of a silent "no subtitle".
        bad_byte = e.start
        line = raw.decode("utf-8", errors="surrogateescape")
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        out.issues.append((source, _json_reason(e, bad_byte), order))
        return
    if not isinstance(row, dict):
        out.issues.append((source, f"expected a JSON object, got {type(row).__name__}", order))
        return
    clip_id = row.get("clip_id")
    if not isinstance(clip_id, str) or not clip_id or utf8_error(clip_id):
        reason = f"missing or bad clip_id: {clip_id!r}"
        if bad_byte is not None:
            reason = f"line is not valid UTF-8 at byte {bad_byte}"
        out.issues.append((source, reason, order))
        return
    if bad_byte is not None:
        out.add(clip_id, None, f"subtitle is not valid UTF-8 at byte {bad_byte} of {source}", order, number)
        return
    out.add(clip_id, *_row_text(row, source), order, number)


def _json_reason(e: json.JSONDecodeError | None, bad_byte: int | None) -> str:
    if bad_byte is not None:
        return f"line is not valid UTF-8 at byte {bad_byte}"
    assert e is not None
    return f"not valid JSON: {e.msg} at column {e.colno}"


def _row_text(row: dict, source: str) -> tuple[str | None, str | None]:
    """(text, error) of a jsonl row; error names the row when there is no usable text."""
    key = next((k for k in _TEXT_KEYS if k in row), None)
    if key is None:
        return None, f"subtitle row has no 'text' ({source})"
    text = row[key]
    if text is None:
        return None, f"subtitle row has a null '{key}' ({source})"
    if not isinstance(text, str):
        return None, f"subtitle '{key}' must be a string, got {type(text).__name__} ({source})"
    bad = utf8_error(text)
    if bad:
        return None, f"subtitle is not valid UTF-8: {bad} ({source})"
    return text, None


def _read_parquet_chunk(chunk: TableChunk, opts: S3Options | None, out: ChunkRows) -> None:
    with fs.open_read(chunk.uri, opts) as f:
        pfile = pq.ParquetFile(f)
        text_col = next(k for k in _TEXT_KEYS if k in pfile.schema_arrow.names)
        row = chunk.first_row
        for batch in pfile.iter_batches(batch_size=65536, row_groups=list(range(chunk.start, chunk.end)), use_threads=False,
                                        columns=["clip_id", text_col]):
            # Parquet readers do not validate UTF-8, so values are checked here, as bytes.
            ids = batch.column(0).cast(pa.binary()).to_pylist()
            texts = batch.column(1).cast(pa.binary()).to_pylist()
            for raw_id, raw_text in zip(ids, texts):
                _add_parquet_row(out, raw_id, raw_text, f"{chunk.uri}:row {row}", row)
                row += 1


def _add_parquet_row(out: ChunkRows, raw_id: bytes | None, raw_text: bytes | None, source: str, order: int) -> None:
    try:
        clip_id = raw_id.decode("utf-8") if raw_id is not None else ""
    except UnicodeDecodeError as e:
        out.issues.append((source, f"clip_id is not valid UTF-8 at byte {e.start}", order))
        return
    if not clip_id:
        out.issues.append((source, "missing clip_id", order))
        return
    if raw_text is None:
        out.add(clip_id, None, f"subtitle row has a null text ({source})", order, order)
        return
    try:
        text = raw_text.decode("utf-8")
    except UnicodeDecodeError as e:
        out.add(clip_id, None, f"subtitle is not valid UTF-8 at byte {e.start} of {source}", order, order)
        return
    out.add(clip_id, text, None, order, order)


def duplicate_issue(clip_id: str) -> str:
    return f"duplicate clip_id {clip_id!r} in subtitle table, later row ignored"


def load_subtitle_table(uri: str, opts: S3Options | None = None) -> SubtitleTable:
    """Read a whole clip_id->text table into memory (small tables, tests and tools; `prepare`
    joins tables chunk by chunk on the cluster instead, `planning.py`).

    Raises:
        SubtitleError: the file is missing, has an unknown extension, or lacks the needed columns.
    """
    table = SubtitleTable()
    chunks = table_chunks(uri, opts, chunk_bytes=1 << 62)  # one chunk: exact line numbers
    for chunk in chunks:
        rows = read_table_chunk(chunk, opts)
        issues = list(rows.issues)
        for clip_id, text, error, order, line in zip(rows.clip_ids, rows.texts, rows.errors, rows.order, rows.lines):
            if clip_id in table.texts or clip_id in table.errors:
                issues.append((row_source(chunk, line, order), duplicate_issue(clip_id), order))
            elif error is not None:
                table.errors[clip_id] = error
            else:
                table.texts[clip_id] = text
        table.issues.extend((source, error) for source, error, _ in sorted(issues, key=lambda i: i[2]))
    return table


# --------------------------------------------------------------------------------------------
# Per-video WebVTT / SRT files


def _cue_time_s(value: str) -> float:
    match = _CUE_TIME_RE.match(value.strip())
    if match is None:
        raise ValueError(f"bad cue timestamp {value!r}")
    hours, minutes, seconds, frac = match.groups()
    if int(minutes) >= 60 or int(seconds) >= 60:
        raise ValueError(f"bad cue timestamp {value!r}")
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds) + int(frac) / 10 ** len(frac)


def _parse_timing(line: str, where: str) -> tuple[float, float]:
    """`00:00:01.000 --> 00:00:02.000 align:start position:0%` -> (1.0, 2.0); settings ignored."""
    left, _, right = line.partition("-->")
    fields = right.split()
    try:
        if not fields:
            raise ValueError("no end time")
        return _cue_time_s(left), _cue_time_s(fields[0])
    except ValueError as e:
        raise SubtitleError(f"{where}: bad cue timing line {line.strip()!r}: {e}") from None


def _clean_lines(lines: Sequence[str]) -> list[str]:
    out = []
    for line in lines:
        text = normalize_text(html.unescape(_TAG_RE.sub("", line)))
        if text:
            out.append(text)
    return out


def _split_blocks(text: str, separator: re.Pattern[str]) -> list[str]:
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return [b.strip("\n") for b in separator.split(text) if b.strip()]


def parse_vtt(text: str) -> list[Cue]:
    """Parse WebVTT text into cues (tags stripped, rolling repeats collapsed, empty cues dropped).

    Raises:
        SubtitleError: no WEBVTT header, or a cue timing line that does not parse.
    """
    blocks = _split_blocks(text, _VTT_SPLIT_RE)
    if not blocks or not blocks[0].startswith("WEBVTT"):
        raise SubtitleError("not a WebVTT file: missing WEBVTT header")
    raw: list[tuple[float, float, list[str]]] = []
    for number, block in enumerate(blocks[1:], start=2):
        lines = block.split("\n")
        if lines[0].split(" ", 1)[0].split("\t", 1)[0] in ("NOTE", "STYLE", "REGION"):
            continue
        timing = next((i for i, line in enumerate(lines[:2]) if "-->" in line), None)
        if timing is None:
            continue  # Header metadata (Kind:, Language:) or a stray block: not a cue.
        start_s, end_s = _parse_timing(lines[timing], f"block {number}")
        raw.append((start_s, end_s, _clean_lines(lines[timing + 1:])))
    return _collapse_rolling(raw)


def parse_srt(text: str) -> list[Cue]:
    """Parse SubRip text (`,` or `.` milliseconds, any line endings) into cues.

    A block without a timing line continues the previous cue's text (a blank line inside a cue).

    Raises:
        SubtitleError: text before the first cue timing, or a timing line that does not parse.
    """
    raw: list[tuple[float, float, list[str]]] = []
    for number, block in enumerate(_split_blocks(text, _SRT_SPLIT_RE), start=1):
        lines = block.split("\n")
        timing = next((i for i, line in enumerate(lines[:2]) if "-->" in line), None)
        if timing is None:
            if not raw:
                raise SubtitleError(f"not an SRT file: block {number} has no cue timing line")
            raw[-1][2].extend(_clean_lines(lines))
            continue
        start_s, end_s = _parse_timing(lines[timing], f"block {number}")
        raw.append((start_s, end_s, _clean_lines(lines[timing + 1:])))
    return _collapse_rolling(raw)


def _collapse_rolling(raw: Sequence[tuple[float, float, list[str]]]) -> list[Cue]:
    """Drop the leading lines of a cue that repeat the tail of the previous cue.

    YouTube ASR cues roll: each cue shows the previous cue's last line again above the new one,
    and 10 ms cues repeat it alone. Kept as is, every word would appear twice in a clip's text.
    Cues that end before they start, or that hold no new text, are dropped.
    """
    cues: list[Cue] = []
    prev: list[str] = []
    for start_s, end_s, lines in raw:
        overlap = 0
        for k in range(min(len(prev), len(lines)), 0, -1):
            if lines[:k] == prev[-k:]:
                overlap = k
                break
        if lines:
            prev = lines
        new = lines[overlap:]
        if new and end_s >= start_s:
            cues.append(Cue(start_s, end_s, " ".join(new)))
    return cues


def read_cue_file(uri: str, opts: S3Options | None = None) -> list[Cue]:
    """Read and parse a `.vtt` or `.srt` file.

    Raises:
        SubtitleError: missing file, not valid UTF-8 (with the byte offset), unknown extension,
            or unparseable content; the message names the file.
    """
    lower = uri.lower()
    if not lower.endswith((".vtt", ".srt")):
        raise SubtitleError(f"{uri}: subtitle file must end in .vtt or .srt")
    try:
        data = fs.read_bytes(uri, opts)
    except FileNotFoundError:
        raise SubtitleError(f"{uri}: subtitle file not found") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SubtitleError(f"{uri}: subtitle file is not valid UTF-8 at byte {e.start}") from None
    try:
        return parse_vtt(text) if lower.endswith(".vtt") else parse_srt(text)
    except SubtitleError as e:
        raise SubtitleError(f"{uri}: {e}") from None


def find_cue_file(subtitles_dir: str, video_id: str, opts: S3Options | None = None) -> str | None:
    """Return `<dir>/<video_id>.vtt`, else `<dir>/<video_id>.srt`, whichever exists first, else None."""
    for ext in ("vtt", "srt"):
        uri = fs.join(subtitles_dir, f"{video_id}.{ext}")
        if fs.exists(uri, opts):
            return uri
    return None


def subtitle_for_span(cues: Sequence[Cue], start_s: float, end_s: float) -> str:
    """Text of the cues that belong to the span [start_s, end_s), joined with spaces.

    A cue belongs when it lies fully inside the span or more than half of its duration overlaps
    it, so a cue straddling a boundary goes to the clip holding most of it (never to both; an
    exact half goes to the clip the cue starts in).
    Consecutive identical cue texts are collapsed. Returns "" when no cue belongs.
    """
    parts: list[str] = []
    for cue in cues:
        inside = start_s <= cue.start_s and cue.end_s <= end_s and cue.start_s < end_s
        overlap_s = min(end_s, cue.end_s) - max(start_s, cue.start_s)
        half_s = 0.5 * (cue.end_s - cue.start_s)
        # An exact half goes to the span the cue starts in, so adjacent clips never both drop it.
        tie = overlap_s == half_s and overlap_s > 0 and start_s <= cue.start_s < end_s
        if inside or overlap_s > half_s or tie:
            if not parts or parts[-1] != cue.text:
                parts.append(cue.text)
    return " ".join(parts)
