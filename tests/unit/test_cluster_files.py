"""Offline checks of where jobs run: ray_cluster.yaml, cluster/Dockerfile, KubeRay manifests, the
MLflow server and cluster/runtime_env.yaml. Nothing here can be run without a cloud account, so
what can be checked is checked: YAML parses, fields KubeRay / the cluster launcher need, and that
versions, images, recipes, GPU counts and bind addresses agree with the rest of the project."""

from __future__ import annotations

import glob
import os
import re
import shlex
import tomllib
from urllib.parse import urlsplit

import pytest
import yaml

from pipeline import submit as core
from tests.conftest import ROOT

CLUSTER = os.path.join(ROOT, "cluster")
KUBERAY = os.path.join(CLUSTER, "kuberay")
IMAGE_DIR = "/opt/clipvip/"  # WORKDIR of cluster/Dockerfile: where RayJob entrypoints find recipes
YAML_FILES = sorted(glob.glob(os.path.join(CLUSTER, "**", "*.yaml"), recursive=True)) + [
    os.path.join(ROOT, "ray_cluster.yaml")]


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def docs(path: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(read(path)) if d]


def pins() -> dict[str, str]:
    out = {}
    for line in read(os.path.join(ROOT, "requirements.txt")).splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s#;]+)", line)
        if m:
            out[m.group(1).lower()] = m.group(3)
    return out


def project_version() -> str:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["version"]


def image() -> str:
    return f"registry.example.com/ml/clipvip-pipeline:{project_version()}"


def kuberay_objects(kind: str) -> list[tuple[str, dict]]:
    return [(p, d) for p in sorted(glob.glob(os.path.join(KUBERAY, "*.yaml"))) for d in docs(p) if d["kind"] == kind]


def cluster_specs() -> list[tuple[str, dict]]:
    """(file, RayClusterSpec) of the RayCluster and of every RayJob."""
    return ([(p, d["spec"]) for p, d in kuberay_objects("RayCluster")]
            + [(p, d["spec"]["rayClusterSpec"]) for p, d in kuberay_objects("RayJob")])


def containers(spec: dict) -> list[tuple[str, dict]]:
    """(group name, container) of a RayClusterSpec, head included."""
    out = [("head", c) for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    for g in spec.get("workerGroupSpecs", []):
        out += [(g["groupName"], c) for c in g["template"]["spec"]["containers"]]
    return out


def gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


# --------------------------------------------------------------------------------------------
# Parsing and secrets


@pytest.mark.parametrize("path", YAML_FILES, ids=[os.path.relpath(p, ROOT) for p in YAML_FILES])
def test_yaml_parses(path):
    assert docs(path), f"{path} is empty"


def test_no_credentials_in_cluster_files():
    files = [p for p in glob.glob(os.path.join(CLUSTER, "**", "*"), recursive=True) if os.path.isfile(p)]
    bad = []
    for path in files + [os.path.join(ROOT, "ray_cluster.yaml")]:
        text = read(path)
        rel = os.path.relpath(path, ROOT)
        if core.has_userinfo(text):
            bad.append(f"{rel}: URI with userinfo")
        if re.search(r"AKIA[0-9A-Z]{16}", text):
            bad.append(f"{rel}: AWS access key id")
        for m in re.finditer(r"(?m)^\s*(?:export\s+|-\s*)?([A-Z][A-Z0-9_]*)\s*[=:]\s*(\S+)", text):
            if core.is_secret_name(m.group(1)) and not m.group(2).startswith(("{", "$")):
                bad.append(f"{rel}: {m.group(1)} set to a literal")
    for path, d in [(p, d) for p in YAML_FILES if p.startswith(CLUSTER) for d in docs(p)]:
        for env in _env_entries(d):
            if core.is_secret_name(env["name"]):
                assert "valueFrom" in env and "secretKeyRef" in env["valueFrom"], f"{path}: {env['name']}"
    assert not bad, bad


def _env_entries(node):
    if isinstance(node, dict):
        if isinstance(node.get("env"), list):
            yield from (e for e in node["env"] if isinstance(e, dict) and "name" in e)
        for v in node.values():
            yield from _env_entries(v)
    elif isinstance(node, list):
        for v in node:
            yield from _env_entries(v)


def test_secret_scan_can_fail():
    assert core.has_userinfo("postgresql://mlflow:pw@db/mlflow")
    assert core.is_secret_name("POSTGRES_PASSWORD") and core.is_secret_name("AWS_SECRET_ACCESS_KEY")
    assert core.is_secret_name("PGPASSWORD") and core.is_secret_name("HF_TOKEN") and core.is_secret_name("GH_APITOKEN")
    assert not core.is_secret_name("TOKENIZERS_PARALLELISM") and not core.is_secret_name("AWS_DEFAULT_REGION")


# --------------------------------------------------------------------------------------------
# ray_cluster.yaml (cluster launcher)


@pytest.fixture(scope="module")
def launcher():
    return docs(os.path.join(ROOT, "ray_cluster.yaml"))[0]


def test_ray_cluster_node_types_and_autoscaling_bounds(launcher):
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != launcher["head_node_type"]}
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= launcher["max_workers"], name
    gpu_types = {k: v for k, v in workers.items() if v.get("resources", {}).get("GPU", 0) > 0}
    cpu_types = {k: v for k, v in workers.items() if not v.get("resources", {}).get("GPU")}
    assert gpu_types and cpu_types, "GPU workers (captioning, training) and CPU workers (decoding)"
    assert types[launcher["head_node_type"]]["resources"].get("CPU") == 0, "the head runs drivers only"
    # The biggest GPU recipe fits: train.num_workers GPUs at most.
    capacity = sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu_types.values())
    assert capacity >= max_gpu_workers_of_recipes()


