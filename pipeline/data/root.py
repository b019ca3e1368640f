"""A dataset root: where everything lives, and opening it once.

`DatasetRoot` is the one place that knows the layout (schema.py documents it) and reads or writes
`manifest.json`. Every reader and writer goes through it: `prepare`, `recaption`, the training
loader on the driver and on each rank, `inspect`, the notebooks. Opening a complete root costs a
constant number of object reads whatever its size: the manifest, then the shard indexes
(`index.py`); shard sidecars remain the writers' done markers and no reader lists or reads them.

One root holds the whole corpus and grows part by part: every metadata part is registered in
the manifest (name, location, size, version tag, sha256), and its shards live under its own name
(`frames/<part>/part-NNNNN.parquet`), so adding a part never renames or rewrites what exists. The
settings that shape the bytes (frame sampling, unit size, video root, subtitle source) are
recorded once; a run with other settings is refused naming each key with its old and new value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pipeline import schema
from pipeline.utils import fs

MANIFEST = "manifest.json"
_PART_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class RootNotReady(ValueError):
    """The root is missing, not written by `prepare`, unfinished, or of another schema version."""


class RootConflict(ValueError):
    """The inputs or settings of a run do not match what the root was built from."""


@dataclass(frozen=True, slots=True, order=True)
class Shard:
    """One work unit's shard: unit `unit` of metadata part `part` (`<part>/part-NNNNN`)."""

    part: str
    unit: int

    @property
    def stem(self) -> str:
        return f"{self.part}/{schema.part_name(self.unit)}"


RETRY = "~r"  # attempt k of part P retrying its quarantined reads is the pseudo-part `P~rk` (retry.py)


def base_part(name: str) -> str:
    """The metadata part a (pseudo-)part reads from: `P` for `P` and for its retry attempts `P~rk`."""
    return name.split(RETRY, 1)[0]


def attempt_of(name: str) -> int:
    return int(name.split(RETRY, 1)[1]) if RETRY in name else 0


