"""Planning benchmark: the prepare driver's memory and planning speed at 1M and 4M clips.

Run:  cd /work/main && .venv/bin/python bench/plan.py [--sizes 1000000,4000000] [--part-clips 1000000]

1. Writes (once, cached under .cache/bench/plan/) synthetic HD-VILA-format metadata: videos of 31
   clips with "HH:MM:SS.mmm" spans, cut into parts of --part-clips clips, and a clip_id -> text
   subtitle table (jsonl) of 32-word texts for every clip.
2. For each size, in a fresh child process (so its peak RSS is that size's alone): starts a local
   Ray instance (2 CPUs), then runs the prepare job's own planning on an empty root: `open_root`
   (list and stat the parts, settings) and `plan_inputs` (Ray tasks cut each part into units and
   write the plans, the subtitle table is joined to the units and written per unit, the driver
   reads back the unit descriptors), then builds the decode stage's input dataset from them as
   the job does (`unit_dataset`). Nothing is decoded.
3. Prints, side by side: clips, units, planning wall time, clips planned per second, the driver's
   peak RSS (ru_maxrss of the child: the driver process, Ray's workers are other processes), and
   the ratio of the two sizes' RSS. Targets (issue): <= 1 GiB at 4M clips, < 1.25x from 1M to 4M,
   >= 50K clips/s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
CACHE = os.path.join(ROOT, ".cache", "bench", "plan")
CLIPS_PER_VIDEO = 31
WORDS = ("a man is talking about the new phone and how it works in the kitchen while a dog runs "
         "around the table and the camera moves slowly to the left side of the room").split()


def _ts(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    return f"{h:02d}:{m:02d}:{rem // 1000:02d}.{rem % 1000:03d}"


def make_inputs(total_clips: int, part_clips: int) -> tuple[list[str], str]:
    """Metadata parts + subtitle table for `total_clips` clips (cached); returns (parts, table)."""
    d = os.path.join(CACHE, f"inputs-{total_clips}-{part_clips}")
    done = os.path.join(d, "done.json")
    if os.path.exists(done):
        return json.load(open(done))["parts"], os.path.join(d, "subtitles.jsonl")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(os.path.join(d, "videos"))
    rng = random.Random(total_clips)
    videos = total_clips // CLIPS_PER_VIDEO
    per_part = max(1, part_clips // CLIPS_PER_VIDEO)
    parts = []
    t0 = time.perf_counter()
    with open(os.path.join(d, "subtitles.jsonl"), "w") as subs:
        for p in range(0, videos, per_part):
            path = os.path.join(d, f"hdvila_part{p // per_part}.jsonl")
            parts.append(path)
            with open(path, "w") as meta:
                for v in range(p, min(p + per_part, videos)):
                    vid = f"v{v:010d}"
                    clips, t = [], rng.uniform(0, 5)
                    for c in range(CLIPS_PER_VIDEO):
                        length = rng.uniform(4, 20)
                        clips.append({"clip_id": f"{vid}.{c}.mp4", "span": [_ts(t), _ts(t + length)]})
                        subs.write(json.dumps({"clip_id": f"{vid}.{c}.mp4",
                                               "text": " ".join(rng.choices(WORDS, k=32))}) + "\n")
                        t += length + rng.uniform(0, 1)
                    meta.write(json.dumps({"video_id": vid, "url": f"https://www.youtube.com/watch?v={vid}",
                                           "clip": clips}) + "\n")
    with open(done, "w") as f:
        json.dump({"parts": parts}, f)
    print(f"[bench] wrote {videos * CLIPS_PER_VIDEO:,} clips in {len(parts)} parts in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return parts, os.path.join(d, "subtitles.jsonl")


def run_one(parts: list[str], table: str, work: str) -> dict:
    """In the child: the job's planning on an empty root; returns its measurements."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from pipeline.config import PrepareJobConfig, load_config
    from pipeline.data.inputs import open_root
    from pipeline.data.planning import plan_inputs

    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "videos"))
    cfg = load_config(PrepareJobConfig, None, [
        f"root={work}/root", f"data.metadata=[{','.join(parts)}]", f"data.video_root={work}/videos",
        f"data.subtitles={table}", "data.clips_per_shard=512", "ray.progress_bars=false"])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    inputs = open_root(cfg)
    from pipeline.utils import fs

    inputs.table["sha256"] = fs.sha256_of(table)
    plan = plan_inputs(inputs.root, inputs.parts, cfg.data.clips_per_shard, inputs.table, log=lambda *_: None)
    wall = time.perf_counter() - t0
    # What the driver then holds to run the stages: the decode stage's dataset of unit descriptors.
    from pipeline.data.build import unit_dataset

    t1 = time.perf_counter()
    ds = unit_dataset(plan.units, {p.name: p.uri for p in inputs.parts})
    dataset_s = time.perf_counter() - t1
    assert ds.count() == len(plan.units)
    out = {"clips": plan.clips, "units": len(plan.units), "parts": len(plan.parts), "plan_s": wall,
           "rss_after_ray_gib": rss0 / 2**20, "rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "subtitle_duplicates": plan.subtitle_duplicates, "table_issues": plan.table_issues,
           "steps_s": dict(plan.timings_s, unit_dataset=round(dataset_s, 2))}
    ray.shutdown()
    return out


