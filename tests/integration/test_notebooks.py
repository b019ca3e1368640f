"""notebooks/*.ipynb executed headless on a real `clipvip demo --quick` output.

The module fixture runs the demo once, in a subprocess as a user would, and checks its report;
each test then executes one notebook top to bottom with nbclient and checks that it drew at
least one image and raised nothing.

Which Python runs the notebooks: they name the kernel "python3", and what that resolves to
depends on the machine (a user-level kernelspec may point at another interpreter, and the one
pip installs into the venv says plain "python", which jupyter_client maps to its own
sys.executable). So `kernel_manager` writes a python3 kernelspec whose argv is this
interpreter (`ipykernel.kernelspec.write_kernel_spec` records `sys.executable`) into a temp dir
and hands nbclient a KernelManager whose KernelSpecManager searches only that dir: the kernel
is always this venv's python, whatever is installed elsewhere (nbclient 0.11, jupyter_client 8).

The kernel gets CLIPVIP_DEMO_OUT and MPLBACKEND=Agg (what a headless CI sets); the notebooks
select the inline backend themselves, so figures still come back as image/png outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.raycluster import LocalCluster

NOTEBOOKS = os.path.join(ROOT, "notebooks")
DEMO_TIMEOUT_S = 900
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    """`clipvip demo --quick` into a temp dir, once for the module; the demo's own test. Another
    local Ray instance is up meanwhile, as on a machine where someone else runs Ray: the demo
    addresses its own instance and ends cleanly (no traceback, no error-level Ray line)."""
    out = tmp_path_factory.mktemp("demo")
    other = LocalCluster()
    other.start(head_cpus=1, workers=())
    try:
        env = dict(os.environ, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.1")
        proc = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--out", str(out), "--quick"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    finally:
        other.close()
    log = f"stdout tail:\n{proc.stdout[-4000:]}\nstderr tail:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, log
    assert "demo report" in proc.stdout, log
    assert "test t2v R@1" in proc.stdout and "order-aware     CLIP-ViP" in proc.stdout, log
    everything = proc.stdout + proc.stderr
    for bad in ("Traceback", "multiple active Ray instances", "has constructor arguments"):
        assert bad not in everything, f"{bad!r} in the demo's output:\n{log}"
    report = json.loads((out / "demo_report.json").read_text(encoding="utf-8"))
    # One CLIP-ViP pretrain; both models fine-tuned from it side by side, to the quick step counts.
    assert {n: r["steps"] for n, r in report["pretrain"].items()} == {"clip-vip": 2}, log
    assert {n: r["steps"] for n, r in report["finetune"].items()} == {"clip-vip": 4, "meanpool-baseline": 4}, log
    assert set(report["stage_s"]) == {"sample-data", "ray-start", "prepare", "recaption", "pack", "pretrain",
                                      "finetune", "evaluate"}
    assert report["pack"]["view"] == "tiny_git" and report["pack"]["rows"] > 0, log
    # The baseline sees a test clip and its reversed twin as the same frames: exactly order-blind.
    assert report["evaluate"]["results"]["meanpool-baseline"]["order/aware"] == 50.0, log
    assert "took " in proc.stdout and "finetune " in proc.stdout.split("took ")[-1]
    return str(out)


@pytest.fixture(scope="module")
def kernel_manager(tmp_path_factory):
    """A factory of KernelManagers for a "python3" kernel that is this interpreter."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(path=str(kernels / "python3"), overrides={"display_name": "Python 3 (test venv)"})
    specs = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
    assert specs.get_kernel_spec("python3").argv[0] == sys.executable
    return lambda: KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def execute(name: str, demo_out: str, km, save_dir) -> list:
    """Run notebooks/<name> top to bottom; returns its code cells' outputs, one list per cell."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name} is committed with outputs"
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": NOTEBOOKS}})
    env = dict(os.environ, CLIPVIP_DEMO_OUT=demo_out, MPLBACKEND="Agg")
    try:
        client.execute(env=env)
    finally:
        nbformat.write(nb, os.path.join(save_dir, name))  # the executed copy, to look at when it fails
    return [c.outputs for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("name", ["01_explore_dataset.ipynb", "02_training_curves.ipynb",
                                  "03_retrieval_demo.ipynb"])
def test_notebook_runs_and_draws(name, demo_out, kernel_manager, tmp_path):
    """Every figure is described (`viz.show`) and draws something: lines with finite points,
    images or bars; for the curves notebook, the series are the demo's MLflow runs, step for step."""
    from pipeline.viz import FIGURE_MIME

    outputs = execute(name, demo_out, kernel_manager(), tmp_path)
    flat = [o for cell in outputs for o in cell]
    errors = [f"{o.get('ename')}: {o.get('evalue')}" for o in flat if o.output_type == "error"]
    assert not errors, errors
    images = [o for o in flat if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]
    assert images, f"{name} drew no image (executed copy in {tmp_path})"
    figures = [o.data[FIGURE_MIME] for o in flat if o.output_type == "display_data" and FIGURE_MIME in o.data]
    assert len(figures) == len(images), f"{name}: {len(images)} images, {len(figures)} described by viz.show"
    for fig in figures:
        drawn = [ax for ax in fig["axes"] if any(ln["n"] for ln in ax["lines"]) or ax["images"] or ax["bars"]]
        assert drawn, f"{name}: a blank figure {fig['suptitle']!r}: {fig}"
        assert all(ln["finite"] for ax in fig["axes"] for ln in ax["lines"]), fig
    if name == "02_training_curves.ipynb":
        check_curves(figures, demo_out)


def check_curves(figures: list, demo_out: str) -> None:
    """The curves notebook drew the demo's runs: each series has the run's steps, no more, no less."""
    from mlflow.tracking import MlflowClient

    from pipeline import viz

    client = MlflowClient(f"sqlite:///{os.path.join(demo_out, 'mlflow.db')}")
    (pretrain,) = viz.find_runs(client, "clipvip-tiny", "demo-pretrain-")
    axes = {ax["title"]: ax for fig in figures for ax in fig["axes"]}

    def steps(run, key):
        return viz.metric_history(client, run.run_id, key)[0].tolist()

    def line(title, label):
        found = [ln for ln in axes[title]["lines"] if ln["label"] == label]
        assert len(found) == 1, (title, label, [ln["label"] for ln in axes[title]["lines"]])
        return found[0]

    name = pretrain.name
    train_steps = steps(pretrain, "train/loss")
    assert train_steps, "the pretrain logged no loss"
    for title, label, key in ((f"{name}\nloss terms", "loss", "train/loss"),
                              (f"{name}\nsamples / s (all workers, per worker)", "samples_per_s_per_worker",
                               "train/samples_per_s_per_worker"),
                              (f"{name}\nmodel TFLOP/s per worker, MFU", "tflops_per_worker",
                               "train/tflops_per_worker")):
        assert line(title, label)["x"] == train_steps == steps(pretrain, key), (title, label)
    assert "MFU: no known peak for this device (train.peak_tflops)" in axes[f"{name}\nmodel TFLOP/s per worker, MFU"][
        "texts"], "a CPU run says why MFU is missing"
    val = line("pretrain: zero-shot retrieval", "clip-vip t2v/R1")
    assert val["x"] == steps(pretrain, "val/t2v/R1") and val["x"], "zero-shot R@1 at every validated step"
    for run in viz.find_runs(client, "clipvip-tiny", "demo-finetune-"):
        label = f"{run.name.removeprefix('demo-finetune-')} t2v/R1"
        assert line("finetune: validation split retrieval", label)["x"] == steps(run, "val/t2v/R1")
