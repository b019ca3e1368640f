"""HD-VILA-100M metadata reading and work-unit planning for the `prepare` job (pure, no Ray).

Input: jsonl files, one video per line, as in the XPretrain release:
    {"video_id": "...", "url": "...", "clip": [{"clip_id": "<video_id>.<n>.mp4",
                                               "span": ["HH:MM:SS.mmm", "HH:MM:SS.mmm"]}, ...]}

Bad input never stops the reading: a malformed line or clip becomes a `MetadataIssue` (a row of
quarantine/metadata.parquet), a clip with an impossible span stays in its video marked with
`error_stage=STAGE_SPAN` (a quarantine row of its unit, so per-unit counts cover every clip).
Files are streamed line by line and clips are slotted dataclasses, since the full corpus is
3.3M videos / 100M clips.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.data.subtitles import SubtitleTable, iter_lines, utf8_error
from pipeline.schema import STAGE_METADATA, STAGE_SPAN, STAGE_SUBTITLE
from pipeline.utils import fs
from pipeline.utils.fs import S3Options


@dataclass(frozen=True, slots=True)
class ClipSpec:
    """One clip of a source video.

    Attributes:
        clip_id: HD-VILA clip id, unique over the inputs.
        start_s: Span start, seconds from the start of the video.
        end_s: Span end, seconds.
        subtitle: Text from a subtitle table; None when subtitles come from per-video files.
        error_stage: Set when the clip is known bad at planning time (STAGE_SPAN, STAGE_SUBTITLE).
        error: Why, when error_stage is set.
    """

    clip_id: str
    start_s: float
    end_s: float
    subtitle: str | None = None
    error_stage: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class VideoEntry:
    """A source video and its clips, in metadata order."""

    video_id: str
    url: str
    clips: tuple[ClipSpec, ...]


@dataclass(frozen=True, slots=True)
class WorkUnit:
    """Whole videos packed into one shard's worth of clips; `index` names the shard."""

    index: int
    videos: tuple[VideoEntry, ...]

    def num_clips(self) -> int:
        return sum(len(v.clips) for v in self.videos)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (sent across Ray); None fields of a clip are left out to keep it small."""
        videos = [
            {"video_id": v.video_id, "url": v.url, "clips": [_clip_to_dict(c) for c in v.clips]}
            for v in self.videos
        ]
        return {"index": self.index, "videos": videos}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> WorkUnit:
        """Inverse of `to_dict`."""
        videos = tuple(
            VideoEntry(v["video_id"], v["url"], tuple(_clip_from_dict(c) for c in v["clips"])) for v in d["videos"]
        )
        return WorkUnit(index=int(d["index"]), videos=videos)


_OPTIONAL_CLIP_FIELDS = ("subtitle", "error_stage", "error")


def _clip_to_dict(clip: ClipSpec) -> dict[str, Any]:
    d: dict[str, Any] = {"clip_id": clip.clip_id, "start_s": clip.start_s, "end_s": clip.end_s}
    for key in _OPTIONAL_CLIP_FIELDS:
        value = getattr(clip, key)
        if value is not None:
            d[key] = value
    return d


def _clip_from_dict(d: dict[str, Any]) -> ClipSpec:
    return ClipSpec(d["clip_id"], float(d["start_s"]), float(d["end_s"]), *(d.get(k) for k in _OPTIONAL_CLIP_FIELDS))


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
        return {
            "clip_id": self.clip_id,
            "video_id": self.video_id,
            "stage": STAGE_METADATA,
            "error": f"{self.source}: {self.error}",
            "source_uri": self.source.rsplit(":", 1)[0],
        }


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

    Args:
        value: A non-negative finite number of seconds, or a clock string; fields after the
            first must be < 60, the fraction is optional.

    Returns:
        The time in seconds.

    Raises:
        ValueError: anything else (e.g. "1:2:3:4", "abc", "-1", NaN, True); the message
            quotes the value.
    """
    seconds = _parse_seconds(value)
    if seconds < 0 or (isinstance(value, str) and value.strip().startswith("-")):
        raise ValueError(f"bad timestamp {value!r}: negative")
    return seconds


# --------------------------------------------------------------------------------------------
# Metadata


def expand_uris(uris: Sequence[str], opts: S3Options | None = None) -> list[str]:
    """Replace each directory (or S3 prefix) by its `*.jsonl` files, sorted; files stay as given."""
    out: list[str] = []
    for uri in uris:
        if fs.is_dir(uri, opts):
            out.extend(fs.list_files(uri, opts, suffix=".jsonl"))
        else:
            out.append(uri)
    return out


