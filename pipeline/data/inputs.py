"""Opening a dataset root for `prepare`, before Ray starts: which metadata parts are registered,
listed, new or changed; the settings that shape the root's bytes; the subtitle table's identity;
and every refusal (changed settings, a changed or missing part, a caption-set conflict), each
naming what differs. Costs one or two requests a part; reads no clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline import schema
from pipeline.config import CaptionConfig, PrepareJobConfig, fingerprint, to_dict
from pipeline.data import captions as capsets
from pipeline.data.metadata import expand_parts
from pipeline.data.planning import PartInput
from pipeline.data.root import DatasetRoot, RootConflict, diff_settings, part_name_of
from pipeline.utils import fs

__all__ = ["EmptyInput", "Inputs", "RootConflict", "open_root", "prepare_settings"]


class EmptyInput(ValueError):
    """The inputs yield nothing at all (no clip, no video); the message names the key."""




@dataclass(slots=True)
class Inputs:
    """What a prepare run is about to do to its root, resolved before Ray starts."""

    root: DatasetRoot
    manifest: dict[str, Any] | None
    parts: list[PartInput]
    """Registered parts first (registration order), then new ones in `data.metadata` order."""
    settings: dict[str, Any]
    fingerprint: str
    table: dict[str, Any] | None
    """The subtitle table's identity (uri, size, version, sha256 when known), None for cue files."""


def prepare_settings(cfg: PrepareJobConfig) -> dict[str, Any]:
    """Everything that shapes the bytes of a root, keyed as in the config (`frames.fps`, ...)."""
    frames = to_dict(cfg.frames)
    frames.pop("decode_threads")  # threads change speed, not bytes
    return {"data": {"clips_per_shard": cfg.data.clips_per_shard, "video_root": cfg.data.video_root,
                     "video_extensions": list(cfg.data.video_extensions), "subtitles": cfg.data.subtitles},
            "frames": frames}


def _settings_fingerprint(settings: dict[str, Any]) -> str:
    return fingerprint({"schema_version": schema.SCHEMA_VERSION, **settings})


def _list_parts(cfg: PrepareJobConfig, root: DatasetRoot, manifest: dict[str, Any] | None) -> dict[str, PartInput]:
    """name -> PartInput of every listed part, stat'ed (one request each), in listed order."""
    uris = expand_parts(cfg.data.metadata, root.opts)
    if not uris:
        raise FileNotFoundError(f"data.metadata: no *.jsonl parts in {list(cfg.data.metadata)}")
    registered = {p["name"] for p in (manifest or {}).get("parts", []) if not p.get("retry_of")}
    listed: dict[str, PartInput] = {}
    for uri in uris:
        name = part_name_of(uri)
        if name in listed:
            raise RootConflict(f"data.metadata: {listed[name].uri} and {uri} have the same part name {name!r}; "
                               "rename one")
        try:
            st = fs.stat(uri, root.opts)
        except FileNotFoundError:
            if name in registered:
                raise RootConflict(f"data.metadata: part {name!r} is registered in {root.uri} but {uri} is "
                                   "missing") from None
            raise FileNotFoundError(f"data.metadata: {uri} does not exist") from None
        listed[name] = PartInput(name, uri, st.size, st.version)
    return listed


def _check_parts(root: DatasetRoot, manifest: dict[str, Any], listed: dict[str, PartInput]) -> list[PartInput]:
    """The registered parts, each still listed and unchanged (size, then version tag, then sha256)."""
    out = []
    for rec in manifest.get("parts", []):
        if rec.get("retry_of"):
            continue  # a retry attempt (retry.py), not a metadata file
        name = rec["name"]
        if name not in listed:
            raise RootConflict(f"data.metadata: part {name!r} ({rec['uri']}) is registered in {root.uri} but not "
                               "listed; a root only grows: list every part it was made from")
        part = listed[name]
        sha = None
        if part.size != rec["size"] or part.version != rec["version"]:
            sha = fs.sha256_of(part.uri, root.opts) if part.size == rec["size"] else None
            if sha != rec["sha256"]:
                raise RootConflict(f"data.metadata: part {name!r} ({part.uri}) changed since it was prepared into "
                                   f"{root.uri} (size {rec['size']} -> {part.size}, sha256 {rec['sha256'][:12]}... -> "
                                   f"{(sha or 'different')[:12]}); put new data in a new part")
        out.append(PartInput(name, part.uri, part.size, part.version, sha))
    return out


