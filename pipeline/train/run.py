"""Library entry points of training: `run_pretrain` and `run_finetune` (Ray must be up).

Each takes a job config as the caller wrote it: local paths are resolved against the caller's
working directory (Ray workers run in another), the run's MLflow run is found by name and run
directory or created, and the Ray Train run is fitted, or resumed from its last checkpoint when
its run directory has one (pipeline/train/launch.py). The CLI jobs, the demo and notebooks call
these; nothing else builds a trainer.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import ConfigError, FinetuneJobConfig, PretrainJobConfig, absolute_tracking, local_path
from pipeline.utils import fs


@dataclass
class TrainRun:
    """What a finished `run_pretrain` / `run_finetune` returns."""

    cfg: Any
    """The config as run (paths resolved)."""
    result: Any
    """Ray Train's Result: metrics of the last report, checkpoint, error."""
    mlflow_run_id: str | None

    @property
    def steps(self) -> int | None:
        return (self.result.metrics or {}).get("step")


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _split_paths(split: Any) -> Any:
    return split if split is None else dataclasses.replace(split, annotations=local_path(split.annotations),
                                                            video_root=local_path(split.video_root),
                                                            order_pairs=local_path(split.order_pairs))


def resolve_pretrain(cfg: PretrainJobConfig) -> PretrainJobConfig:
    t = cfg.train
    train = dataclasses.replace(t, storage_path=_absolute(t.storage_path), warm_start=local_path(t.warm_start))
    model = dataclasses.replace(cfg.model, pretrained=local_path(cfg.model.pretrained))
    return dataclasses.replace(cfg, root=_absolute(cfg.root), train=train, model=model, val=_split_paths(cfg.val),
                               tracking=absolute_tracking(cfg.tracking))


def resolve_finetune(cfg: FinetuneJobConfig) -> FinetuneJobConfig:
    t = cfg.train
    train = dataclasses.replace(t, storage_path=_absolute(t.storage_path), warm_start=local_path(t.warm_start))
    data = dataclasses.replace(cfg.data, train=_split_paths(cfg.data.train), val=_split_paths(cfg.data.val),
                               batch_groups=local_path(cfg.data.batch_groups))
    model = dataclasses.replace(cfg.model, pretrained=local_path(cfg.model.pretrained))
    return dataclasses.replace(cfg, train=train, data=data, model=model, tracking=absolute_tracking(cfg.tracking))


def mlflow_run(cfg: Any, job: str) -> str | None:
    """The MLflow run of this training run: found by name and run directory, else created."""
    if not cfg.tracking.enabled:
        return None
    from pipeline.tracking import create_run, find_run  # noqa: PLC0415
    from pipeline.train.launch import run_dir  # noqa: PLC0415

    tags = {"clipvip.run_dir": run_dir(cfg), "clipvip.job": job}
    run_id = find_run(cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.run_name, tags)
    return run_id or create_run(cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.run_name, tags)


def open_view(cfg: PretrainJobConfig) -> Any:
    """The training view pretrain reads (a ViewIndex), checked against the run's frame size.

    Raises:
        ValueError, OSError: no root or view, an unfinished view, frames of another size.
    """
    from pipeline.data.loader import ViewIndex  # noqa: PLC0415

    index = ViewIndex.open(cfg.root, cfg.train.view, fs.S3Options.of(cfg.storage))
    index.check_size(cfg.train.image_size_px)
    return index


def run_pretrain(cfg: PretrainJobConfig, val_items: list | None = None) -> TrainRun:
    """Omnisource post-pretraining (or its resumption) on Ray Train; returns when the run ends.
    `val_items`: what `pretrain_val_items(cfg)` returned, when the caller has read it already."""
    from pipeline.train.launch import make_trainer  # noqa: PLC0415

    cfg = resolve_pretrain(cfg)
    val = pretrain_val_items(cfg) if val_items is None else val_items
    run_id = mlflow_run(cfg, "pretrain")
    if run_id:
        print(f"[pretrain] MLflow run {run_id} at {cfg.tracking.tracking_uri} ({cfg.run_name})", flush=True)
    trainer = make_trainer(cfg, run_id, extra_loop_config={"val_items": [asdict(it) for it in val],
                                                           "val_pairs": _order_pairs(cfg.val, val, cfg)})
    return TrainRun(cfg, trainer.fit(), run_id)


