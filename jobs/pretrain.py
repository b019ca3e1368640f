"""`clipvip pretrain`: omnisource CLIP-ViP post-pretraining on Ray Train + DeepSpeed, in MLflow.

Locally (private Ray instance, tiny model, sqlite MLflow):
    clipvip pretrain --config jobs/configs/tiny_pretrain.yaml
On a cluster:
    ray job submit --working-dir . -- clipvip pretrain --config jobs/configs/hdvila_b32.yaml
Resume: submit the same command (same run_name and train.storage_path) again; it continues from
the latest checkpoint and keeps logging into the same MLflow run.
"""

from __future__ import annotations

import sys

from jobs.common import config_parser, init_ray, load_or_exit
from pipeline.config import PretrainJobConfig
from pipeline.train.run import open_view, pretrain_val_items, resolve_pretrain, run_pretrain


def main(argv: list[str]) -> int:
    args = config_parser("clipvip pretrain", __doc__.splitlines()[0]).parse_args(argv)
    cfg = resolve_pretrain(load_or_exit(PretrainJobConfig, args))
    from pipeline.train.launch import export_dir, run_dir  # noqa: PLC0415

    try:  # fail before Ray starts: missing root or view, an unfinished view, another frame size, no val split
        index = open_view(cfg)
        val = pretrain_val_items(cfg)
    except (ValueError, OSError) as e:
        print(f"pretrain refused: {e}", file=sys.stderr)
        return 2
    print(f"[pretrain] {index.num_rows} clips in view {cfg.train.view!r} of {cfg.root} (caption set "
          f"{index.caption_set!r}); run {cfg.run_name!r} in {run_dir(cfg)}", flush=True)
    init_ray(cfg.ray)
    try:
        run = run_pretrain(cfg, val)
    except Exception as e:  # noqa: BLE001  Ray Train V2 raises the worker group's error from fit()
        print(f"pretrain failed after {cfg.train.max_failures} restarts: {e}\n"
              "Fix the cause and submit the same command again: it resumes from the last checkpoint.",
              file=sys.stderr)
        return 1
    m = run.result.metrics or {}
    print("pretrain summary")
    print(f"  steps           {m.get('step')} (epoch {m.get('epoch')}, {m.get('samples_seen')} samples)")
    if "samples_per_s" in m:
        mfu = f", MFU {m['mfu']:.1%}" if "mfu" in m else " (MFU: no known peak for this device; train.peak_tflops)"
        print(f"  throughput      {m['samples_per_s']:.1f} samples/s, {m['samples_per_s_per_worker']:.1f} per worker, "
              f"{m.get('tflops_per_worker', 0.0):.3g} model TFLOP/s per worker{mfu}")
    if m.get("best_metric") is not None:
        print(f"  zero-shot val   t2v R@1 best {m['best_metric']:.1f} at step {m['best_step']} "
              f"(val/ metrics every {cfg.train.val_every_steps} steps)")
    print(f"  checkpoint      {run.result.checkpoint.path if run.result.checkpoint else None}")
    print(f"  final weights   {export_dir(cfg)} (HF format: CLIPViPModel.from_pretrained)")
    if run.mlflow_run_id:
        print(f"  MLflow run      {run.mlflow_run_id} at {cfg.tracking.tracking_uri}")
        print(f"  view it         mlflow ui --backend-store-uri {cfg.tracking.tracking_uri}")
    return 0
