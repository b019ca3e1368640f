"""`clipvip pretrain`: omnisource CLIP-ViP post-pretraining on Ray Train + DeepSpeed, in MLflow.

Locally (private Ray instance, tiny model, sqlite MLflow):
    clipvip pretrain --config jobs/configs/tiny_pretrain.yaml
On a cluster:
    ray job submit --working-dir . -- clipvip pretrain --config jobs/configs/hdvila_b32.yaml
Resume: submit the same command (same run_name and train.storage_path) again; it continues from
the latest checkpoint and keeps logging into the same MLflow run.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from jobs.common import absolute_tracking, config_parser, init_ray, load_or_exit, local_path
from pipeline.config import PretrainJobConfig


def absolutize(cfg: PretrainJobConfig) -> PretrainJobConfig:
    """Ray workers run in another cwd: make local paths absolute on the driver."""
    def local(path: str | None) -> str | None:
        return path if path is None or "://" in path else os.path.abspath(path)

    t = cfg.train
    train = dataclasses.replace(t, dataset_root=local(t.dataset_root), storage_path=local(t.storage_path),
                                warm_start=local_path(t.warm_start))
    model = dataclasses.replace(cfg.model, pretrained=local_path(cfg.model.pretrained))
    return dataclasses.replace(cfg, train=train, model=model,
                               tracking=absolute_tracking(cfg.tracking))


def mlflow_run(cfg: PretrainJobConfig) -> str | None:
    """The MLflow run of this training run: found by name + run dir, else created."""
    if not cfg.tracking.enabled:
        return None
    from pipeline.tracking import create_run, find_run  # noqa: PLC0415
    from pipeline.train.launch import run_dir  # noqa: PLC0415

    tags = {"clipvip.run_dir": run_dir(cfg), "clipvip.job": "pretrain"}
    run_id = find_run(cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.run_name, tags)
    return run_id or create_run(cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.run_name, tags)


def main(argv: list[str]) -> int:
    args = config_parser("clipvip pretrain", __doc__.splitlines()[0]).parse_args(argv)
    cfg = absolutize(load_or_exit(PretrainJobConfig, args))

    from pipeline.data.loader import ViewIndex  # noqa: PLC0415
    from pipeline.train.launch import export_dir, make_trainer, run_dir  # noqa: PLC0415
    from pipeline.utils.fs import S3Options  # noqa: PLC0415

    try:  # fail before Ray starts: missing root or view, an unfinished view, another frame size
        index = ViewIndex.open(cfg.train.dataset_root, cfg.train.view, S3Options.of(cfg.storage))
        index.check_size(cfg.train.image_size_px)
    except (ValueError, OSError) as e:
        print(f"pretrain refused: {e}", file=sys.stderr)
        return 2
    run_id = mlflow_run(cfg)
    print(f"[pretrain] {index.num_rows} clips in view {cfg.train.view!r} of {cfg.train.dataset_root} (caption set "
          f"{index.caption_set!r}); "
          f"run {cfg.run_name!r} in {run_dir(cfg)}; MLflow run {run_id}")
    init_ray(cfg.ray)
    try:
        result = make_trainer(cfg, run_id).fit()
    except Exception as e:  # noqa: BLE001  Ray Train V2 raises the worker group's error from fit()
        print(f"pretrain failed after {cfg.train.max_failures} restarts: {e}\n"
              "Fix the cause and submit the same command again: it resumes from the last checkpoint.",
              file=sys.stderr)
        return 1
    m = result.metrics or {}
    print("pretrain summary")
    print(f"  steps           {m.get('step')} (epoch {m.get('epoch')}, {m.get('samples_seen')} samples)")
    print(f"  checkpoint      {result.checkpoint.path if result.checkpoint else None}")
    print(f"  final weights   {export_dir(cfg)} (HF format: CLIPViPModel.from_pretrained)")
    if run_id:
        print(f"  MLflow run      {run_id} at {cfg.tracking.tracking_uri}")
        print(f"  view it         mlflow ui --backend-store-uri {cfg.tracking.tracking_uri}")
    return 0
