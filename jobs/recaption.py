"""`clipvip recaption`: a new caption set for a prepared dataset root; frames are never touched.

Run locally (starts a private Ray instance):
    clipvip recaption --config jobs/configs/tiny_recaption.yaml
On a cluster (see cluster/ and ray_cluster.yaml):
    ray job submit --working-dir . -- clipvip recaption --config jobs/configs/tiny_recaption.yaml \
        --set root=s3://bucket/hdvila/v1 --set caption.model=Salesforce/blip-image-captioning-large \
        --set caption.set_name=blip_large
Re-running the same command resumes; on a complete set it is a no-op. A set of the same name made
by another captioner or config is refused (exit 2): pick another caption.set_name.
"""

from __future__ import annotations

import sys

from jobs.common import config_parser, init_ray, load_or_exit, plain_failure
from pipeline.config import RecaptionJobConfig


def main(argv: list[str]) -> int:
    args = config_parser("clipvip recaption", __doc__.splitlines()[0]).parse_args(argv)
    cfg = load_or_exit(RecaptionJobConfig, args)

    from pipeline.data.captions import CaptionSetConflict  # noqa: PLC0415
    from pipeline.data.captions import covers  # noqa: PLC0415
    from pipeline.data.recaption import RootNotReady, open_recaption, run_recaption  # noqa: PLC0415

    try:
        # Before Ray starts: a wrong root or a conflicting set costs milliseconds, not a cluster,
        # and a set that covers the root needs no cluster at all.
        opened = open_recaption(cfg)
        if not covers(opened.capset, opened.frames.num_rows):
            init_ray(cfg.ray)
        summary = run_recaption(cfg, opened=opened)
    except (RootNotReady, CaptionSetConflict, FileNotFoundError) as e:
        print(f"recaption refused: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if (line := plain_failure(e)) is None:
            raise
        print(f"recaption failed: {line}", file=sys.stderr)
        return 1
    print(summary.render())
    return 0