def max_gpu_workers_of_recipes() -> int:
    most = 0
    for path in glob.glob(os.path.join(ROOT, "jobs", "configs", "*.yaml")):
        train = core.read_recipe(path).get("train") or {}
        if train.get("use_gpu"):
            most = max(most, int(train["num_workers"]))
    assert most > 0
    return most


def test_ray_cluster_installs_the_project_with_our_pins(launcher):
    setup = "\n".join(launcher["setup_commands"])
    p = pins()
    assert f"torch=={p['torch']}" in setup
    assert re.search(r"--index-url https://download\.pytorch\.org/whl/cu12\d", setup), "the CUDA 12 build of torch"
    torch_at = setup.index("torch==")
    assert torch_at < setup.index("-r ~/clipvip/requirements.txt"), "torch first (deepspeed would pull another)"
    assert "--no-deps -e ~/clipvip" in setup and "vocab" in setup
    assert_dependencies_compiled(launcher["setup_commands"])
    for name, version in re.findall(r"\b(ray|deepspeed|mlflow|torch)(?:\[[^\]]*\])?==([\w.]+)", setup):
        assert version == p[name], f"{name}=={version} but requirements.txt pins {p[name]}"
    assert launcher["file_mounts"]["~/clipvip"] == "."
    # S3 / MLflow settings through the environment, sourced before Ray starts.
    assert "MLFLOW_TRACKING_URI=" in setup and "AWS_DEFAULT_REGION=" in setup
    for cmd in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert cmd.strip().startswith(". ~/clipvip.env"), cmd


def test_ray_cluster_dashboard_binds_loopback(launcher):
    head = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in read(os.path.join(ROOT, "ray_cluster.yaml"))


def assert_dependencies_compiled(commands: list[str]) -> None:
    """Every uv install of torch or requirements.txt writes bytecode: uv writes none by default, and
    a process that cannot cache it (PYTHONDONTWRITEBYTECODE, a read-only venv) compiles the
    libraries from source on every import."""
    installs = [c for c in commands if "uv pip install" in c and ("torch==" in c or "requirements.txt" in c)]
    assert len(installs) >= 2, f"torch and requirements.txt installs not found in {commands}"
    for cmd in installs:
        assert "--compile-bytecode" in cmd, f"no --compile-bytecode: {cmd.strip()}"


def test_make_install_compiles_dependencies():
    lines = read(os.path.join(ROOT, "Makefile")).splitlines()
    requirements = [line for line in lines if "uv pip install" in line and "requirements.txt" in line]
    assert requirements and all("--compile-bytecode" in line for line in requirements), requirements
    torch = [line for line in lines if "torch==" in line and "install" in line]
    # pip compiles by default; uv only when told.
    assert torch and all("uv pip" not in line or "--compile-bytecode" in line for line in torch), torch


