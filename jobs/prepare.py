"""`clipvip prepare`: HD-VILA videos -> frame shards + auxiliary captions + quarantine.

Run locally (starts a private Ray instance):
    clipvip prepare --config jobs/configs/tiny.yaml
On a cluster (see cluster/ and ray_cluster.yaml):
    ray job submit --working-dir . -- clipvip prepare --config jobs/configs/hdvila_prepare.yaml \
        --set data.root=s3://bucket/hdvila/v1
Re-running the same command resumes: finished shards are skipped, none is written twice.
"""

from __future__ import annotations

import sys

from jobs.common import config_parser, init_ray, load_or_exit
from pipeline.config import PrepareJobConfig


def main(argv: list[str]) -> int:
    args = config_parser("clipvip prepare", __doc__.splitlines()[0]).parse_args(argv)
    cfg = load_or_exit(PrepareJobConfig, args)

    from pipeline.data.build import RootConflict, check_inputs, run_prepare  # noqa: PLC0415
    from pipeline.data.captions import CaptionSetConflict  # noqa: PLC0415

    try:
        check_inputs(cfg)  # before Ray starts: a wrong path costs milliseconds, not a cluster
        init_ray(cfg.ray)
        summary = run_prepare(cfg)
    except (RootConflict, CaptionSetConflict, FileNotFoundError) as e:
        print(f"prepare refused: {e}", file=sys.stderr)
        return 2
    print(summary.render())
    return 0
