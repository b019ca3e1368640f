"""`train.profile_steps`: the trace of exactly the window's steps reaches the MLflow run (sqlite),
opens as a Chrome trace, and a run resumed after the window records nothing."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import ConfigError, PretrainJobConfig, build_dataclass
from pipeline.tracking import MlflowTracker, create_run
from pipeline.train.profile import StepProfiler


def _train(profiler: StepProfiler, steps: range) -> None:
    w = torch.randn(64, 64, requires_grad=True)
    for step in steps:
        profiler.before_step(step)
        with torch.profiler.record_function(f"my_step_{step}"):
            (torch.randn(32, 64) @ w).square().sum().backward()
        profiler.after_step(step)


def test_window_trace_logged_once_as_an_artifact(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MlflowTracker(uri, create_run(uri, "profile", "run"))
    _train(StepProfiler((2, 3), 0, tracker), range(1, 6))
    tracker.close("FINISHED")
    client = MlflowClient(uri)
    assert [a.path for a in client.list_artifacts(tracker.run_id, "profiles")] == ["profiles/steps_2-3.json"]
    trace = json.load(open(client.download_artifacts(tracker.run_id, "profiles/steps_2-3.json", str(tmp_path))))
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"my_step_2", "my_step_3"} <= names and not names & {"my_step_1", "my_step_4", "my_step_5"}


def test_no_trace_after_the_window_on_other_ranks_or_without_a_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MlflowTracker(uri, create_run(uri, "profile", "run"))
    for profiler, steps in ((StepProfiler((2, 3), 0, tracker), range(4, 6)),  # resumed after the window
                            (StepProfiler((2, 3), 1, tracker), range(1, 6)),  # not rank 0
                            (StepProfiler((), 0, tracker), range(1, 6))):      # not asked for
        _train(profiler, steps)
        assert profiler.prof is None
    tracker.close("FINISHED")
    from mlflow.tracking import MlflowClient

    assert MlflowClient(uri).list_artifacts(tracker.run_id, "profiles") == []


@pytest.mark.parametrize("window", ["[3]", "[0, 2]", "[4, 2]"])
def test_bad_window_names_the_key(window):
    import yaml

    with pytest.raises(ConfigError, match="train.profile_steps"):
        build_dataclass(PretrainJobConfig, {"root": "r", "train": {"profile_steps": yaml.safe_load(window)}})
