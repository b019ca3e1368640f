"""`clipvip sample-data --out DIR [--seed N]`: a synthetic HD-VILA-format dataset.

Source videos (H.264 mp4, several resolutions up to 1280x720) of moving coloured shapes, HD-VILA
metadata jsonl, ASR-style subtitles (a clip_id table and per-video WebVTT), and a held-out
MSR-VTT-format retrieval set whose texts need frame order. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import time

from pipeline.data.synthetic import SampleDataSpec, make_sample_dataset


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clipvip sample-data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-videos", type=int, default=None, help="source videos (default: the spec's)")
    args = parser.parse_args(argv)
    spec = SampleDataSpec() if args.num_videos is None else SampleDataSpec(num_videos=args.num_videos)
    t0 = time.perf_counter()
    ds = make_sample_dataset(args.out, seed=args.seed, spec=spec)
    print(f"sample data: {ds.num_videos} videos, {ds.num_clips} clips, {ds.num_retrieval} retrieval clips "
          f"in {time.perf_counter() - t0:.1f} s")
    print(f"  metadata   {ds.metadata_path}\n  videos     {ds.video_root}\n  subtitles  {ds.subtitles_table} "
          f"(table), {ds.subtitles_dir} (WebVTT)\n  retrieval  {ds.retrieval_jsonl}")
    return 0
