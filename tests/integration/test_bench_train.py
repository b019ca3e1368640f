"""`bench/train.py` measures the pretrain worker's own step loop (`steps.run_steps`) in-process; nothing else runs
the benchmark, so this drives that measurement for a few steps on a tiny model: a change to the
loop's signature or its logged metrics must not leave the README's benchmark command broken."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

# A subprocess: importing bench.train sets CLIPVIP_CACHE_DIR and ds_inprocess starts a gloo group.
SNIPPET = r"""
import dataclasses, json, tempfile
import numpy as np, torch
from bench import train as bench
from pipeline.model.tokenizer import tokenize

with tempfile.TemporaryDirectory() as tmp:
    cfg = bench.job_config(tmp, "unused", tmp, "sqlite:///unused.db", 1, 3, "bench-smoke")
cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None, preset="tiny"),
                          train=dataclasses.replace(cfg.train, num_frames=2, image_size_px=32))
B, T, px = bench.MICRO_BATCH, cfg.train.num_frames, cfg.train.image_size_px
rng = np.random.default_rng(0)
ids, mask = tokenize([f"clip {i} subtitle" for i in range(B)], cfg.model.max_text_len)
cap_ids, cap_mask = tokenize([f"clip {i} caption" for i in range(B)], cfg.model.max_text_len)
batch = {"frames": torch.from_numpy(rng.integers(0, 255, (B, T, px, px, 3), dtype=np.uint8)),
         "middle_frame": torch.from_numpy(rng.integers(0, 255, (B, px, px, 3), dtype=np.uint8)),
         "subtitle_ids": ids, "subtitle_mask": mask, "caption_ids": cap_ids, "caption_mask": cap_mask,
         "clip_id": torch.arange(B, dtype=torch.int64), "skipped": torch.zeros(B, dtype=torch.int64)}
print("RESULT " + json.dumps(bench.ds_inprocess(cfg, [batch], warmup=1, steps=2, threads=1)))
"""


def test_in_process_loop_measurement_runs():
    proc = subprocess.run([sys.executable, "-c", SNIPPET], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    res = json.loads(line[len("RESULT "):])
    assert res["steps_measured"] == 2 and res["steps_s"] > 0 and 0 <= res["wait_frac"] <= 1, res
