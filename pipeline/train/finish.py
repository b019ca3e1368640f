"""The end of a training run: once-only steps that survive kill -9 and resubmission.

After the final checkpoint, a run (pretrain or finetune) does, in order:

    export                 the fp32 master weights in HF format to <run>-export; recorded done by
                           <run>-export.done.json (the step it holds), written after the files
    artifacts.<path>       those files as MLflow artifacts; recorded done by a run tag
    registered.<path>      one model-registry version of them; recorded done by a run tag

Every submission of the run walks the list, a finished run's too: a step whose record says done is
skipped, the others run. A record is written only after its step, and each step gives the same
result when redone (the same files at the same paths; registration finds the run's version before
making one), so a kill between a step and its record costs a redo, never a duplicate.

`pause_point` lets the kill tests stop a run at each point of this list (and nothing else).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import torch.distributed as dist

from pipeline.train import checkpoint as ckpt_io
from pipeline.utils import fs

PAUSE_ENV = "CLIPVIP_PAUSE_AT"
"""`<point>:<file>`: rank 0 creates <file> at that point of the finish and waits there until the
process is killed. Points: checkpoint (final checkpoint reported), export, artifacts."""


def pause_point(point: str, rank: int) -> None:
    """Fault injection for the kill tests (PAUSE_ENV); a no-op unless it names this point."""
    want, _, marker = os.environ.get(PAUSE_ENV, "").partition(":")
    if rank != 0 or want != point or not marker:
        return
    print(f"[finish] paused at {point} ({PAUSE_ENV})", flush=True)
    with open(marker, "w", encoding="utf-8") as f:
        f.write(point)
    while True:  # until kill -9: the test's event is the marker file
        time.sleep(3600)


def done_marker(out_uri: str) -> str:
    return out_uri.rstrip("/") + ".done.json"


def write_weights(engine: Any, out_uri: str, cfg: Any, rank: int, tag: str) -> None:
    """The module's fp32 weights as an HF-format `CLIPViPModel` at `out_uri` (all ranks call: ZeRO-3
    gathers; rank 0 writes)."""
    weights = ckpt_io.full_fp32_state_dict(engine)
    if rank != 0:
        return
    from pipeline.model.clip_vip import CLIPViPModel  # noqa: PLC0415

    model = CLIPViPModel(engine.module.model.config)
    prefix = "model."
    model.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True)
    with tempfile.TemporaryDirectory(prefix="clipvip-export-") as local:
        model.save_pretrained(local)
        fs.upload_dir(local, out_uri, fs.S3Options.of(cfg.storage))
    print(f"[{tag}] weights (HF format) -> {out_uri}", flush=True)


def export_once(engine: Any, out_uri: str, step: int, cfg: Any, rank: int, world: int, tag: str) -> bool:
    """The final weights at `out_uri`, unless its done marker records this step. All ranks call and
    agree (rank 0 reads the marker). Returns whether it exported."""
    opts = fs.S3Options.of(cfg.storage)
    decision = [False]
    if rank == 0:
        record = fs.read_json_or_none(done_marker(out_uri), opts)
        decision[0] = bool(record and record.get("step") == step)
    if world > 1:
        dist.broadcast_object_list(decision, src=0)
    if decision[0]:
        if rank == 0:
            print(f"[{tag}] weights of step {step} already at {out_uri}", flush=True)
        return False
    write_weights(engine, out_uri, cfg, rank, tag)
    if rank == 0:
        fs.write_json_atomic(done_marker(out_uri), {"step": step, "uri": out_uri}, opts)
    return True


def log_artifacts_once(tracker: Any, uri: str, artifact_path: str, cfg: Any) -> None:
    """The files under `uri` as the run's artifacts at `artifact_path`, once per run (rank 0)."""

    def log() -> None:
        with tempfile.TemporaryDirectory(prefix="clipvip-artifacts-") as local:
            fs.download_dir(uri, local, fs.S3Options.of(cfg.storage))
            tracker.log_artifacts(local, artifact_path)

    tracker.finish_step(f"artifacts.{artifact_path}", log)


def register_once(tracker: Any, artifact_path: str, name: str, cfg: Any, tag: str) -> None:
    """One registry version of the run's `artifact_path` under `name`, once per run (rank 0)."""
    from pipeline.tracking import register_model  # noqa: PLC0415

    def register() -> str:
        version = register_model(cfg.tracking.tracking_uri, tracker.run_id, artifact_path, name)
        print(f"[{tag}] registered {artifact_path} as {name!r} version {version}", flush=True)
        return version

    tracker.finish_step(f"registered.{artifact_path}", register)
