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
