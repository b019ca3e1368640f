"""`clipvip finetune --config FILE`: retrieval fine-tuning on Ray Train + DeepSpeed (spec 4.2).

    clipvip finetune --config jobs/configs/tiny_finetune.yaml
    clipvip finetune --config jobs/configs/msrvtt_finetune_b32.yaml --set model.pretrained=out/runs/pt-export \
        --set data.train.annotations=s3://my-bucket/msrvtt/train9k.jsonl \
        --set data.train.video_root=s3://my-bucket/msrvtt/videos_6fps

Symmetric InfoNCE with global negatives; validation every `train.val_every_steps` on a held-out
split picks the best weights (`<storage>/<run_name>-best`); the last weights go to
`<run_name>-export`. Resubmitting the same run name and storage resumes from its last checkpoint.
Annotations, videos and `data.batch_groups` may be local or on S3 (reached with `storage`).
Exit 2 on a bad config or unreadable split before Ray starts, 1 on a failed run.
"""

from __future__ import annotations

import sys

from jobs.common import config_parser, init_ray, load_or_exit
from pipeline.config import FinetuneJobConfig
from pipeline.train.run import finetune_data, resolve_finetune, run_finetune


def main(argv: list[str]) -> int:
    args = config_parser("clipvip finetune", __doc__.splitlines()[0]).parse_args(argv)
    cfg = resolve_finetune(load_or_exit(FinetuneJobConfig, args))
    try:  # missing/empty splits fail before Ray starts
        data = finetune_data(cfg)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train, val, groups, _ = data
    print(f"[finetune] {len(train)} train / {len(val)} val videos"
          + (f" ({sum(map(len, groups))} of them in {len(groups)} batch groups)" if groups else "")
          + f"; run {cfg.run_name!r} under "
          f"{cfg.train.storage_path}", flush=True)
    init_ray(cfg.ray)
    from pipeline.train.launch import best_dir, export_dir  # noqa: PLC0415

    run = run_finetune(cfg, data)
    if run.result.error:
        print(f"finetune failed: {run.result.error}", file=sys.stderr)
        return 1
    print(f"[finetune] done: {run.steps} steps; best weights {best_dir(cfg)}; last weights "
          f"{export_dir(cfg)}; MLflow run {run.mlflow_run_id}", flush=True)
    return 0
