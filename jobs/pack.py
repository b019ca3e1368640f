"""`clipvip pack`: a training view of a prepared root and one caption set, what pretrain reads.

Run locally (starts a private Ray instance):
    clipvip pack --config jobs/configs/tiny_pack.yaml
On a cluster:
    clipvip submit jobs/configs/hdvila_pack.yaml
Re-running the same command resumes; on a complete view it is a no-op. A view of the same name
with other settings, another caption set or made before the root grew is refused (exit 2):
pick another view.name.
"""

from __future__ import annotations

import sys

from jobs.common import config_parser, init_ray, load_or_exit, plain_failure
from pipeline.config import PackJobConfig


def main(argv: list[str]) -> int:
    args = config_parser("clipvip pack", __doc__.splitlines()[0]).parse_args(argv)
    cfg = load_or_exit(PackJobConfig, args)

    from pipeline.data.pack_job import EmptyView, open_pack, run_pack  # noqa: PLC0415

    try:
        # Before Ray starts: a wrong root, caption set or view name costs milliseconds, not a cluster.
        opened = open_pack(cfg)
    except (ValueError, OSError) as e:  # RootNotReady, ViewConflict, a caption set that is missing or misaligned
        print(f"pack refused: {e}", file=sys.stderr)
        return 2
    try:
        if opened[1].get("status") != "complete":
            init_ray(cfg.ray)
        summary = run_pack(cfg, opened=opened)
    except EmptyView as e:
        print(f"pack failed: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if (line := plain_failure(e)) is None:
            raise
        print(f"pack failed: {line}", file=sys.stderr)
        return 1
    print(summary.render())
    return 0
