"""`clipvip finetune --config FILE`: retrieval fine-tuning on Ray Train + DeepSpeed (spec 4.2).

    clipvip finetune --config jobs/configs/tiny_finetune.yaml
    clipvip finetune --config jobs/configs/msrvtt_finetune_b32.yaml --set model.pretrained=out/runs/pt-export \
        --set data.train.annotations=s3://my-bucket/msrvtt/train9k.jsonl \
        --set data.train.video_root=s3://my-bucket/msrvtt/videos_6fps

Symmetric InfoNCE with global negatives; validation every `data.val_every_steps` on a held-out
split picks the best weights (`<storage>/<run_name>-best`); the last weights go to
`<run_name>-export`. Resubmitting the same run name and storage resumes from its last checkpoint.
Annotations, videos and `data.batch_groups` may be local or on S3 (reached with `storage`).
Exit 2 on a bad config or unreadable split before Ray starts, 1 on a failed run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import asdict

from jobs.common import (
    absolute_tracking,
    config_parser,
    init_ray,
    load_or_exit,
    local_path,
)
from pipeline.config import ConfigError
from pipeline.eval.config import FinetuneJobConfig
from pipeline.utils import fs


def absolutize(cfg: FinetuneJobConfig) -> FinetuneJobConfig:
    """Ray workers run in another cwd: existing relative paths become absolute on the driver."""
    import os  # noqa: PLC0415

    def split(d):
        return d if d is None else dataclasses.replace(d, annotations=local_path(d.annotations),
                                                       video_root=local_path(d.video_root))

    t = cfg.train
    storage = t.storage_path if "://" in t.storage_path else os.path.abspath(t.storage_path)
    train = dataclasses.replace(t, storage_path=storage, warm_start=local_path(t.warm_start))
    data = dataclasses.replace(cfg.data, train=split(cfg.data.train), val=split(cfg.data.val),
                               batch_groups=local_path(cfg.data.batch_groups))
    model = dataclasses.replace(cfg.model, pretrained=local_path(cfg.model.pretrained))
    return dataclasses.replace(cfg, train=train, data=data, model=model,
                               tracking=absolute_tracking(cfg.tracking))


def splits(cfg: FinetuneJobConfig):
    """(train items, val items, skipped rows) as the workers will see them."""
    from pipeline.eval.formats import read_items  # noqa: PLC0415
    from pipeline.train.retrieval_data import holdout_split  # noqa: PLC0415

    opts = fs.S3Options.of(cfg.storage)
    train, skipped = read_items(cfg.data.train, opts)
    if cfg.data.val is not None:
        val, val_skipped = read_items(cfg.data.val, opts)
        skipped = [*skipped, *val_skipped]
    else:
        train, val = holdout_split(train, cfg.data.val_holdout, cfg.train.seed)
    return train, val, skipped


def batch_groups(cfg: FinetuneJobConfig, train: list) -> list[list[int]]:
    """`data.batch_groups` as index groups of `train`; a clear error for an unreadable file."""
    if not cfg.data.batch_groups:
        return []
    from pipeline.train.retrieval_data import resolve_groups  # noqa: PLC0415

    try:
        raw = json.loads(fs.read_bytes(cfg.data.batch_groups, fs.S3Options.of(cfg.storage)).decode("utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.batch_groups: cannot read {cfg.data.batch_groups}: {e}") from None
    if not isinstance(raw, list) or not all(isinstance(g, list) and all(isinstance(c, str) for c in g) for g in raw):
        raise ConfigError(f"data.batch_groups: {cfg.data.batch_groups} must hold a JSON list of clip-id lists")
    try:
        groups, missing = resolve_groups(train, raw)
    except ValueError as e:
        raise ConfigError(f"data.batch_groups: {e}") from None
    if missing:
        print(f"[finetune] data.batch_groups: {missing} listed ids are not in the training split", flush=True)
    return groups


def mlflow_run(cfg: FinetuneJobConfig) -> str | None:
    if not cfg.tracking.enabled:
        return None
    from pipeline.tracking import create_run, find_run  # noqa: PLC0415
    from pipeline.train.launch import run_dir  # noqa: PLC0415

    tags = {"clipvip.run_dir": run_dir(cfg), "clipvip.job": "finetune"}
    run_id = find_run(cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.run_name, tags)
    return run_id or create_run(cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.run_name, tags)


def prepare_data(cfg: FinetuneJobConfig):
    """(train, val, batch groups), read once; skipped annotation rows are printed."""
    train, val, skipped = splits(cfg)
    for where, why in skipped[:20]:
        print(f"[finetune] skipped annotation {where}: {why}", flush=True)
    return train, val, batch_groups(cfg, train)


def run(cfg: FinetuneJobConfig, data=None):
    """Fit (or resume) the run; returns (Ray Train result, MLflow run id). Ray must be up.
    `data`: what `prepare_data(cfg)` returned, when the caller already read it."""
    from pipeline.train.finetune_worker import finetune_loop_per_worker  # noqa: PLC0415
    from pipeline.train.launch import make_trainer  # noqa: PLC0415

    train, val, groups = data or prepare_data(cfg)
    run_id = mlflow_run(cfg)
    trainer = make_trainer(cfg, run_id, loop=finetune_loop_per_worker, extra_loop_config={
        "train_items": [asdict(it) for it in train], "val_items": [asdict(it) for it in val],
        "train_groups": groups})
    return trainer.fit(), run_id


def main(argv: list[str]) -> int:
    args = config_parser("clipvip finetune", __doc__.splitlines()[0]).parse_args(argv)
    cfg = absolutize(load_or_exit(FinetuneJobConfig, args))
    try:  # missing/empty splits fail before Ray starts
        data = prepare_data(cfg)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train, val, groups = data
    print(f"[finetune] {len(train)} train / {len(val)} val videos"
          + (f" ({sum(map(len, groups))} of them in {len(groups)} batch groups)" if groups else "")
          + f"; run {cfg.run_name!r} under "
          f"{cfg.train.storage_path}", flush=True)
    init_ray(cfg.ray)
    from pipeline.train.launch import best_dir, export_dir  # noqa: PLC0415

    result, run_id = run(cfg, data)
    if result.error:
        print(f"finetune failed: {result.error}", file=sys.stderr)
        return 1
    m = result.metrics or {}
    print(f"[finetune] done: {m.get('step')} steps; best weights {best_dir(cfg)}; last weights "
          f"{export_dir(cfg)}; MLflow run {run_id}", flush=True)
    return 0
