"""Paths that are either local or `s3://bucket/key`: local files directly, S3 through
`pipeline/utils/s3.py` (boto3 with retries, large reads); pyarrow.fs only where a library needs
a pyarrow filesystem (Ray Train's storage, the training loader's Parquet reads).

S3 credentials come from the standard AWS chain (boto3: env vars, profile, instance role) of
the process that opens the path; they are never stored in configs, manifests or pickles we
write. The endpoint can be overridden for S3-compatible stores (MinIO, moto on loopback):
`StorageConfig.s3_endpoint_url`, else the env vars `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`
that boto3 also honours.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from pipeline.utils import s3


@dataclass(frozen=True, slots=True)
class S3Options:
    """What is needed to reach S3, minus the secrets (those come from the AWS chain), and how
    to behave on it (retries, read sizes; see `pipeline/utils/s3.py`)."""

    endpoint_url: str | None = None
    region: str | None = None
    retry_attempts: int = 8
    """Tries per request on transient errors (throttling, 5xx, resets, timeouts)."""
    retry_base_s: float = 0.1
    """First backoff; doubles each try, jittered x0.5-1.5, capped at retry_max_s."""
    retry_max_s: float = 10.0
    block_bytes: int = 8 << 20
    """Ranged reads of large objects fetch blocks of this size (and the next one ahead)."""
    whole_read_max_bytes: int = 64 << 20
    """Objects up to this size are read whole, in one GET."""

    @classmethod
    def of(cls, storage: Any) -> S3Options:
        """From a `StorageConfig` (s3_endpoint_url, s3_region, retry_*, read_block_mb, whole_read_max_mb)."""
        return cls(endpoint_url=storage.s3_endpoint_url, region=storage.s3_region,
                   retry_attempts=getattr(storage, "retry_attempts", 8),
                   retry_base_s=getattr(storage, "retry_base_s", 0.1), retry_max_s=getattr(storage, "retry_max_s", 10.0),
                   block_bytes=int(getattr(storage, "read_block_mb", 8) * 2**20),
                   whole_read_max_bytes=int(getattr(storage, "whole_read_max_mb", 64) * 2**20))


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(root: str, *parts: str) -> str:
    """Join path parts with '/', keeping an `s3://` scheme intact."""
    if is_s3(root):
        return "s3://" + posixpath.join(root[len("s3://"):], *parts)
    return os.path.join(root, *parts)


def endpoint(opts: S3Options) -> str | None:
    return opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint_url: str | None, region: str | None) -> pafs.S3FileSystem:
    import boto3  # noqa: PLC0415  (only S3 users pay for it)

    session = boto3.Session()
    creds = session.get_credentials()
    kwargs: dict[str, Any] = {}
    if creds is not None:
        frozen = creds.get_frozen_credentials()
        kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key)
        if frozen.token:
            kwargs["session_token"] = frozen.token
    region = region or session.region_name or "us-east-1"
    if endpoint_url:
        scheme = "https"
        host = endpoint_url
        if "://" in endpoint_url:
            scheme, host = endpoint_url.split("://", 1)
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    return pafs.S3FileSystem(region=region, **kwargs)


def resolve(uri: str, opts: S3Options | None = None) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a local path or an `s3://` URI."""
    if is_s3(uri):
        opts = opts or S3Options()
        return _s3_filesystem(endpoint(opts), opts.region), uri[len("s3://"):]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def exists(uri: str, opts: S3Options | None = None) -> bool:
    """A file/object exists (one HEAD on S3)."""
    if is_s3(uri):
        try:
            s3.head(uri, opts or S3Options())
            return True
        except FileNotFoundError:
            return False
    return os.path.exists(os.path.abspath(uri))


def is_dir(uri: str, opts: S3Options | None = None) -> bool:
    """A directory, or on S3 a prefix with objects under it (one LIST)."""
    if is_s3(uri):
        files, prefixes = s3.list_prefix(uri, opts or S3Options())
        return bool(files or prefixes)
    return os.path.isdir(os.path.abspath(uri))


