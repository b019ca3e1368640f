"""Pure core of `clipvip submit`: a recipe becomes a Ray job (kind, entrypoint, id, runtime_env).

No Ray here, no network: `jobs/submit.py` owns the Jobs API client and calls these functions.

- The job kind is read from the recipe's top-level sections (a recipe never names its kind).
- The entrypoint is `clipvip <kind> --config <recipe relative to the project> [--set k=v ...]`.
  The project directory travels as the job's `working_dir`, so the recipe must live inside it,
  and relative paths *inside* the recipe resolve on the cluster, against that unpacked copy.
- The submission id is derived from the run name: `<kind>-<run_name>` for the first attempt,
  `<kind>-<run_name>.<n>` after (Ray refuses to reuse an id). Resume itself does not come from
  the id but from the job's own state: Ray Train's run name + storage path for pretrain and
  finetune, the shard sidecars for prepare and recaption.
- Credentials never travel: the runtime_env carries only allow-listed, non-secret variables,
  and a recipe, override or variable holding URI userinfo (`scheme://user:pass@host`) is refused.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import (
    ConfigError,
    EvaluateJobConfig,
    FinetuneJobConfig,
    PackJobConfig,
    PrepareJobConfig,
    PretrainJobConfig,
    RecaptionJobConfig,
    apply_overrides,
    load_config,
    read_yaml_mapping,
)

KINDS = ("prepare", "recaption", "pack", "pretrain", "finetune", "evaluate")

# kind -> its config class: a recipe is validated before it is submitted.
CONFIG_CLASSES: dict[str, type] = {
    "prepare": PrepareJobConfig,
    "recaption": RecaptionJobConfig,
    "pack": PackJobConfig,
    "pretrain": PretrainJobConfig,
    "finetune": FinetuneJobConfig,
    "evaluate": EvaluateJobConfig,
}

# Ray job statuses during which a second submission for the same run is refused.
ACTIVE_STATUSES = frozenset({"PENDING", "RUNNING"})

# Never uploaded as the job's working_dir (gitignore syntax, relative to the project root).
# Ray's own .gitignore handling is switched off by the submitter because it would also drop
# the CLIP BPE vocabulary (`make vocab`, gitignored), which the shipped `pipeline/` needs.
WORKING_DIR_EXCLUDES = (
    ".git", ".venv", "venv", ".cache", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache",
    ".ipynb_checkpoints", "/out", "/runs", "/demo", "/data", "/build", "/dist", "mlruns", "mlartifacts",
    "*.db", "*.log",
)

# Recipe keys that hold local paths or s3:// URIs (for the relative-path notes).
PATH_KEYS = frozenset({"root", "storage_path", "video_root", "metadata", "subtitles", "annotations",
                       "out", "warm_start", "tracking_uri"})

# Non-secret settings forwarded from the submitting shell into the job's environment.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "MLFLOW_TRACKING_URI")

# runtime_env keys that install packages: the nodes already hold the pinned stack (cluster/Dockerfile,
# ray_cluster.yaml), and a per-job install would shadow torch/ray/deepspeed with other builds.
INSTALLING_KEYS = ("pip", "conda", "uv")

# A variable is secret when its name contains one of these, or one of its words ends in TOKEN
# (AWS_SESSION_TOKEN, HFTOKEN; not TOKENIZERS_PARALLELISM).
_SECRET_PARTS = ("PASSWORD", "PASSWD", "SECRET", "CREDENTIAL", "PRIVATE_KEY", "ACCESS_KEY", "API_KEY", "APIKEY")
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s@'\"]+)@")
_SLUG = re.compile(r"[^A-Za-z0-9_\-]+")


class SubmitError(ValueError):
    """The submission is refused before anything reaches the cluster (exit code 2)."""


# --------------------------------------------------------------------------------------------
# Secrets


def has_userinfo(text: str) -> bool:
    return _USERINFO.search(text) is not None


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask URI userinfo and any of `secrets` (values, not names) in text meant for a terminal."""
    out = _USERINFO.sub(lambda m: m.group("scheme") + "***@", text)
    for s in secrets:
        if s and len(s) >= 8:  # short values (e.g. "1") would mask unrelated text
            out = out.replace(s, "***")
    return out


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return any(p in upper for p in _SECRET_PARTS) or any(w.endswith("TOKEN") for w in re.split(r"[^A-Z0-9]+", upper))


def secret_values(environ: Mapping[str, str]) -> list[str]:
    """Values of secret-looking variables of this process (to mask them in printed job logs)."""
    return [v for k, v in environ.items() if is_secret_name(k) and v]


