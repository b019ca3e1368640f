"""Caption benchmark: batched captioning against one image per call, and what recaption reads.

Run:  cd /work/main && .venv/bin/python bench/caption.py [--images 64] [--repeats 3]

1. Makes (once, cached under .cache/bench/caption/) the synthetic HD-VILA sample (seed 0) and a
   dataset root from it with `prepare` on a local Ray instance, at the default frame settings
   (3 fps, <= 32 frames, short side 240, JPEG 90) and default shard size.
2. Captions/s: for each builtin captioner (tiny-blip, tiny-git), ONE FrameCaptioner instance
   captions the root's middle frames (real 240p JPEGs, repeated up to --images) either in one
   call with caption.batch_size=16, or one image per call; alternated --repeats times in this
   process, best of each, torch pinned to one thread. Also counts captions that differ between
   the two (batch invariance).
3. Bytes read per clip by the recaption read path (`captions.read_columns`, what caption_shard
   calls: clip_id + middle_frame, footer read exactly) against the frame shard's size; with
   pyarrow's plain `read_table` projection (64 KiB speculative footer read) and the
   frames_per_clip > 1 path (adds `frames`) for comparison. Bytes are counted as they come
   off storage.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pipeline.config import CaptionConfig, PrepareJobConfig, load_config  # noqa: E402
from pipeline.data import captions as capsets  # noqa: E402
from pipeline.utils import fs  # noqa: E402

CACHE_DIR = os.path.join(ROOT, ".cache", "bench", "caption")
MODELS = ("builtin:tiny-blip", "builtin:tiny-git")


def make_root() -> str:
    """Synthetic sample + prepared root at default frame settings (reused when complete)."""
    sample_dir, root = os.path.join(CACHE_DIR, "sample"), os.path.join(CACHE_DIR, "root")
    manifest = os.path.join(root, "manifest.json")
    if os.path.exists(manifest) and fs.read_json(manifest).get("status") == "complete" and \
            fs.read_json(manifest).get("schema_version") == 2:
        return root
    from pipeline.data.synthetic import make_sample_dataset

    t0 = time.perf_counter()
    sample = make_sample_dataset(sample_dir, seed=0)
    cfg = load_config(PrepareJobConfig, None, [
        f"root={root}", f"data.metadata={sample.metadata_path}", f"data.video_root={sample.video_root}",
        f"data.subtitles={sample.subtitles_table}", "caption.model=builtin:tiny-blip", "caption.max_new_tokens=8",
        "ray.num_cpus=2", "ray.progress_bars=false"])
    from jobs.common import init_ray
    from pipeline.data.build import run_prepare

    init_ray(cfg.ray)
    run_prepare(cfg, log=lambda *_: None)
    import ray

    ray.shutdown()
    print(f"made {root} in {time.perf_counter() - t0:.0f} s")
    return root


def frame_parts(root: str) -> list[str]:
    """The root's frame shards, found through its index (as every reader does)."""
    from pipeline import viz
    from pipeline.data.root import DatasetRoot

    return [DatasetRoot(root).frames_uri(s) for s in viz.shards(root)]


def bench_captions(images: list[bytes], repeats: int) -> list[tuple[str, float, float, int]]:
    """(model, batched img/s, single img/s, captions that differ) per builtin captioner."""
    import torch

    from pipeline.data.captioner import FrameCaptioner

    torch.set_num_threads(1)
    out = []
    for model in MODELS:
        cap = FrameCaptioner(CaptionConfig(model=model, batch_size=16, max_new_tokens=20), device="cpu")
        cap.caption(images[:4])  # warm-up: first-call allocations and lazy inits
        best_batched = best_single = float("inf")
        batched = single = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            batched = cap.caption(images)
            best_batched = min(best_batched, time.perf_counter() - t0)
            t0 = time.perf_counter()
            single = [r for img in images for r in cap.caption([img])]
            best_single = min(best_single, time.perf_counter() - t0)
        differ = sum(a.caption != b.caption for a, b in zip(batched, single, strict=True))
        out.append((model, len(images) / best_batched, len(images) / best_single, differ))
    return out


def plain_read_bytes(uri: str, columns: list[str]) -> int:
    """Bytes pyarrow's own projected read_table pulls (footer via its 64 KiB tail read)."""
    import pyarrow.parquet as pq

    filesystem, path = fs.resolve(uri)
    with filesystem.open_input_file(path) as native:
        counting = capsets._CountingFile(native)  # noqa: SLF001  same counter as the real path
        pq.read_table(counting, columns=columns)
        return counting.bytes_read


def column_bytes(uri: str, column: str) -> int:
    """On-disk (compressed) bytes of one column over all row groups, from the footer."""
    import pyarrow.parquet as pq

    md = pq.ParquetFile(uri).metadata
    return sum(md.row_group(g).column(i).total_compressed_size for g in range(md.num_row_groups)
               for i in range(md.num_columns) if md.row_group(g).column(i).path_in_schema == column)


def bench_reads(root: str) -> None:
    rows = []
    for uri in frame_parts(root):
        size = fs.file_size(uri)
        print(f"{'/'.join(uri.split('/')[-2:])}: middle_frame column alone is {column_bytes(uri, 'middle_frame') / size:.1%} "
              f"of the file (the floor for any reader of it)")
        table, mid = capsets.read_columns(uri, None, ["clip_id", "middle_frame"])
        _, k_path = capsets.read_columns(uri, None, ["clip_id", "middle_frame", "frames"])
        plain = plain_read_bytes(uri, ["clip_id", "middle_frame"])
        rows.append(('/'.join(uri.split('/')[-2:]), table.num_rows, size, mid, plain, k_path))
    print(f"\nbytes read per clip by the recaption read path, root {root}")
    print(f"{'shard':20s} {'clips':>5s} {'shard B':>9s} {'B/clip':>8s} {'read B/clip':>11s} {'ratio':>7s} "
          f"{'plain read_table':>16s} {'k>1 path':>9s}")
    for name, n, size, mid, plain, k_path in rows:
        print(f"{name:20s} {n:5d} {size:9d} {size / n:8.0f} {mid / n:11.0f} {mid / size:7.1%} "
              f"{plain / size:16.1%} {k_path / size:9.1%}")
    n, size = sum(r[1] for r in rows), sum(r[2] for r in rows)
    mid, plain, k_path = (sum(r[i] for r in rows) for i in (3, 4, 5))
    print(f"{'all':20s} {n:5d} {size:9d} {size / n:8.0f} {mid / n:11.0f} {mid / size:7.1%} "
          f"{plain / size:16.1%} {k_path / size:9.1%}")
    print(f"recaption (frames_per_clip=1) reads {mid / size:.1%} of the frame shard bytes (target < 10%)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed runs per mode (best kept)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    root = make_root()

    images = [img for uri in frame_parts(root)
              for img in capsets.read_columns(uri, None, ["middle_frame"])[0].column(0).to_pylist()]
    images = (images * (args.images // max(1, len(images)) + 1))[:args.images]
    results = bench_captions(images, args.repeats)
    print(f"\ncaptions/s, {len(images)} middle frames (240p JPEG), 1 torch thread, best of {args.repeats}, "
          "max_new_tokens=20, greedy")
    print(f"{'captioner':20s} {'batch 16 img/s':>14s} {'1 per call img/s':>16s} {'ratio':>7s} {'differ':>7s}")
    for model, b, s, differ in results:
        print(f"{model:20s} {b:14.1f} {s:16.1f} {b / s:6.2f}x {differ:7d}")
    bench_reads(root)


if __name__ == "__main__":
    main()