def pretrain_val_items(cfg: PretrainJobConfig) -> list:
    """The zero-shot validation split's usable videos ([] without `val`); skipped rows printed.

    Raises:
        OSError, ValueError: a missing split, or one with no usable video.
    """
    if cfg.val is None:
        return []
    from pipeline.eval.formats import read_items  # noqa: PLC0415

    items, skipped = read_items(cfg.val, fs.S3Options.of(cfg.storage))
    for where, why in skipped[:20]:
        print(f"[pretrain] val: skipped annotation {where}: {why}", flush=True)
    print(f"[pretrain] zero-shot validation on {len(items)} videos of {cfg.val.annotations} every "
          f"{cfg.train.val_every_steps} steps", flush=True)
    return items


def finetune_data(cfg: FinetuneJobConfig) -> tuple[list, list, list[list[int]], list]:
    """(train items, val items, batch groups, skipped annotation rows) as the workers will see them;
    the first skipped rows are printed.

    Raises:
        OSError, ValueError: a missing or empty split; ConfigError: a bad `data.batch_groups`.
    """
    from pipeline.eval.formats import read_items  # noqa: PLC0415
    from pipeline.train.retrieval_data import holdout_split  # noqa: PLC0415

    opts = fs.S3Options.of(cfg.storage)
    train, skipped = read_items(cfg.data.train, opts)
    if cfg.data.val is not None:
        val, val_skipped = read_items(cfg.data.val, opts)
        skipped = [*skipped, *val_skipped]
    else:
        train, val = holdout_split(train, cfg.data.val_holdout, cfg.train.seed)
    for where, why in skipped[:20]:
        print(f"[finetune] skipped annotation {where}: {why}", flush=True)
    return train, val, _batch_groups(cfg, train), skipped


def _batch_groups(cfg: FinetuneJobConfig, train: list) -> list[list[int]]:
    """`data.batch_groups` as index groups of `train`; a clear error for an unreadable file."""
    if not cfg.data.batch_groups:
        return []
    from pipeline.eval.formats import read_clip_groups  # noqa: PLC0415
    from pipeline.train.retrieval_data import resolve_groups  # noqa: PLC0415

    try:
        raw = read_clip_groups(cfg.data.batch_groups, "data.batch_groups", fs.S3Options.of(cfg.storage))
        groups, missing = resolve_groups(train, raw)
    except ValueError as e:
        raise ConfigError(f"data.batch_groups: {e}") from None
    if missing:
        print(f"[finetune] data.batch_groups: {missing} listed ids are not in the training split", flush=True)
    return groups


def run_finetune(cfg: FinetuneJobConfig, data: tuple | None = None) -> TrainRun:
    """Retrieval fine-tuning (or its resumption) on Ray Train; returns when the run ends.
    `data`: what `finetune_data(cfg)` returned, when the caller has read it already."""
    from pipeline.train.finetune_worker import finetune_loop_per_worker  # noqa: PLC0415
    from pipeline.train.launch import make_trainer  # noqa: PLC0415

    cfg = resolve_finetune(cfg)
    train, val, groups, _ = data or finetune_data(cfg)
    run_id = mlflow_run(cfg, "finetune")
    if run_id:
        print(f"[finetune] MLflow run {run_id} at {cfg.tracking.tracking_uri} ({cfg.run_name})", flush=True)
    trainer = make_trainer(cfg, run_id, loop=finetune_loop_per_worker, extra_loop_config={
        "train_items": [asdict(it) for it in train], "val_items": [asdict(it) for it in val],
        "train_groups": groups, "val_pairs": _order_pairs(cfg.data.val, val, cfg)})
    return TrainRun(cfg, trainer.fit(), run_id)


def _order_pairs(split: Any, items: list, cfg: Any) -> list[tuple[int, int]]:
    """The validation split's `order_pairs` as item indices ([] without); errors before Ray Train starts."""
    if split is None or not split.order_pairs:
        return []
    from pipeline.eval.formats import order_pair_indices  # noqa: PLC0415

    try:
        return order_pair_indices(split, items, fs.S3Options.of(cfg.storage))
    except ValueError as e:
        raise ConfigError(str(e)) from None
