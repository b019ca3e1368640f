"""`clipvip submit RECIPE`: run a jobs/ recipe on a Ray cluster through the Ray Jobs API.

    clipvip submit jobs/configs/hdvila_prepare.yaml --address http://127.0.0.1:8265
    clipvip submit jobs/configs/hdvila_b32.yaml --set train.max_steps=20000 --follow
    RAY_ADDRESS=http://127.0.0.1:8265 clipvip submit my_recipe.yaml --kind recaption

The job runs `clipvip <kind> --config RECIPE [--set ...]` on the head node, with this project
directory as its working_dir (so the code you see is the code that runs) and the base runtime_env
of cluster/runtime_env.yaml (`--runtime-env` for another). The nodes already hold the pinned
dependencies (cluster/Dockerfile, ray_cluster.yaml); nothing is pip-installed per job.

The submission id comes from the run name: `pretrain-hdvila-b32`, then `pretrain-hdvila-b32.2`
for the next submission of the same run, which resumes it (Ray Train run name + storage path;
prepare/recaption skip finished shards). A run that is still PENDING/RUNNING is not submitted twice.
Relative paths in a recipe resolve on the cluster, inside the job's working_dir copy: use
absolute paths or s3:// for data, runs and MLflow. Credentials never travel with the job; the
nodes use their own environment / instance role (see README, "Running on a cluster").

Exit codes: 0 submitted (with --follow: the job SUCCEEDED), 1 the followed job failed or was
stopped, 2 refused (bad recipe, unknown kind, credentials in the recipe, no cluster reachable,
run already active).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobs.job_control import DEFAULT_ADDRESS, ClusterUnreachable, connect, follow_logs, resolve_address, status_str
from pipeline.submit import (
    KINDS,
    SubmissionPlan,
    SubmitError,
    load_runtime_env,
    next_submission,
    plan_submission,
    prior_jobs,
    redact,
    run_metadata,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNTIME_ENV = PROJECT_ROOT / "cluster" / "runtime_env.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipvip submit", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="YAML recipe inside this project (e.g. jobs/configs/hdvila_b32.yaml)")
    parser.add_argument("--kind", choices=KINDS,
                        help="job kind (default: read from the recipe's sections)")
    parser.add_argument("--address", help=f"Jobs API (dashboard) URL; default $RAY_ADDRESS or {DEFAULT_ADDRESS}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override passed to the job, e.g. --set train.max_steps=100 (repeatable)")
    parser.add_argument("--runtime-env", default=str(DEFAULT_RUNTIME_ENV),
                        help="base runtime_env YAML (env_vars, extra excludes); default cluster/runtime_env.yaml")
    parser.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    return parser


@contextlib.contextmanager
def _packaging_the_project() -> Iterator[None]:
    """Ray drops .gitignore'd files from a working_dir by default, which would drop the CLIP vocab
    (`make vocab`); our own excludes (pipeline.submit.WORKING_DIR_EXCLUDES) keep out the rest.
    Ray's notice that .git/.venv are skipped by default is noise here: they are in our excludes too."""
    old = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE")
    os.environ["RAY_RUNTIME_ENV_IGNORE_GITIGNORE"] = "1"
    notices = logging.getLogger("ray._private.runtime_env.working_dir")
    level = notices.level
    notices.setLevel(logging.ERROR)
    try:
        yield
    finally:
        notices.setLevel(level)
        if old is None:
            os.environ.pop("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", None)
        else:
            os.environ["RAY_RUNTIME_ENV_IGNORE_GITIGNORE"] = old


def _plan(args: argparse.Namespace) -> SubmissionPlan:
    if not (PROJECT_ROOT / "pyproject.toml").is_file():
        raise SubmitError(f"{PROJECT_ROOT} is not a source checkout; run clipvip submit from one (it is "
                          "uploaded as the job's working_dir)")
    path = args.runtime_env
    if path == str(DEFAULT_RUNTIME_ENV) and not DEFAULT_RUNTIME_ENV.is_file():
        path = None  # an installed copy without cluster/: no base runtime_env
    base = load_runtime_env(path)
    return plan_submission(args.recipe, args.kind, args.overrides, str(PROJECT_ROOT), base, os.environ)


def submit(client: Any, plan: SubmissionPlan) -> str:
    """Pick the run's next submission id (refusing an active run) and submit; returns the id."""
    jobs = client.list_jobs()
    rows = [(j.submission_id, status_str(j.status), j.metadata) for j in jobs]
    attempt, job_id = next_submission(plan.kind, plan.run_name, prior_jobs(rows, plan.kind, plan.run_name),
                                      {r[0] for r in rows if r[0]})
    with _packaging_the_project():
        return client.submit_job(
            entrypoint=plan.entrypoint, submission_id=job_id, runtime_env=plan.runtime_env,
            metadata=run_metadata(plan.kind, plan.run_name, plan.recipe_rel, attempt))


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    address = resolve_address(args.address)
    try:
        plan = _plan(args)
        for note in plan.notes:
            print(f"note: {note}", file=sys.stderr)
        client = connect(address)
        job_id = submit(client, plan)
    except (SubmitError, ClusterUnreachable) as e:
        print(f"submit refused: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the Jobs API said no (e.g. a racing submission took the id)
        print(f"submit failed: {redact(str(e))}", file=sys.stderr)
        return 2
    print(f"submitted {plan.kind} run {plan.run_name!r} as job {job_id} to {redact(address)}")
    print(f"  entrypoint  {redact(plan.entrypoint)}")
    print(f"  status      clipvip job status {job_id}")
    print(f"  logs        clipvip job logs {job_id} --follow")
    print(f"  stop        clipvip job stop {job_id}   (submit the same recipe again to resume)")
    if not args.follow:
        return 0
    status = follow_logs(client, job_id)
    print(f"[clipvip] job {job_id} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1
