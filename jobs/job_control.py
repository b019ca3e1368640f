"""`clipvip job list|status|logs|stop`: look after jobs submitted with `clipvip submit`.

    clipvip job list                       # clipvip jobs on the cluster: id, status, kind, run
    clipvip job status pretrain-hdvila-b32
    clipvip job logs pretrain-hdvila-b32 --follow
    clipvip job stop pretrain-hdvila-b32   # resubmitting the same recipe resumes the run

Every subcommand takes `--address URL`; without it $RAY_ADDRESS, else http://127.0.0.1:8265 (a
local head's dashboard, or the tunnel of `ray dashboard ray_cluster.yaml` / `kubectl
port-forward svc/clipvip-head-svc 8265`). Printed logs are redacted (URI userinfo, values of
this shell's secret variables) as a second line of defence: jobs never receive credentials.

Also home of the Jobs API helpers shared with `jobs/submit.py` (connect, follow, wait).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any, TextIO

from pipeline.submit import redact, secret_values

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class ClusterUnreachable(Exception):
    """No Jobs API answered at the address (exit code 2)."""


def resolve_address(flag: str | None) -> str:
    return flag or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def status_str(status: Any) -> str:
    """JobStatus is a str Enum; str() of it is 'JobStatus.RUNNING' on Python 3.11."""
    return str(getattr(status, "value", status))


def connect(address: str) -> Any:
    """A JobSubmissionClient for `address`, or ClusterUnreachable with a message that says what to do."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray.job_submission import JobSubmissionClient  # noqa: PLC0415

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001  requests/aiohttp/Ray raise many types for "nobody there"
        reason = redact(str(e)).splitlines()[0] if str(e) else type(e).__name__
        raise ClusterUnreachable(
            f"no Ray cluster reachable at {redact(address)}: {reason}\n"
            "Start one (`ray up ray_cluster.yaml`, or a KubeRay RayCluster from cluster/kuberay/), forward its "
            "dashboard port (`ray dashboard ray_cluster.yaml`, `kubectl port-forward ... 8265`), and pass "
            "--address http://127.0.0.1:8265 or set RAY_ADDRESS") from None


def wait_for_terminal(client: Any, job_id: str, timeout_s: float, poll_s: float = 0.5) -> str:
    deadline = time.monotonic() + timeout_s
    status = status_str(client.get_job_status(job_id))
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(poll_s)
        status = status_str(client.get_job_status(job_id))
    return status


def follow_logs(client: Any, job_id: str, out: TextIO | None = None) -> str:
    """Stream a job's logs until it ends; returns its final status."""
    out = out or sys.stdout
    secrets = secret_values(os.environ)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(redact(chunk, secrets))
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the websocket closed before the job ended (head restart, proxy timeout)
        print(f"[clipvip] log stream interrupted ({redact(str(e))}); waiting for the job to end", file=sys.stderr)
    return wait_for_terminal(client, job_id, timeout_s=float("inf"))


def describe(info: Any) -> list[str]:
    """Human lines for one job (JobDetails); entrypoint and message redacted."""
    meta = info.metadata or {}
    lines = [f"job        {info.submission_id}",
             f"status     {status_str(info.status)}"
             + (f" (driver exit code {info.driver_exit_code})" if getattr(info, "driver_exit_code", None) else "")]
    if meta.get("clipvip.kind"):
        lines.append(f"run        {meta.get('clipvip.run_name')} ({meta.get('clipvip.kind')}, attempt "
                     f"{meta.get('clipvip.attempt', '1')}, recipe {meta.get('clipvip.recipe')})")
    lines.append(f"entrypoint {redact(info.entrypoint or '')}")
    for name in ("start_time", "end_time"):
        ms = getattr(info, name, None)
        if ms:
            lines.append(f"{name[:-5]:<10} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ms / 1000))}")
    if info.message:
        lines.append(f"message    {redact(info.message)}")
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipvip job", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    for action, text in (("list", "clipvip jobs on the cluster"), ("status", "one job's status"),
                         ("logs", "a job's logs"), ("stop", "stop a job (resubmit the recipe to resume)")):
        p = sub.add_parser(action, help=text)
        if action != "list":
            p.add_argument("job_id", help="submission id printed by `clipvip submit` (e.g. pretrain-hdvila-b32)")
        p.add_argument("--address", help=f"Jobs API (dashboard) URL; default $RAY_ADDRESS or {DEFAULT_ADDRESS}")
        if action == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
        if action == "stop":
            p.add_argument("--no-wait", action="store_true", help="return without waiting for the job to end")
    return parser


def _list(client: Any) -> int:
    rows = [j for j in client.list_jobs() if (j.metadata or {}).get("clipvip.kind") and j.submission_id]
    rows.sort(key=lambda j: j.start_time or 0)
    print(f"{'JOB':<40} {'STATUS':<10} {'KIND':<10} RUN")
    for j in rows:
        meta = j.metadata or {}
        kind, run = meta["clipvip.kind"], meta.get("clipvip.run_name")
        print(f"{j.submission_id:<40} {status_str(j.status):<10} {kind:<10} {run}")
    return 0


def run_action(args: argparse.Namespace, client: Any) -> int:
    if args.action == "list":
        return _list(client)
    try:
        info = client.get_job_info(args.job_id)
    except RuntimeError as e:
        print(f"job {args.job_id}: {redact(str(e)).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.action == "status":
        print("\n".join(describe(info)))
        return 0
    if args.action == "logs":
        if not args.follow:
            sys.stdout.write(redact(client.get_job_logs(args.job_id), secret_values(os.environ)))
            return 0
        status = follow_logs(client, args.job_id)
        print(f"[clipvip] job {args.job_id} {status}", file=sys.stderr)
        return 0 if status == "SUCCEEDED" else 1
    stopped = client.stop_job(args.job_id)
    if not stopped:
        print(f"job {args.job_id} is already {status_str(client.get_job_status(args.job_id))}")
        return 0
    status = "STOPPING" if args.no_wait else wait_for_terminal(client, args.job_id, timeout_s=120)
    print(f"job {args.job_id} {status}; submit the same recipe again to resume the run")
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        client = connect(resolve_address(args.address))
    except ClusterUnreachable as e:
        print(str(e), file=sys.stderr)
        return 2
    return run_action(args, client)
