"""A real multi-node Ray cluster on loopback for tests: `ray start --head` and nodes that join it,
each a set of processes of this machine, owned by one test module only.

Ray's `ray start` rewrites 127.0.0.1 to the machine's routable address on Linux
(`services.resolve_ip_for_localhost`) and then binds its gRPC servers to all interfaces. Keeping
the cluster on loopback therefore takes RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the nodes'
environment (node address stays 127.0.0.1, servers bind it) and, for a joining node, Ray's own
`ray start` entry point with that rewrite switched off (the CLI refuses to join otherwise).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import psutil

from tests.conftest import free_port

RAY = [sys.executable, "-m", "ray.scripts.scripts"]
JOIN = [sys.executable, "-c", "import sys, ray._private.ray_constants as c, ray._private.services as s; "
        "c.ENABLE_RAY_CLUSTER = True; s.resolve_ip_for_localhost = lambda h: h; "
        "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"]
TIMEOUT_S = 300


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


class LocalCluster:
    """A head and nodes started by `ray start`: their processes are found by a marker in their
    environment (never `ray stop`, which would also stop other Ray instances of the test session
    or of other users)."""

    def __init__(self, extra_env: dict[str, str] | None = None) -> None:
        self.marker = uuid.uuid4().hex
        self.temp_dir = tempfile.mkdtemp(prefix="cvray")  # short: Ray's unix socket paths are length-capped
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = dict(os.environ, **(extra_env or {}), CLIPVIP_TEST_CLUSTER=self.marker,
                        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
                        RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", CUDA_VISIBLE_DEVICES="")
        self.agent_ports: dict[str, int] = {}

    def _ray_start(self, node: str, cmd: list[str], gpus: bool = False) -> None:
        """`ray start` one node. Ray 2.60's raylet aborts when its dashboard agent has not published
        its port within 15 s, which the agent's imports can exceed on a busy 2-core machine; `ray
        start` then hangs for minutes on GCS retries. So the raylet log is watched, and a crashed
        start is cleaned up (that node's processes only) and tried again."""
        for attempt in (1, 2, 3):
            t0 = time.time()
            env = dict(self.env, CLIPVIP_TEST_NODE=node)
            if gpus:  # logical GPUs (`--num-gpus`): Ray refuses them with an empty CUDA_VISIBLE_DEVICES
                env.pop("CUDA_VISIBLE_DEVICES")
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            while proc.poll() is None and time.time() - t0 < TIMEOUT_S and not self._raylet_crashed(since=t0):
                time.sleep(0.5)
            if proc.poll() is None:
                proc.kill()
            out = proc.communicate()[0]
            if proc.returncode == 0:
                print(f"[cluster] {node} up in {time.time() - t0:.1f}s (attempt {attempt})")
                return
            self.stop(node)
        raise AssertionError(f"ray start ({node}) failed 3 times:\n{out[-4000:]}")

    def _raylet_crashed(self, since: float) -> bool:
        for log in glob.glob(os.path.join(self.temp_dir, "session_*", "logs", "raylet*.out")):
            with contextlib.suppress(OSError):
                if os.path.getmtime(log) >= since and "Check failed" in open(log, errors="replace").read():
                    return True
        return False

    def _node_ports(self, node: str, num_cpus: int, num_gpus: int) -> list[str]:
        # Every agent port is given: with port 0 the raylet waits for each agent to publish its port
        # before joining, and a slow (loaded) machine then misses `ray start`'s fixed 30 s window.
        self.agent_ports[node] = free_port()
        return [f"--dashboard-agent-listen-port={self.agent_ports[node]}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--node-manager-port={free_port()}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
                "--disable-usage-stats"]

    def start(self, dashboard: bool = False, head_cpus: int = 2, head_gpus: int = 0,
              workers: tuple[tuple[str, int, int], ...] = (("worker", 2, 0),)) -> None:
        """The head (`head_cpus` CPUs), then each worker node (name, CPUs, GPUs). With `dashboard`,
        the Jobs API serves on `self.address` once this returns."""
        head = [*RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
                f"--ray-client-server-port={free_port()}", f"--temp-dir={self.temp_dir}"]
        head += ["--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"] if dashboard else \
            ["--include-dashboard=false"]
        self._ray_start("head", [*head, *self._node_ports("head", head_cpus, head_gpus)], gpus=head_gpus > 0)
        for name, cpus, gpus in workers:
            self.add_node(name, cpus, gpus)
        if dashboard:  # jobs run through the head's dashboard agent: wait until every agent serves
            t0 = time.monotonic()
            wait_for(lambda: {self.dashboard_port, *self.agent_ports.values()} <=
                     {port for _, _, port in self.listening()}, TIMEOUT_S, "the dashboard and the agents", poll_s=0.5)
            print(f"[cluster] agents up after {time.monotonic() - t0:.1f}s more")

    def add_node(self, name: str, num_cpus: int, num_gpus: int = 0) -> None:
        # All nodes share one session directory here, so the head's log monitor already streams
        # every node's logs; a second monitor would only print every line twice.
        self._ray_start(name, [*JOIN, "start", f"--address={self.gcs_address}", "--node-ip-address=127.0.0.1",
                               "--include-log-monitor=false", *self._node_ports(name, num_cpus, num_gpus)],
                        gpus=num_gpus > 0)

    def processes(self, node: str | None = None) -> list[psutil.Process]:
        """The node's daemons (found by the marker in their environment) and all their descendants:
        agents and workers rename themselves, which can clobber their /proc environ."""
        roots = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                env = p.environ()
                if env.get("CLIPVIP_TEST_CLUSTER") == self.marker and node in (None, env.get("CLIPVIP_TEST_NODE")):
                    roots.append(p)
        found = {p.pid: p for p in roots}
        for p in roots:
            with contextlib.suppress(psutil.Error):
                found.update({c.pid: c for c in p.children(recursive=True)})
        return list(found.values())

    def listening(self) -> list[tuple[str, str, int]]:
        """(process name, address, port) of every listening socket of the cluster's processes."""
        rows = []
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                rows += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                         if c.status == psutil.CONN_LISTEN]
        return rows

    def kill_node(self, node: str) -> int:
        """A machine gone at once (spot reclaim): SIGKILL to every process of `node`; how many."""
        procs = self.processes(node)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=10)
        return len(procs)

    def stop(self, node: str | None = None) -> None:
        procs = self.processes(node)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
