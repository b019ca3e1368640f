"""The demo's closing report: every figure the issue asks for, read from the report dict."""

from __future__ import annotations

import os

from jobs.demo import CONFIGS, render
from pipeline.config import PretrainJobConfig, load_config


def test_report_names_numbers_places_runs_and_times():
    cfg = load_config(PretrainJobConfig, os.path.join(CONFIGS, "tiny_pretrain.yaml"),
                      ["tracking.tracking_uri=sqlite:////tmp/x/mlflow.db", "train.storage_path=/tmp/x/runs"])
    report = {
        "prepare": {"clips": 23, "quarantined": 1, "captions": 22, "caption_set": "tiny_blip", "root": "/tmp/x/dataset"},
        "recaption": {"caption_set": "tiny_git", "captioned": 22},
        "pretrain": {"clip-vip": {"steps": 4, "final_loss": 53.5, "mlflow_run": "p1", "zero_shot_val_t2v_R1": 12.5,
                                  "samples_per_s": 21.3, "samples_per_s_per_worker": 10.65,
                                  "tflops_per_worker": 0.00123, "mfu": None}},
        "finetune": {"clip-vip": {"steps": 1200, "final_loss": 0.988, "val_t2v_R1": 62.5, "mlflow_run": "f1",
                                  "val_order_aware": 90.625},
                     "meanpool-baseline": {"steps": 1200, "final_loss": 2.1, "val_t2v_R1": 37.5, "val_order_aware": 50.0,
                                           "mlflow_run": "f2"}},
        "evaluate": {"results": {"clip-vip": {"t2v/R1": 56.25, "order/aware": 87.5},
                                 "meanpool-baseline": {"t2v/R1": 43.75, "order/aware": 50.0}},
                     "chance": {"t2v/R1": 6.25}, "num": 16, "out": "/tmp/x/eval/demo-evaluate", "mlflow_run": "e1"},
        "took_s": 413.2, "stage_s": {"sample-data": 17.0, "pretrain": 117.4, "finetune": 207.0},
    }
    text = render(report, {"pretrain/clip-vip": cfg})
    for expected in ("23 clips prepared (1 quarantined), 22 captions in 'tiny_blip', 22 in 'tiny_git'",
                     "clip-vip: 4 steps, final loss 53.5, zero-shot val t2v R@1 12.5 (last)",
                     "throughput      21.3 clips/s, 10.7 per worker, 0.001 model TFLOP/s per worker, MFU - (no known "
                     "peak for a CPU; train.peak_tflops)",
                     "meanpool-baseline: 1200 steps, final loss 2.100, val t2v R@1 37.5, val order-aware 50.0% "
                     "(final weights: what is tested)",
                     "clip-vip: 1200 steps, final loss 0.988, val t2v R@1 62.5, val order-aware 90.6%",
                     "order-aware     CLIP-ViP 87.5% | mean-pooling baseline 50.0% | order-blind 50%",
                     "CLIP-ViP 56.2 | mean-pooling baseline 43.8 | chance 6.2 (16 clips",
                     "dataset root    /tmp/x/dataset", "checkpoints     /tmp/x/runs",
                     "mlflow ui --backend-store-uri sqlite:////tmp/x/mlflow.db",
                     "pretrain clip-vip p1; finetune clip-vip f1, meanpool-baseline f2; "
                     "evaluate e1", "took            413 s (sample-data 17, pretrain 117, finetune 207)"):
        assert expected in text, f"{expected!r} not in\n{text}"


def test_both_fine_tunes_start_from_the_one_clip_vip_pretrain(tmp_path):
    """The baseline takes the CLIP-ViP pretrain's CLIP weights through the worker's `build_model`."""
    import dataclasses
    from types import SimpleNamespace

    import torch

    from jobs.demo import build_configs
    from pipeline.model.clip_vip import CLIPViPModel, config_from_model_cfg
    from pipeline.train.session import build_model

    ret = tmp_path / "sample" / "retrieval"
    sample = SimpleNamespace(metadata_path=str(tmp_path / "m.jsonl"), video_root=str(tmp_path / "v"),
                             subtitles_table=str(tmp_path / "s"), retrieval_jsonl=str(ret / "test.jsonl"))
    cfgs = build_configs(str(tmp_path), sample)
    assert [k for k in cfgs if k.startswith("pretrain/")] == ["pretrain/clip-vip"]
    vip, base = cfgs["finetune/clip-vip"], cfgs["finetune/meanpool-baseline"]
    export = str(tmp_path / "runs" / "demo-pretrain-clip-vip-export")
    assert vip.model.pretrained == base.model.pretrained == export
    assert (vip.model.pretrained_clip_only, base.model.pretrained_clip_only) == (False, True)
    assert base.model.video_pooling == "mean"

    torch.manual_seed(0)
    CLIPViPModel(config_from_model_cfg(vip.model)).save_pretrained(export)
    saved = CLIPViPModel.from_pretrained(export).state_dict()
    for cfg in (vip, base):
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, warm_start=None))
        state = build_model(cfg).state_dict()
        for key, value in state.items():
            if "added_cls" not in key and "temporal_embedding" not in key:
                assert torch.equal(value, saved[key]), key
    assert build_model(base).config.add_cls_num == 0 and build_model(vip).config.add_cls_num == 3
