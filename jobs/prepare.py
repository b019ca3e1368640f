"""`clipvip prepare`: HD-VILA videos -> frame shards + auxiliary captions + quarantine.

Run locally (starts a private Ray instance):
    clipvip prepare --config jobs/configs/tiny.yaml
On a cluster (see cluster/ and ray_cluster.yaml):
    ray job submit --working-dir . -- clipvip prepare --config jobs/configs/hdvila_prepare.yaml \
        --set root=s3://bucket/hdvila/v1
Re-running the same command resumes: finished shards are skipped, none is written twice. Listing
more metadata parts grows the root: only the new parts are planned and processed.
"""

from __future__ import annotations

import sys

from jobs.common import config_parser, init_ray, load_or_exit, plain_failure
from pipeline.config import PrepareJobConfig


def main(argv: list[str]) -> int:
    args = config_parser("clipvip prepare", __doc__.splitlines()[0]).parse_args(argv)
    cfg = load_or_exit(PrepareJobConfig, args)

    from pipeline.data.build import run_prepare  # noqa: PLC0415
    from pipeline.data.captions import CaptionSetConflict  # noqa: PLC0415
    from pipeline.data.inputs import EmptyInput, RootConflict, open_root  # noqa: PLC0415

    try:
        # Before Ray starts: a wrong path, a changed setting or part costs milliseconds, not a cluster.
        inputs = open_root(cfg)
    except (ValueError, OSError) as e:  # RootConflict, CaptionSetConflict, a bad part name, S3 refusing
        print(f"prepare refused: {e}", file=sys.stderr)
        return 2
    init_ray(cfg.ray)
    try:
        summary = run_prepare(cfg, inputs=inputs)
    except (EmptyInput, RootConflict, CaptionSetConflict) as e:
        print(f"prepare refused: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if (line := plain_failure(e)) is None:
            raise
        print(f"prepare failed: {line}", file=sys.stderr)
        return 1
    print(summary.render())
    return 0