def _check_table(root: DatasetRoot, manifest: dict[str, Any] | None, uri: str) -> dict[str, Any]:
    try:
        st = fs.stat(uri, root.opts)
    except FileNotFoundError:
        raise FileNotFoundError(f"data.subtitles: {uri} does not exist") from None
    rec = (manifest or {}).get("subtitles_table")
    table = {"uri": uri, "size": st.size, "version": st.version, "sha256": None}
    if rec is None:
        return table
    if st.size == rec["size"] and st.version == rec["version"]:
        return dict(table, sha256=rec["sha256"])
    sha = fs.sha256_of(uri, root.opts)
    if sha != rec["sha256"]:
        raise RootConflict(f"data.subtitles: the table {uri} changed since {root.uri} was prepared (sha256 "
                           f"{rec['sha256'][:12]}... -> {sha[:12]}...); use a new root, or data.force=true")
    return dict(table, sha256=sha)


def open_root(cfg: PrepareJobConfig, dry_run: bool = False) -> Inputs:
    """Resolve the inputs and check them against the root; no Ray, a few requests per part.

    With data.force a conflicting root is deleted here (unless `dry_run`: `clipvip plan` only
    reports what the run would do).

    Raises:
        FileNotFoundError: data.metadata lists nothing, a listed file is missing, data.video_root
            or data.subtitles does not exist (each names its key).
        RootConflict: other settings (each key with its old and new value), a registered part
            changed, missing or no longer listed, or two parts with one name.
        CaptionSetConflict: caption.set_name exists with another captioner.
    """
    root = DatasetRoot(cfg.root, fs.S3Options.of(cfg.storage))
    opts = root.opts
    manifest = root.read_manifest()
    listed = _list_parts(cfg, root, manifest)
    if not fs.is_dir(cfg.data.video_root, opts):
        raise FileNotFoundError(f"data.video_root: {cfg.data.video_root} is not a directory")
    subs = cfg.data.subtitles
    if not fs.exists(subs, opts) and not fs.is_dir(subs, opts):
        raise FileNotFoundError(f"data.subtitles: {subs} does not exist")
    settings = prepare_settings(cfg)
    if manifest is not None and manifest.get("schema_version") != schema.SCHEMA_VERSION:
        raise RootConflict(f"{root.uri} has schema_version {manifest.get('schema_version')}; this code writes "
                           f"{schema.SCHEMA_VERSION} (one root per corpus). Use a new root, or data.force=true")
    parts: list[PartInput] = []
    try:
        if manifest is not None and manifest.get("settings") != settings:
            changed = "; ".join(diff_settings(manifest.get("settings", {}), settings))
            raise RootConflict(f"{root.uri} was prepared with other settings: {changed}. Use a new root, or set "
                               "data.force=true to delete its frames, captions, quarantine, plans and index and rebuild.")
        parts = _check_parts(root, manifest, listed) if manifest is not None else []
        table = None if fs.is_dir(subs, opts) else _check_table(root, manifest, subs)
    except RootConflict:
        if not cfg.data.force:
            raise
        if not dry_run:
            for sub in ("frames", "captions", "quarantine", "plan", "index"):
                fs.delete_dir(root.path(sub), opts)
            fs.delete_file(root.manifest_uri, opts)
        manifest, parts = None, []
        table = None if fs.is_dir(subs, opts) else _check_table(root, None, subs)
    registered = {p.name for p in parts}
    parts += [p for name, p in listed.items() if name not in registered]
    inputs = Inputs(root, manifest, parts, settings, _settings_fingerprint(settings), table)
    _check_caption_set(root, cfg.caption, inputs.fingerprint)
    return inputs


def _check_caption_set(root: DatasetRoot, caption: CaptionConfig, frames_fp: str) -> None:
    meta = fs.read_json_or_none(root.caption_set_uri(caption.set_name), root.opts)
    if meta is not None and meta.get("fingerprint") != capsets.set_fingerprint(caption, frames_fp):
        capsets.open_caption_set(root, caption, frames_fp)  # raises the conflict with its full message
