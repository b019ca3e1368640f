"""A data job's progress as MLflow metrics, one row per shard done (prepare, recaption, pack).

The driver feeds each finished shard's sidecar summary in; `metrics()` is what the job logs at
that shard, its step being the count of the root's shards done (so a resumed job continues the
curve). Rates cover this submission: shards skipped as done before count in the totals, not in
clips/s. Names: `<job>/clips_per_s`, `<job>/images_per_s` (captioner input frames), `<job>/clips`,
`<job>/quarantined` and `<job>/quarantined/<stage>`, `<job>/captions_failed`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class JobProgress:
    job: str
    t0: float = field(default_factory=time.perf_counter)
    clips: int = 0
    """Clips this submission processed (rows kept + quarantined)."""
    images: int = 0
    """Frames this submission's captioner read."""
    captioned: int = 0
    captions_failed: int = 0
    quarantined: Counter = field(default_factory=Counter)
    """Quarantined clips by stage, this submission."""

    def add_frames(self, side: dict[str, Any]) -> None:
        """A frame shard's sidecar (prepare), unless the shard was done before this submission."""
        if side.get("skipped"):
            return
        self.clips += int(side.get("clips", 0))
        self.quarantined.update({k: int(v) for k, v in side.get("quarantined_by_stage", {}).items()})

    def add_captions(self, side: dict[str, Any]) -> None:
        """A caption part's sidecar (prepare, recaption), unless done before this submission."""
        if side.get("skipped"):
            return
        self.images += int(side.get("images", 0))
        self.captioned += int(side.get("captioned", 0))
        self.captions_failed += int(side.get("failed", 0))

    def add_rows(self, rows: int) -> None:
        """Clips written by a job without sidecar counts of its own (pack)."""
        self.clips += rows

    def metrics(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        j = self.job
        out = {f"{j}/clips": float(self.clips), f"{j}/clips_per_s": self.clips / elapsed,
               f"{j}/elapsed_s": elapsed}
        if self.images or self.captioned or self.captions_failed:
            out.update({f"{j}/images_per_s": self.images / elapsed, f"{j}/captioned": float(self.captioned),
                        f"{j}/captions_failed": float(self.captions_failed)})
        out[f"{j}/quarantined"] = float(sum(self.quarantined.values()))
        out.update({f"{j}/quarantined/{stage}": float(n) for stage, n in sorted(self.quarantined.items())})
        return out


@dataclass
class Progressed:
    """Where each finished shard's progress goes: the job's MLflow run, at the root's shard count."""

    tracker: Any
    progress: JobProgress
    done_before: int
    """Shards of the root done before this submission (the first new one is step done_before + 1)."""

    def shard(self, n: int) -> None:
        """The n-th shard of this submission is done."""
        self.tracker.log_metrics(self.progress.metrics(), step=self.done_before + n)
