"""`run_evaluate`: one retrieval split, one or more models, metrics side by side (spec 5.1).

Driver side: read and check the split (local or s3://, through `storage`'s S3 options), encode it with every model on the Ray cluster
(`ray_encode.encode_split`: one decode, one actor pool), rank, write `results.json` + per-model
similarity matrices under `eval.out/<run_name>/`, log everything to one MLflow run, and return
a printable summary.
Exactly the N usable videos are ranked; videos that fail to decode are reported and left out
of both axes (their texts too), never padded or duplicated.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import absolute_tracking, local_path, to_dict
from pipeline.config import EvaluateJobConfig
from pipeline.eval.formats import eval_texts, order_pair_indices, read_items
from pipeline.eval.metrics import ORDER_KEY, chance_r_at_k, format_table, order_awareness, t2v_v2t
from pipeline.utils import fs


@dataclass
class EvalSummary:
    split: str
    num_items: int
    num_evaluated: int
    skipped: list[tuple[Any, str]] = field(default_factory=list)
    failed: dict[str, dict[str, str]] = field(default_factory=dict)
    """model -> clip_id -> decode error."""
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    """model (and "<model>+dsl") -> metric -> value."""
    out_dir: str = ""
    mlflow_run_id: str | None = None
    wall_s: float = 0.0

    def chance(self) -> dict[str, float]:
        n = max(self.num_evaluated, 1)
        out = {"t2v/R1": chance_r_at_k(n, 1), "t2v/R5": chance_r_at_k(n, 5), "t2v/R10": chance_r_at_k(n, 10),
               "t2v/MdR": (n + 1) / 2, "t2v/MnR": (n + 1) / 2, "v2t/R1": chance_r_at_k(n, 1)}
        if any(ORDER_KEY in r for r in self.results.values()):
            out[ORDER_KEY] = 50.0  # a random (or order-blind) ranking of each pair
        return out

    def render(self) -> str:
        lines = [f"[evaluate] {self.split}: {self.num_evaluated} of {self.num_items} videos ranked "
                 f"({len(self.skipped)} annotation rows skipped) in {self.wall_s:.0f} s"]
        lines += [f"  skipped {where}: {why}" for where, why in self.skipped[:10]]
        for name, bad in self.failed.items():
            lines += [f"  {name}: undecodable {cid}: {why}" for cid, why in list(bad.items())[:10]]
        lines.append(format_table({**self.results, "chance": self.chance()}))
        lines.append(f"  results: {fs.join(self.out_dir, 'results.json')}")
        if self.mlflow_run_id:
            lines.append(f"  MLflow run: {self.mlflow_run_id}")
        return "\n".join(lines)


def resolve_paths(cfg: EvaluateJobConfig) -> EvaluateJobConfig:
    """Local paths made absolute against the caller's cwd (Ray workers run in another)."""
    e = cfg.eval
    data = dataclasses.replace(e.data, annotations=local_path(e.data.annotations),
                               video_root=local_path(e.data.video_root), order_pairs=local_path(e.data.order_pairs))
    models = tuple(dataclasses.replace(m, weights=local_path(m.weights)) for m in e.models)
    out = e.out if "://" in e.out else os.path.abspath(e.out)
    return dataclasses.replace(cfg, eval=dataclasses.replace(e, data=data, models=models, out=out),
                               tracking=absolute_tracking(cfg.tracking))