class _Reader:
    """Accumulates videos over several files; first clip_id / video_id occurrence wins."""

    def __init__(self) -> None:
        # video_id -> (url, clips); dicts keep insertion order, i.e. first appearance.
        self.videos: dict[str, tuple[str, list[ClipSpec]]] = {}
        # clip_id -> "file:line" of its first occurrence; one location string is shared by all
        # clips of a line, so this costs a dict slot per clip, not a string.
        self.seen: dict[str, str] = {}
        self.issues: list[MetadataIssue] = []

    def issue(self, source: str, error: str, video_id: str = "", clip_id: str = "") -> None:
        self.issues.append(MetadataIssue(source=source, clip_id=clip_id, video_id=video_id, error=error))

    def add_line(self, raw: bytes, source: str) -> None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.issue(source, f"line is not valid UTF-8 at byte {e.start}", video_id=_guess_video_id(raw))
            return
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            self.issue(source, f"not valid JSON: {e.msg} at column {e.colno}")
            return
        if not isinstance(row, dict):
            self.issue(source, f"expected a JSON object, got {type(row).__name__}")
            return
        video_id, url, clips, error = _video_fields(row)
        if error:
            self.issue(source, error, video_id=video_id)
            return
        entry = self.videos.setdefault(video_id, (url, []))
        for i, clip in enumerate(clips):
            self.add_clip(clip, i, video_id, entry[1], source)

    def add_clip(self, clip: Any, i: int, video_id: str, out: list[ClipSpec], source: str) -> None:
        if not isinstance(clip, dict):
            self.issue(source, f"clip[{i}]: expected an object, got {type(clip).__name__}", video_id)
            return
        clip_id = clip.get("clip_id")
        if not isinstance(clip_id, str) or not clip_id or utf8_error(clip_id):
            self.issue(source, f"clip[{i}]: missing or bad clip_id: {clip_id!r}", video_id)
            return
        try:
            start_s, end_s = _parse_span(clip.get("span"))
        except ValueError as e:
            self.issue(source, f"clip[{i}]: {e}", video_id, clip_id)
            return
        first = self.seen.get(clip_id)
        if first is not None:
            self.issue(source, f"duplicate clip_id, first seen at {first}", video_id, clip_id)
            return
        self.seen[clip_id] = source
        out.append(_clip_with_span_check(clip_id, start_s, end_s))

    def entries(self) -> list[VideoEntry]:
        return [VideoEntry(video_id=v, url=url, clips=tuple(clips)) for v, (url, clips) in self.videos.items()]


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


def _clip_with_span_check(clip_id: str, start_s: float, end_s: float) -> ClipSpec:
    if start_s < 0:
        error = f"span start {start_s:.3f}s is negative"
    elif end_s <= start_s:
        error = f"span end {end_s:.3f}s is not after start {start_s:.3f}s"
    else:
        return ClipSpec(clip_id, start_s, end_s)
    return ClipSpec(clip_id, start_s, end_s, error_stage=STAGE_SPAN, error=error)


def read_metadata(
    uris: Sequence[str], opts: S3Options | None = None
) -> tuple[list[VideoEntry], list[MetadataIssue]]:
    """Read HD-VILA metadata jsonl files, streaming line by line.

    Args:
        uris: jsonl files (local or `s3://`), or directories of `*.jsonl`, read in order.
        opts: S3 endpoint/region, for `s3://` URIs.

    Returns:
        (videos in order of first appearance, issues). A video_id repeated on another line
        merges its clips into the first entry; a repeated clip_id keeps the first occurrence.
        Clips with an impossible span are kept with `error_stage=STAGE_SPAN`.

    Raises:
        FileNotFoundError: an input file does not exist (a bad path fails the job up front).
    """
    reader = _Reader()
    for uri in expand_uris(uris, opts):
        try:
            for number, raw in iter_lines(uri, opts):
                if raw.strip():
                    reader.add_line(raw, f"{uri}:{number}")
        except FileNotFoundError:
            raise FileNotFoundError(f"metadata file not found: {uri}") from None
    return reader.entries(), reader.issues


def attach_subtitle_table(videos: list[VideoEntry], table: SubtitleTable) -> list[VideoEntry]:
    """Fill each clip's subtitle from `table`, or mark it `error_stage=STAGE_SUBTITLE`.

    Clips already marked bad (a span error) keep their first error untouched.

    Returns:
        New entries; clip order and video order are unchanged.
    """
    out = []
    for video in videos:
        clips = []
        for clip in video.clips:
            if clip.error_stage is None:
                text, error = table.lookup(clip.clip_id)
                if error is None:
                    clip = ClipSpec(clip.clip_id, clip.start_s, clip.end_s, subtitle=text)
                else:
                    clip = ClipSpec(clip.clip_id, clip.start_s, clip.end_s, error_stage=STAGE_SUBTITLE, error=error)
            clips.append(clip)
        out.append(VideoEntry(video.video_id, video.url, tuple(clips)))
    return out


# --------------------------------------------------------------------------------------------
# Planning and provenance


def plan_units(videos: Sequence[VideoEntry], clips_per_shard: int) -> list[WorkUnit]:
    """Pack whole videos, in input order, into consecutive work units.

    A unit is closed when the next video would take it past `clips_per_shard` clips, unless it
    is empty: a video with more clips than that becomes a unit of its own. Videos without clips
    are dropped. The result is a pure function of the arguments (no sorting, no randomness),
    so a rerun on the same inputs yields the same units and shard names.

    Raises:
        ValueError: clips_per_shard < 1.
    """
    if clips_per_shard < 1:
        raise ValueError(f"clips_per_shard must be >= 1, got {clips_per_shard}")
    units: list[WorkUnit] = []
    current: list[VideoEntry] = []
    num_current = 0
    for video in videos:
        n = len(video.clips)
        if n == 0:
            continue
        if current and num_current + n > clips_per_shard:
            units.append(WorkUnit(index=len(units), videos=tuple(current)))
            current, num_current = [], 0
        current.append(video)
        num_current += n
    if current:
        units.append(WorkUnit(index=len(units), videos=tuple(current)))
    return units


def inputs_digest(uris: Sequence[str], opts: S3Options | None = None) -> dict[str, str]:
    """sha256 hex digest of each file's stored bytes (not decompressed), for manifest.json.

    Raises:
        FileNotFoundError: a file does not exist.
        IsADirectoryError: a URI is a directory (digest its files instead).
    """
    out: dict[str, str] = {}
    for uri in uris:
        if fs.is_dir(uri, opts):
            raise IsADirectoryError(f"cannot digest a directory: {uri}")
        filesystem, path = fs.resolve(uri, opts)
        digest = hashlib.sha256()
        try:
            with filesystem.open_input_stream(path, compression=None) as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
        except FileNotFoundError:
            raise FileNotFoundError(f"input file not found: {uri}") from None
        out[uri] = digest.hexdigest()
    return out
