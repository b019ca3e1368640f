"""The step loop every training job runs, pretrain and finetune alike.

`run_steps` takes optimizer steps from the session's state to the run's last step: the
learning rate of the step (pipeline/train/optim.py), one `gradcache.train_step` over this
rank's share of the global batch, the run's position, logging every `train.log_every_steps`,
a checkpoint every `train.checkpoint_every_steps` and at the end. What differs between the jobs
comes in a `StepLoop`: where the batches come from, how a step is logged, what follows a step
(finetune validates).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from pipeline.train import gradcache
from pipeline.train.checkpoint import TrainState
from pipeline.train.optim import lr_at, set_lr
from pipeline.train.profile import StepProfiler
from pipeline.train.session import RunLog, Session, save_checkpoint

Batch = dict[str, torch.Tensor]


@dataclass
class StepLoop:
    """What a job gives the shared loop."""

    batches: Callable[[int, int], Iterable[Batch]]
    """(epoch, first step of the epoch to read) -> this rank's micro batches (one per step, in
    order); an epoch's iterator may end at the epoch's end."""
    log_step: Callable[[RunLog, dict[str, torch.Tensor], TrainState, float, float], None]
    """(log, the step's metrics, state, lr, data wait in s since this submission's first step, as
    `log.train_metrics`' elapsed time counts): metrics out."""
    after_step: Callable[[TrainState], None] | None = None
    """Runs on every rank after each step, before its checkpoint (finetune: validation)."""


@dataclass
class SampleLedger:
    """`train.log_sample_ids`: the clip ids of every global batch (sorted, all ranks gathered),
    logged by rank 0 at each checkpoint as the MLflow artifact samples/steps_<first>-<last>.json.
    A resumed run redoes the steps after its checkpoint and writes the same names again, so every
    step is in exactly one file, whatever the kills and the world sizes on the way."""

    enabled: bool
    world: int
    device: Any
    """The collectives' device (NCCL gathers only GPU tensors; finetune's batches stay on the CPU)."""
    steps: dict[int, list[int]] = field(default_factory=dict)

    def add(self, step: int, clip_ids: torch.Tensor) -> None:
        if not self.enabled:
            return
        ids = clip_ids.reshape(-1).to(self.device, torch.int64)
        parts = [ids]
        if self.world > 1:
            parts = [torch.empty_like(ids) for _ in range(self.world)]
            dist.all_gather(parts, ids)
        self.steps[step] = sorted(int(x) for x in torch.cat(parts).cpu())

    def flush(self, tracker: Any) -> None:
        if self.steps and tracker.run_id:
            first, last = min(self.steps), max(self.steps)
            tracker.log_dict({str(k): v for k, v in sorted(self.steps.items())},
                             f"samples/steps_{first:09d}-{last:09d}.json")
        self.steps.clear()


def run_steps(s: Session, cfg: Any, loop_config: dict[str, Any], log: RunLog, steps_per_epoch: int,
              loop: StepLoop) -> None:
    """Train from `s.state.step` to `log.total` (every rank; the checkpoints are collective)."""
    engine, world, state, t = s.engine, s.world, s.state, cfg.train
    ledger = SampleLedger(t.log_sample_ids, world, engine.device)
    wait_s = 0.0  # over the whole submission, like the elapsed time the wait fraction divides by
    profiler = StepProfiler(t.profile_steps, s.rank, s.tracker)
    while state.step < log.total:
        epoch, start = divmod(state.step, steps_per_epoch)
        t0 = time.perf_counter()
        for batch in loop.batches(epoch, start):
            step_wait_s = time.perf_counter() - t0
            wait_s += step_wait_s
            lr = lr_at(state.step, t.lr, log.total, t.warmup_ratio)
            set_lr(engine.optimizer, lr)
            profiler.before_step(state.step + 1)
            loss, metrics = gradcache.train_step(engine, batch, s.chunks)
            state.step += 1
            profiler.after_step(state.step)
            state.epoch, state.step_in_epoch = divmod(state.step, steps_per_epoch)
            skipped = int(batch["skipped"].sum())
            state.samples_seen += int(batch["frames"].shape[0]) * world
            state.skipped_rows += skipped * world
            ledger.add(state.step, batch["clip_id"])
            if state.step % t.log_every_steps == 0 or state.step == log.total:
                metrics = dict(metrics, loss=loss, skipped_rows=torch.tensor(float(skipped)),
                               step_time_s=torch.tensor(time.perf_counter() - t0),
                               data_wait_s=torch.tensor(step_wait_s))
                loop.log_step(log, metrics, state, lr, wait_s)
            if loop.after_step is not None:
                loop.after_step(state)
            if state.step % t.checkpoint_every_steps == 0 or state.step == log.total:
                ledger.flush(s.tracker)
                save_checkpoint(s, cfg, loop_config, log.throughput)
            t0 = time.perf_counter()
            if state.step >= log.total or state.step % steps_per_epoch == 0:
                break