# --------------------------------------------------------------------------------------------
# Docker images


def dockerfile() -> str:
    return read(os.path.join(CLUSTER, "Dockerfile"))


def test_dockerfile_builds_the_pinned_cuda_stack():
    text, p = dockerfile(), pins()
    base = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-[\w-]*runtime[\w.-]*", text)
    assert base, "an NVIDIA CUDA runtime base image"
    index = re.search(r"--index-url https://download\.pytorch\.org/whl/cu(\d+)", text)
    assert index and index.group(1) == base.group(1) + base.group(2), "torch wheel CUDA = base image CUDA"
    assert f"torch=={p['torch']}" in text
    assert text.index("torch==") < text.index("-r requirements.txt"), "torch installed first"
    assert "eva-decord" in p, "decord comes with requirements.txt (eva-decord: same `import decord`)"
    assert "--no-deps -e ." in text and "make vocab" in text
    assert re.search(r"^ENV (?:.*\\\n)*\s*UV_COMPILE_BYTECODE=1\b", text, re.M), "uv installs compile bytecode"
    assert re.search(rf"WORKDIR {IMAGE_DIR.rstrip('/')}\b", text)
    assert f"-t {image()} ." in text, "the documented build tag is the image the manifests use"
    assert "USER ray" in text


def test_mlflow_image_matches_client_pins():
    text, p = read(os.path.join(CLUSTER, "mlflow", "Dockerfile")), pins()
    assert f"mlflow=={p['mlflow']}" in text and f"boto3=={p['boto3']}" in text
    assert "psycopg2" in text, "driver for the PostgreSQL backend store"


# --------------------------------------------------------------------------------------------
# KubeRay


def test_kuberay_images_and_ray_version_match_the_project():
    specs = cluster_specs()
    assert len(specs) >= 5, "a RayCluster and RayJobs for prepare, recaption, pretrain, finetune"
    for path, spec in specs:
        assert spec["rayVersion"] == pins()["ray"], path
        for group, c in containers(spec):
            assert c["image"] == image(), f"{path} {group}: {c['image']}"
            assert {"configMapRef": {"name": "clipvip-env"}} in c.get("envFrom", []), f"{path} {group}"


def rayjobs() -> dict[str, tuple[str, dict]]:
    out = {}
    for path, d in kuberay_objects("RayJob"):
        kind = shlex.split(d["spec"]["entrypoint"])[1]
        out[kind] = (path, d)
    return out


def test_rayjobs_cover_the_job_kinds_with_valid_entrypoints():
    from jobs.cli import COMMANDS

    jobs = rayjobs()
    assert {"prepare", "recaption", "pack", "pretrain", "finetune"} <= set(jobs)
    runtime_env = core.read_recipe(os.path.join(CLUSTER, "runtime_env.yaml"))
    for kind, (path, d) in jobs.items():
        spec = d["spec"]
        argv = shlex.split(spec["entrypoint"])
        assert argv[0] == "clipvip" and argv[1] in COMMANDS and argv[2] == "--config", path
        assert argv[3].startswith(IMAGE_DIR), f"{path}: recipes live in the image at {IMAGE_DIR}"
        recipe = os.path.join(ROOT, argv[3][len(IMAGE_DIR):])
        assert os.path.isfile(recipe), f"{path}: {argv[3]} is not in this checkout"
        overrides = argv[5::2]
        assert argv[4::2] == ["--set"] * len(overrides), f"{path}: only --set after the recipe"
        assert core.infer_kind(core.apply_overrides(core.read_recipe(recipe), overrides)) == kind
        # The whole config validates, and the run name is the one the manifest advertises.
        assert core.resolve_run_name(kind, recipe, overrides) == spec["metadata"]["clipvip.run_name"], path
        assert spec["metadata"]["clipvip.kind"] == kind
        assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"] == runtime_env["env_vars"], path
        assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] in ("K8sJobMode", "HTTPMode")
        core.check_no_credentials(spec, path)


