"""Training ingest at the recipe's shapes: the view loader against the shard loader it replaced.

Run:  cd /work/main && .venv/bin/python bench/ingest.py [--quick]

Corpus: 2,000 frame shards of 512 clips, each shard whole videos of 31 clips (HD-VILA-100M:
31 clips a video on average); world 32, micro batch 32 (global batch 1024, hdvila_b32.yaml).
Everything in one process, side by side:
  same-video pairs   pairs of clips of one video in a global batch, mean over the epoch's first
                     batches, against the uniform sampler's expectation over the same corpus;
                     before: the shard loader's order (block shuffle of 4-shard windows, contiguous
                     rank chunks; `bench/ingest_baseline.py`); after: `pack`'s task plan
                     (`pack.plan_tasks`' grouping, `pack.interleave`) and `view_order.order_entries`.
  bytes read / used  row-group bytes fetched per row-group byte used. Before: the shard reader's
                     LRU of 32 row groups (frame and caption parts share it) replayed over each
                     rank's plan. After: the real `ViewReader` of each of the 32 ranks over a real
                     view written with the same layout and small payloads (the row-group ratio does
                     not depend on payload size); footers are counted apart and projected to real
                     row-group sizes.
  reads at open      object reads of `DatasetIndex.open` (before) and `ViewIndex.open` (after).
  transform          clips/s on one core of the training transform (12 jittered frames + middle):
                     before, the shard loader's (`ingest_baseline.transform_clip`: PIL decode and
                     resize, channels-first copies) on 426x240 q90 JPEGs as `prepare` stores them;
                     after, `sampling.transform_clip` on the same frames resized by `pack` to 224
                     q95 (libjpeg-turbo straight into the batch, channels-last, no resize); the
                     before transform on the packed frames shows what the view alone gives.
  ingest vs training loader cores per GPU (the recipes' node shape) x transform rate, against the
                     clips/s a GPU consumes at the plan's assumed MFU (pipeline/plan.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import ingest_baseline as before  # noqa: E402
from pipeline.data.pack import interleave  # noqa: E402
from pipeline.data.sampling import ShardLayout  # noqa: E402
from pipeline.data.view_order import ViewLayout, order_entries, rank_positions  # noqa: E402

SHARDS, ROWS, CLIPS_PER_VIDEO = 2000, 512, 31
WORLD, MICRO = 32, 32
GLOBAL = WORLD * MICRO
GROUP, VIEW_SHARD = 32, 1024
SEED = 42


def video_of_shard_rows(rows: int = ROWS) -> np.ndarray:
    """Video index within a shard of each row: whole videos of 31 clips, the last one shorter."""
    return np.arange(rows) // CLIPS_PER_VIDEO


def videos_per_shard() -> int:
    return -(-ROWS // CLIPS_PER_VIDEO)


def uniform_pairs() -> float:
    """E[same-video pairs] in G clips drawn uniformly without replacement from the corpus."""
    sizes = np.bincount(video_of_shard_rows())
    n = SHARDS * ROWS
    same = SHARDS * float(np.sum(sizes * (sizes - 1)))
    return GLOBAL * (GLOBAL - 1) / 2 * same / (n * (n - 1))


def pairs(video_ids: np.ndarray) -> int:
    return sum(c * (c - 1) // 2 for c in Counter(video_ids.tolist()).values())


def before_pairs(batches: int) -> float:
    lay = ShardLayout(shard_ids=np.arange(SHARDS), num_rows=np.full(SHARDS, ROWS))
    order = before.epoch_order(lay, SEED, 0, WORLD, MICRO, window_shards=4)
    vid = order[:, 0] * videos_per_shard() + video_of_shard_rows()[order[:, 1]]
    return float(np.mean([pairs(vid[b * GLOBAL:(b + 1) * GLOBAL]) for b in range(batches)]))


def view_plan() -> tuple[ViewLayout, list[np.ndarray]]:
    """The view `pack` makes of this corpus: its layout, and each view shard's rows' video ids."""
    shard_videos = []
    for t0 in range(0, SHARDS, GROUP):
        shards = list(range(t0, min(t0 + GROUP, SHARDS)))
        order = interleave([ROWS] * len(shards))
        vid = (np.array(shards)[order[:, 0]] * videos_per_shard() + video_of_shard_rows()[order[:, 1]])
        shard_videos += [vid[i:i + VIEW_SHARD] for i in range(0, len(vid), VIEW_SHARD)]
    return ViewLayout(np.array([len(v) for v in shard_videos]), GROUP), shard_videos


def after_pairs(layout: ViewLayout, shard_videos: list[np.ndarray], batches: int) -> float:
    out = []
    for b in range(batches):
        e = order_entries(layout, SEED, 0, np.arange(b * GLOBAL, (b + 1) * GLOBAL))
        out.append(pairs(np.array([shard_videos[s][g * GROUP + r] for s, g, r in e.tolist()])))
    return float(np.mean(out))


def before_overread(steps: int) -> float:
    """Rows of row groups read per row used: the shard reader's LRU (32 row groups, frame and caption
    parts each a key) replayed over every rank's first `steps` steps."""
    lay = ShardLayout(shard_ids=np.arange(SHARDS), num_rows=np.full(SHARDS, ROWS))
    read = used = 0
    for rank in range(WORLD):
        plan = before.rank_plan(lay, SEED, 0, rank, WORLD, MICRO, 0, window_shards=4)[:steps * MICRO]
        lru: dict[tuple, None] = {}
        for s, r in plan.tolist():
            for part in ("frames", "captions"):
                key = (part, s, r // 32)
                if key in lru:
                    lru[key] = lru.pop(key)
                else:
                    lru[key] = None
                    read += 32
                    if len(lru) > 32:
                        lru.pop(next(iter(lru)))
            used += 2
    return read / used


def write_view(layout: ViewLayout, shard_videos: list[np.ndarray], out: str) -> str:
    """A real view of this layout on disk (small payloads), written as `pack` writes one."""
    from pipeline.config import ViewConfig
    from pipeline.data import view as views
    from pipeline.data.pack import piece_bytes
    from pipeline.data.root import DatasetRoot
    from pipeline.utils import fs

    root = DatasetRoot(out)
    cfg = ViewConfig(name="bench", rows_per_group=GROUP, rows_per_shard=VIEW_SHARD)
    sides = []
    payload = bytes(range(256)) * 4
    for i, vids in enumerate(shard_videos):
        rows = [{"clip_id": f"c{i}-{j}", "video_id": f"v{v}", "subtitle": "s", "caption": "c", "frames": [payload],
                 "middle_frame": payload} for j, v in enumerate(vids.tolist())]
        data = piece_bytes(rows, cfg)
        name = f"t{i:05d}-000"
        fs.write_bytes_atomic(root.view_shard_uri("bench", name), data)
        sides.append({"shard": name, "rows": len(rows), "row_groups": -(-len(rows) // GROUP), "videos": 0,
                      "bytes": len(data), "footer_bytes": int.from_bytes(data[-8:-4], "little") + 8, "sha256": "",
                      "clip_ids_sha256": ""})
    meta = {"name": "bench", "status": "in_progress", "settings": {"caption_set": "x", "image_size_px": 224,
                                                                    "rows_per_group": GROUP}}
    views.finish_view(root, meta, sides, len(sides), 0.0)
    return out


def after_overread(root: str, steps: int) -> dict[str, float]:
    from pipeline.data.loader import ViewIndex, ViewReader

    index = ViewIndex.open(root, "bench")
    readers = [ViewReader(index) for _ in range(WORLD)]
    for step in range(steps):
        for rank, reader in enumerate(readers):
            reader.rows(order_entries(index.layout, SEED, 0, rank_positions(step, rank, WORLD, GLOBAL)))
    fetched = sum(r.bytes_fetched - r.footer_bytes for r in readers)
    used = sum(r.bytes_used for r in readers)
    return {"rg_ratio": fetched / used, "rg_requests": sum(r.requests - r.footer_requests for r in readers),
            "footer_requests": sum(r.footer_requests for r in readers),
            "footer_bytes_mean": sum(r.footer_bytes for r in readers) / max(1, sum(r.footer_requests for r in readers)),
            "steps": steps}


def reads_at_open(view_root: str) -> tuple[int, int]:
    """Object reads of DatasetIndex.open (an index-only root stand-in) and ViewIndex.open."""
    from bench.plan import write_corpus_index
    from pipeline.data.dataset_index import DatasetIndex
    from pipeline.data.loader import ViewIndex
    from pipeline.utils import fs

    calls = []
    real = fs.read_bytes

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    with tempfile.TemporaryDirectory() as d:
        write_corpus_index(d, parts=2, clips=SHARDS * ROWS, clips_per_shard=ROWS)
        fs.read_bytes = counting
        try:
            DatasetIndex.open(d, "blip_large")
            old = len(calls)
            calls.clear()
            ViewIndex.open(view_root, "bench")
            new = len(calls)
        finally:
            fs.read_bytes = real
    return old, new


def transform_rates(clips: int) -> tuple[float, float, float, float]:
    """Clips/s on one core: (before on stored frames, before on packed frames, after on packed, after
    on frames packed at view.jpeg_quality 90)."""
    import torch

    from bench.gpu_data import make_jpegs
    from pipeline.data.pack import resize_jpeg
    from pipeline.data.sampling import jitter_rng, transform_clip

    torch.set_num_threads(1)
    stored = make_jpegs(32, seed=2)
    packed = [resize_jpeg(f, 224, 95) for f in stored]
    packed90 = [resize_jpeg(f, 224, 90) for f in stored]
    frames_out, middle_out = np.empty((12, 224, 224, 3), np.uint8), np.empty((224, 224, 3), np.uint8)
    runs = ((before.transform_clip, stored), (before.transform_clip, packed),
            (lambda f, m, t, px, rng: transform_clip(f, m, t, px, True, rng, frames_out, middle_out), packed))
    runs += ((runs[-1][0], packed90),)
    rates = []
    for fn, frames in runs:
        fn(frames, frames[16], 12, 224, jitter_rng(0, 0, 0))
        t0 = time.process_time()
        for i in range(clips):
            fn(frames, frames[16], 12, 224, jitter_rng(0, 0, i))
        rates.append(clips / (time.process_time() - t0))
    return rates[0], rates[1], rates[2], rates[3]


def pack_rate(clips: int) -> float:
    """Clips/s on one core of `pack`'s resize: 32 frames + middle decoded, resized to 224, re-encoded."""
    from bench.gpu_data import make_jpegs
    from pipeline.data.pack import resize_jpeg

    stored = make_jpegs(33, seed=3)
    t0 = time.process_time()
    for _ in range(clips):
        for f in stored:
            resize_jpeg(f, 224, 95)
    return clips / (time.process_time() - t0)


def consumption() -> dict[str, float]:
    """Clips/s one GPU trains at the plan's assumed MFU (B/32, B/16 at 12 frames, text 70)."""
    from pipeline.plan import ASSUMED_MFU, ASSUMED_PEAK_TFLOPS

    tflop = {"b32": 0.37, "b16": 1.40}  # pipeline/model/flops.py, README "GPU check"
    return {k: ASSUMED_PEAK_TFLOPS * ASSUMED_MFU / v for k, v in tflop.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer batches and clips (< 1 min)")
    args = ap.parse_args(argv)
    batches, steps, clips = (20, 4, 40) if args.quick else (100, 16, 200)
    t0 = time.perf_counter()
    layout, shard_videos = view_plan()
    uni = uniform_pairs()
    old_p, new_p = before_pairs(batches), after_pairs(layout, shard_videos, batches)
    print(f"corpus: {SHARDS} shards x {ROWS} clips, videos of {CLIPS_PER_VIDEO}; world {WORLD} x micro {MICRO} = "
          f"{GLOBAL}; view: {len(shard_videos)} shards, row groups of {GROUP}")
    print(f"same-video pairs / global batch (mean of {batches}): before {old_p:.2f} | after {new_p:.2f} | "
          f"uniform {uni:.2f}  -> after/uniform {new_p / uni:.2f}x (target <= 2x), before/uniform {old_p / uni:.0f}x")
    old_r = before_overread(steps)
    with tempfile.TemporaryDirectory() as d:
        write_view(layout, shard_videos, d)
        new_r = after_overread(d, steps)
        opened = reads_at_open(d)
    real_rg = GROUP * 32 * 19.4 * 1024  # 32 frames of 224 px q95 (~19.4 KiB) a clip
    print(f"row-group bytes read / used ({steps} steps x {WORLD} ranks): before {old_r:.1f}x | after "
          f"{new_r['rg_ratio']:.2f}x (target <= 1.3x); after: {new_r['rg_requests']} row-group GETs, "
          f"{new_r['footer_requests']} footer GETs of {new_r['footer_bytes_mean'] / 1024:.1f} KiB "
          f"(+{new_r['footer_requests'] * new_r['footer_bytes_mean'] / (new_r['rg_requests'] * real_rg):.2%} "
          f"bytes at real {real_rg / 2**20:.1f} MiB row groups)")
    print(f"object reads at open: before {opened[0]} | after {opened[1]}")
    t_old, t_view, t_new, t_q90 = transform_rates(clips)
    print(f"transform clips/s/core: before {t_old:.1f} | after {t_new:.1f} -> {t_new / t_old:.2f}x (target >= 2x); "
          f"the before transform on the view's frames: {t_view:.1f}; after on a view at jpeg_quality 90: {t_q90:.1f}")
    print(f"pack clips/s/core (32 frames + middle, 240p q90 -> 224 q95, once per view): {pack_rate(clips // 10):.1f}")
    cores = 64 / 8 - 2  # gpu node: 64 CPUs, 8 GPUs; train.cpus_per_worker 2
    for model, need in consumption().items():
        have = cores * t_new
        print(f"ingest vs training, {model}: {have:.0f} clips/s/GPU from {cores:.0f} loader cores against "
              f"{need:.0f} consumed -> {have / need:.2f}x (target >= 2x; before {cores * t_old / need:.2f}x; "
              f"a view at jpeg_quality 90: {cores * t_q90 / need:.2f}x)")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
