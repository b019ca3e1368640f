"""HD-VILA-100M metadata: parsing lines, cutting one metadata part into work units (pure, no Ray).

Input: jsonl parts, one video per line, as in the XPretrain release:
    {"video_id": "...", "url": "...", "clip": [{"clip_id": "<video_id>.<n>.mp4",
                                               "span": ["HH:MM:SS.mmm", "HH:MM:SS.mmm"]}, ...]}

`plan_part` streams one part once, in constant memory apart from the set of clip-id hashes it
has seen: it checks every line, records the bad ones as `MetadataIssue`s, and packs whole videos,
in order, into units of about `clips_per_shard` clips. A unit is described by the byte range of
its lines (`UnitSpec`), not by its clips, so the driver holds a few numbers per unit and the
decode task reads its own lines back (one ranged read) with `read_unit`, parsing them with the
same code. Units are a pure function of the part's bytes and `clips_per_shard`.

Within a part the first occurrence of a clip id wins; a later one is a metadata issue and is
recorded in the unit's `dropped` list so the re-read skips it too. A video id that appears on
two lines is two entries (its video is opened twice). A clip with an impossible span stays in
its video marked `error_stage=STAGE_SPAN` (a quarantine row of its unit).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.data.subtitles import utf8_error
from pipeline.schema import STAGE_METADATA, STAGE_SPAN
from pipeline.utils import fs
from pipeline.utils.fs import S3Options


@dataclass(frozen=True, slots=True)
class ClipSpec:
    """One clip of a source video.

    Attributes:
        clip_id: HD-VILA clip id, unique within its part.
        start_s: Span start, seconds from the start of the video.
        end_s: Span end, seconds.
        error_stage: Set when the clip is known bad from the metadata (STAGE_SPAN).
        error: Why, when error_stage is set.
    """

    clip_id: str
    start_s: float
    end_s: float
    error_stage: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class VideoEntry:
    """A source video (one metadata line) and its clips, in metadata order."""

    video_id: str
    url: str
    clips: tuple[ClipSpec, ...]


@dataclass(frozen=True, slots=True)
class UnitSpec:
    """One work unit of a part: whole videos on the lines in bytes [byte_start, byte_end).

    Attributes:
        part: the part's name; with `unit` it names the shard (`<part>/part-NNNNN`).
        line_start: 1-based number of the line at byte_start.
        dropped: (line number, clip index in its line) of duplicate clips the re-read skips.
        only: when set, the unit is a retry of these clips only (`retry.py`); videos and clips
            count them.
    """

    part: str
    unit: int
    byte_start: int
    byte_end: int
    line_start: int
    videos: int
    clips: int
    dropped: tuple[tuple[int, int], ...] = ()
    only: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"part": self.part, "unit": self.unit, "byte_start": self.byte_start, "byte_end": self.byte_end,
                "line_start": self.line_start, "videos": self.videos, "clips": self.clips,
                "dropped": [list(d) for d in self.dropped], "only": list(self.only)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> UnitSpec:
        return UnitSpec(str(d["part"]), int(d["unit"]), int(d["byte_start"]), int(d["byte_end"]), int(d["line_start"]),
                        int(d["videos"]), int(d["clips"]), tuple((int(a), int(b)) for a, b in d.get("dropped") or ()),
                        tuple(str(c) for c in d.get("only") or ()))


@dataclass(frozen=True, slots=True)
class MetadataIssue:
    """A malformed metadata line or clip, or a dropped duplicate; becomes a quarantine row.

    Attributes:
        source: "<file uri>:<1-based line number>".
        clip_id: The clip concerned, "" when unknown or when the whole line is bad.
        video_id: The video concerned, "" when unknown.
        error: The reason.
    """

    source: str
    clip_id: str
    video_id: str
    error: str

    def to_quarantine_row(self) -> dict[str, str]:
        """A row of QUARANTINE_SCHEMA (stage "metadata"; `error` carries file:line)."""
        return {"clip_id": self.clip_id, "video_id": self.video_id, "stage": STAGE_METADATA,
                "error": f"{self.source}: {self.error}", "source_uri": self.source.rsplit(":", 1)[0]}


def clip_key(clip_id: str) -> int:
    """64-bit key of a clip id (blake2b), the same in every process: duplicate detection and
    the subtitle-table join use it; equal keys of different ids are told apart by the id."""
    return int.from_bytes(hashlib.blake2b(clip_id.encode("utf-8"), digest_size=8).digest(), "little")


# --------------------------------------------------------------------------------------------
# Timestamps

# [-][[HH:]MM:]SS[.fff], ASCII digits only; the sign is for span checks, parse_timestamp rejects it.
_TIMESTAMP_RE = re.compile(r"(-)?(?:(\d+):)?(?:(\d+):)?(\d+)(?:\.(\d+))?", re.ASCII)


def _parse_seconds(value: str | int | float) -> float:
    """Like `parse_timestamp` but a leading '-' (or a negative number) is allowed."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"bad timestamp {value!r}: expected a number or a string")
    if not isinstance(value, str):
        if not math.isfinite(value):
            raise ValueError(f"bad timestamp {value!r}: not a finite number")
        return float(value)
    match = _TIMESTAMP_RE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"bad timestamp {value!r}: expected seconds or [[HH:]MM:]SS[.mmm]")
    sign, first, second, whole, frac = match.groups()
    fields = [int(f) for f in (first, second, whole) if f is not None]
    # Fields after the leading one are clock fields: 00:75:00 is garbage, not 75 minutes.
    if any(f >= 60 for f in fields[1:]):
        raise ValueError(f"bad timestamp {value!r}: minutes and seconds must be < 60")
    seconds = 0.0
    for f in fields:
        seconds = seconds * 60 + f
    if frac:
        seconds += int(frac) / 10 ** len(frac)
    return -seconds if sign else seconds


