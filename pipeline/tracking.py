"""The one place that talks to MLflow.

A run is created once (on the driver, before training starts) and its id travels with the job
and into every checkpoint, so a restarted or resubmitted run keeps logging into the same MLflow
run. Params are logged once (MLflow params are immutable); step metrics at or below the last
step already in the run are dropped, so replaying steps after a resume never logs a step twice.
Only one process (rank 0) holds a live tracker; the others get NullTracker.

The finish of a run (artifacts, model registration) is a list of steps, each done once: a step
records a `clipvip.finish.<step>` tag on the run after its side effect, so a run killed anywhere
in its finish and submitted again does the steps it had not recorded, and no step twice.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

# The metric whose history marks which steps a run has already logged.
STEP_METRIC = "train/step"


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_dict(self, obj: Any, artifact_file: str) -> None: ...

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None: ...

    def finish_step(self, name: str, fn: Any) -> bool: ...

    def flush(self) -> None: ...

    def close(self, status: str | None = None) -> None: ...


FINISH_TAG = "clipvip.finish."


class NullTracker:
    """For non-zero ranks and `tracking.enabled=false`."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        pass

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        pass

    def finish_step(self, name: str, fn: Any) -> bool:
        return False

    def flush(self) -> None:
        pass

    def close(self, status: str | None = None) -> None:
        pass


