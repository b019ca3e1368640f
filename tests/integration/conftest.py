"""Real components for integration tests: a local Ray instance, a moto S3 server on loopback,
and a small synthetic HD-VILA dataset made by the project's own generator."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from tests.conftest import ROOT

# Dummy credentials for the loopback S3 server, set before Ray starts so its workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    import ray

    os.environ.setdefault("CLIPVIP_CACHE_DIR", str(tmp_path_factory.mktemp("clipvip_cache")))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on 127.0.0.1 (moto server); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


class RequestLog:
    """Every request an S3 endpoint answered: (method, path, query), in arrival order."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []
        self.body_bytes: list[int] = []
        """Bytes of each response body, in the order of `requests`."""
        self._lock = threading.Lock()

    def add(self, method: str, path: str, query: str) -> int:
        with self._lock:
            self.requests.append((method, path, query))
            self.body_bytes.append(0)
            return len(self.requests) - 1

    def count_bytes(self, i: int, n: int) -> None:
        with self._lock:
            self.body_bytes[i] += n

    def since(self, mark: int) -> list[tuple[str, str, str]]:
        with self._lock:
            return list(self.requests[mark:])

    def bytes_since(self, mark: int, path: str) -> tuple[int, int]:
        """(GET requests, response body bytes) for one object's path since `mark`."""
        with self._lock:
            picked = [i for i in range(mark, len(self.requests))
                      if self.requests[i][0] == "GET" and self.requests[i][1] == path]
            return len(picked), sum(self.body_bytes[i] for i in picked)

    def mark(self) -> int:
        with self._lock:
            return len(self.requests)


@pytest.fixture(scope="session")
def s3_counting():
    """A moto S3 endpoint on loopback that records every request it answers (a WSGI layer in front
    of moto's own app, the same server ThreadedMotoServer runs); yields (endpoint URL, RequestLog)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    log = RequestLog()
    app = DomainDispatcherApplication(create_backend_app)

    def counting(environ, start_response):
        i = log.add(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""))
        for chunk in app(environ, start_response):
            log.count_bytes(i, len(chunk))
            yield chunk

    server = make_server("127.0.0.1", 0, counting, True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", log
    server.shutdown()
    thread.join()


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """Small synthetic dataset (session-wide, read-only for tests: copy before mutating)."""
    from pipeline.data.synthetic import SampleDataSpec, make_sample_dataset

    out = tmp_path_factory.mktemp("sample")
    spec = SampleDataSpec(num_videos=4, min_duration_s=4.0, max_duration_s=10.0,
                          resolutions=((320, 240), (640, 360), (1280, 720)), num_retrieval=4,
                          num_retrieval_train=8, num_retrieval_val=4, retrieval_resolution=(160, 120),
                          retrieval_fps=10.0, retrieval_duration_s=(1.5, 2.5))
    return make_sample_dataset(str(out), seed=0, spec=spec)


def clipvip(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def parquet_tables(root: str, sub: str = "frames") -> dict:
    """{"<relative path>": table} of every Parquet file under <root>/<sub> (all parts), sorted."""
    import pyarrow.parquet as pq

    base = os.path.join(root, sub)
    files = sorted(os.path.relpath(os.path.join(d, f), base) for d, _, names in os.walk(base) for f in names
                   if f.endswith(".parquet"))
    return {f: pq.read_table(os.path.join(base, f)) for f in files}


def copy_tree(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints


def checkpoint_committed(snapshot_text: str | None) -> bool:
    """Ray Train has recorded a checkpoint of the run, so a resubmitted job resumes from it. Files
    under `step_*/` in storage are not enough: the controller records them after the workers'
    upload, seconds later on a busy machine, and a job killed in between starts over."""
    if not snapshot_text:
        return False
    try:
        snapshot = json.loads(snapshot_text)
    except ValueError:
        return False  # being written
    return bool(snapshot.get("checkpoint_results"))


def pack_view(root: str, caption_set: str, name: str, *extra: str, storage: dict | None = None):
    """`clipvip pack` in process (a Ray instance must be up): the view pretrain reads, frames at
    32 px (the tests' train.image_size_px), row groups of 2 (their micro batch)."""
    from pipeline.config import PackJobConfig, load_config
    from pipeline.data.pack_job import run_pack

    sets = [f"root={root}", f"view.name={name}", f"view.caption_set={caption_set}", "view.image_size_px=32",
            "view.rows_per_group=2", "view.rows_per_shard=8", "ray.progress_bars=false", *extra]
    sets += [f"storage.{k}={v}" for k, v in (storage or {}).items()]
    return run_pack(load_config(PackJobConfig, None, sets), log=lambda *_: None)