def _walk_strings(node: Any, key: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _walk_strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _walk_strings(v, f"{key}.{i}")
    elif isinstance(node, str):
        yield key, node


def check_no_credentials(raw: Mapping[str, Any], what: str) -> None:
    """Refuse URI userinfo anywhere in a recipe: it would reach MLflow params and checkpoints."""
    for key, value in _walk_strings(raw):
        if has_userinfo(value):
            raise SubmitError(f"{what}: {key} holds credentials in a URI ({redact(value)}); credentials come "
                              "only from the environment of the cluster nodes (AWS chain, "
                              "MLFLOW_TRACKING_USERNAME/PASSWORD), never from configs")


# --------------------------------------------------------------------------------------------
# Recipe -> kind, run name, entrypoint


def read_recipe(path: str) -> dict[str, Any]:
    try:
        return read_yaml_mapping(path, f"recipe {path}")
    except ConfigError as e:
        raise SubmitError(str(e)) from None


def infer_kind(raw: Mapping[str, Any]) -> str:
    """The job a recipe is for, from its top-level sections (see jobs/configs/)."""
    keys = set(raw)
    if "eval" in keys:
        return "evaluate"
    if "train" in keys:
        return "finetune" if "data" in keys else "pretrain"
    if "data" in keys:
        return "prepare"
    if "view" in keys:
        return "pack"
    if "root" in keys or "frames_per_clip" in keys:
        return "recaption"
    raise SubmitError(f"cannot tell the job kind from the recipe's sections {sorted(keys)}; "
                      f"pass --kind {{{','.join(KINDS)}}}")


def resolve_run_name(kind: str, recipe: str, overrides: list[str]) -> str:
    """Validate the recipe as `kind`'s config and return its run_name."""
    try:
        return str(load_config(CONFIG_CLASSES[kind], recipe, overrides).run_name)
    except ConfigError as e:
        raise SubmitError(f"config error ({kind}): {e}") from None


def recipe_in_project(recipe: str, project_root: str) -> str:
    """The recipe's path relative to the project (posix), or SubmitError if it would not be uploaded."""
    path = Path(recipe).resolve()
    root = Path(project_root).resolve()
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        raise SubmitError(f"recipe {recipe} is outside the project directory {root}, which is what gets "
                          "uploaded as the job's working_dir; put the recipe under jobs/configs/") from None
    if is_excluded(rel):
        raise SubmitError(f"recipe {rel} lies in a directory that is never uploaded "
                          f"({', '.join(WORKING_DIR_EXCLUDES)}); put it under jobs/configs/")
    return rel


def is_excluded(rel_path: str) -> bool:
    """Whether a project-relative path matches WORKING_DIR_EXCLUDES (simplified gitignore match)."""
    parts = rel_path.split("/")
    for pattern in WORKING_DIR_EXCLUDES:
        anchored = pattern.startswith("/")
        pat = pattern.lstrip("/")
        candidates = parts[:1] if anchored else parts
        if any(Path(p).match(pat) for p in candidates):
            return True
    return False


def entrypoint(kind: str, recipe_rel: str, overrides: list[str]) -> str:
    args = ["clipvip", kind, "--config", recipe_rel]
    for item in overrides:
        args += ["--set", item]
    return shlex.join(args)


def relative_path_notes(raw: Mapping[str, Any]) -> list[str]:
    """Notes for relative local paths in a recipe: on the cluster they resolve inside the job's
    temporary working_dir copy, which a later submission does not share (resume needs the same path)."""
    notes = []
    for key, value in _walk_strings(raw):
        leaf = next((p for p in reversed(key.split(".")) if not p.isdigit()), key)
        if leaf not in PATH_KEYS:
            continue
        path = value[len("sqlite:///"):] if value.startswith("sqlite:///") else value
        if "://" in path or os.path.isabs(path):
            continue
        notes.append(f"{key}={value!r} is relative: on the cluster it resolves inside the job's working_dir "
                     "copy, which is not kept across submissions; use an absolute path or s3://")
    return notes


# --------------------------------------------------------------------------------------------
# Submission ids


def slug(text: str) -> str:
    s = _SLUG.sub("-", text).strip("-")
    return s or "run"


def submission_id(kind: str, run_name: str, attempt: int) -> str:
    base = f"{kind}-{slug(run_name)}"
    return base if attempt == 1 else f"{base}.{attempt}"


@dataclass(frozen=True, slots=True)
class PriorJob:
    """A job already on the cluster for the same kind + run name."""

    submission_id: str
    status: str
    attempt: int


def run_metadata(kind: str, run_name: str, recipe_rel: str, attempt: int) -> dict[str, str]:
    """Job metadata (non-secret) that ties submissions of one run together."""
    return {"clipvip.kind": kind, "clipvip.run_name": run_name, "clipvip.recipe": recipe_rel,
            "clipvip.attempt": str(attempt)}


def prior_jobs(jobs: Iterable[tuple[str | None, str, Mapping[str, str] | None]], kind: str,
               run_name: str) -> list[PriorJob]:
    """The (submission_id, status, metadata) rows that belong to this kind + run name."""
    out = []
    for sid, status, meta in jobs:
        meta = meta or {}
        if sid and meta.get("clipvip.kind") == kind and meta.get("clipvip.run_name") == run_name:
            attempt = int(meta.get("clipvip.attempt", "1")) if str(meta.get("clipvip.attempt", "1")).isdigit() else 1
            out.append(PriorJob(sid, str(status), attempt))
    return sorted(out, key=lambda j: j.attempt)


def next_submission(kind: str, run_name: str, prior: list[PriorJob], taken_ids: set[str]) -> tuple[int, str]:
    """(attempt, submission_id) for a new submission of this run; refuses while one is active."""
    active = [j for j in prior if j.status in ACTIVE_STATUSES]
    if active:
        j = active[-1]
        raise SubmitError(f"run {run_name!r} ({kind}) is already {j.status} as job {j.submission_id}; "
                          f"follow it with `clipvip job logs {j.submission_id} --follow` or stop it with "
                          f"`clipvip job stop {j.submission_id}`")
    attempt = max((j.attempt for j in prior), default=0) + 1
    while submission_id(kind, run_name, attempt) in taken_ids:  # another run's slug collides
        attempt += 1
    return attempt, submission_id(kind, run_name, attempt)


# --------------------------------------------------------------------------------------------
# runtime_env


@dataclass(slots=True)
class RuntimeEnvPlan:
    runtime_env: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def load_runtime_env(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    if not os.path.exists(path):
        raise SubmitError(f"--runtime-env {path}: file not found")
    return read_recipe(path)


def build_runtime_env(project_root: str, base: Mapping[str, Any], environ: Mapping[str, str]) -> RuntimeEnvPlan:
    """working_dir = the project, our excludes, base env_vars + allow-listed settings of `environ`."""
    bad = [k for k in INSTALLING_KEYS if k in base]
    if bad:
        raise SubmitError(f"runtime_env: {', '.join(bad)} would install packages per job; the nodes already "
                          "hold the pinned stack (cluster/Dockerfile, ray_cluster.yaml setup_commands)")
    if "working_dir" in base:
        raise SubmitError("runtime_env: working_dir is set by clipvip submit (the project directory)")
    env_vars = {str(k): str(v) for k, v in (base.get("env_vars") or {}).items()}
    notes = []
    for name in FORWARDED_ENV:
        value = environ.get(name)
        if not value:
            continue
        if has_userinfo(value):
            value = _USERINFO.sub(lambda m: m.group("scheme"), value)
            notes.append(f"{name}: credentials in the URI are not forwarded (nodes use their own environment)")
        env_vars[name] = value
    check_env_vars(env_vars)
    runtime_env = {k: v for k, v in base.items() if k not in ("env_vars", "excludes")}
    runtime_env["working_dir"] = str(Path(project_root).resolve())
    runtime_env["excludes"] = list(WORKING_DIR_EXCLUDES) + [str(x) for x in base.get("excludes") or []]
    runtime_env["env_vars"] = env_vars
    return RuntimeEnvPlan(runtime_env, notes)


def check_env_vars(env_vars: Mapping[str, str]) -> None:
    """Refuse secret-looking names or URI userinfo in env_vars (they are stored with the job)."""
    for name, value in env_vars.items():
        if is_secret_name(name) or name == "AWS_ACCESS_KEY_ID":
            raise SubmitError(f"runtime_env.env_vars.{name}: looks like a credential; the nodes read "
                              "credentials from their own environment / instance role, never from job metadata")
        if has_userinfo(value):
            raise SubmitError(f"runtime_env.env_vars.{name}: holds credentials in a URI ({redact(value)})")


# --------------------------------------------------------------------------------------------
# The whole plan


@dataclass(slots=True)
class SubmissionPlan:
    """Everything about a submission that does not need the cluster."""

    kind: str
    run_name: str
    recipe_rel: str
    entrypoint: str
    runtime_env: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def plan_submission(recipe: str, kind: str | None, overrides: list[str], project_root: str,
                    base_runtime_env: Mapping[str, Any], environ: Mapping[str, str]) -> SubmissionPlan:
    """Validate a recipe and build the job's entrypoint and runtime_env (no cluster involved).

    Raises:
        SubmitError: unknown kind, missing job module, recipe outside the project, bad config,
            credentials in the recipe/overrides/runtime_env.
    """
    raw = read_recipe(recipe)
    kind = kind or infer_kind(raw)
    if kind not in KINDS:
        raise SubmitError(f"--kind {kind!r}: must be one of {', '.join(KINDS)}")
    if not (Path(project_root) / "jobs" / f"{kind}.py").is_file():
        raise SubmitError(f"this checkout has no `{kind}` job (jobs/{kind}.py)")
    recipe_rel = recipe_in_project(recipe, project_root)
    try:
        resolved = apply_overrides(raw, overrides)
    except ConfigError as e:
        raise SubmitError(f"config error: {e}") from None
    check_no_credentials(resolved, f"recipe {recipe_rel} (with --set overrides)")
    run_name = resolve_run_name(kind, recipe, overrides)
    env_plan = build_runtime_env(project_root, base_runtime_env, environ)
    return SubmissionPlan(kind=kind, run_name=run_name, recipe_rel=recipe_rel,
                          entrypoint=entrypoint(kind, recipe_rel, overrides), runtime_env=env_plan.runtime_env,
                          notes=relative_path_notes(resolved) + env_plan.notes)
