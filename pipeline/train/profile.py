"""`train.profile_steps: [a, b]`: a torch.profiler trace of optimizer steps a..b, in MLflow.

Rank 0 records steps a to b (CPU and, on GPUs, CUDA activity, with shapes and memory) and logs
the Chrome trace as the artifact `profiles/steps_<a>-<b>.json` (open it in chrome://tracing or
https://ui.perfetto.dev). A run resumed inside the window records the steps it still runs and
writes the same artifact path again; a run resumed after it records nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import torch


class StepProfiler:
    """Starts before step `first`, stops after step `last` (1-based optimizer steps)."""

    def __init__(self, window: tuple[int, ...], rank: int, tracker: Any) -> None:
        self.first, self.last = window if window else (0, -1)
        self.active = bool(window) and rank == 0 and tracker.run_id is not None
        self.tracker = tracker
        self.prof: Any = None

    def before_step(self, step: int) -> None:
        """`step`: the step about to run."""
        if self.active and self.prof is None and self.first <= step <= self.last:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
            self.prof.__enter__()

    def after_step(self, step: int) -> None:
        """`step`: the step that just ran; after the window's last, the trace goes to MLflow."""
        if self.prof is None or step < self.last:
            return
        self.prof.__exit__(None, None, None)
        out = tempfile.mkdtemp(prefix="clipvip-profile-")
        try:
            self.prof.export_chrome_trace(os.path.join(out, f"steps_{self.first}-{self.last}.json"))
            self.tracker.log_artifacts(out, "profiles")
        finally:
            shutil.rmtree(out, ignore_errors=True)
            self.prof = None
            self.active = False
