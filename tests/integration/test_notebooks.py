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

NOTEBOOKS = os.path.join(ROOT, "notebooks")
DEMO_TIMEOUT_S = 900
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    """`clipvip demo --quick` into a temp dir, once for the module; the demo's own test."""
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.1")
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--out", str(out), "--quick"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    log = f"stdout tail:\n{proc.stdout[-4000:]}\nstderr tail:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, log
    assert "demo report" in proc.stdout, log
    assert "test t2v R@1" in proc.stdout, log
    report = json.loads((out / "demo_report.json").read_text(encoding="utf-8"))
    # One CLIP-ViP pretrain; both models fine-tuned from it side by side, to the quick step counts.
    assert {n: r["steps"] for n, r in report["pretrain"].items()} == {"clip-vip": 2}, log
    assert {n: r["steps"] for n, r in report["finetune"].items()} == {"clip-vip": 4, "meanpool-baseline": 4}, log
    assert set(report["stage_s"]) == {"sample-data", "ray-start", "prepare", "recaption", "pack", "pretrain",
                                      "finetune", "evaluate"}
    assert report["pack"]["view"] == "tiny_git" and report["pack"]["rows"] > 0, log
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
    outputs = execute(name, demo_out, kernel_manager(), tmp_path)
    flat = [o for cell in outputs for o in cell]
    errors = [f"{o.get('ename')}: {o.get('evalue')}" for o in flat if o.output_type == "error"]
    assert not errors, errors
    images = [o for o in flat if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]
    assert images, f"{name} drew no image (executed copy in {tmp_path})"