def run_evaluate(cfg: EvaluateJobConfig, log: Any = print) -> EvalSummary:
    """Evaluate every model of `cfg.eval.models` on `cfg.eval.data` (Ray must be initialised)."""
    from pipeline.eval.ray_encode import encode_split  # noqa: PLC0415

    t0 = time.perf_counter()
    e = cfg.eval
    opts = fs.S3Options.of(cfg.storage)
    items, skipped = read_items(e.data, opts)
    pairs = order_pair_indices(e.data, items, opts)
    texts = eval_texts(items)
    summary = EvalSummary(split=e.data.annotations, num_items=len(items), num_evaluated=len(items),
                          skipped=list(skipped), out_dir=fs.join(e.out, cfg.run_name))
    num_frames = e.data.resolved_num_frames()
    log(f"[evaluate] {len(items)} videos x {num_frames} frames at {e.image_size_px}px, "
        f"{len(e.models)} model(s): {', '.join(m.name for m in e.models)}")
    encoded = encode_split(items, texts, models=[(m.weights, m.model) for m in e.models],
                           video_format=e.data.video_format, num_frames=num_frames, size_px=e.image_size_px,
                           batch_size=e.batch_size, num_encoders=e.num_encoders,
                           encoder_gpus=e.encoder_gpus, decode_cpus=e.decode_cpus,
                           progress_bars=cfg.ray.progress_bars, opts=opts)
    log(f"[evaluate] encoded with {len(e.models)} model(s) in {time.perf_counter() - t0:.0f} s")
    for spec, enc in zip(e.models, encoded, strict=True):
        keep = np.array([i not in enc.failed for i in range(len(items))], dtype=bool)
        if enc.failed:
            summary.failed[spec.name] = {items[i].clip_id: why for i, why in enc.failed.items()}
        summary.num_evaluated = int(keep.sum())
        if summary.num_evaluated == 0:
            raise ValueError(f"{e.data.annotations}: no video could be decoded for model {spec.name}")
        sim_TV = enc.text_NP[keep].astype(np.float64) @ enc.video_NP[keep].astype(np.float64).T
        summary.results[spec.name] = t2v_v2t(sim_TV)
        position = np.cumsum(keep) - 1  # item index -> row of the kept matrix
        kept = [(position[i], position[j]) for i, j in pairs if keep[i] and keep[j]]
        if kept:
            summary.results[spec.name][ORDER_KEY] = order_awareness(sim_TV, kept)
        if e.dsl:
            summary.results[spec.name + "+dsl"] = t2v_v2t(sim_TV, use_dsl=True)
        _save_matrix(summary.out_dir, spec.name, sim_TV, [it.clip_id for it, k in zip(items, keep) if k], opts)
        log(f"[evaluate] {spec.name}: t2v R@1 {summary.results[spec.name]['t2v/R1']:.1f}"
            + (f", order-aware {summary.results[spec.name][ORDER_KEY]:.1f}% of {len(kept)} pairs" if kept else ""))
    summary.wall_s = time.perf_counter() - t0
    _write_results(summary, cfg, opts)
    summary.mlflow_run_id = _log_mlflow(summary, cfg)
    return summary


def _save_matrix(out_dir: str, name: str, sim_TV: np.ndarray, clip_ids: list[str], opts: fs.S3Options) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, sim_TV=sim_TV, clip_ids=np.array(clip_ids))
    fs.write_bytes_atomic(fs.join(out_dir, f"sim_{name}.npz"), buf.getvalue(), opts)


def _write_results(summary: EvalSummary, cfg: EvaluateJobConfig, opts: fs.S3Options) -> None:
    doc = {"run_name": cfg.run_name, "split": summary.split, "num_items": summary.num_items,
           "num_evaluated": summary.num_evaluated, "skipped": [[str(w), r] for w, r in summary.skipped],
           "failed": summary.failed, "results": summary.results, "chance": summary.chance(),
           "config": to_dict(cfg)}
    fs.write_bytes_atomic(fs.join(summary.out_dir, "results.json"),
                          (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), opts)


def _log_mlflow(summary: EvalSummary, cfg: EvaluateJobConfig) -> str | None:
    if not cfg.tracking.enabled:
        return None
    from pipeline.tracking import MlflowTracker, create_run  # noqa: PLC0415

    run_id = create_run(cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.run_name,
                        {"clipvip.job": "evaluate"})
    tracker = MlflowTracker(cfg.tracking.tracking_uri, run_id)
    tracker.log_params(to_dict(cfg))
    # MLflow keys allow [A-Za-z0-9_-. /]: "<model>+dsl" is logged as "<model>/dsl/...".
    metrics = {f"{name.replace('+dsl', '/dsl')}/{k}": v for name, res in summary.results.items() for k, v in res.items()}
    metrics.update({f"chance/{k}": v for k, v in summary.chance().items()})
    metrics["num_evaluated"] = float(summary.num_evaluated)
    tracker.log_metrics(metrics, step=0)
    tracker.log_dict({"results": summary.results, "failed": summary.failed}, "eval/results.json")
    tracker.close("FINISHED")
    return run_id