def parse_timestamp(value: str | int | float) -> float:
    """Seconds from a number or an "HH:MM:SS.mmm" / "MM:SS.mmm" / "SS.mmm" string.

    Raises:
        ValueError: a negative value, more than three fields, a clock field >= 60, NaN, a bool;
            the message quotes the value.
    """
    seconds = _parse_seconds(value)
    if seconds < 0 or (isinstance(value, str) and value.strip().startswith("-")):
        raise ValueError(f"bad timestamp {value!r}: negative")
    return seconds


def _parse_span(span: Any) -> tuple[float, float]:
    if not isinstance(span, list) or len(span) != 2:
        raise ValueError(f"'span' must be a list [start, end], got {span!r}")
    seconds = []
    for name, value in zip(("start", "end"), span):
        try:
            seconds.append(_parse_seconds(value))
        except ValueError as e:
            raise ValueError(f"bad span {name}: {e}") from None
    return seconds[0], seconds[1]


def _span_error(start_s: float, end_s: float) -> str | None:
    if start_s < 0:
        return f"span start {start_s:.3f}s is negative"
    if end_s <= start_s:
        return f"span end {end_s:.3f}s is not after start {start_s:.3f}s"
    return None


# --------------------------------------------------------------------------------------------
# One line


@dataclass(slots=True)
class ParsedLine:
    """A metadata line: its video, its usable clips (with their index in the line) and issues."""

    video_id: str = ""
    url: str = ""
    clips: list[tuple[int, ClipSpec]] = field(default_factory=list)
    issues: list[tuple[str, str, str]] = field(default_factory=list)  # (clip_id, video_id, error)


def _video_fields(row: dict[str, Any]) -> tuple[str, str, list[Any], str | None]:
    """(video_id, url, clips, error) of a metadata row; error is None when the row is usable."""
    video_id = row.get("video_id")
    if "video_id" not in row:
        return "", "", [], "missing key 'video_id'"
    if not isinstance(video_id, str) or not video_id or utf8_error(video_id):
        return "", "", [], f"'video_id' must be a non-empty string, got {video_id!r}"
    # The URL is informational (videos are found under the video root by id), so a missing
    # one does not cost the video; a wrong type still means a broken line.
    url = row.get("url")
    if url is None:
        url = ""
    elif not isinstance(url, str) or utf8_error(url):
        return video_id, "", [], f"'url' must be a string, got {type(url).__name__}"
    if "clip" not in row:
        return video_id, url, [], "missing key 'clip'"
    clips = row["clip"]
    if not isinstance(clips, list):
        return video_id, url, [], f"'clip' must be a list, got {type(clips).__name__}"
    return video_id, url, clips, None