def write_corpus_index(out: str, parts: int = 11, clips: int = 103_000_000, clips_per_shard: int = 512) -> None:
    """An index-only stand-in of a prepared and packed HD-VILA-100M root (manifest, caption_set.json,
    view.json and the shard and view indexes, no shard files), for `clipvip plan` of the pretrain
    recipes: planning reads nothing else. Numbers, not data: every shard holds `clips_per_shard` clips."""
    import pyarrow as pa

    from pipeline import schema
    from pipeline.config import CaptionConfig
    from pipeline.data.captions import set_fingerprint
    from pipeline.data.index import CAPTIONS_INDEX_SCHEMA, FRAMES_INDEX_SCHEMA, _to_bytes
    from pipeline.data.root import DatasetRoot
    from pipeline.utils import fs

    root = DatasetRoot(out)
    shards = clips // clips_per_shard
    per_part = -(-shards // parts)
    names = [f"hdvila_part{i}" for i in range(parts)]
    part_col = [names[i // per_part] for i in range(shards)]
    unit_col = [i % per_part for i in range(shards)]
    common = {"part": part_col, "unit": unit_col, "rows": [clips_per_shard] * shards, "bytes": [0] * shards,
              "sha256": [""] * shards, "clip_ids_sha256": [f"{i}" for i in range(shards)]}
    frames = pa.table(dict(common, videos=[17] * shards, clips=[clips_per_shard] * shards, quarantined=[0] * shards,
                           quarantined_by_stage=["{}"] * shards, frames=[0] * shards, min_clip_id=[None] * shards,
                           max_clip_id=[None] * shards)).select(FRAMES_INDEX_SCHEMA.names).cast(FRAMES_INDEX_SCHEMA)
    caps = pa.table(dict(common, captioned=[clips_per_shard] * shards, failed=[0] * shards, null_rows=[[]] * shards,
                         images=[0] * shards, bytes_read=[0] * shards, frame_captions=[0] * shards,
                         frame_captions_failed=[0] * shards, captioner=["{}"] * shards)
                    ).select(CAPTIONS_INDEX_SCHEMA.names).cast(CAPTIONS_INDEX_SCHEMA)
    fs.write_bytes_atomic(root.index_uri("frames"), _to_bytes(frames))
    fs.write_bytes_atomic(root.index_uri("captions-blip_large"), _to_bytes(caps))
    cap = CaptionConfig(set_name="blip_large")
    fs.write_json_atomic(root.caption_set_uri("blip_large"), {
        "schema_version": schema.SCHEMA_VERSION, "name": "blip_large", "status": "complete",
        "fingerprint": set_fingerprint(cap, "stand-in"), "frames_fingerprint": "stand-in", "config": cap.identity(),
        "counts": {"shards": shards}})
    # The view pretrain reads (hdvila_pack.yaml): 1024-row view shards, row groups of 32.
    view_shards = -(-clips // 1024)
    view_rows = [1024] * (view_shards - 1) + [clips - 1024 * (view_shards - 1)]
    views = pa.table({"shard": [f"t{i // 16:05d}-{i % 16:03d}" for i in range(view_shards)], "rows": view_rows,
                      "row_groups": [-(-r // 32) for r in view_rows], "videos": [1024] * view_shards,
                      "bytes": [0] * view_shards, "footer_bytes": [0] * view_shards, "sha256": [""] * view_shards,
                      "clip_ids_sha256": [""] * view_shards}).cast(schema.VIEW_INDEX_SCHEMA)
    fs.write_bytes_atomic(root.index_uri("view-blip_large_224"), _to_bytes(views))
    fs.write_json_atomic(root.view_uri("blip_large_224"), {
        "name": "blip_large_224", "status": "complete", "counts": {"shards": view_shards, "rows": clips},
        "settings": {"caption_set": "blip_large", "image_size_px": 224, "rows_per_group": 32, "rows_per_shard": 1024}})
    root.write_manifest({"schema_version": schema.SCHEMA_VERSION, "status": "complete", "fingerprint": "stand-in",
                         "settings": {}, "caption_sets": ["blip_large"], "views": ["blip_large_224"],
                         "parts": [{"name": n, "uri": f"{n}.jsonl", "units": min(per_part, shards - i * per_part),
                                    "issues": 0, "clips": 0, "videos": 0} for i, n in enumerate(names)]})
    print(f"[bench] index-only stand-in root of {shards:,} shards x {clips_per_shard} clips at {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000,4000000")
    ap.add_argument("--part-clips", type=int, default=1_000_000)
    ap.add_argument("--corpus-index", metavar="DIR", help="only write an index-only HD-VILA-100M stand-in root "
                    "(for `clipvip plan` of hdvila_b32/b16.yaml) and exit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.corpus_index:
        write_corpus_index(args.corpus_index)
        return 0
    if args.child:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(run_one(spec["parts"], spec["table"], spec["work"])), flush=True)
        return 0
    results = {}
    for size in [int(s) for s in args.sizes.split(",")]:
        parts, table = make_inputs(size, args.part_clips)
        spec = json.dumps({"parts": parts, "table": table, "work": os.path.join(CACHE, f"work-{size}")})
        proc = subprocess.run([sys.executable, __file__, "--child", spec], cwd=ROOT, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            return 1
        results[size] = json.loads(line[0][len("RESULT "):])
        r = results[size]
        print(f"[bench] {size:,} clips: {r['units']:,} units in {r['plan_s']:.1f} s ({r['steps_s']}), driver peak "
              f"RSS {r['rss_peak_gib']:.2f} GiB", flush=True)
    print(f"\nplanning on {os.cpu_count()} cores (Ray num_cpus=2), 512 clips a unit, 31 clips a video, "
          "32-word subtitle table joined")
    print(f"{'clips':>10} {'parts':>5} {'units':>7} {'plan s':>7} {'clips/s':>9} {'RSS after ray.init':>19} "
          f"{'driver peak RSS':>16}")
    for _size, r in results.items():
        print(f"{r['clips']:>10,} {r['parts']:>5} {r['units']:>7,} {r['plan_s']:>7.1f} {r['clips'] / r['plan_s']:>9,.0f} "
              f"{r['rss_after_ray_gib']:>17.2f} G {r['rss_peak_gib']:>14.2f} G")
    sizes = sorted(results)
    if len(sizes) >= 2:
        a, b = results[sizes[0]], results[sizes[-1]]
        print(f"driver peak RSS {sizes[-1]:,} / {sizes[0]:,} clips: {b['rss_peak_gib'] / a['rss_peak_gib']:.2f}x "
              f"(target < 1.25x); at {sizes[-1]:,}: {b['rss_peak_gib']:.2f} GiB (target <= 1 GiB); "
              f"{b['clips'] / b['plan_s']:,.0f} clips/s (target >= 50,000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
