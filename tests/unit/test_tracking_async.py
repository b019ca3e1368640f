"""MlflowTracker sends metrics off the caller's thread, in batches: a training step's log call
never waits on the tracking server, `flush` makes everything durable, and a resumed run logs
each step once."""

from __future__ import annotations

import threading

from pipeline.tracking import MlflowTracker, create_run, metric_history


def test_metrics_leave_the_training_thread_in_batches(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = create_run(uri, "exp", "run")
    tracker = MlflowTracker(uri, run_id, send_every_s=3600)  # the sender thread never fires here
    callers = []
    real = tracker.client.log_batch

    def recording(*a, **k):
        callers.append(threading.current_thread().name)
        return real(*a, **k)

    tracker.client.log_batch = recording
    for step in range(1, 51):
        tracker.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step=step)
    assert callers == [], "log_metrics sends nothing itself"
    assert metric_history(uri, run_id, "train/loss") == {}
    tracker.flush()
    assert len(callers) == 1, "50 steps x 3 metrics in one request"
    assert sorted(metric_history(uri, run_id, "train/loss")) == list(range(1, 51))
    tracker.close("FINISHED")


def test_the_sender_thread_sends_and_a_resumed_run_logs_each_step_once(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = create_run(uri, "exp", "run")
    first = MlflowTracker(uri, run_id, send_every_s=0.05)
    sent = threading.Event()
    real = first.client.log_batch

    def noting(*a, **k):
        out = real(*a, **k)
        sent.set()
        return out

    first.client.log_batch = noting
    for step in (1, 2, 3):
        first.log_metrics({"train/loss": float(step)}, step=step)
    assert sent.wait(60), "the background sender sent the queued steps"
    first.close()  # flushes; no status: the run goes on
    # A kill here loses nothing flushed; the resumed run replays steps 2-4 from its checkpoint.
    second = MlflowTracker(uri, run_id, send_every_s=3600)
    for step in (2, 3, 4):
        second.log_metrics({"train/loss": 10.0 * step}, step=step)
    second.close("FINISHED")
    history = metric_history(uri, run_id, "train/loss")
    assert {s: v for s, (v, _) in history.items()} == {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0}
