"""House-style layering, enforced by an AST scan of imports (house_style.md section 3.2)."""

from __future__ import annotations

import ast
import os

from tests.conftest import ROOT

PIPELINE = os.path.join(ROOT, "pipeline")

# module path prefix (relative to repo) -> top-level packages it must not import
FORBIDDEN = {
    "pipeline/config.py": {"torch", "ray", "deepspeed", "mlflow"},
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


def _imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0], node.lineno


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
