"""`clipvip demo --out DIR`: the embedded default end to end (what `make run` runs).

Synthetic HD-VILA-format data -> `prepare` (local Ray, decode + tiny captioner) -> summary.
Later stages (pretrain, evaluate) join here as they land. Everything stays under DIR.
"""

from __future__ import annotations

import argparse
import os
import time

from jobs.common import init_ray
from pipeline.config import ConfigError, PrepareJobConfig, load_config

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.yaml")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clipvip demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/demo", help="where sample data and outputs go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the prepare recipe (jobs/configs/tiny.yaml)")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    t0 = time.perf_counter()

    from pipeline.data.synthetic import make_sample_dataset  # noqa: PLC0415

    sample_dir = os.path.join(out, "sample")
    print(f"[demo] 1/2 synthetic HD-VILA-format data -> {sample_dir}")
    sample = make_sample_dataset(sample_dir, seed=args.seed)
    print(f"[demo]     {sample.num_videos} videos, {sample.num_clips} clips")

    try:
        cfg = load_config(PrepareJobConfig, TINY, [
            f"data.root={os.path.join(out, 'dataset')}", f"data.metadata={sample.metadata_path}",
            f"data.video_root={sample.video_root}", f"data.subtitles={sample.subtitles_table}",
            *args.overrides])
    except ConfigError as e:
        print(f"config error: {e}")
        return 2
    from pipeline.data.build import run_prepare  # noqa: PLC0415

    print(f"[demo] 2/2 prepare -> {cfg.data.root}")
    init_ray(cfg.ray)
    summary = run_prepare(cfg)
    print(summary.render())
    print(f"[demo] done in {time.perf_counter() - t0:.1f} s; dataset root: {cfg.data.root}")
    return 0