def read_bytes(uri: str, opts: S3Options | None = None, start: int | None = None, end: int | None = None) -> bytes:
    """The whole object (one GET on S3), or bytes [start, end) of it (one ranged GET).

    Raises:
        FileNotFoundError: the object or file does not exist.
        TransientS3Error: S3 kept failing transiently through the retry budget.
    """
    if is_s3(uri):
        return s3.get(uri, opts or S3Options(), start, end)
    with open(os.path.abspath(uri), "rb") as f:
        if start is None:
            return f.read()
        f.seek(start)
        return f.read(-1 if end is None else end - start)


def open_read(uri: str, opts: S3Options | None = None) -> Any:
    """A seekable binary file: local files as they are, S3 objects read whole when small, else
    in large blocks with read-ahead (`s3.open_read`). The caller closes it.

    Raises:
        FileNotFoundError: it does not exist.
    """
    if is_s3(uri):
        return s3.open_read(uri, opts or S3Options())
    return open(os.path.abspath(uri), "rb")  # the caller owns it


def open_ranges(uri: str, opts: S3Options | None = None) -> Any:
    """A seekable binary file whose reads go to storage as asked (S3: one ranged GET a read),
    for readers that coalesce their own ranges (Parquet projections). The caller closes it."""
    if is_s3(uri):
        opts = opts or S3Options()
        return s3.RangeFile(uri, opts, s3.head(uri, opts)[0])
    return open(os.path.abspath(uri), "rb")  # the caller owns it


def read_bytes_or_none(uri: str, opts: S3Options | None = None) -> bytes | None:
    """`read_bytes`, or None when the object does not exist (one request either way)."""
    try:
        return read_bytes(uri, opts)
    except FileNotFoundError:
        return None


def parquet_from_bytes(data: bytes, columns: list[str] | None = None) -> Any:
    """A whole Parquet file held in memory as a pyarrow Table.

    Single-threaded on purpose: pyarrow 25 aborts a process now and then ("terminate called
    without an active exception") when it exits right after a threaded read, which a CLI that
    opens a root and exits (inspect, plan, a refusal) does; reproduced 3 times in 60 under load,
    never without threads. These tables are small (indexes, plans, per-unit rows).
    """
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    return pq.read_table(pa.BufferReader(data), columns=columns, use_threads=False)


def read_parquet(uri: str, opts: S3Options | None = None, columns: list[str] | None = None) -> Any:
    """A small Parquet file read whole (one request on S3), see `parquet_from_bytes`."""
    return parquet_from_bytes(read_bytes(uri, opts), columns)


def read_json(uri: str, opts: S3Options | None = None) -> Any:
    return json.loads(read_bytes(uri, opts).decode("utf-8"))


def read_json_or_none(uri: str, opts: S3Options | None = None) -> Any:
    data = read_bytes_or_none(uri, opts)
    return None if data is None else json.loads(data.decode("utf-8"))


def write_bytes_atomic(uri: str, data: bytes, opts: S3Options | None = None) -> None:
    """Write a whole object so readers see all of it or none of it.

    Local: write a temp file beside the target, fsync, rename. S3: one PUT, which is atomic.
    """
    if is_s3(uri):
        s3.put(uri, data, opts or S3Options())
        return
    path = os.path.abspath(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True, slots=True)
class Stat:
    """What identifies an object's version cheaply: its size and its ETag (S3) or mtime (local)."""

    size: int
    version: str


def stat(uri: str, opts: S3Options | None = None) -> Stat:
    """Size and version tag of a file/object (one HEAD on S3).

    Raises:
        FileNotFoundError: it does not exist.
    """
    if is_s3(uri):
        return Stat(*s3.head(uri, opts or S3Options()))
    st = os.stat(os.path.abspath(uri))
    return Stat(st.st_size, f"mtime:{st.st_mtime_ns}")