def client_for(tracking_uri: str) -> Any:
    """An MlflowClient for `tracking_uri`, made where the process has a working directory.

    MLflow's sqlite store resolves its default artifact root against the cwd when a client is
    made. A Ray job's driver can lose its cwd: Ray replaced the first job's working_dir package
    under it when the driver connected (seen with `clipvip submit`: FileNotFoundError from
    os.getcwd()). Our paths are absolute, so the driver moves to the same path again if it was
    recreated there, else to the temp directory."""
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    try:
        os.getcwd()
    except FileNotFoundError:
        again = os.environ.get("PWD")
        os.chdir(again if again and os.path.isdir(again) else tempfile.gettempdir())
    return MlflowClient(tracking_uri)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}; lists as JSON. Keys keep the config's dotted names."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def create_run(tracking_uri: str, experiment: str, run_name: str, tags: Mapping[str, str] | None = None) -> str:
    """Create an MLflow run (driver side) and return its id."""
    from mlflow.exceptions import MlflowException  # noqa: PLC0415
    client = client_for(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        try:
            exp_id = client.create_experiment(experiment, artifact_location=default_artifact_location(tracking_uri))
        except MlflowException:  # another job created it since the lookup
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    run = client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
    return run.info.run_id


def default_artifact_location(tracking_uri: str) -> str | None:
    """sqlite: artifacts beside the database (not ./mlruns of whatever the cwd is); servers decide."""
    if tracking_uri.startswith("sqlite:///"):
        db = tracking_uri[len("sqlite:///"):]
        return "file://" + os.path.join(os.path.dirname(os.path.abspath(db)), "mlartifacts")
    return None


def register_model(tracking_uri: str, run_id: str, artifact_path: str, name: str) -> str:
    """Register `runs:/<run_id>/<artifact_path>` as a new version of model `name`; returns it."""
    from mlflow.exceptions import MlflowException  # noqa: PLC0415
    client = client_for(tracking_uri)
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    source = f"runs:/{run_id}/{artifact_path}"
    # A registration cut off before its finish tag was recorded left the version behind: reuse it.
    for mv in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if mv.source == source:
            return str(mv.version)
    mv = client.create_model_version(name, source=source, run_id=run_id)
    return str(mv.version)


def find_run(tracking_uri: str, experiment: str, run_name: str, tags: Mapping[str, str] | None = None) -> str | None:
    """The newest run of that name (and tags) in the experiment, if any (resubmitting reuses it)."""
    client = client_for(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    clauses = [f"tags.`mlflow.runName` = '{run_name}'"]
    clauses += [f"tags.`{k}` = '{v}'" for k, v in (tags or {}).items()]
    runs = client.search_runs([exp.experiment_id], filter_string=" and ".join(clauses),
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def metric_history(tracking_uri: str, run_id: str, key: str) -> dict[int, tuple[float, int]]:
    """step -> (value, timestamp ms) of one metric of a run (the last value logged at a step)."""
    return {m.step: (m.value, m.timestamp) for m in sorted(client_for(tracking_uri).get_metric_history(run_id, key),
                                                           key=lambda m: (m.step, m.timestamp))}


class MlflowTracker:
    """Logs into an existing run through MlflowClient (thread-safe, no global active run).

    Metrics leave the caller's thread: `log_metrics` queues them and a background thread sends
    them in batches every `send_every_s` (a training step never waits on the tracking server).
    `flush` sends what is queued and returns once the server has it; the training loops flush
    before every checkpoint and `close` flushes, so a kill loses at most the steps since the last
    checkpoint, which the resumed run replays and logs (never twice: `replayed_until`).
    """

    def __init__(self, tracking_uri: str, run_id: str, monitor_node: str | None = None,
                 send_every_s: float = 5.0, step_metric: str = STEP_METRIC) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.step_metric = step_metric
        """The metric whose history says which steps the run has (a data job's: shards done)."""
        self.client = client_for(tracking_uri)
        self.last_step = self._last_logged_step()
        # Steps the run already has were logged by an earlier attempt: a resumed run replays them
        # (from its last checkpoint) and must not log them twice. Later steps may be logged in
        # several calls (training metrics, then validation at the same step).
        self.replayed_until = self.last_step
        self.batches_sent = 0
        self._queue: list[Any] = []
        self._queue_lock = threading.Lock()  # guards _queue
        self._send_lock = threading.Lock()  # one sender at a time, so batches keep their order
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._sender = threading.Thread(target=self._send_forever, args=(send_every_s,), daemon=True,
                                        name="mlflow-metrics")
        self._sender.start()
        # This machine's system metrics as system/<monitor_node>/... (training workers start their
        # nodes' monitors themselves: pipeline/train/session.py).
        self._monitor = start_node_monitor(tracking_uri, run_id, monitor_node, resume=True) if monitor_node else None

    def _last_logged_step(self) -> int:
        history = self.client.get_metric_history(self.run_id, self.step_metric)
        return max((m.step for m in history), default=-1)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param  # noqa: PLC0415

        flat = flatten(params)
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v[:6000]) for k, v in sorted(flat.items()) if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log one step's metrics; a step already in the run (a replay after resume) is dropped."""
        from mlflow.entities import Metric  # noqa: PLC0415

        if step <= self.replayed_until:
            return
        if self._error is not None:
            self.flush()  # the sender failed: retry now, in the caller's thread, and raise if it still fails
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        if step > self.last_step:
            batch.append(Metric(self.step_metric, float(step), ts, step))
        with self._queue_lock:
            self._queue.extend(batch)
        self.last_step = max(self.last_step, step)

    def flush(self) -> None:
        """Send every queued metric now; returns once the tracking server has them.

        Raises:
            Exception: the server refused them (they stay queued for the next flush).
        """
        self._send()
        self._error = None

    def _send(self) -> None:
        with self._send_lock:
            with self._queue_lock:
                batch, self._queue = self._queue, []
            try:
                for i in range(0, len(batch), 1000):  # MLflow's log_batch limit
                    self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])
                    self.batches_sent += 1
            except BaseException:
                with self._queue_lock:
                    self._queue[:0] = batch[i:]  # keep the order; what was sent stays sent
                raise

    def _send_forever(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self._send()
            except Exception as e:  # noqa: BLE001  kept for the training thread's next log or flush
                self._error = e

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def finish_step(self, name: str, fn: Any) -> bool:
        """Run `fn` (a finishing side effect) unless the run records it done; then record it.

        `fn` must give the same result when run again (it may have run before a kill that came
        before the record): artifacts are rewritten at the same paths, registration reuses the
        run's version. Returns whether it ran.
        """
        key = FINISH_TAG + name
        if key in self.client.get_run(self.run_id).data.tags:
            return False
        value = fn()
        self.client.set_tag(self.run_id, key, str(value) if value is not None else "done")
        return True

    def close(self, status: str | None = None) -> None:
        self._stop.set()
        self._sender.join()
        self.flush()
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        if status:
            self.client.set_terminated(self.run_id, status=status)


def open_job_run(cfg: Any, job: str, run_name: str, root: str, settings: str, params: Mapping[str, Any]) -> Any:
    """The MLflow run of a data job (prepare, recaption, pack) on `root`: found again by name, job,
    root and settings fingerprint when the job is resumed or the root grows, else created; params
    logged (once). Its step is the count of the root's shards the job has done, so a resumed job
    continues the same curves and never logs a shard twice. A NullTracker when `cfg.enabled` is off.

    Args:
        cfg: the job's `TrackingConfig`.
        settings: what makes another run of the job a different one (a rebuilt root, another set).
    """
    if not cfg.enabled:
        return NullTracker()
    from pipeline.config import absolute_tracking  # noqa: PLC0415

    cfg = absolute_tracking(cfg)  # a relative sqlite path's directory exists
    tags = {"clipvip.job": job, "clipvip.root": root, "clipvip.settings": settings}
    run_id = (find_run(cfg.tracking_uri, cfg.experiment, run_name, tags)
              or create_run(cfg.tracking_uri, cfg.experiment, run_name, tags))
    tracker = MlflowTracker(cfg.tracking_uri, run_id, monitor_node="driver" if cfg.system_metrics else None,
                            step_metric=f"{job}/shards_done")
    tracker.log_params(params)
    return tracker


def log_job_totals(tracker: Any, totals: Mapping[str, float], step: int) -> None:
    """A data job's final counts as metrics at `step` (the root's shards done), once for that step
    even across kills and resubmissions (a finish step); nothing without a run."""
    if not tracker.run_id:
        return
    from mlflow.entities import Metric  # noqa: PLC0415

    def send() -> None:
        ts = int(time.time() * 1000)
        tracker.flush()  # the per-shard rows first
        tracker.client.log_batch(tracker.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in totals.items()])

    tracker.finish_step(f"totals-{step}", send)