def part_name_of(uri: str) -> str:
    """A metadata part's name: its file name without `.jsonl` (and `.gz`), e.g. `hdvila_part3`.

    Raises:
        ValueError: the name holds characters that do not belong in a path.
    """
    base = uri.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".gz", ".jsonl", ".json"):
        base = base.removesuffix(suffix)
    if not _PART_NAME_RE.fullmatch(base):
        raise ValueError(f"data.metadata: part file {uri!r} gives the name {base!r}; use letters, digits, '.', '_' "
                         "and '-' only (the name becomes a directory of the root)")
    return base


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"frames": {"fps": 3}} -> {"frames.fps": 3} (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def diff_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Each setting that differs, as `key: old -> new`, in key order."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


class DatasetRoot:
    """The layout of a dataset root (local path or `s3://bucket/prefix`) and its manifest.

    Paths are pure functions of names, so a writer can compute where a shard goes without any
    request; the methods that touch storage say so.
    """

    def __init__(self, uri: str, opts: fs.S3Options | None = None) -> None:
        if not uri:
            raise ValueError("dataset root: empty path")
        self.uri = uri
        self.opts = opts or fs.S3Options()

    def __repr__(self) -> str:
        return f"DatasetRoot({self.uri!r})"

    def path(self, *parts: str) -> str:
        return fs.join(self.uri, *parts)

    # ----- layout ---------------------------------------------------------------------------

    @property
    def manifest_uri(self) -> str:
        return self.path(MANIFEST)

    def frames_uri(self, shard: Shard) -> str:
        return self.path("frames", shard.stem + ".parquet")

    def frames_sidecar_uri(self, shard: Shard) -> str:
        return self.path("frames", shard.stem + ".json")

    def quarantine_uri(self, shard: Shard) -> str:
        return self.path("quarantine", shard.stem + ".parquet")

    def metadata_quarantine_uri(self, part: str) -> str:
        """Malformed lines and duplicate clip ids of one metadata part."""
        return self.path("quarantine", part, "metadata.parquet")

    def subtitle_quarantine_uri(self, name: str) -> str:
        """Unusable rows of the subtitle table (one file per table chunk or unit that had any)."""
        return self.path("quarantine", "subtitles", name + ".parquet")

    def plan_summary_uri(self, part: str) -> str:
        """A part's plan: its summary, written last (the plan's done marker)."""
        return self.path("plan", part, "part.json")

    def plan_units_uri(self, part: str) -> str:
        """A part's unit descriptors (one row per unit)."""
        return self.path("plan", part, "units.parquet")

    def subtitles_uri(self, shard: Shard) -> str:
        """A unit's rows of the subtitle table, joined once at planning (table subtitles only)."""
        # A retry attempt re-reads its part's lines, so it reads that part's joined rows too.
        return self.path("plan", base_part(shard.part), "subtitles", schema.part_name(shard.unit) + ".parquet")

    def subtitles_done_uri(self, part: str) -> str:
        return self.path("plan", part, "subtitles.json")

    def caption_set_dir(self, name: str) -> str:
        return self.path("captions", name)

    def caption_set_uri(self, name: str) -> str:
        return self.path("captions", name, "caption_set.json")

    def caption_uri(self, name: str, shard: Shard) -> str:
        return self.path("captions", name, shard.stem + ".parquet")

    def caption_sidecar_uri(self, name: str, shard: Shard) -> str:
        return self.path("captions", name, shard.stem + ".json")

    def caption_quarantine_uri(self, name: str, shard: Shard) -> str:
        return self.path("quarantine", "captions", name, shard.stem + ".parquet")

    def view_uri(self, name: str) -> str:
        """A training view's `view.json` (settings, status, counts; written last when complete)."""
        return self.path("views", name, "view.json")

    def view_shard_uri(self, name: str, shard: str) -> str:
        return self.path("views", name, shard + ".parquet")

    def view_sidecar_uri(self, name: str, shard: str) -> str:
        return self.path("views", name, shard + ".json")

    def index_uri(self, kind: str) -> str:
        """The compacted shard index `index/<kind>.parquet` (kind "frames" or "captions-<set>")."""
        return self.path("index", kind + ".parquet")

    def index_pending_dir(self, kind: str) -> str:
        """Index fragments written while a job runs, merged into `index_uri` when it ends."""
        return self.path("index", "pending", kind)

    # ----- manifest -------------------------------------------------------------------------

    def read_manifest(self) -> dict[str, Any] | None:
        """manifest.json, or None when there is none (one request)."""
        return fs.read_json_or_none(self.manifest_uri, self.opts)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        fs.write_json_atomic(self.manifest_uri, manifest, self.opts)

    def open(self, require_complete: bool = True) -> dict[str, Any]:
        """The manifest of a root written by `prepare`, validated (one request).

        Raises:
            RootNotReady: no manifest, another schema version, or (with `require_complete`)
                a prepare that has not finished; the message says what to run.
        """
        manifest = self.read_manifest()
        if manifest is None:
            raise RootNotReady(f"{self.uri}: no {MANIFEST}; this is not a dataset root written by `clipvip prepare`")
        version = manifest.get("schema_version")
        if version != schema.SCHEMA_VERSION:
            raise RootNotReady(f"{self.uri}: schema_version {version}, this code reads {schema.SCHEMA_VERSION} "
                               "(the one-root-per-corpus layout); prepare a new root with this version")
        if require_complete and manifest.get("status") != "complete":
            raise RootNotReady(f"{self.uri}: prepare is not finished (manifest status {manifest.get('status')!r}); "
                               "rerun the same prepare command to finish it")
        return manifest

    def parts(self, manifest: dict[str, Any]) -> list[str]:
        """Part names in registration order (the order shards are indexed and trained in)."""
        return [p["name"] for p in manifest.get("parts", [])]
