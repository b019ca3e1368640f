"""pipeline.submit (recipe -> kind, entrypoint, submission id, runtime_env) and the refusals of
`clipvip submit` that happen before any cluster is contacted."""

from __future__ import annotations

import contextlib
import glob
import importlib
import io
import os
import shlex
import zipfile

import pytest

from pipeline import submit as core
from tests.conftest import ROOT

RECIPES = sorted(glob.glob(os.path.join(ROOT, "jobs", "configs", "*.yaml")))


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.basename(p) for p in RECIPES])
def test_kind_inferred_from_sections_is_the_config_that_loads(path):
    kind = core.infer_kind(core.read_recipe(path))
    run_name = core.resolve_run_name(kind, path, [])  # raises SubmitError if the recipe is not a `kind` config
    assert run_name == core.read_recipe(path).get("run_name", run_name)


def test_kind_rules_and_unknown_recipe():
    assert core.infer_kind({"data": {}, "caption": {}}) == "prepare"
    assert core.infer_kind({"root": "r", "caption": {}}) == "recaption"
    assert core.infer_kind({"train": {}}) == "pretrain"
    assert core.infer_kind({"train": {}, "data": {}}) == "finetune"
    assert core.infer_kind({"eval": {}}) == "evaluate"
    with pytest.raises(core.SubmitError, match="pass --kind"):
        core.infer_kind({"model": {}})


def test_wrong_explicit_kind_is_a_config_error():
    with pytest.raises(core.SubmitError, match=r"config error \(pretrain\)"):
        core.resolve_run_name("pretrain", os.path.join(ROOT, "jobs", "configs", "tiny.yaml"), [])


def test_submission_ids_derive_from_the_run_name():
    assert core.submission_id("pretrain", "hdvila-b32", 1) == "pretrain-hdvila-b32"
    assert core.submission_id("pretrain", "hdvila-b32", 3) == "pretrain-hdvila-b32.3"
    assert core.submission_id("prepare", "my run/v1", 1) == "prepare-my-run-v1"
    assert core.submission_id("prepare", "///", 1) == "prepare-run"


def _rows(*jobs):
    return [(sid, status, core.run_metadata(kind, run, "jobs/configs/x.yaml", attempt))
            for sid, status, kind, run, attempt in jobs]


def test_resubmission_gets_the_next_attempt_and_an_active_run_is_refused():
    rows = _rows(("pretrain-a", "STOPPED", "pretrain", "a", 1), ("pretrain-a.2", "FAILED", "pretrain", "a", 2),
                 ("prepare-a", "RUNNING", "prepare", "a", 1), ("pretrain-b", "RUNNING", "pretrain", "b", 1))
    rows.append(("raysubmit_x", "RUNNING", None))  # someone else's job, no metadata
    prior = core.prior_jobs(rows, "pretrain", "a")
    assert [j.submission_id for j in prior] == ["pretrain-a", "pretrain-a.2"]
    assert core.next_submission("pretrain", "a", prior, {r[0] for r in rows}) == (3, "pretrain-a.3")
    assert core.next_submission("pretrain", "c", [], {r[0] for r in rows}) == (1, "pretrain-c")
    with pytest.raises(core.SubmitError, match="already RUNNING as job pretrain-b"):
        core.next_submission("pretrain", "b", core.prior_jobs(rows, "pretrain", "b"), set())
    # Two run names with one slug: the id of the other run is skipped, never reused.
    assert core.next_submission("pretrain", "a.b", [], {"pretrain-a-b"}) == (2, "pretrain-a-b.2")


def test_entrypoint_round_trips_through_a_shell():
    ep = core.entrypoint("prepare", "jobs/configs/tiny.yaml", ["root=/d/with space", "caption.prompt='a b'"])
    assert shlex.split(ep) == ["clipvip", "prepare", "--config", "jobs/configs/tiny.yaml", "--set",
                               "root=/d/with space", "--set", "caption.prompt='a b'"]


def plan(recipe="jobs/configs/tiny_pretrain.yaml", overrides=(), base=None, environ=None, kind=None):
    return core.plan_submission(os.path.join(ROOT, recipe), kind, list(overrides), ROOT, base or {}, environ or {})


def test_plan_builds_entrypoint_runtime_env_and_notes():
    p = plan(overrides=["train.max_steps=3"], base=core.read_recipe(os.path.join(ROOT, "cluster", "runtime_env.yaml")),
             environ={"AWS_DEFAULT_REGION": "eu-west-1", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value-123",
                      "MLFLOW_TRACKING_URI": "http://user:pw-123456@mlflow:5000", "HOME": "/root"})
    assert (p.kind, p.run_name) == ("pretrain", "tiny-pretrain")
    assert p.entrypoint == "clipvip pretrain --config jobs/configs/tiny_pretrain.yaml --set train.max_steps=3"
    env = p.runtime_env["env_vars"]
    assert env["AWS_DEFAULT_REGION"] == "eu-west-1" and env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", "userinfo stripped"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "HOME" not in env, "only allow-listed variables travel"
    assert "pw-123456" not in repr(p)
    assert p.runtime_env["working_dir"] == os.path.realpath(ROOT)
    assert "pip" not in p.runtime_env
    assert any("train.storage_path='out/runs' is relative" in n for n in p.notes)
    absolute = plan(overrides=["root=/d", "train.storage_path=s3://b/runs", "val.annotations=/s/val.jsonl",
                               "val.video_root=s3://b/videos", "tracking.tracking_uri=sqlite:////tmp/m.db"])
    assert not [n for n in absolute.notes if "relative" in n]


