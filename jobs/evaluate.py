"""`clipvip evaluate --config FILE`: text<->video retrieval (R@1/5/10, MdR, MnR; DSL) for any checkpoint.

    clipvip evaluate --config jobs/configs/tiny_evaluate.yaml
    clipvip evaluate --config jobs/configs/msrvtt_evaluate.yaml --set eval.models.0.weights=out/runs/ft-export
    clipvip evaluate --config jobs/configs/msrvtt_evaluate.yaml --set eval.data.annotations=s3://my-bucket/msrvtt/test1ka.jsonl \
        --set eval.data.video_root=s3://my-bucket/msrvtt/videos_6fps

Models: our HF-format exports (`<run>-export`, `<run>-best`), an official CLIP-ViP `.pt`, plain
HF CLIP (`openai/clip-vit-base-patch32`); several are ranked side by side (e.g. CLIP-ViP and the
mean-pooling baseline). The split may be local or on S3 (reached with the `storage` section).
Exit 2 on a bad config or unreadable split, 1 on a failed run.
"""

from __future__ import annotations

import sys

from jobs.common import config_parser, init_ray, load_or_exit
from pipeline.config import EvaluateJobConfig
from pipeline.eval.evaluate import resolve_paths


def main(argv: list[str]) -> int:
    args = config_parser("clipvip evaluate", __doc__.splitlines()[0]).parse_args(argv)
    cfg = resolve_paths(load_or_exit(EvaluateJobConfig, args))
    from pipeline.eval.formats import read_items  # noqa: PLC0415
    from pipeline.utils import fs  # noqa: PLC0415

    try:  # a missing or empty split fails before Ray starts
        read_items(cfg.eval.data, fs.S3Options.of(cfg.storage))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    init_ray(cfg.ray)
    from pipeline.eval.evaluate import run_evaluate  # noqa: PLC0415

    try:
        summary = run_evaluate(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.render(), flush=True)
    return 0