def _guess_video_id(raw: bytes) -> str:
    """Best-effort video_id of a line that is not valid UTF-8, for the issue's quarantine row."""
    try:
        row = json.loads(raw.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        return ""
    video_id = row.get("video_id") if isinstance(row, dict) else None
    return video_id if isinstance(video_id, str) and "\ufffd" not in video_id else ""


def parse_line(raw: bytes) -> ParsedLine:
    """Parse one non-empty metadata line; never raises (problems become issues)."""
    out = ParsedLine()
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        out.issues.append(("", _guess_video_id(raw), f"line is not valid UTF-8 at byte {e.start}"))
        return out
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        out.issues.append(("", "", f"not valid JSON: {e.msg} at column {e.colno}"))
        return out
    if not isinstance(row, dict):
        out.issues.append(("", "", f"expected a JSON object, got {type(row).__name__}"))
        return out
    video_id, url, clips, error = _video_fields(row)
    out.video_id, out.url = video_id, url
    if error:
        out.issues.append(("", video_id, error))
        return out
    for i, clip in enumerate(clips):
        if not isinstance(clip, dict):
            out.issues.append(("", video_id, f"clip[{i}]: expected an object, got {type(clip).__name__}"))
            continue
        clip_id = clip.get("clip_id")
        if not isinstance(clip_id, str) or not clip_id or utf8_error(clip_id):
            out.issues.append(("", video_id, f"clip[{i}]: missing or bad clip_id: {clip_id!r}"))
            continue
        try:
            start_s, end_s = _parse_span(clip.get("span"))
        except ValueError as e:
            out.issues.append((clip_id, video_id, f"clip[{i}]: {e}"))
            continue
        bad = _span_error(start_s, end_s)
        spec = ClipSpec(clip_id, start_s, end_s) if bad is None else ClipSpec(clip_id, start_s, end_s, STAGE_SPAN, bad)
        out.clips.append((i, spec))
    return out


# --------------------------------------------------------------------------------------------
# Parts: listing, streaming, planning


def expand_parts(uris: Sequence[str], opts: S3Options | None = None) -> list[str]:
    """Metadata parts from `data.metadata`: files as given, a directory's `*.jsonl` files, and
    glob patterns (`s3://b/meta/part*.jsonl`), each expanded in sorted order; duplicates once."""
    out: list[str] = []
    for uri in uris:
        if any(c in uri for c in "*?["):
            parent, pattern = uri.rsplit("/", 1) if "/" in uri else (".", uri)
            found = [u for u in fs.list_files(parent, opts) if fnmatch.fnmatchcase(u.rsplit("/", 1)[-1], pattern)]
        elif fs.is_dir(uri, opts):
            found = fs.list_files(uri, opts, suffix=".jsonl")
        else:
            found = [uri]
        out.extend(u for u in found if u not in out)
    return out


class PartReader:
    """Streams a part's lines with their byte offsets, hashing every byte (sha256) on the way."""

    def __init__(self, uri: str, opts: S3Options | None = None, block_bytes: int = 8 << 20) -> None:
        self.uri, self.opts, self.block_bytes = uri, opts, block_bytes
        self.sha256 = ""
        self.size = 0

    def __iter__(self) -> Iterator[tuple[int, int, int, bytes]]:
        """(1-based line number, start byte, end byte incl. the newline, line without CR/LF)."""
        digest = hashlib.sha256()
        number, offset, carry = 0, 0, b""
        with fs.open_read(self.uri, self.opts) as f:
            while True:
                block = f.read(self.block_bytes)
                digest.update(block)
                data = carry + block if carry else block
                if not block:
                    if data:
                        number += 1
                        yield number, offset, offset + len(data), data.rstrip(b"\r\n")
                    break
                start = 0
                while (nl := data.find(b"\n", start)) >= 0:
                    number += 1
                    yield number, offset + start, offset + nl + 1, data[start:nl].rstrip(b"\r")
                    start = nl + 1
                offset += start
                carry = data[start:]
        self.sha256, self.size = digest.hexdigest(), offset + len(carry)


@dataclass(slots=True)
class PartPlan:
    """What `plan_part` found in one part."""

    name: str
    uri: str
    sha256: str = ""
    size: int = 0
    lines: int = 0
    videos: int = 0
    clips: int = 0
    clip_seconds: float = 0.0
    """Summed span of the clips without a span error (what `clipvip plan` sizes frames from)."""
    units: list[UnitSpec] = field(default_factory=list)
    issues: list[MetadataIssue] = field(default_factory=list)
    key_hashes: np.ndarray | None = None
    """With keys: [N] uint64 `clip_key` of every clip without a span error ..."""
    key_units: np.ndarray | None = None
    """... and [N] uint32 unit index of each (the subtitle-table join's input)."""

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "uri": self.uri, "sha256": self.sha256, "size": self.size, "lines": self.lines,
                "videos": self.videos, "clips": self.clips, "units": len(self.units), "issues": len(self.issues),
                "clip_seconds": round(self.clip_seconds, 3),
                "max_unit_clips": max((u.clips for u in self.units), default=0)}


