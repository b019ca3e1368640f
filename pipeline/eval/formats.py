"""Downstream retrieval annotations (MSR-VTT, DiDeMo, LSMDC, ActivityNet) -> checked items.

Reads one retrieval split (its config section is `pipeline.config.RetrievalDataConfig`) (clipvip_spec.md 3.3, 6.2).
Rows are `{"clip_id": str, "text": str | [str], "num_frame": int (frame dirs only)}`. A row
that cannot be used (bad JSON, no clip id, empty text, missing video, duplicate id) is skipped
and reported with its reason; the split fails only when nothing is left.

Where the videos are:
    video_format "video":  <video_root>/<clip_id><ext>; lsmdc: ext = .avi (raw LSMDC clips),
                           other formats: the first of .mp4, .avi, .mkv, .webm that exists.
    video_format "frames": <video_root>/<clip_id>/<clip_id>_{i:03d}.jpg, 0-indexed (ActivityNet).

`annotations` and `video_root` are local paths or `s3://` URIs, read as `prepare` reads S3
(`pipeline/utils/fs.py`, `s3.py`: our retries): the jsonl in one GET, video_root in one
listing (paginated) whose objects are the video files and whose common prefixes are the frame
directories, so a split costs a few requests whatever its size, never one per item.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from pipeline.config import RetrievalDataConfig
from pipeline.utils import fs, s3

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm")


@dataclass(frozen=True, slots=True)
class RetrievalItem:
    """One video of a split with all its texts."""

    clip_id: str
    video_path: str
    """The resolved video file, or the frame directory when video_format is "frames"."""
    texts: tuple[str, ...]
    """Every caption of the video; for paragraph datasets ONE text, the sentences joined by " "."""
    num_frames_hint: int | None = None
    """The jsonl `num_frame` of a frame directory (None when absent or for video files)."""
    size_bytes: int | None = None
    """Size of an S3 video object, from the listing, so opening it needs no HEAD (None: local,
    frame directories, or unknown)."""


class ReadResult(NamedTuple):
    """What `read_items` returns; unpacks as `items, skipped = read_items(cfg)`."""

    items: list[RetrievalItem]
    """Usable videos in file order (at most `limit`)."""
    skipped: list[tuple[int | str, str]]
    """(1-based line number, reason) for unparsable rows, (clip_id, reason) for the rest."""


def _texts(raw: Any, paragraph: bool) -> tuple[str, ...] | str:
    """The row's texts, or the reason they are unusable."""
    if raw is None:
        return "no text"
    if isinstance(raw, str):
        sentences = [raw]
    elif isinstance(raw, list) and all(isinstance(t, str) for t in raw):
        sentences = raw
    else:
        return f"text must be a string or a list of strings, got {type(raw).__name__}"
    kept = [t.strip() for t in sentences if t.strip()]
    if not kept:
        return "empty text"
    return (" ".join(kept),) if paragraph else tuple(kept)


def _scan(root: str, opts: fs.S3Options | None) -> tuple[dict[str, int | None], set[str]]:
    """File names (with their S3 size) and directory names directly under root: one listing
    instead of a stat or HEAD per item.

    Raises:
        ValueError: root is not a local directory, or no object is under the S3 prefix.
    """
    if fs.is_s3(root):
        # A refusal (AccessDenied, no credentials) is an s3.S3RequestError: an OSError naming the prefix.
        objects, prefixes = s3.list_prefix(root, opts or fs.S3Options())
        if not objects and not prefixes:
            raise ValueError(f"video_root {root!r}: no objects under this S3 prefix")
        sized: dict[str, int | None] = {k.rsplit("/", 1)[-1]: n for k, n in objects}
        return sized, {p.rstrip("/").rsplit("/", 1)[-1] for p in prefixes}
    if not os.path.isdir(root):
        raise ValueError(f"video_root {root!r} is not a directory")
    files: dict[str, int | None] = {}
    dirs: set[str] = set()
    with os.scandir(root) as entries:
        for e in entries:
            if e.is_dir():
                dirs.add(e.name)
            else:
                files[e.name] = None
    return files, dirs


def _annotation_lines(uri: str, opts: fs.S3Options | None) -> io.TextIOWrapper:
    """The jsonl as text lines, read whole (one GET on S3; annotation files are a few MB at
    most), split as `open()` splits them (universal newlines, so a U+2028 inside a caption does
    not cut a row as `str.splitlines` would)."""
    data = fs.read_bytes(uri, opts)  # OSError naming the object when S3 refuses or keeps failing
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")


