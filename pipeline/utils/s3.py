"""S3 through boto3, as a network that fails: every request is retried on throttling (SlowDown,
503), other 5xx, connection resets and timeouts, with exponential backoff and jitter, up to
`S3Options.retry_attempts` tries; a missing object or any other 4xx is permanent at once. After
the last try `TransientS3Error` says how many were made and the last error (quarantine stage
`read`). botocore's own retries are off, so the policy (and the request count) is ours alone.

Reads are large (S3 is paid per request and slow per round trip): `open_read` gives a whole small
object in one GET, else a seekable file (`BlockFile`) that fetches 8 MiB blocks and the next block
ahead, so a decoder seeking around a video never drives the network with small reads.
"""

from __future__ import annotations

import functools
import io
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from pipeline.utils.fs import S3Options

T = TypeVar("T")
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500", "502", "504", "RequestLimitExceeded"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}


class TransientS3Error(OSError):
    """A request that kept failing transiently until the retry budget ran out."""

    def __init__(self, what: str, attempts: int, last: BaseException) -> None:
        super().__init__(f"{what}: gave up after {attempts} attempts (transient errors); last: "
                         f"{type(last).__name__}: {last}")
        self.attempts, self.last = attempts, last


class S3RequestError(OSError):
    """A request that failed permanently (access denied, bad range, no credentials, ...): an
    OSError naming the object, so every caller that reports unreadable input reports it too."""

    def __init__(self, what: str, error: BaseException) -> None:
        code = _code(error)
        super().__init__(f"{what}: {code + ' ' if code else ''}{type(error).__name__}: {error}")
        self.error = error


def _code(error: BaseException) -> str:
    response = getattr(error, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code or (str(status) if status else "")


def classify(error: BaseException) -> str:
    """"missing", "transient" or "permanent"."""
    code = _code(error)
    if code in _MISSING_CODES:
        return "missing"
    if code in _TRANSIENT_CODES or (code.isdigit() and code.startswith("5")):
        return "transient"
    if code:
        return "permanent"  # AccessDenied, InvalidRange, 400, 403 ...
    # No S3 error code: the connection itself failed (reset, closed, timed out, cut mid-body).
    names = {c.__name__ for c in type(error).__mro__}
    transient = {"EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError", "ReadTimeoutError",
                 "ResponseStreamingError", "ProtocolError", "IncompleteRead", "ConnectionError", "TimeoutError",
                 "BotoConnectionError", "HTTPClientError"}
    return "transient" if names & transient else "permanent"


def with_retries(opts: S3Options, what: str, fn: Callable[[], T]) -> T:
    """Run one S3 request (fn), retrying transient failures with jittered exponential backoff.

    Raises:
        FileNotFoundError: the object does not exist (never retried).
        TransientS3Error: still failing after `opts.retry_attempts` tries.
        S3RequestError: a permanent error (the original as its cause and `.error`).
    """
    attempts = max(1, opts.retry_attempts)
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # botocore/urllib3 errors, imported lazily
            kind = classify(e)
            if kind == "missing":
                raise FileNotFoundError(f"no such object: {what}") from None
            if kind == "permanent":
                raise S3RequestError(what, e) from e
            if attempt == attempts - 1:
                raise TransientS3Error(what, attempts, e) from e
            delay = min(opts.retry_max_s, opts.retry_base_s * 2**attempt)
            time.sleep(delay * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=8)
def client(endpoint_url: str | None, region: str | None) -> Any:
    """A boto3 S3 client from the AWS credential chain; retries are ours (`with_retries`)."""
    import boto3  # noqa: PLC0415
    from botocore.config import Config  # noqa: PLC0415

    session = boto3.Session()
    config = Config(retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=10, read_timeout=60,
                    max_pool_connections=32)
    return session.client("s3", endpoint_url=endpoint_url, region_name=region or session.region_name or "us-east-1",
                          config=config)


def split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def _client(opts: S3Options) -> Any:
    from pipeline.utils.fs import endpoint  # noqa: PLC0415

    return client(endpoint(opts), opts.region)


def get(uri: str, opts: S3Options, start: int | None = None, end: int | None = None) -> bytes:
    """The object, or bytes [start, end) of it: one GET (the body is read inside the retry)."""
    bucket, key = split(uri)
    kwargs = {} if start is None else {"Range": f"bytes={start}-{'' if end is None else end - 1}"}
    return with_retries(opts, uri, lambda: _client(opts).get_object(Bucket=bucket, Key=key, **kwargs)["Body"].read())


def put(uri: str, data: bytes, opts: S3Options) -> None:
    bucket, key = split(uri)
    with_retries(opts, uri, lambda: _client(opts).put_object(Bucket=bucket, Key=key, Body=data))


def head(uri: str, opts: S3Options) -> tuple[int, str]:
    """(size, ETag)."""
    bucket, key = split(uri)
    out = with_retries(opts, uri, lambda: _client(opts).head_object(Bucket=bucket, Key=key))
    return int(out["ContentLength"]), str(out.get("ETag", "")).strip('"')


def list_prefix(uri: str, opts: S3Options, recursive: bool = False) -> tuple[list[tuple[str, int]], list[str]]:
    """(files as (key, size), sub-prefixes) directly under the prefix `uri` (or all, recursive)."""
    bucket, key = split(uri.rstrip("/") + "/")
    files: list[tuple[str, int]] = []
    prefixes: list[str] = []
    token = None
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key, "MaxKeys": 1000}
        if not recursive:
            kwargs["Delimiter"] = "/"
        if token:
            kwargs["ContinuationToken"] = token
        page = with_retries(opts, uri, lambda kw=kwargs: _client(opts).list_objects_v2(**kw))
        files += [(o["Key"], int(o["Size"])) for o in page.get("Contents", [])]
        prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        if not page.get("IsTruncated"):
            return files, prefixes
        token = page["NextContinuationToken"]


