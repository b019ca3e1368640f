"""The console entry point: frozen options, and bad configs fail before any work starts."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.conftest import ROOT


def run(*args):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("sample-data", "prepare", "pretrain", "recaption", "inspect", "demo"):
        assert cmd in out.stdout


def test_bad_config_fails_fast_naming_the_key(tmp_path):
    t0 = time.time()
    out = run("prepare", "--set", f"root={tmp_path}/r", "--set", "data.metadata=m.jsonl",
              "--set", "data.video_root=v", "--set", "data.subtitles=s.jsonl", "--set", "frames.fps=fast")
    assert out.returncode == 2
    assert "frames.fps: expected a number" in out.stderr
    assert time.time() - t0 < 20, "validation happens before Ray or models start"
    assert not (tmp_path / "r").exists(), "nothing written for a bad config"


def test_unknown_key_in_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("root: r\ndata:\n  metadata: [m]\n  video_root: v\n  shards: 3\n")
    out = run("prepare", "--config", str(cfg))
    assert out.returncode == 2 and "data.shards: unknown key" in out.stderr


def test_a_renamed_key_names_its_new_home(tmp_path):
    """Recipes written before the dataset root had one name fail with the key to use instead."""
    cfg = tmp_path / "old.yaml"
    cfg.write_text("data:\n  root: r\n  metadata: [m]\n  video_root: v\n  subtitles: s\n")
    out = run("prepare", "--config", str(cfg))
    assert out.returncode == 2 and "data.root: this setting is now root" in out.stderr, out.stderr
    out = run("pretrain", "--config", "jobs/configs/tiny_pretrain.yaml", "--set", "train.dataset_root=r")
    assert out.returncode == 2 and "train.dataset_root: this setting is now root" in out.stderr, out.stderr


def test_missing_inputs_refused_before_work(tmp_path):
    out = run("prepare", "--set", f"root={tmp_path}/r", "--set", f"data.metadata={tmp_path}/nope.jsonl",
              "--set", f"data.video_root={tmp_path}", "--set", f"data.subtitles={tmp_path}", "--set", "ray.num_cpus=1")
    assert out.returncode == 2
    assert "data.metadata" in out.stderr and "does not exist" in out.stderr


def test_job_options_are_frozen():
    """Every job takes --config and --set only: new knobs go into the typed config."""
    from jobs.common import config_parser

    opts = {a.option_strings[0] for a in config_parser("x", "y")._actions if a.option_strings}
    assert opts == {"-h", "--config", "--set"}


def test_every_command_module_imports_and_has_main():
    import importlib

    from jobs.cli import COMMANDS

    assert {"submit", "job", "finetune", "evaluate"} <= set(COMMANDS)
    for name, (module, _) in COMMANDS.items():
        assert callable(getattr(importlib.import_module(module), "main", None)), name