def _item(cfg: RetrievalDataConfig, row: dict[str, Any], clip_id: str, paragraph: bool,
          files: dict[str, int | None], dirs: set[str]) -> RetrievalItem | str:
    """The row's item, or the reason it is skipped."""
    if "/" in clip_id or os.sep in clip_id or clip_id in (".", ".."):
        return "clip_id is not a plain file name"
    texts = _texts(row.get("text"), paragraph)
    if isinstance(texts, str):
        return texts
    if cfg.video_format == "frames":
        if clip_id not in dirs:
            return f"no frame directory {clip_id}/ under {cfg.video_root}"
        hint = row.get("num_frame")
        if hint is not None and (not isinstance(hint, int) or isinstance(hint, bool) or hint < 1):
            return f"num_frame must be a positive integer, got {hint!r}"
        return RetrievalItem(clip_id, fs.join(cfg.video_root, clip_id), texts, hint)
    extensions = (".avi",) if cfg.format == "lsmdc" else VIDEO_EXTENSIONS
    name = next((clip_id + ext for ext in extensions if clip_id + ext in files), None)
    if name is None:
        return f"no video file {clip_id}{{{','.join(extensions)}}} under {cfg.video_root}"
    return RetrievalItem(clip_id, fs.join(cfg.video_root, name), texts, size_bytes=files[name])


def read_items(cfg: RetrievalDataConfig, opts: fs.S3Options | None = None) -> ReadResult:
    """Read and check a split's annotation jsonl.

    Args:
        cfg: the split's config.
        opts: how to reach S3 (`fs.S3Options.of(job.storage)`) when a path is s3://; None: defaults.

    Returns:
        ReadResult(items, skipped): the usable items in file order (the first `cfg.limit`
        only), and every skipped row with its reason. Reading stops once `limit` items are kept.

    Raises:
        FileNotFoundError: the annotation file does not exist.
        OSError: S3 refused (s3.S3RequestError) or kept failing through the retries (TransientS3Error).
        ValueError: video_root is not a directory (an empty S3 prefix), or no usable item is left.
    """
    files, dirs = _scan(cfg.video_root, opts)
    paragraph = cfg.resolved_paragraph()
    items: list[RetrievalItem] = []
    skipped: list[tuple[int | str, str]] = []
    first_line: dict[str, int] = {}
    with _annotation_lines(cfg.annotations, opts) as f:
        for line_no, line in enumerate(f, start=1):
            if cfg.limit is not None and len(items) >= cfg.limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.append((line_no, f"bad JSON: {e.msg} at column {e.colno}"))
                continue
            clip_id = row.get("clip_id") if isinstance(row, dict) else None
            if not isinstance(clip_id, str) or not clip_id.strip():
                skipped.append((line_no, "no clip_id string"))
                continue
            if clip_id in first_line:
                skipped.append((clip_id, f"duplicate clip_id at line {line_no} (first seen at line "
                                         f"{first_line[clip_id]})"))
                continue
            first_line[clip_id] = line_no
            item = _item(cfg, row, clip_id, paragraph, files, dirs)
            if isinstance(item, str):
                skipped.append((clip_id, f"{item} (line {line_no})"))
            else:
                items.append(item)
    if not items:
        reasons = "; ".join(f"{k}: {r}" for k, r in skipped[:3])
        raise ValueError(f"{cfg.annotations}: no usable items ({len(skipped)} skipped{': ' if reasons else ''}"
                         f"{reasons})")
    return ReadResult(items, skipped)


def eval_texts(items: Sequence[RetrievalItem]) -> list[str]:
    """One text per video, for a square test matrix: the first text (the paragraph, if joined)."""
    return [item.texts[0] for item in items]


def read_clip_groups(path: str, key: str, opts: fs.S3Options | None = None) -> list[list[str]]:
    """A JSON file holding a list of clip-id lists (`data.batch_groups`, `order_pairs`).

    Raises:
        ValueError: unreadable, not JSON, or not a list of string lists; the message starts with
            `key` and names the file.
    """
    try:
        raw = json.loads(fs.read_bytes(path, opts).decode("utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{key}: cannot read {path}: {e}") from None
    if not isinstance(raw, list) or not all(isinstance(g, list) and all(isinstance(c, str) for c in g) for g in raw):
        raise ValueError(f"{key}: {path} must hold a JSON list of clip-id lists")
    return raw


def order_pair_indices(cfg: RetrievalDataConfig, items: Sequence[RetrievalItem],
                       opts: fs.S3Options | None = None) -> list[tuple[int, int]]:
    """`cfg.order_pairs` as (i, j) indices into `items` ([] when the split has none). Pairs with a
    clip that is not among the items (skipped rows, `limit`) drop out.

    Raises:
        ValueError: a bad file, a group that is not two distinct ids, or no pair left; the message
            starts with "data.order_pairs".
    """
    if not cfg.order_pairs:
        return []
    groups = read_clip_groups(cfg.order_pairs, "data.order_pairs", opts)
    if any(len(g) != 2 or g[0] == g[1] for g in groups):
        raise ValueError(f"data.order_pairs: {cfg.order_pairs}: every entry must be two distinct clip ids")
    index = {it.clip_id: i for i, it in enumerate(items)}
    pairs = [(index[a], index[b]) for a, b in groups if a in index and b in index]
    if not pairs:
        raise ValueError(f"data.order_pairs: no pair of {cfg.order_pairs} has both clips in {cfg.annotations}")
    return pairs