def plan_part(uri: str, name: str, clips_per_shard: int, opts: S3Options | None = None,
              with_keys: bool = False) -> PartPlan:
    """Read one metadata part once and cut it into units of whole videos, in order.

    A unit is closed when the next video would take it past `clips_per_shard` clips, unless it
    is empty: a video with more clips than that is a unit of its own. Lines without a usable
    clip join no unit (they may lie inside a unit's byte range; the re-read skips them too).

    Args:
        uri: the part (local or s3://), uncompressed jsonl.
        name: the part's name in the root (`root.part_name_of`).
        with_keys: also return the clip keys and units for the subtitle-table join.

    Raises:
        FileNotFoundError: the part does not exist.
        ValueError: clips_per_shard < 1, or a compressed part (units are read back by byte range).
    """
    if clips_per_shard < 1:
        raise ValueError(f"clips_per_shard must be >= 1, got {clips_per_shard}")
    if uri.endswith((".gz", ".bz2", ".zst", ".xz")):
        raise ValueError(f"data.metadata: {uri} is compressed; decompress it (units are read back by byte range)")
    plan = PartPlan(name=name, uri=uri)
    seen: set[int] = set()
    hashes: list[int] = []
    key_units: list[int] = []
    cur: dict[str, Any] | None = None  # the open unit: start, end, line, videos, clips, dropped
    pending_drops: list[tuple[int, int]] = []  # drops on clip-less lines since the unit's last video
    reader = PartReader(uri, opts)
    for number, start, end, raw in reader:
        plan.lines = number
        if not raw.strip():
            continue
        parsed = parse_line(raw)
        source = f"{uri}:{number}"
        plan.issues.extend(MetadataIssue(source, c, v, e) for c, v, e in parsed.issues)
        kept: list[ClipSpec] = []
        drops: list[tuple[int, int]] = []
        for i, clip in parsed.clips:
            key = clip_key(clip.clip_id)
            if key in seen:
                drops.append((number, i))
                plan.issues.append(MetadataIssue(source, clip.clip_id, parsed.video_id,
                                                 "duplicate clip_id (an earlier line of this part has it)"))
                continue
            seen.add(key)
            kept.append(clip)
            if clip.error_stage is None:
                plan.clip_seconds += clip.end_s - clip.start_s
            if with_keys and clip.error_stage is None:
                hashes.append(key)
        if not kept:
            pending_drops.extend(drops)
            continue
        if cur is not None and cur["clips"] + len(kept) > clips_per_shard:
            plan.units.append(_close(name, len(plan.units), cur))
            cur = None
        if cur is None:
            cur = {"start": start, "line": number, "videos": 0, "clips": 0, "dropped": []}
        else:
            cur["dropped"].extend(pending_drops)
        pending_drops = []
        cur["dropped"].extend(drops)
        cur["end"] = end
        cur["videos"] += 1
        cur["clips"] += len(kept)
        if with_keys:
            key_units.extend([len(plan.units)] * (len(hashes) - len(key_units)))
        plan.videos += 1
        plan.clips += len(kept)
    if cur is not None:
        plan.units.append(_close(name, len(plan.units), cur))
    plan.sha256, plan.size = reader.sha256, reader.size
    if with_keys:
        plan.key_hashes = np.array(hashes, dtype=np.uint64)
        plan.key_units = np.array(key_units, dtype=np.uint32)
    return plan


def _close(name: str, index: int, cur: dict[str, Any]) -> UnitSpec:
    return UnitSpec(name, index, cur["start"], cur["end"], cur["line"], cur["videos"], cur["clips"],
                    tuple(cur["dropped"]))


def read_unit(uri: str, spec: UnitSpec, opts: S3Options | None = None, check: bool = True) -> list[VideoEntry]:
    """The videos of one unit, read back from its byte range (one ranged read) and parsed by the
    same code as `plan_part`, duplicates skipped as planned.

    Raises:
        RuntimeError: the lines no longer give the planned videos and clips (the part changed
            after it was planned).
    """
    data = fs.read_bytes(uri, opts, spec.byte_start, spec.byte_end)
    dropped = set(spec.dropped)
    only = set(spec.only)
    videos: list[VideoEntry] = []
    for offset, raw in enumerate(data.split(b"\n")):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        number = spec.line_start + offset
        parsed = parse_line(raw)
        clips = tuple(c for i, c in parsed.clips if (number, i) not in dropped and (not only or c.clip_id in only))
        if clips:
            videos.append(VideoEntry(parsed.video_id, parsed.url, clips))
    got = (len(videos), sum(len(v.clips) for v in videos))
    if check and got != (spec.videos, spec.clips):
        raise RuntimeError(f"{uri} bytes {spec.byte_start}-{spec.byte_end}: {got[0]} videos / {got[1]} clips where "
                           f"{spec.videos} / {spec.clips} were planned; the part changed after planning")
    return videos
