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

    def _add(self, clip_id: str, text: str | None, error: str | None, source: str) -> None:
        if clip_id in self.texts or clip_id in self.errors:
            # First row wins, as for duplicate clips in the metadata.
            self.issues.append((source, f"duplicate clip_id {clip_id!r} in subtitle table, later row ignored"))
            return
        if error is not None:
            self.errors[clip_id] = error
            return
        clean = normalize_text(text or "")
        if clean:
            self.texts[clip_id] = clean
        else:
            self.errors[clip_id] = EMPTY_SUBTITLE


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
# clip_id -> text tables


def load_subtitle_table(uri: str, opts: S3Options | None = None) -> SubtitleTable:
    """Read a clip_id->text table from a jsonl or Parquet file.

    Args:
        uri: Local path or `s3://` URI ending in `.parquet`, `.jsonl` or `.json` (optionally `.gz`).
        opts: S3 endpoint/region, for `s3://` URIs.

    Returns:
        The table; bad rows are recorded in it, never raised.

    Raises:
        SubtitleError: the file is missing, has an unknown extension, or lacks the needed columns.
    """
    name = uri.lower().removesuffix(".gz")
    try:
        if name.endswith(".parquet"):
            return _load_parquet_table(uri, opts)
        if name.endswith((".jsonl", ".json")):
            return _load_jsonl_table(uri, opts)
    except FileNotFoundError:
        raise SubtitleError(f"{uri}: subtitle table not found") from None
    raise SubtitleError(f"{uri}: subtitle table must be .jsonl or .parquet")


def iter_lines(uri: str, opts: S3Options | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, raw line bytes without the line ending), streaming the file."""
    filesystem, path = fs.resolve(uri, opts)
    with filesystem.open_input_stream(path) as raw:
        reader = io.BufferedReader(raw, buffer_size=1 << 20)
        for number, line in enumerate(reader, start=1):
            yield number, line.rstrip(b"\r\n")


def _load_jsonl_table(uri: str, opts: S3Options | None) -> SubtitleTable:
    table = SubtitleTable()
    for number, raw in iter_lines(uri, opts):
        if not raw.strip():
            continue
        source = f"{uri}:{number}"
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
            table.issues.append((source, _json_reason(e, bad_byte)))
            continue
        if not isinstance(row, dict):
            table.issues.append((source, f"expected a JSON object, got {type(row).__name__}"))
            continue
        clip_id = row.get("clip_id")
        if not isinstance(clip_id, str) or not clip_id or utf8_error(clip_id):
            reason = f"missing or bad clip_id: {clip_id!r}"
            if bad_byte is not None:
                reason = f"line is not valid UTF-8 at byte {bad_byte}"
            table.issues.append((source, reason))
            continue
        if bad_byte is not None:
            table._add(clip_id, None, f"subtitle is not valid UTF-8 at byte {bad_byte} of {source}", source)
            continue
        table._add(clip_id, *_row_text(row, source), source)
    return table


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


def _load_parquet_table(uri: str, opts: S3Options | None) -> SubtitleTable:
    filesystem, path = fs.resolve(uri, opts)
    table = SubtitleTable()
    with filesystem.open_input_file(path) as f:
        pfile = pq.ParquetFile(f)
        names = set(pfile.schema_arrow.names)
        text_col = next((k for k in _TEXT_KEYS if k in names), None)
        if "clip_id" not in names or text_col is None:
            raise SubtitleError(f"{uri}: subtitle Parquet needs columns clip_id and text, has {sorted(names)}")
        row = 0
        for batch in pfile.iter_batches(batch_size=65536, columns=["clip_id", text_col]):
            # Parquet readers do not validate UTF-8, so values are checked here, as bytes.
            ids = batch.column(0).cast(pa.binary()).to_pylist()
            texts = batch.column(1).cast(pa.binary()).to_pylist()
            for raw_id, raw_text in zip(ids, texts):
                _add_parquet_row(table, raw_id, raw_text, f"{uri}:row {row}")
                row += 1
    return table


def _add_parquet_row(table: SubtitleTable, raw_id: bytes | None, raw_text: bytes | None, source: str) -> None:
    try:
        clip_id = raw_id.decode("utf-8") if raw_id is not None else ""
    except UnicodeDecodeError as e:
        table.issues.append((source, f"clip_id is not valid UTF-8 at byte {e.start}"))
        return
    if not clip_id:
        table.issues.append((source, "missing clip_id"))
        return
    if raw_text is None:
        table._add(clip_id, None, f"subtitle row has a null text ({source})", source)
        return
    try:
        text = raw_text.decode("utf-8")
    except UnicodeDecodeError as e:
        table._add(clip_id, None, f"subtitle is not valid UTF-8 at byte {e.start} of {source}", source)
        return
    table._add(clip_id, text, None, source)


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