def run_link(tracker: Any) -> str | None:
    """`<run id> at <tracking uri>` for a summary line, or None without a run."""
    return f"{tracker.run_id} at {tracker.tracking_uri}" if tracker.run_id else None


def start_node_monitor(tracking_uri: str, run_id: str, node: str, resume: bool, every_s: float = 10.0) -> Any:
    """MLflow system metrics of this machine into the run, as system/<node>/...: CPU, memory,
    disk, network, and each GPU's utilisation and memory when NVML (nvidia-ml-py) finds an NVIDIA
    driver. One per node (its first training worker), so a 4-node run has 4 sets of curves. What
    is measured is printed once, plainly, for example that a node has no GPU metrics and why.
    Returns the monitor (`finish()` it), or None when MLflow cannot monitor here."""
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor  # noqa: PLC0415
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # noqa: PLC0415

        monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, samples_before_logging=1,
                                       resume_logging=resume, node_id=node, tracking_uri=tracking_uri)
    except Exception as e:  # noqa: BLE001  system metrics are best-effort, never fail training
        print(f"[tracking] {node}: no system metrics ({type(e).__name__}: {e})", flush=True)
        return None
    gpus = [m for m in monitor.monitors if isinstance(m, GPUMonitor)]
    what = f"{gpus[0].num_gpus} GPU(s): utilisation, memory, power" if gpus else \
        "no GPU metrics (NVML found no NVIDIA driver or nvidia-ml-py is missing)"
    print(f"[tracking] {node}: system metrics every {monitor.sampling_interval:g} s as system/{node}/...: CPU, "
          f"memory, disk, network; {what}", flush=True)
    monitor.start()
    return monitor
