"""`clipvip demo --out DIR`: the embedded default end to end (what `make run` runs).

Synthetic HD-VILA-format data -> `prepare` (decode tasks + tiny captioner actor) -> `recaption`
(a second caption set) -> `pack` (the training view of that set) -> `pretrain` CLIP-ViP (2 Ray Train workers, DeepSpeed ZeRO-1 on gloo,
MLflow on sqlite) -> `finetune` from its weights both CLIP-ViP and the CLIP4Clip mean-pooling
baseline on the synthetic retrieval train split (validated on its val split) ->
`evaluate` both on the test split, whose clip pairs differ only in frame order. Every stage runs
through the same library calls as its `clipvip` command, with the tiny recipes in
jobs/configs/; everything stays under DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from jobs.common import init_ray
from pipeline.eval.metrics import ORDER_KEY
from pipeline.config import (ConfigError, PackJobConfig, PrepareJobConfig, PretrainJobConfig, RecaptionJobConfig,
                             load_config)

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
MODELS = ("clip-vip", "meanpool-baseline")
BASELINE = ["model.add_cls_num=0", "model.use_temporal_embed=false", "model.video_pooling=mean"]
# Both fine-tunes start from the one CLIP-ViP pretrain: the baseline takes its CLIP weights (towers,
# projections, temperature) and leaves the proxy tokens and temporal embedding behind, so the two
# differ only in the video path. A second pretrain of the baseline cost a minute of Ray Train
# start-up for 4 steps of a barely-trained tiny model.
BASELINE_START = ["model.pretrained_clip_only=true"]


def _recipe(cls: type, name: str, overrides: list[str]):
    return load_config(cls, os.path.join(CONFIGS, name), overrides)


QUICK_SAMPLE = dict(num_videos=4, max_duration_s=12.0, num_retrieval=8, num_retrieval_train=16, num_retrieval_val=8)
# The two fine-tunes (the demo's longest stage) run side by side, one worker each: on 2 cores two
# single-core workers keep both cores busy without a gradient all-reduce per step, where two
# 2-worker runs in a row spend a third of each step synchronising (measured: 216 s against ~340 s
# for both). Same global batch (64) as the recipe's 2 x 32. Runs side by side save nothing when
# their time is CPU-bound start-up (two 4-step pretrains: 141 s against 139 s in turn).
FINETUNE_SIDE_BY_SIDE = ["train.num_workers=1", "train.micro_batch_size=64"]
QUICK = {"pretrain": ["train.max_steps=2", "train.checkpoint_every_steps=2", "train.val_every_steps=1"],
         "finetune": ["train.max_steps=4", "train.checkpoint_every_steps=4", "train.val_every_steps=2",
                      "train.micro_batch_size=4"]}


def build_configs(out: str, sample, quick: bool = False, seed: int = 0, finetune_sets: tuple[str, ...] = (),
                  tag: str = "") -> dict:
    """Every stage's config: the tiny recipes with their paths pointed under `out`, and `seed` as
    every training run's train.seed (init, batch order, frame jitter). `finetune_sets` go to both
    fine-tunes last; `tag` ends the fine-tune and evaluate run names (bench/demo_robustness.py runs
    several such cells from one pretrain)."""
    from pipeline.config import EvaluateJobConfig, FinetuneJobConfig  # noqa: PLC0415

    root, runs = os.path.join(out, "dataset"), os.path.join(out, "runs")
    mlflow = f"tracking.tracking_uri=sqlite:///{os.path.join(out, 'mlflow.db')}"
    ret = os.path.dirname(sample.retrieval_jsonl)
    prep = _recipe(PrepareJobConfig, "tiny.yaml", [
        f"root={root}", f"data.metadata={sample.metadata_path}", f"data.video_root={sample.video_root}",
        f"data.subtitles={sample.subtitles_table}", mlflow])
    recap = _recipe(RecaptionJobConfig, "tiny_recaption.yaml", [f"root={root}", mlflow])
    pack = _recipe(PackJobConfig, "tiny_pack.yaml", [f"root={root}", f"view.name={recap.caption.set_name}",
                                                      f"view.caption_set={recap.caption.set_name}", mlflow])
    cfgs = {"prepare": prep, "recaption": recap, "pack": pack}
    cfgs["pretrain/clip-vip"] = _recipe(PretrainJobConfig, "tiny_pretrain.yaml", [
        "run_name=demo-pretrain-clip-vip", f"train.seed={seed}", f"root={root}", f"train.view={pack.view.name}",
        f"train.storage_path={runs}", mlflow, f"val.annotations={ret}/val.jsonl", f"val.video_root={ret}/videos",
        f"val.order_pairs={ret}/val_pairs.json",
        *(QUICK["pretrain"] if quick else [])])
    for name, extra in (("clip-vip", []), ("meanpool-baseline", BASELINE + BASELINE_START)):
        cfgs[f"finetune/{name}"] = _recipe(FinetuneJobConfig, "tiny_finetune.yaml", [
            f"run_name=demo-finetune-{name}{tag}", f"train.seed={seed}",
            f"model.pretrained={runs}/demo-pretrain-clip-vip-export",
            f"train.storage_path={runs}", mlflow, f"data.train.annotations={ret}/train.jsonl",
            f"data.train.video_root={ret}/videos", f"data.val.annotations={ret}/val.jsonl",
            f"data.val.video_root={ret}/videos", f"data.val.order_pairs={ret}/val_pairs.json",
            f"data.batch_groups={ret}/train_pairs.json", *FINETUNE_SIDE_BY_SIDE,
            *extra, *(QUICK["finetune"] if quick else []), *finetune_sets])
    cfgs["evaluate"] = _recipe(EvaluateJobConfig, "tiny_evaluate.yaml", [
        f"run_name=demo-evaluate{tag}", f"eval.data.annotations={ret}/test.jsonl", f"eval.data.video_root={ret}/videos",
        f"eval.data.order_pairs={ret}/test_pairs.json",
        # The final weights of each fine-tune, not the val-selected ones: with 64 val clips, val R@1
        # is too noisy to pick the step. In side runs (global batch 32) its best came at step 1,200
        # of 2,400, before the temporal path had learned frame order (64% of test pairs right there,
        # 95% at the end).
        f"eval.models.0.weights={runs}/demo-finetune-clip-vip{tag}-export",
        f"eval.models.1.weights={runs}/demo-finetune-meanpool-baseline{tag}-export",
        f"eval.out={os.path.join(out, 'eval')}", mlflow])
    return cfgs


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clipvip demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/demo", help="where sample data and outputs go")
    parser.add_argument("--seed", type=int, default=0,
                        help="the sample data's seed and every training run's train.seed")
    parser.add_argument("--quick", action="store_true",
                        help="smaller data and a few steps per stage: checks the wiring, not the numbers (tests)")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    t0 = time.perf_counter()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # else each report waits 2 s
    from pipeline.data.synthetic import make_sample_dataset  # noqa: PLC0415

    sample_dir = os.path.join(out, "sample")
    print(f"[demo] 1/7 synthetic HD-VILA-format data + retrieval splits -> {sample_dir}", flush=True)
    from pipeline.data.synthetic import SampleDataSpec  # noqa: PLC0415

    spec = SampleDataSpec(**QUICK_SAMPLE) if args.quick else SampleDataSpec()
    sample = make_sample_dataset(sample_dir, seed=args.seed, spec=spec)
    sample_s = time.perf_counter() - t0
    print(f"[demo]     {sample.num_videos} videos, {sample.num_clips} clips; retrieval test {sample.num_retrieval} "
          "clips (pairs differing only in frame order)", flush=True)
    try:
        cfgs = build_configs(out, sample, quick=args.quick, seed=args.seed)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    report = run_stages(cfgs)
    report["stage_s"] = {"sample-data": sample_s, **report["stage_s"]}
    report["took_s"] = time.perf_counter() - t0
    print(render(report, cfgs), flush=True)
    with open(os.path.join(out, "demo_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    return 0 if report["ok"] else 1


class _Laps:
    """Wall time per stage into report["stage_s"]."""

    def __init__(self, report: dict) -> None:
        self.report, self.clock = report, time.perf_counter()
        report.setdefault("stage_s", {})

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.report["stage_s"][stage] = self.report["stage_s"].get(stage, 0.0) + now - self.clock
        self.clock = now


def run_stages(cfgs: dict) -> dict:
    """Every stage after the sample data, on a local Ray started here; the report dict."""
    report: dict = {"ok": True, "pretrain": {}, "finetune": {}, "stage_s": {}}
    lap = _Laps(report)
    init_ray(cfgs["pretrain/clip-vip"].ray)
    lap("ray-start")
    data_and_pretrain(cfgs, report, lap)
    finetune_and_evaluate(cfgs, report, lap)
    return report


def data_and_pretrain(cfgs: dict, report: dict, lap=None) -> None:
    """prepare, recaption, pack and the CLIP-ViP pretrain (Ray initialised); fills `report`."""
    from pipeline.data.build import run_prepare  # noqa: PLC0415
    from pipeline.data.pack_job import run_pack  # noqa: PLC0415
    from pipeline.data.recaption import run_recaption  # noqa: PLC0415
    from pipeline.train.run import run_pretrain  # noqa: PLC0415

    lap = lap or _Laps(report)
    report.setdefault("pretrain", {})
    print(f"[demo] 2/7 prepare -> {cfgs['prepare'].root}", flush=True)
    prep = run_prepare(cfgs["prepare"])
    print(prep.render(), flush=True)
    lap("prepare")
    report["prepare"] = {"clips": prep.clips_ok, "quarantined": prep.clips_quarantined, "captions": prep.captions_ok,
                         "caption_set": cfgs["prepare"].caption.set_name, "root": cfgs["prepare"].root}
    print(f"[demo] 3/7 recaption -> caption set {cfgs['recaption'].caption.set_name!r}", flush=True)
    recap = run_recaption(cfgs["recaption"])
    print(recap.render(), flush=True)
    lap("recaption")
    report["recaption"] = {"caption_set": recap.caption_set, "captioned": recap.captioned, "failed": recap.failed}
    print(f"[demo] 4/7 pack -> training view {cfgs['pack'].view.name!r} (frames at "
          f"{cfgs['pack'].view.image_size_px} px, row groups of {cfgs['pack'].view.rows_per_group} shards)", flush=True)
    packed = run_pack(cfgs["pack"])
    print(packed.render(), flush=True)
    lap("pack")
    report["pack"] = {"view": packed.view, "rows": packed.rows, "videos_per_group": packed.videos_per_group}
    cfg = cfgs["pretrain/clip-vip"]
    print(f"[demo] 5/7 pretrain clip-vip (tiny, 2 workers, DeepSpeed ZeRO-{cfg.train.zero_stage}, MLflow)", flush=True)
    run = run_pretrain(cfg)
    uri, m = run.cfg.tracking.tracking_uri, run.result.metrics or {}
    report["pretrain"]["clip-vip"] = {
        "steps": run.steps, "mlflow_run": run.mlflow_run_id,
        "final_loss": _last_metric(uri, run.mlflow_run_id, "train/loss"),
        "zero_shot_val_t2v_R1": _last_metric(uri, run.mlflow_run_id, "val/t2v/R1"),
        **{k: m.get(k) for k in ("samples_per_s", "samples_per_s_per_worker", "tflops_per_worker", "mfu")}}
    lap("pretrain")


def finetune_and_evaluate(cfgs: dict, report: dict, lap=None, side_by_side: bool = True) -> None:
    """Both fine-tunes side by side (or in turn), then the test evaluation of both (Ray initialised);
    fills `report`."""
    from pipeline.eval.evaluate import resolve_paths, run_evaluate  # noqa: PLC0415
    from pipeline.train.run import run_finetune  # noqa: PLC0415

    lap = lap or _Laps(report)
    report.setdefault("finetune", {})
    ft_cfgs = {name: cfgs[f"finetune/{name}"] for name in MODELS}
    print(f"[demo] 6/7 finetune {' and '.join(MODELS)} from the CLIP-ViP pretrain, side by side, on the retrieval "
          f"train split (runs {', '.join(c.run_name for c in ft_cfgs.values())})", flush=True)
    runs = (_side_by_side(lambda name: run_finetune(ft_cfgs[name]), MODELS) if side_by_side
            else {name: run_finetune(ft_cfgs[name]) for name in MODELS})
    for name, run in runs.items():
        uri = run.cfg.tracking.tracking_uri
        report["finetune"][name] = {"steps": run.steps, "mlflow_run": run.mlflow_run_id,
                                    "final_loss": _last_metric(uri, run.mlflow_run_id, "train/loss"),
                                    "val_t2v_R1": _last_metric(uri, run.mlflow_run_id, "val/t2v/R1"),
                                    "val_order_aware": _last_metric(uri, run.mlflow_run_id, f"val/{ORDER_KEY}"),
                                    # When the temporal path learned frame order (bench/demo_robustness.py)
                                    "val_order_aware_by_step": _by_step(uri, run.mlflow_run_id, f"val/{ORDER_KEY}")}
    lap("finetune")
    print("[demo] 7/7 evaluate on the test split: CLIP-ViP vs mean pooling", flush=True)
    summary = run_evaluate(resolve_paths(cfgs["evaluate"]))
    print(summary.render(), flush=True)
    report["evaluate"] = {"results": summary.results, "chance": summary.chance(), "num": summary.num_evaluated,
                          "out": summary.out_dir, "mlflow_run": summary.mlflow_run_id}
    lap("evaluate")


def _side_by_side(fn, names: tuple[str, ...]) -> dict:
    """{name: fn(name)}, all at once, one driver thread each (Ray Train's fit() blocks its caller).
    The first failure is raised once every run has ended."""
    with ThreadPoolExecutor(len(names), thread_name_prefix="demo-run") as pool:
        futures = {name: pool.submit(fn, name) for name in names}
    return {name: future.result() for name, future in futures.items()}


def _last_metric(uri: str, run_id: str | None, key: str) -> float | None:
    return _history(uri, run_id, key)[-1] if _history(uri, run_id, key) else None


def _history(uri: str, run_id: str | None, key: str) -> list[float]:
    return list(_by_step(uri, run_id, key).values())


def _by_step(uri: str, run_id: str | None, key: str) -> dict[int, float]:
    if not run_id:
        return {}
    from pipeline.tracking import metric_history  # noqa: PLC0415

    return {step: value for step, (value, _) in sorted(metric_history(uri, run_id, key).items())}


def render(report: dict, cfgs: dict) -> str:
    ev = report["evaluate"]
    vip, base = ev["results"]["clip-vip"], ev["results"]["meanpool-baseline"]
    uri = cfgs["pretrain/clip-vip"].tracking.tracking_uri
    p, ft = report["prepare"], report["finetune"]
    lines = [
        "demo report",
        f"  data            {p['clips']} clips prepared ({p['quarantined']} quarantined), {p['captions']} captions "
        f"in {p['caption_set']!r}, {report['recaption']['captioned']} in {report['recaption']['caption_set']!r}",
        *([f"  view            {report['pack']['view']!r}: {report['pack']['rows']} clips, "
           f"{report['pack']['videos_per_group']:.2f} videos a row group"] if "pack" in report else []),
        *(f"  pretrain        {n}: {r['steps']} steps, final loss {_fmt(r['final_loss'])}, zero-shot val t2v R@1 "
          f"{_fmt(r.get('zero_shot_val_t2v_R1'))} (last)" for n, r in report["pretrain"].items()),
        *(f"  throughput      {_fmt(r.get('samples_per_s'))} clips/s, {_fmt(r.get('samples_per_s_per_worker'))} per "
          f"worker, {_fmt(r.get('tflops_per_worker'))} model TFLOP/s per worker, MFU "
          + (f"{r['mfu']:.1%}" if r.get("mfu") is not None else "- (no known peak for a CPU; train.peak_tflops)")
          for r in report["pretrain"].values()),
        *(f"  finetune        {n}: {r['steps']} steps, final loss {_fmt(r['final_loss'])}, val t2v R@1 "
          f"{_fmt(r.get('val_t2v_R1'))}, val order-aware {_pct(r.get('val_order_aware'))} (final weights: what is "
          "tested)" for n, r in ft.items()),
        f"  test t2v R@1    CLIP-ViP {vip['t2v/R1']:.1f} | mean-pooling baseline {base['t2v/R1']:.1f} | chance "
        f"{ev['chance']['t2v/R1']:.1f} ({ev['num']} clips in pairs that differ only in frame order)",
        f"  order-aware     CLIP-ViP {_pct(vip.get(ORDER_KEY))} | mean-pooling baseline {_pct(base.get(ORDER_KEY))} | "
        "order-blind 50% (test pairs ranked the right way round)",
        f"  dataset root    {p['root']}",
        f"  checkpoints     {cfgs['pretrain/clip-vip'].train.storage_path}",
        f"  results         {ev['out']}/results.json",
        f"  MLflow          mlflow ui --backend-store-uri {uri}   (experiment "
        f"{cfgs['pretrain/clip-vip'].tracking.experiment!r})",
        "  MLflow runs     " + "; ".join(
            f"{stage} " + ", ".join(f"{n} {r['mlflow_run']}" for n, r in report[stage].items())
            for stage in ("pretrain", "finetune")) + f"; evaluate {ev['mlflow_run']}",
        f"  took            {report['took_s']:.0f} s ("
        + ", ".join(f"{k} {v:.0f}" for k, v in report.get("stage_s", {}).items()) + ")",
    ]
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}%"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"
