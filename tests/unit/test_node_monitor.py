"""Per-node system metrics (MLflow's SystemMetricsMonitor through `start_node_monitor`) land in the
run under system/<node>/..., say plainly what they measure, and a second node's go beside them."""

from __future__ import annotations

import time

from pipeline.tracking import create_run, start_node_monitor


def test_two_nodes_log_their_own_system_metrics(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = create_run(uri, "monitor", "run")
    monitors = [start_node_monitor(uri, run_id, node, resume=False, every_s=0.2) for node in ("node0", "node1")]
    assert all(m is not None for m in monitors)
    client = MlflowClient(uri)
    wanted = {f"system/node{i}/cpu_utilization_percentage" for i in (0, 1)}
    deadline = time.monotonic() + 120  # an event wait: the first samples of both monitors
    while not wanted <= set(client.get_run(run_id).data.metrics) and time.monotonic() < deadline:
        time.sleep(0.1)
    for m in monitors:
        m.finish()
    metrics = set(client.get_run(run_id).data.metrics)
    assert wanted <= metrics, sorted(metrics)
    assert {f"system/node{i}/system_memory_usage_megabytes" for i in (0, 1)} <= metrics
    out = capsys.readouterr().out
    for node in ("node0", "node1"):
        # This machine has no NVIDIA driver: said once per node, not left to guess.
        assert f"[tracking] {node}: system metrics every 0.2 s as system/{node}/...: CPU, memory, disk, network; " \
               "no GPU metrics" in out, out