def sha256_of(uri: str, opts: S3Options | None = None) -> str:
    """sha256 hex of a file's bytes, streamed in large reads (memory bounded by the read blocks)."""
    import hashlib  # noqa: PLC0415

    digest = hashlib.sha256()
    with open_read(uri, opts) as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def remove_stale_temp_files(uri: str) -> int:
    """Delete the temp files `write_bytes_atomic` leaves under a local directory (recursively)
    when its writer is killed between write and rename; returns how many. A job calls it on the
    directories it writes before it writes them: no other writer of those is alive then (a job's
    resubmission is refused while it runs, `pipeline/submit.py`). Readers never see these files
    (`list_files` skips them); this keeps a root free of a killed run's debris. S3: a no-op, a PUT
    leaves nothing behind."""
    if is_s3(uri) or not os.path.isdir(uri):
        return 0
    removed = 0
    for dirpath, _, names in os.walk(os.path.abspath(uri)):
        for name in names:
            if ".tmp-" in name:
                try:
                    os.remove(os.path.join(dirpath, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def write_json_atomic(uri: str, obj: Any, opts: S3Options | None = None) -> None:
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"), opts)


def list_files(uri: str, opts: S3Options | None = None, suffix: str = "") -> list[str]:
    """Files directly under `uri` (not recursive), as full URIs, sorted; [] if it does not exist."""
    if is_s3(uri):
        files, _ = s3.list_prefix(uri, opts or S3Options())
        names = [k.rsplit("/", 1)[-1] for k, _ in files]
    else:
        path = os.path.abspath(uri)
        names = [n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n))] if os.path.isdir(path) else []
    return sorted(join(uri, n) for n in names if n and n.endswith(suffix) and ".tmp-" not in n)


def list_dirs(uri: str, opts: S3Options | None = None) -> list[str]:
    """Names of the directories (S3: common prefixes) directly under `uri`, sorted (one LIST)."""
    if is_s3(uri):
        _, prefixes = s3.list_prefix(uri, opts or S3Options())
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in prefixes)
    path = os.path.abspath(uri)
    return sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n))) if os.path.isdir(path) else []


def delete_file(uri: str, opts: S3Options | None = None) -> None:
    """Delete one file/object; a missing one is not an error."""
    if is_s3(uri):
        s3.delete(uri, opts or S3Options())
        return
    try:
        os.remove(os.path.abspath(uri))
    except FileNotFoundError:
        pass


def delete_dir(uri: str, opts: S3Options | None = None) -> None:
    """Delete a directory tree (S3: every object under the prefix); a missing one is fine."""
    if is_s3(uri):
        s3.delete_prefix(uri, opts or S3Options())
        return
    import shutil  # noqa: PLC0415

    shutil.rmtree(os.path.abspath(uri), ignore_errors=True)


def file_size(uri: str, opts: S3Options | None = None) -> int:
    return stat(uri, opts).size


def upload_dir(local_dir: str, uri: str, opts: S3Options | None = None) -> None:
    """Copy a local directory tree to `uri` (local or S3), each file written atomically."""
    for dirpath, _, files in os.walk(local_dir):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            with open(path, "rb") as f:
                write_bytes_atomic(join(uri, *rel.split("/")), f.read(), opts)


def download_dir(uri: str, local_dir: str, opts: S3Options | None = None) -> None:
    """Copy every file under `uri` (recursively) into `local_dir`."""
    if not is_s3(uri):
        import shutil  # noqa: PLC0415

        shutil.copytree(os.path.abspath(uri), local_dir, dirs_exist_ok=True)
        return
    opts = opts or S3Options()
    files, _ = s3.list_prefix(uri, opts, recursive=True)
    bucket, prefix = s3.split(uri.rstrip("/") + "/")
    for key, _ in files:
        dest = os.path.join(local_dir, key[len(prefix):])
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "wb") as out:
            out.write(s3.get(f"s3://{bucket}/{key}", opts))
