"""`clipvip demo --out DIR`: the embedded default end to end (what `make run` runs).

Synthetic HD-VILA-format data -> `prepare` (local Ray: decode tasks + tiny captioner actor) ->
`pretrain` (tiny CLIP-ViP, 2 Ray Train workers, DeepSpeed ZeRO-1 on gloo, MLflow on sqlite).
Everything stays under DIR. Later stages (recaption, evaluate) join here as they land.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from jobs.common import init_ray
from pipeline.config import ConfigError, PrepareJobConfig, PretrainJobConfig, load_config

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clipvip demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/demo", help="where sample data and outputs go")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    t0 = time.perf_counter()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # else each report waits 2 s

    from pipeline.data.synthetic import make_sample_dataset  # noqa: PLC0415

    sample_dir = os.path.join(out, "sample")
    print(f"[demo] 1/3 synthetic HD-VILA-format data -> {sample_dir}", flush=True)
    sample = make_sample_dataset(sample_dir, seed=args.seed)
    print(f"[demo]     {sample.num_videos} videos, {sample.num_clips} clips", flush=True)

    root = os.path.join(out, "dataset")
    try:
        prep = load_config(PrepareJobConfig, os.path.join(CONFIGS, "tiny.yaml"), [
            f"data.root={root}", f"data.metadata={sample.metadata_path}", f"data.video_root={sample.video_root}",
            f"data.subtitles={sample.subtitles_table}"])
        train = load_config(PretrainJobConfig, os.path.join(CONFIGS, "tiny_pretrain.yaml"), [
            f"train.dataset_root={root}", f"train.caption_set={prep.caption.set_name}",
            f"train.storage_path={os.path.join(out, 'runs')}",
            f"tracking.tracking_uri=sqlite:///{os.path.join(out, 'mlflow.db')}"])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from jobs.pretrain import absolutize, mlflow_run  # noqa: PLC0415
    from pipeline.data.build import run_prepare  # noqa: PLC0415
    from pipeline.train.launch import export_dir, make_trainer  # noqa: PLC0415

    print(f"[demo] 2/3 prepare -> {root}", flush=True)
    init_ray(train.ray)
    summary = run_prepare(prep)
    print(summary.render(), flush=True)

    print("[demo] 3/3 pretrain (tiny CLIP-ViP, 2 workers, DeepSpeed ZeRO-1, MLflow)", flush=True)
    train = absolutize(train)
    run_id = mlflow_run(train)
    result = make_trainer(train, run_id).fit()
    m = result.metrics or {}
    print("demo report")
    print(f"  clips           {summary.clips_ok} prepared ({summary.clips_quarantined} quarantined), "
          f"{summary.captions_ok} captions in set {prep.caption.set_name!r}")
    print(f"  training        {m.get('step')} steps, {m.get('samples_seen')} samples")
    print(f"  dataset root    {root}")
    print(f"  checkpoints     {result.checkpoint.path if result.checkpoint else None}")
    print(f"  final weights   {export_dir(train)}")
    print(f"  MLflow          run {run_id}: mlflow ui --backend-store-uri {train.tracking.tracking_uri}")
    print(f"  took            {time.perf_counter() - t0:.0f} s")
    return 0
