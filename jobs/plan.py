"""`clipvip plan --config RECIPE [--set ...] [--json]`: a dry run of a prepare, recaption, pack or
pretrain recipe: what the job would do, its costs, and whether the cluster fits it.

    clipvip plan --config jobs/configs/hdvila_prepare.yaml
    clipvip plan --config jobs/configs/hdvila_b32.yaml --set ray.address=auto --json
Nothing is decoded, captioned, trained or written. Metadata parts without a finished plan are
cut into units on Ray (a private local instance unless `ray.address` is set). Exits 0 when every
check fits, 3 naming each failed check, 2 for a bad recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jobs.common import config_parser, init_ray, load_or_exit
from pipeline.config import (ConfigError, PackJobConfig, PrepareJobConfig, PretrainJobConfig, RecaptionJobConfig,
                             read_yaml_mapping)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results")
CLASSES = {"prepare": PrepareJobConfig, "recaption": RecaptionJobConfig, "pack": PackJobConfig,
           "pretrain": PretrainJobConfig}


def main(argv: list[str]) -> int:
    parser = config_parser("clipvip plan", __doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    from pipeline.submit import SubmitError, infer_kind  # noqa: PLC0415

    try:
        kind = infer_kind(read_yaml_mapping(args.config, f"--config {args.config}") if args.config else {})
    except (SubmitError, ConfigError) as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    if kind not in CLASSES:
        print(f"plan: {kind} recipes are not planned (prepare, recaption, pack and pretrain are)", file=sys.stderr)
        return 2
    cfg = load_or_exit(CLASSES[kind], argparse.Namespace(config=args.config, overrides=args.overrides))
    from pipeline import plan  # noqa: PLC0415
    from pipeline.plan_pack import plan_pack  # noqa: PLC0415

    connected = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    if kind == "prepare" or connected:  # parts are planned on Ray; a cluster is asked for its shape
        init_ray(cfg.ray)
    report = {"prepare": plan.plan_prepare, "recaption": plan.plan_recaption, "pack": plan_pack,
              "pretrain": plan.plan_pretrain}[kind](cfg, RESULTS_DIR, connected)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.render())
    if report.failed:
        print(f"plan: does not fit: {'; '.join(f'{c.name}: {c.detail}' for c in report.failed)}", file=sys.stderr)
        return 3
    return 0