def delete(uri: str, opts: S3Options) -> None:
    bucket, key = split(uri)
    with_retries(opts, uri, lambda: _client(opts).delete_object(Bucket=bucket, Key=key))


def delete_prefix(uri: str, opts: S3Options) -> None:
    bucket, _ = split(uri)
    files, _ = list_prefix(uri, opts, recursive=True)
    for i in range(0, len(files), 1000):
        batch = {"Objects": [{"Key": k} for k, _ in files[i:i + 1000]], "Quiet": True}
        with_retries(opts, uri, lambda b=batch: _client(opts).delete_objects(Bucket=bucket, Delete=b))


class BlockFile(io.RawIOBase):
    """A read-only, seekable view of an S3 object fetched in blocks of `block_bytes`.

    Fetched blocks stay cached up to `cache_bytes` (least recently used dropped), and reading
    block k starts fetching block k+1 in the background, so a sequential scan overlaps network
    and compute. `gets` and `bytes_fetched` count what went over the network.
    """

    def __init__(self, uri: str, opts: S3Options, size: int, block_bytes: int, cache_bytes: int = 1 << 30) -> None:
        super().__init__()
        self.uri, self.opts, self.size = uri, opts, size
        self.block_bytes = max(1, block_bytes)
        self.max_blocks = max(2, cache_bytes // self.block_bytes)
        self._pos = 0
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3-read-ahead")
        self.gets = 0
        self.bytes_fetched = 0
        self.read_error: TransientS3Error | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _fetch(self, index: int) -> bytes:
        start = index * self.block_bytes
        try:
            data = get(self.uri, self.opts, start, min(start + self.block_bytes, self.size))
        except TransientS3Error as e:
            # A decoder reading through this file turns the exception into its own error; the
            # caller asks `read_error` to tell a network failure from a bad video.
            self.read_error = e
            raise
        with self._lock:
            self.gets += 1
            self.bytes_fetched += len(data)
        return data

    def _block(self, index: int) -> bytes:
        with self._lock:
            if index in self._blocks:
                self._blocks.move_to_end(index)
                return self._blocks[index]
            future = self._pending.pop(index, None)
        data = future.result() if future is not None else self._fetch(index)
        with self._lock:
            self._blocks[index] = data
            while len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)
            ahead = index + 1
            if ahead * self.block_bytes < self.size and ahead not in self._blocks and ahead not in self._pending:
                self._pending[ahead] = self._pool.submit(self._fetch, ahead)
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), max(0, self.size - self._pos))
        done = 0
        while done < n:
            index, offset = divmod(self._pos, self.block_bytes)
            block = self._block(index)
            take = min(n - done, len(block) - offset)
            view[done:done + take] = block[offset:offset + take]
            done += take
            self._pos += take
        return done

    def read(self, size: int = -1) -> bytes:
        size = self.size - self._pos if size is None or size < 0 else size
        buffer = bytearray(max(0, min(size, self.size - self._pos)))
        return bytes(buffer[:self.readinto(buffer)])

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        super().close()


class RangeFile(io.RawIOBase):
    """A read-only, seekable S3 object where each read() is one ranged GET of exactly what was
    asked: for readers that already coalesce their own ranges (pyarrow's Parquet reader with
    pre_buffer reads a projection's column chunks in a few large reads)."""

    def __init__(self, uri: str, opts: S3Options, size: int) -> None:
        super().__init__()
        self.uri, self.opts, self.size, self._pos = uri, opts, size, 0
        self.gets = self.bytes_fetched = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        end = self.size if size is None or size < 0 else min(self.size, self._pos + size)
        if end <= self._pos:
            return b""
        data = get(self.uri, self.opts, self._pos, end)
        self.gets += 1
        self.bytes_fetched += len(data)
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def open_read(uri: str, opts: S3Options, size: int | None = None) -> io.RawIOBase | io.BytesIO:
    """A seekable file over an S3 object: the whole object in memory when it is at most
    `opts.whole_read_max_bytes` (one GET), else a `BlockFile` of `opts.block_bytes` blocks.

    Raises:
        FileNotFoundError, TransientS3Error: as `head`/`get`.
    """
    if size is None:
        size = head(uri, opts)[0]
    if size <= opts.whole_read_max_bytes:
        data = get(uri, opts) if size else b""
        buf = io.BytesIO(data)
        buf.gets, buf.bytes_fetched = (1 if size else 0), len(data)  # type: ignore[attr-defined]
        return buf
    return BlockFile(uri, opts, size, opts.block_bytes)
