"""`RunLog.train_metrics` on a real 2-rank gloo group: losses are averaged over ranks, the keys in
`sums` (pretrain's skipped rows) are summed, and every rank gets the same numbers."""

from __future__ import annotations

import json
import sys

from tests.conftest import free_port, run_ranks

RANK_SCRIPT = r"""
import json, sys
import torch
import torch.distributed as dist
from pipeline.train.checkpoint import TrainState
from pipeline.train.session import RunLog

rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)


class Engine:  # the one engine call RunLog makes; its value is DeepSpeed's business
    def get_global_grad_norm(self):
        return 0.5


log = RunLog(Engine(), None, rank=rank, world=2, total=10, run_name="r", samples_at_start=0)
state = TrainState(step=3, epoch=1, samples_seen=24, world_size=2)
metrics = {"loss": torch.tensor(1.0 + 2 * rank), "skipped_rows": torch.tensor(float(3 * rank + 1))}
out, elapsed, rate = log.train_metrics(metrics, state, lr=0.01, sums=("skipped_rows",))
print("OUT " + json.dumps(out))
dist.destroy_process_group()
"""



def test_train_metrics_average_over_ranks_and_sum_the_sums():
    port = free_port()
    logs = run_ranks(lambda rank: [sys.executable, "-c", RANK_SCRIPT, str(rank), str(port)], 2, timeout=120)
    outs = [json.loads(next(ln for ln in log.splitlines() if ln.startswith("OUT "))[4:]) for log in logs]
    assert outs[0].keys() == outs[1].keys()
    for key in ("train/loss", "train/skipped_rows", "train/lr", "train/epoch", "train/grad_norm"):
        assert outs[0][key] == outs[1][key], key
    assert outs[0]["train/loss"] == 2.0  # mean of 1 and 3
    assert outs[0]["train/skipped_rows"] == 5.0  # sum of 1 and 4
    assert outs[0]["train/lr"] == 0.01 and outs[0]["train/epoch"] == 1.0 and outs[0]["train/grad_norm"] == 0.5
    assert outs[0]["train/samples_per_s"] > 0


def test_throughput_per_worker_model_flops_and_mfu():
    from pipeline.train.session import throughput

    out = throughput(100.0, 4, 2e12, 100.0)
    assert out == {"samples_per_s": 100.0, "samples_per_s_per_worker": 25.0, "tflops_per_worker": 50.0, "mfu": 0.5}
    assert "mfu" not in throughput(100.0, 4, 2e12, None)  # unknown peak: left out, not guessed
    assert throughput(100.0, 4, 0.0, 100.0) == {"samples_per_s": 100.0, "samples_per_s_per_worker": 25.0}


def test_model_flops_count_the_passes_the_task_runs():
    import torch

    from pipeline.config import LossConfig, ModelConfig, PretrainJobConfig, build_dataclass
    from pipeline.model.clip_vip import CLIPViPModel, config_from_model_cfg
    from pipeline.model.flops import train_flops_per_clip
    from pipeline.model.losses import NCELearnableTempLoss, build_loss
    from pipeline.train.session import model_flops
    from pipeline.train.task import ClipVipTask, RetrievalTask

    cfg = build_dataclass(PretrainJobConfig, {"root": "r", "model": {"max_text_len": 16},
                                              "train": {"num_frames": 4, "peak_tflops": 2.0}})
    model = CLIPViPModel(config_from_model_cfg(ModelConfig(max_text_len=16)))
    omni = ClipVipTask(model, build_loss(LossConfig(variant="vsc_fc")))
    flops, peak = model_flops(cfg, omni, torch.device("cpu"))
    assert peak == 2.0
    assert flops == train_flops_per_clip(model.config, 4, 16, ("video", "subtitle", "frame", "caption")).total
    retrieval = RetrievalTask(model, NCELearnableTempLoss(gather=False))
    assert model_flops(cfg, retrieval, torch.device("cpu"))[0] == train_flops_per_clip(
        model.config, 4, 16, ("video", "subtitle")).total
    no_peak = build_dataclass(PretrainJobConfig, {"root": "r", "train": {"num_frames": 4}})
    assert model_flops(no_peak, omni, torch.device("cpu"))[1] is None  # a CPU has no listed peak
