"""Sections every job shares: storage (S3), Ray, the cluster's shape, MLflow tracking."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

from pipeline.config.build import ConfigError, refuse_credentials


@dataclass(frozen=True, kw_only=True, slots=True)
class StorageConfig:
    s3_endpoint_url: str | None = None
    """Endpoint override for S3-compatible stores (else AWS_ENDPOINT_URL[_S3] or AWS)."""
    s3_region: str | None = None
    """Region for S3 (else the AWS chain's region, else us-east-1)."""
    retry_attempts: int = 8
    """Tries per S3 request on transient errors (SlowDown/503, other 5xx, resets, timeouts); a
    video whose reads still fail is quarantined at stage `read` (retryable later)."""
    retry_base_s: float = 0.1
    """First backoff; doubles each try with jitter (x0.5-1.5), capped at retry_max_s."""
    retry_max_s: float = 10.0
    read_block_mb: float = 8.0
    """Large objects are read in ranged GETs of this size, the next block fetched ahead."""
    whole_read_max_mb: float = 64.0
    """Objects up to this size (most videos' metadata, shards' footers aside) are read in one GET."""

    def __post_init__(self) -> None:
        refuse_credentials("storage.s3_endpoint_url", self.s3_endpoint_url)
        if self.retry_attempts < 1:
            raise ConfigError(f"storage.retry_attempts: must be >= 1, got {self.retry_attempts}")
        if self.retry_base_s < 0 or self.retry_max_s < self.retry_base_s:
            raise ConfigError("storage.retry_base_s must be >= 0 and storage.retry_max_s >= retry_base_s")
        if self.read_block_mb < 1 or self.whole_read_max_mb < 0:
            raise ConfigError("storage.read_block_mb must be >= 1 and storage.whole_read_max_mb >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterShape:
    """The machines a recipe expects, for `clipvip plan`'s fit checks when it cannot ask the
    cluster itself (no `ray.address`). Mirror cluster/kuberay/raycluster.yaml or ray_cluster.yaml."""

    head_memory_gb: float
    """Memory of the node the driver runs on."""
    cpu_node_cpus: int = 0
    """CPUs of a decode (CPU) worker node; 0 = no such node group."""
    cpu_node_memory_gb: float = 0.0
    gpu_node_cpus: int = 0
    """CPUs of a GPU worker node (training workers and their loader tasks share them)."""
    gpu_node_gpus: int = 0
    gpu_node_memory_gb: float = 0.0

    def __post_init__(self) -> None:
        for name in ("head_memory_gb", "cpu_node_cpus", "cpu_node_memory_gb", "gpu_node_cpus", "gpu_node_gpus",
                     "gpu_node_memory_gb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ray.cluster.{name}: must be >= 0, got {getattr(self, name)}")
        if self.gpu_node_gpus and not self.gpu_node_cpus:
            raise ConfigError("ray.cluster.gpu_node_cpus: required when gpu_node_gpus is set")


@dataclass(frozen=True, kw_only=True, slots=True)
class RayConfig:
    address: str | None = None
    """Ray address to connect to; None starts a local Ray instance."""
    num_cpus: int | None = None
    """CPUs for a local instance (None = all)."""
    decode_cpus_per_task: float = 1.0
    """CPUs reserved per decode task (one task = one work unit)."""
    decode_memory_gb: float | None = None
    """Memory reserved per decode task (one unit's frames are held until its shard is written);
    None = sized from the largest unit to decode (its clips x frames.max_frames x the frame size,
    plus the video read buffer; `pipeline/data/memory.py`), as `clipvip plan` reports."""
    progress_bars: bool = True
    cluster: ClusterShape | None = None
    """The cluster's node shapes, for `clipvip plan` (None: ask the connected cluster, or this machine)."""

    def __post_init__(self) -> None:
        if self.decode_cpus_per_task <= 0:
            raise ConfigError(f"ray.decode_cpus_per_task: must be > 0, got {self.decode_cpus_per_task}")
        if self.decode_memory_gb is not None and self.decode_memory_gb <= 0:
            raise ConfigError(f"ray.decode_memory_gb: must be > 0, got {self.decode_memory_gb}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"ray.num_cpus: must be >= 1, got {self.num_cpus}")


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@'\"]+@")


def _default_tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return _USERINFO.sub(r"\1", uri) if uri else "sqlite:///out/mlflow.db"


@dataclass(frozen=True, kw_only=True, slots=True)
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str = field(default_factory=lambda: _default_tracking_uri())
    """sqlite:///path locally; http://host:5000 for a tracking server (MLflow's file store is refused).
    Unset: $MLFLOW_TRACKING_URI (MLflow's own variable) without any user:password@ in it (credentials
    come from MLFLOW_TRACKING_USERNAME/PASSWORD, never from a URI that params and logs would copy),
    else sqlite:///out/mlflow.db."""
    experiment: str = "clipvip"
    system_metrics: bool = True
    register_model: str | None = "clip-vip"
    """Registered model name for the final weights (None: log them, do not register)."""

    def __post_init__(self) -> None:
        if self.tracking_uri.startswith("file:") or "://" not in self.tracking_uri:
            raise ConfigError(f"tracking.tracking_uri: use sqlite:///path or http(s)://host, got {self.tracking_uri!r} "
                              "(MLflow 3 refuses its file store)")
        refuse_credentials("tracking.tracking_uri", self.tracking_uri)


def absolute_tracking(cfg: TrackingConfig) -> TrackingConfig:
    """A relative sqlite:///path becomes absolute (its directory created), so the driver and the
    Ray workers, which run in another cwd, write the same database."""
    uri = cfg.tracking_uri
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:////"):
        return cfg
    db = os.path.abspath(uri[len("sqlite:///"):])
    os.makedirs(os.path.dirname(db), exist_ok=True)
    return dataclasses.replace(cfg, tracking_uri="sqlite:///" + db)


def data_job_tracking() -> TrackingConfig:
    """The tracking default of prepare, recaption and pack: a run per job, no node monitor and
    nothing to register."""
    return TrackingConfig(system_metrics=False, register_model=None)
