"""House-style layering, enforced by an AST scan of imports (house_style.md section 3.2)."""

from __future__ import annotations

import ast
import os

from tests.conftest import ROOT

PIPELINE = os.path.join(ROOT, "pipeline")

# module path prefix (relative to repo) -> top-level packages it must not import
FORBIDDEN = {
    "pipeline/config/": {"torch", "ray", "deepspeed", "mlflow"},
    "pipeline/schema.py": {"torch", "ray", "deepspeed", "mlflow"},
    "pipeline/utils/": {"torch", "ray", "deepspeed", "mlflow"},
    "pipeline/model/": {"ray", "deepspeed", "mlflow"},
    "pipeline/data/": {"deepspeed", "mlflow"},
    "pipeline/data/frames.py": {"ray"},
    "pipeline/data/decoders.py": {"ray", "torch"},
    "pipeline/data/metadata.py": {"ray"},
    "pipeline/data/root.py": {"ray", "torch"},
    "pipeline/data/index.py": {"ray", "torch"},
    "pipeline/data/inputs.py": {"ray", "torch"},
    "pipeline/data/memory.py": {"ray", "torch"},
    "pipeline/plan.py": {"deepspeed", "mlflow"},
    "pipeline/data/subtitles.py": {"ray"},
    "pipeline/data/captioner.py": {"ray"},
    "pipeline/data/captioner_load.py": {"ray"},
    "pipeline/data/shards.py": {"ray"},
    "pipeline/data/captions.py": {"ray"},
    "pipeline/data/synthetic.py": {"ray"},
    "pipeline/data/sampling.py": {"ray"},
    "pipeline/eval/": {"deepspeed"},
    "pipeline/eval/metrics.py": {"torch", "ray", "mlflow"},
    "pipeline/eval/formats.py": {"torch", "ray", "mlflow"},
    "pipeline/eval/video.py": {"ray", "mlflow"},
    "pipeline/eval/encode.py": {"ray", "mlflow"},
    "pipeline/train/retrieval_data.py": {"ray", "deepspeed", "mlflow"},
    "pipeline/": {"argparse", "jobs"},
}


def _modules(path, root=ROOT):
    """(dotted module, line) of every import in `path`, relative imports resolved, lazy ones too;
    `from a import b` yields both `a` and `a.b` (b may be a module)."""
    rel = os.path.relpath(path, root).replace(os.sep, "/")[:-3]
    package = rel.split("/")[:-1]  # the package a relative import starts from (an __init__'s own too)
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module, node.lineno
            for a in node.names:
                yield f"{module}.{a.name}", node.lineno


def _imports(path):
    for module, line in _modules(path):
        yield module.split(".")[0], line


def _py_files(base):
    for dirpath, _, files in os.walk(base):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


def test_imports_point_down():
    bad = []
    for path in _py_files(PIPELINE):
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        banned = set().union(*(v for k, v in FORBIDDEN.items() if rel.startswith(k)))
        bad += [f"{rel}:{line} imports {mod}" for mod, line in _imports(path) if mod in banned]
    assert not bad, "\n".join(bad)


def test_library_never_starts_ray():
    bad = []
    for path in _py_files(PIPELINE):
        src = open(path, encoding="utf-8").read()
        if "ray.init(" in src:
            bad.append(os.path.relpath(path, ROOT))
    assert not bad, f"only jobs/ may call ray.init: {bad}"


def test_importing_pipeline_is_cheap():
    import subprocess
    import sys

    code = "import sys, pipeline, pipeline.config, pipeline.schema; print(sorted(m for m in ('torch','ray','mlflow','deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# The project's own layers: (files, what they must not import, why). Prefixes of repo paths and of
# dotted module names; jobs/ and bench/ are held too (tests are not).
# Everything of the project but the configs: what pipeline/config/ must not import.
NOT_CONFIG = tuple(sorted(
    "pipeline." + (n[:-3] if n.endswith(".py") else n) for n in os.listdir(os.path.join(ROOT, "pipeline"))
    if n not in ("config", "__init__.py", "__pycache__") and (n.endswith(".py") or "." not in n)))

LAYERS = [
    ("pipeline/config/", NOT_CONFIG, "every job's config is built before any of its code is imported"),
    ("pipeline/model/", ("pipeline.data", "pipeline.train", "pipeline.eval"), "the model is the bottom layer"),
    ("pipeline/data/", ("pipeline.train", "pipeline.eval"), "data serves training and evaluation"),
    ("pipeline/eval/", ("pipeline.train",), "evaluation runs without training"),
    ("", ("ray.train", "deepspeed"), "only pipeline/train/ drives training"),
    ("", ("mlflow",), "only pipeline/tracking.py talks to MLflow"),
]
LAYER_HOMES = {"ray.train": "pipeline/train/", "deepspeed": "pipeline/train/", "mlflow": "pipeline/tracking.py"}
NOT_YET: set[tuple[str, str]] = set()  # (file, layer) pairs allowed for now: none


def _banned(module: str, prefixes: tuple[str, ...]) -> str | None:
    return next((p for p in prefixes if module == p or module.startswith(p + ".")), None)


def test_project_layers():
    bad = []
    for top in ("pipeline", "jobs", "bench"):
        for path in _py_files(os.path.join(ROOT, top)):
            rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
            for files, prefixes, why in LAYERS:
                if not rel.startswith(files):
                    continue
                for module, line in _modules(path):
                    hit = _banned(module, prefixes)
                    if hit is None or rel.startswith(LAYER_HOMES.get(hit, "\0")) or (rel, hit) in NOT_YET:
                        continue
                    bad.append(f"{rel}:{line} imports {module} ({why})")
    assert not bad, "\n".join(sorted(set(bad)))


# What a job may import from jobs/: the shared helpers. A job that needs another job's logic
# calls the library (pipeline/) instead; the dispatcher (cli.py) imports them all.
JOB_HELPERS = ("jobs.common", "jobs.stderr_filter", "jobs.job_control")


def test_jobs_do_not_import_each_other():
    bad = []
    for path in _py_files(os.path.join(ROOT, "jobs")):
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        if rel in ("jobs/cli.py", "jobs/__init__.py"):
            continue
        own = rel[:-3].replace("/", ".")
        for module, line in _modules(path):
            if module in ("jobs", own) or not module.startswith("jobs.") or _banned(module, JOB_HELPERS):
                continue
            bad.append(f"{rel}:{line} imports {module} (call pipeline/, not another job)")
    assert not bad, "\n".join(sorted(set(bad)))


def test_layer_scan_sees_relative_and_lazy_imports(tmp_path):
    pkg = tmp_path / "pipeline" / "model"
    pkg.mkdir(parents=True)
    src = pkg / "x.py"
    src.write_text("from ..data import loader\n\ndef f():\n    import mlflow\n    from . import y\n")
    got = {m for m, _ in _modules(str(src), str(tmp_path))}
    assert {"pipeline.data", "pipeline.data.loader", "mlflow", "pipeline.model", "pipeline.model.y"} <= got
