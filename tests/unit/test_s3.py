"""pipeline/utils/s3.py against a real S3 endpoint on loopback (moto) behind a real faulty proxy:
transient faults are retried to the same bytes, a path that keeps failing gives up after the
budget, a missing object is permanent at once; large objects are read in 8 MiB blocks (GETs per
object and bytes read counted by the proxy)."""

from __future__ import annotations

import math
import os

import pytest

from pipeline.utils import fs, s3
from tests.faultproxy import FaultProxy

FAST = dict(retry_base_s=0.001, retry_max_s=0.01)


@pytest.fixture(scope="module")
def moto():
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1"}.items():
            mp.setenv(key, value)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bkt")
        yield endpoint
    server.stop()


def test_transient_faults_are_retried_to_the_same_bytes(moto):
    data = os.urandom(300_000)
    with FaultProxy(moto, seed=3, rate=0.3) as proxy:
        opts = fs.S3Options(endpoint_url=proxy.endpoint, **FAST)
        fs.write_bytes_atomic("s3://bkt/x.bin", data, opts)
        for _ in range(10):
            assert fs.read_bytes("s3://bkt/x.bin", opts) == data
            assert fs.read_bytes("s3://bkt/x.bin", opts, 100, 200) == data[100:200]
            assert fs.stat("s3://bkt/x.bin", opts).size == len(data)
            assert fs.list_files("s3://bkt", opts) == ["s3://bkt/x.bin"]
        assert proxy.faults["503"] > 0 and proxy.faults["reset"] > 0, proxy.faults
    with pytest.raises(FileNotFoundError):
        fs.read_bytes("s3://bkt/nope.bin", fs.S3Options(endpoint_url=moto))


def test_a_path_that_keeps_failing_gives_up_after_the_budget(moto):
    opts = fs.S3Options(endpoint_url=moto)
    fs.write_bytes_atomic("s3://bkt/down.bin", b"x" * 10, opts)
    with FaultProxy(moto, fail_paths=("/bkt/down.bin",)) as proxy:
        with pytest.raises(s3.TransientS3Error, match="gave up after 4 attempts") as err:
            fs.read_bytes("s3://bkt/down.bin", fs.S3Options(endpoint_url=proxy.endpoint, retry_attempts=4, **FAST))
        assert proxy.requests == 4 and "SlowDown" in str(err.value)


@pytest.mark.parametrize("size", [3_000_000, 21_000_000])
def test_large_objects_are_read_in_blocks(moto, size):
    data = os.urandom(size)
    opts = fs.S3Options(endpoint_url=moto, whole_read_max_bytes=4 << 20)
    fs.write_bytes_atomic(f"s3://bkt/v{size}.mp4", data, opts)
    with FaultProxy(moto) as proxy:
        o = fs.S3Options(endpoint_url=proxy.endpoint, whole_read_max_bytes=4 << 20)
        with fs.open_read(f"s3://bkt/v{size}.mp4", o) as f:
            # A decoder's pattern: small reads, a seek to the end (index) and back, skips.
            head = f.read(4096)
            f.seek(size - 8192)
            tail = f.read(8192)
            f.seek(4096)
            middle = b"".join(iter(lambda: f.read(65_536), b""))
            fetched = getattr(f, "bytes_fetched", None)
        assert head + middle[: size - 4096 - 8192] == data[: size - 8192] and tail == data[-8192:]
        gets = proxy.requests - 1  # the HEAD that sizes the object
        assert gets <= math.ceil(size / (8 << 20)) + 2, (gets, proxy.requests)
        assert fetched <= 1.1 * size


def test_a_permanent_failure_is_an_oserror_naming_the_object():
    from botocore.exceptions import NoCredentialsError

    def no_credentials():
        raise NoCredentialsError()

    with pytest.raises(s3.S3RequestError, match=r"s3://b/k: NoCredentialsError: Unable to locate credentials") as err:
        s3.with_retries(fs.S3Options(retry_attempts=5), "s3://b/k", no_credentials)
    assert isinstance(err.value, OSError) and isinstance(err.value.error, NoCredentialsError)


def test_a_killed_writers_temp_files_are_removed_and_nothing_else(tmp_path):
    """`write_bytes_atomic` leaves `<name>.tmp-<id>` behind when its writer dies before the rename;
    the job that writes the directory next removes those (recursively), never a finished file."""
    fs.write_bytes_atomic(str(tmp_path / "a" / "part-00000.parquet"), b"done")
    debris = [tmp_path / "a" / "part-00001.parquet.tmp-1234abcd", tmp_path / "a" / "b" / "x.json.tmp-0000ffff"]
    for path in debris:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    assert fs.list_files(str(tmp_path / "a")) == [str(tmp_path / "a" / "part-00000.parquet")]
    assert fs.remove_stale_temp_files(str(tmp_path)) == 2
    assert not any(p.exists() for p in debris)
    assert (tmp_path / "a" / "part-00000.parquet").read_bytes() == b"done"
    assert fs.remove_stale_temp_files(str(tmp_path / "nowhere")) == 0
    assert fs.remove_stale_temp_files("s3://bucket/prefix") == 0  # a PUT leaves nothing behind