def test_rayjobs_request_the_gpus_their_recipes_need():
    for kind, (path, d) in rayjobs().items():
        spec = d["spec"]["rayClusterSpec"]
        groups = spec["workerGroupSpecs"]
        gpu_groups = [g for g in groups if any(gpus(c) for c in g["template"]["spec"]["containers"])]
        for g in groups:
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{path} {g['groupName']}"
        if kind == "pack":  # CPU work only: a GPU pod would idle
            assert not gpu_groups, f"{path}: pack needs no GPU"
            continue
        assert gpu_groups, f"{path}: {kind} needs GPU workers (captioner or training)"
        for g in gpu_groups:
            tolerations = g["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), f"{path} {g['groupName']}"
        if kind in ("pretrain", "finetune"):
            recipe = os.path.join(ROOT, shlex.split(d["spec"]["entrypoint"])[3][len(IMAGE_DIR):])
            train = core.read_recipe(recipe)["train"]
            assert train["use_gpu"] is True
            total = sum(g["minReplicas"] * gpus(c) for g in gpu_groups for c in g["template"]["spec"]["containers"])
            assert total == train["num_workers"], f"{path}: {total} GPUs for {train['num_workers']} Train workers"
            for g in gpu_groups:
                fixed = g["replicas"] == g["minReplicas"] == g["maxReplicas"]
                assert fixed, "fixed world size: ZeRO shards and the InfoNCE batch depend on it"
                for c in g["template"]["spec"]["containers"]:
                    cpus = float(c["resources"]["limits"]["cpu"])
                    assert cpus >= gpus(c) * float(train.get("cpus_per_worker", 1)), f"{path}: CPUs per worker"


def test_kuberay_dashboards_bind_loopback_or_stay_in_the_namespace():
    (policy,) = [d for _, d in kuberay_objects("NetworkPolicy")]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"] and policy["spec"]["ingress"]
    for path, spec in cluster_specs():
        head = spec["headGroupSpec"]
        host = head["rayStartParams"].get("dashboard-host", "127.0.0.1")
        if host != "127.0.0.1":
            assert head["serviceType"] == "ClusterIP", f"{path}: the head Service is never exposed"
            for group in [head, *spec["workerGroupSpecs"]]:
                labels = group["template"]["metadata"]["labels"]
                assert selected.items() <= labels.items(), f"{path}: pods outside the NetworkPolicy"


# --------------------------------------------------------------------------------------------
# MLflow server


def test_mlflow_server_database_backend_s3_artifacts_and_binding():
    objs = docs(os.path.join(CLUSTER, "mlflow", "mlflow.yaml"))
    (deploy,) = [d for d in objs if d["kind"] == "Deployment"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    args = dict(a.split("=", 1) for a in container["args"] if a.startswith("--") and "=" in a)
    backend = urlsplit(args["--backend-store-uri"])
    assert backend.scheme.startswith("postgresql") and backend.username is None, "a database, no credentials in the URI"
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["PGPASSWORD"]["valueFrom"]
    assert args["--artifacts-destination"].startswith("s3://") and "--serve-artifacts" in container["args"]
    assert "*" not in args["--allowed-hosts"].split(",")
    services = {d["metadata"]["name"]: d for d in objs if d["kind"] == "Service"}
    policies = [d for d in objs if d["kind"] == "NetworkPolicy"]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    if args["--host"] != "127.0.0.1":
        assert all(s["spec"]["type"] == "ClusterIP" for s in services.values())
        assert any(p["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items() for p in policies)
    # The recipes and the Ray pods point at this Service.
    port = int(args["--port"])
    for path in glob.glob(os.path.join(ROOT, "jobs", "configs", "*.yaml")):
        uri = (core.read_recipe(path).get("tracking") or {}).get("tracking_uri", "")
        if uri.startswith("http"):
            u = urlsplit(uri)
            name, namespace = u.hostname.split(".")[:2]
            assert name in services and namespace == deploy["metadata"]["namespace"], path
            assert u.port == port == services[name]["spec"]["ports"][0]["port"], path
    (config_map,) = [d for _, d in kuberay_objects("ConfigMap")]
    assert urlsplit(config_map["data"]["MLFLOW_TRACKING_URI"]).port == port


def test_runtime_env_is_usable_and_installs_nothing():
    base = core.read_recipe(os.path.join(CLUSTER, "runtime_env.yaml"))
    plan = core.build_runtime_env(ROOT, base, {})
    assert not set(core.INSTALLING_KEYS) & set(plan.runtime_env)
    assert all(isinstance(v, str) for v in base["env_vars"].values()), "Ray needs string env values"