@pytest.mark.parametrize("overrides, base, match", [
    (["tracking.tracking_uri=http://me:hunter2@mlflow:5000"], {}, "holds credentials in a URI"),
    (["storage.s3_endpoint_url=https://AKIA:secret@s3.example.com"], {}, "holds credentials in a URI"),
    ([], {"env_vars": {"AWS_SECRET_ACCESS_KEY": "x"}}, "looks like a credential"),
    ([], {"env_vars": {"MLFLOW_TRACKING_TOKEN": "x"}}, "looks like a credential"),
    ([], {"env_vars": {"DB": "postgresql://u:p@db/x"}}, "holds credentials in a URI"),
    ([], {"pip": ["torch"]}, "would install packages"),
    ([], {"working_dir": "/elsewhere"}, "working_dir is set by clipvip submit"),
    (["train.max_steps=zero"], {}, "config error"),
])
def test_plan_refusals(overrides, base, match):
    with pytest.raises(core.SubmitError, match=match):
        plan(overrides=overrides, base=base)


def test_recipe_must_be_uploaded_with_the_project(tmp_path):
    outside = tmp_path / "r.yaml"
    outside.write_text(open(os.path.join(ROOT, "jobs", "configs", "tiny.yaml")).read())
    with pytest.raises(core.SubmitError, match="outside the project directory"):
        core.plan_submission(str(outside), None, [], ROOT, {}, {})
    assert core.is_excluded("out/tiny/recipe.yaml") and core.is_excluded(".venv/x.yaml")
    assert core.is_excluded("pipeline/__pycache__/x.pyc") and not core.is_excluded("jobs/configs/tiny.yaml")
    assert not core.is_excluded("jobs/out/x.yaml"), "anchored patterns only match at the top"


def test_redact_masks_userinfo_and_secret_values():
    text = "uri http://bob:pw@host:5000/x and s3://K:S@b/k, token abcdefgh123, short 1"
    out = core.redact(text, ["abcdefgh123", "1"])
    assert out == "uri http://***@host:5000/x and s3://***@b/k, token ***, short 1"
    assert core.secret_values({"AWS_SESSION_TOKEN": "t", "MLFLOW_TRACKING_PASSWORD": "p", "HOME": "h"}) == ["t", "p"]


def test_working_dir_package_keeps_code_and_vocab_drops_local_state(tmp_path):
    """Ray's own packer with our excludes and .gitignore off (as `clipvip submit` uploads)."""
    from ray._private.runtime_env.packaging import create_package

    zip_path = tmp_path / "pkg.zip"
    create_package(ROOT, zip_path, include_gitignore=False, excludes=list(core.WORKING_DIR_EXCLUDES))
    names = set(zipfile.ZipFile(zip_path).namelist())
    assert {"jobs/configs/tiny.yaml", "pipeline/submit.py", "jobs/cli.py", "pyproject.toml"} <= names
    vocab = "pipeline/model/assets/bpe_simple_vocab_16e6.txt.gz"
    if os.path.exists(os.path.join(ROOT, vocab)):
        assert vocab in names, "the gitignored CLIP vocab travels with the code that needs it"
    leaked = sorted(n for n in names if n.split("/")[0] in {".venv", ".git", ".cache", "out", "runs"}
                    or "__pycache__" in n or n.endswith((".pyc", ".db")))
    assert not leaked, leaked[:10]
    assert zip_path.stat().st_size < 20 * 2**20


def cli(command, *args):
    """`clipvip submit|job ...` through the module `main(argv)` the console script dispatches to."""
    main = importlib.import_module({"submit": "jobs.submit", "job": "jobs.job_control"}[command]).main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = main(list(args))
        except SystemExit as e:
            rc = int(e.code or 0)
    return rc, buf.getvalue()


def test_cli_refuses_before_contacting_a_cluster(tmp_path):
    rc, out = cli("submit", str(tmp_path / "nope.yaml"), "--address", "http://127.0.0.1:9")
    assert rc == 2 and "not found" in out
    tiny = os.path.join(ROOT, "jobs", "configs", "tiny.yaml")
    rc, out = cli("submit", tiny, "--kind", "pretrain", "--address", "http://127.0.0.1:9")
    assert rc == 2 and "config error (pretrain)" in out
    rc, out = cli("submit", tiny, "--set", "root=s3://k:s3cr3t@b/r")
    assert rc == 2 and "credentials" in out and "s3cr3t" not in out
    rc, _ = cli("job")
    assert rc == 2


def test_unreachable_cluster_is_a_user_error():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tiny = os.path.join(ROOT, "jobs", "configs", "tiny.yaml")
    rc, out = cli("submit", tiny, "--address", f"http://me:pw-123456@127.0.0.1:{port}")
    assert rc == 2 and "no Ray cluster reachable at http://***@127.0.0.1" in out, out
    assert "pw-123456" not in out
    rc, out = cli("job", "status", "x", "--address", f"http://127.0.0.1:{port}")
    assert rc == 2 and "no Ray cluster reachable" in out
