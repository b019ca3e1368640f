"""Paths that are either local or `s3://bucket/key`, through pyarrow.fs.

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


@dataclass(frozen=True, slots=True)
class S3Options:
    """What is needed to reach S3, minus the secrets (those come from the AWS chain)."""

    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def of(cls, storage: Any) -> S3Options:
        """From a `StorageConfig` (any object with s3_endpoint_url / s3_region)."""
        return cls(endpoint_url=storage.s3_endpoint_url, region=storage.s3_region)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(root: str, *parts: str) -> str:
    """Join path parts with '/', keeping an `s3://` scheme intact."""
    if is_s3(root):
        return "s3://" + posixpath.join(root[len("s3://"):], *parts)
    return os.path.join(root, *parts)


def _endpoint(opts: S3Options) -> str | None:
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
        return _s3_filesystem(_endpoint(opts), opts.region), uri[len("s3://"):]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def exists(uri: str, opts: S3Options | None = None) -> bool:
    fs, path = resolve(uri, opts)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str, opts: S3Options | None = None) -> bool:
    fs, path = resolve(uri, opts)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        return True
    if is_s3(uri) and info.type == pafs.FileType.NotFound:
        # S3 has no directories: a prefix with objects under it counts as one.
        return bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    return False


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint_url: str | None, region: str | None) -> Any:
    """A boto3 S3 client (AWS credential chain), for the calls that pyarrow makes in several
    requests: a whole-object read is one GET (pyarrow: HEAD + GET), a write one PUT (pyarrow: a
    three-request multipart upload)."""
    import boto3  # noqa: PLC0415
    from botocore.config import Config  # noqa: PLC0415

    session = boto3.Session()
    return session.client("s3", endpoint_url=endpoint_url, region_name=region or session.region_name or "us-east-1",
                          config=Config(retries={"mode": "standard", "max_attempts": 5}))


def _bucket_key(uri: str, opts: S3Options | None) -> tuple[Any, str, str]:
    opts = opts or S3Options()
    bucket, _, key = uri[len("s3://"):].partition("/")
    return _s3_client(_endpoint(opts), opts.region), bucket, key


def _is_missing(error: Exception) -> bool:
    code = str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("NoSuchKey", "404", "NotFound")


def read_bytes(uri: str, opts: S3Options | None = None, start: int | None = None, end: int | None = None) -> bytes:
    """The whole object (one GET on S3), or bytes [start, end) of it (one ranged GET).

    Raises:
        FileNotFoundError: the object or file does not exist.
    """
    if is_s3(uri):
        client, bucket, key = _bucket_key(uri, opts)
        kwargs = {} if start is None else {"Range": f"bytes={start}-{'' if end is None else end - 1}"}
        try:
            return client.get_object(Bucket=bucket, Key=key, **kwargs)["Body"].read()
        except Exception as e:  # noqa: BLE001  botocore's ClientError, imported lazily
            if _is_missing(e):
                raise FileNotFoundError(f"no such object: {uri}") from None
            raise
    with open(os.path.abspath(uri), "rb") as f:
        if start is None:
            return f.read()
        f.seek(start)
        return f.read(-1 if end is None else end - start)


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
        client, bucket, key = _bucket_key(uri, opts)
        client.put_object(Bucket=bucket, Key=key, Body=data)
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
        client, bucket, key = _bucket_key(uri, opts)
        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except Exception as e:  # noqa: BLE001
            if _is_missing(e):
                raise FileNotFoundError(f"no such object: {uri}") from None
            raise
        return Stat(int(head["ContentLength"]), str(head.get("ETag", "")).strip('"'))
    st = os.stat(os.path.abspath(uri))
    return Stat(st.st_size, f"mtime:{st.st_mtime_ns}")


def sha256_of(uri: str, opts: S3Options | None = None) -> str:
    """sha256 hex of a file's bytes, streamed (constant memory)."""
    import hashlib  # noqa: PLC0415

    filesystem, path = resolve(uri, opts)
    digest = hashlib.sha256()
    with filesystem.open_input_stream(path, compression=None) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(uri: str, obj: Any, opts: S3Options | None = None) -> None:
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"), opts)


def list_files(uri: str, opts: S3Options | None = None, suffix: str = "") -> list[str]:
    """Files directly under `uri` (not recursive), as full URIs, sorted; [] if it does not exist."""
    fs, path = resolve(uri, opts)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.base_name.endswith(suffix):
            continue
        if ".tmp-" in info.base_name:
            continue
        out.append(join(uri, info.base_name))
    return sorted(out)


def delete_file(uri: str, opts: S3Options | None = None) -> None:
    """Delete one file/object; a missing one is not an error."""
    filesystem, path = resolve(uri, opts)
    try:
        filesystem.delete_file(path)
    except FileNotFoundError:
        pass


def delete_dir(uri: str, opts: S3Options | None = None) -> None:
    fs, path = resolve(uri, opts)
    if fs.get_file_info(path).type == pafs.FileType.NotFound and not is_s3(uri):
        return
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


def file_size(uri: str, opts: S3Options | None = None) -> int:
    fs, path = resolve(uri, opts)
    return int(fs.get_file_info(path).size or 0)


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
    filesystem, path = resolve(uri, opts)
    for info in filesystem.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(path):].lstrip("/")
        dest = os.path.join(local_dir, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with filesystem.open_input_stream(info.path) as src, open(dest, "wb") as out:
            out.write(src.read())
