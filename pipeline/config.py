"""Typed, validated job configs: YAML recipe + repeated `--set a.b=c` overrides.

Every section is a frozen dataclass; `load_config` builds them from plain dicts, rejecting
unknown keys and wrong types with the dotted key and the reason, before any work starts.
Components receive only their own section (`FramesConfig` goes to frame code, and so on).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config value is wrong; the message names the dotted key and the reason."""


_URI_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/\s@'\"]+@")


def refuse_credentials(key: str, value: str | None) -> None:
    """Credentials in a URI (`https://user:token@host`) would be copied into MLflow params, the
    resolved config written next to checkpoints, and logs; they must come from the environment
    (MLFLOW_TRACKING_USERNAME/PASSWORD, the AWS chain) instead."""
    if value and _URI_USERINFO.search(value):
        raise ConfigError(f"{key}: holds credentials in the URI; take them out and set them in the environment "
                          "(MLFLOW_TRACKING_USERNAME/PASSWORD, AWS_* or an instance role)")


# --------------------------------------------------------------------------------------------
# Sections


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
class DataConfig:
    root: str
    """Dataset root to write (local path or s3://bucket/prefix)."""
    metadata: tuple[str, ...]
    """HD-VILA-100M metadata parts, jsonl ({"video_id", "url", "clip": [{"clip_id", "span"}]}): files,
    directories of *.jsonl, or glob patterns (s3://bucket/meta/hdvila_part*.jsonl). Each part is
    named by its file name; listing more parts on a later run grows the root."""
    video_root: str
    """Directory (or s3:// prefix) holding <video_id>.<ext> source videos."""
    subtitles: str
    """clip_id->text table (.jsonl/.parquet), or a directory of per-video <video_id>.vtt/.srt."""
    video_extensions: tuple[str, ...] = ("mp4", "mkv", "webm", "mov", "avi")
    """Extensions tried, in order, when looking for <video_root>/<video_id>.<ext>."""
    clips_per_shard: int = 256
    """Target clips per work unit / shard; a video's clips never straddle two units."""
    force: bool = False
    """Allow changed settings or a changed part on an existing root: its frames, captions,
    quarantine, plans and index are deleted and rebuilt. Without it such a run is refused."""
    retry_quarantined: bool = False
    """Also re-attempt the clips quarantined at a retryable stage (`read`: storage kept failing)
    into new shards, nothing else touched; clips that recover leave the quarantine."""

    def __post_init__(self) -> None:
        if not self.metadata:
            raise ConfigError("data.metadata: at least one metadata jsonl is required")
        if self.clips_per_shard < 1:
            raise ConfigError(f"data.clips_per_shard: must be >= 1, got {self.clips_per_shard}")
        if not self.root:
            raise ConfigError("data.root: must not be empty")
        if not self.subtitles:
            raise ConfigError("data.subtitles: must not be empty (a clip_id->text table or a directory of .vtt/.srt)")


@dataclass(frozen=True, kw_only=True, slots=True)
class FramesConfig:
    fps: float = 3.0
    """Sampling rate inside each span (the paper's clips are 3 fps)."""
    max_frames: int = 32
    """Cap per clip; longer spans are sampled uniformly down to this many frames."""
    short_side_px: int = 240
    """Frames are resized so their short side is this (aspect kept); 0 keeps the source size."""
    jpeg_quality: int = 90
    backend: Literal["pyav", "decord"] = "pyav"
    """Decoder. PyAV is the default because it measured faster (bench/decode.py, README)."""
    span_tolerance_s: float = 0.5
    """A span may end this far past the video's end (rounding in HD-VILA spans); it is clamped."""
    decode_threads: int = 1
    """Decoder threads per task; parallelism comes from Ray tasks, so 1 by default."""

    def __post_init__(self) -> None:
        if not 0 < self.fps <= 120:
            raise ConfigError(f"frames.fps: must be in (0, 120], got {self.fps}")
        if self.max_frames < 1:
            raise ConfigError(f"frames.max_frames: must be >= 1, got {self.max_frames}")
        if self.short_side_px < 0 or 0 < self.short_side_px < 16:
            raise ConfigError(f"frames.short_side_px: must be 0 or >= 16, got {self.short_side_px}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"frames.jpeg_quality: must be in [1, 100], got {self.jpeg_quality}")
        if self.span_tolerance_s < 0:
            raise ConfigError(f"frames.span_tolerance_s: must be >= 0, got {self.span_tolerance_s}")
        if self.decode_threads < 0:
            raise ConfigError(f"frames.decode_threads: must be >= 0, got {self.decode_threads}")


@dataclass(frozen=True, kw_only=True, slots=True)
class CaptionConfig:
    set_name: str = "default"
    """Caption set directory name under <root>/captions/."""
    model: str = "Salesforce/blip-image-captioning-large"
    """HF hub id, local directory, or `builtin:<name>` (random-init: tiny-blip, tiny-git for CPU demos;
    random-blip-large, random-git-large with the real shapes, for benchmarks)."""
    revision: str | None = None
    """Hub revision (commit/tag) to pin; recorded in caption_set.json."""
    prompt: str | None = None
    """Text prompt for conditional captioners (e.g. Florence-2's '<CAPTION>'); None = unconditional."""
    max_new_tokens: int = 30
    num_beams: int = 1
    batch_size: int = 16
    """Images per generate() call."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto = bfloat16 on GPU, float32 on CPU."""
    trust_remote_code: bool = False
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where the captioner runs. `cuda`: every actor reserves GPUs and fails at start, naming its
    node, if it sees no CUDA device (a GPU recipe never quietly captions on a CPU); use it on
    clusters that add GPU nodes on demand. `cpu`: on the CPU. `auto`: `cuda` when the cluster has
    GPUs when the job starts, else `cpu` with one CPU per actor."""
    num_gpus_per_actor: float | None = None
    """GPUs each captioner actor reserves (fractions pack small models); None = 1 when the
    captioner runs on cuda, else 0. Logical GPUs work with `device: cpu` (the actors then go to
    the nodes that offer GPUs, e.g. `ray start --num-gpus=1` in tests)."""
    min_actors: int = 1
    """Captioner actors kept alive (and waited for) from the start."""
    max_actors: int | None = None
    """Upper bound of the captioner actor pool, which grows as nodes with free GPUs join (the
    autoscaler's GPU node group); None = what the cluster holds when the job starts (its GPUs /
    num_gpus_per_actor, or 1 CPU actor). Set it to the GPU node group's maximum when GPU nodes
    scale from zero."""

    def __post_init__(self) -> None:
        if not self.set_name or "/" in self.set_name or self.set_name.startswith("."):
            raise ConfigError(f"caption.set_name: must be a plain directory name, got {self.set_name!r}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"caption.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ConfigError(f"caption.num_beams: must be >= 1, got {self.num_beams}")
        if self.batch_size < 1:
            raise ConfigError(f"caption.batch_size: must be >= 1, got {self.batch_size}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"caption.device: must be auto, cuda or cpu, got {self.device!r}")
        if self.num_gpus_per_actor is not None and not 0 <= self.num_gpus_per_actor <= 8:
            raise ConfigError(f"caption.num_gpus_per_actor: must be in [0, 8], got {self.num_gpus_per_actor}")
        if self.device == "cuda" and self.num_gpus_per_actor == 0:
            raise ConfigError("caption.num_gpus_per_actor: 0 with caption.device=cuda would put the captioner on "
                              "nodes without a GPU; leave it unset (1) or reserve a fraction")
        if self.min_actors < 1:
            raise ConfigError(f"caption.min_actors: must be >= 1, got {self.min_actors}")
        if self.max_actors is not None and self.max_actors < self.min_actors:
            raise ConfigError(f"caption.max_actors: must be >= caption.min_actors ({self.min_actors}), "
                              f"got {self.max_actors}")

    def identity(self) -> dict[str, Any]:
        """What defines the captions this set holds (fingerprinted; batching/resources excluded)."""
        return {
            "model": self.model,
            "revision": self.revision,
            "prompt": self.prompt,
            "generation": {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": False},
            "dtype": self.dtype,
        }


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


@dataclass(frozen=True, kw_only=True, slots=True)
class RecaptionJobConfig:
    """`clipvip recaption`: a new caption set for an existing root, frames untouched."""

    run_name: str = "recaption"
    root: str
    """Dataset root written by `prepare` (local or s3://)."""
    caption: CaptionConfig
    """The captioner and the new set's name (caption.set_name)."""
    frames_per_clip: int = 1
    """1 captions the middle frame (the paper); k > 1 also captions k frames spread over the
    clip's stored frames, kept as a list beside the middle-frame caption."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.frames_per_clip <= 64:
            raise ConfigError(f"frames_per_clip: must be in [1, 64], got {self.frames_per_clip}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ViewConfig:
    """A training view (`clipvip pack`): the rows of one caption set as training reads them,
    frames at training resolution, row groups of clips from different videos (pipeline/data/pack.py)."""

    name: str = "default"
    """The view's name under <root>/views/; a view is immutable once complete."""
    caption_set: str = "default"
    """The caption set joined to the frames (its null-caption rows are left out)."""
    image_size_px: int = 224
    """Frames squash-resized to this square size once, as the training transform would (the
    paper's 224); 0 keeps the stored frames as they are (training then resizes each visit)."""
    jpeg_quality: int = 95
    """JPEG quality of resized frames (one more encode than the stored frames went through)."""
    rows_per_group: int = 32
    """c: clips per row group = input shards read together, so a row group holds clips of c
    different shards (hence videos). Training reads whole row groups: choose c dividing the
    micro batch (bytes read per byte used is 1.0 then)."""
    rows_per_shard: int = 1024
    """Rows of a view shard (a multiple of rows_per_group): one object, written in one PUT."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"view.name: must be a non-empty name without '/', got {self.name!r}")
        if self.image_size_px != 0 and self.image_size_px < 16:
            raise ConfigError(f"view.image_size_px: must be 0 or >= 16, got {self.image_size_px}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"view.jpeg_quality: must be in [1, 100], got {self.jpeg_quality}")
        if self.rows_per_group < 1:
            raise ConfigError(f"view.rows_per_group: must be >= 1, got {self.rows_per_group}")
        if self.rows_per_shard < self.rows_per_group or self.rows_per_shard % self.rows_per_group:
            raise ConfigError(f"view.rows_per_shard: must be a multiple of view.rows_per_group "
                              f"({self.rows_per_group}), got {self.rows_per_shard}")


@dataclass(frozen=True, kw_only=True, slots=True)
class PackJobConfig:
    """`clipvip pack`: a training view of a prepared root and one of its caption sets."""

    run_name: str = "pack"
    root: str
    """Dataset root written by `prepare` (local or s3://)."""
    view: ViewConfig = field(default_factory=ViewConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """CLIP-ViP architecture and initialisation (clipvip_spec.md section 1)."""

    preset: Literal["tiny", "b32", "b16"] = "tiny"
    """Architecture when no weights are loaded: tiny (CPU tests/demo), ViT-B/32, ViT-B/16."""
    pretrained: str | None = None
    """Initial weights: an HF CLIP id/dir (openai/clip-vit-base-patch32), an official CLIP-ViP
    release (.pt, `clipmodel.` keys), or a directory saved by this project (HF format)."""
    pretrained_clip_only: bool = False
    """Take only the CLIP weights of `pretrained`; the proxy tokens and temporal embedding keep their
    init. How the mean-pooling baseline starts from a CLIP-ViP checkpoint (or a model changes its
    number of proxies); an HF CLIP gives only these anyway. A resumed run or `train.warm_start`
    loads its own weights whole."""
    temporal_size: int = 12
    """Length of the learned temporal embedding (interpolated to other frame counts)."""
    add_cls_num: int = 3
    """Extra video proxy tokens beside CLIP's class embedding (M = 1 + add_cls_num)."""
    use_temporal_embed: bool = True
    logit_scale_init: float = 4.60
    """ln(100); set after loading CLIP, as VidCLIP does."""
    logit_scale_max: float = 5.298317366548036
    """ln(200): the clamp applied inside forward."""
    attention: Literal["sparse", "dense"] = "sparse"
    """sparse: per-frame + proxy two-branch SDPA; dense: S x S masked reference (tests only)."""
    max_text_len: int = 70
    vision_heads: int | None = None
    """Attention heads of the vision tower when loading an official `.pt` whose tower matches no preset
    (the count is in no tensor shape); unset, such a load fails naming this key."""
    text_heads: int | None = None
    """Likewise for the text tower."""
    video_pooling: Literal["proxy", "mean"] = "proxy"
    """proxy: CLIP-ViP (first video proxy token). mean: the CLIP4Clip-MeanP baseline (spec 1.6),
    every frame through plain CLIP, L2-normalised features averaged; needs add_cls_num=0 and
    use_temporal_embed=false so the tower is exactly CLIP."""

    def __post_init__(self) -> None:
        if self.pretrained_clip_only and not self.pretrained:
            raise ConfigError("model.pretrained_clip_only: set model.pretrained to the checkpoint to take CLIP from")
        if self.video_pooling == "mean" and (self.add_cls_num != 0 or self.use_temporal_embed):
            raise ConfigError("model.video_pooling: 'mean' (the CLIP4Clip baseline) runs plain CLIP per frame; "
                              "set model.add_cls_num=0 and model.use_temporal_embed=false")
        if self.temporal_size < 1:
            raise ConfigError(f"model.temporal_size: must be >= 1, got {self.temporal_size}")
        if self.add_cls_num < 0:
            raise ConfigError(f"model.add_cls_num: must be >= 0, got {self.add_cls_num}")
        for key in ("vision_heads", "text_heads"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"model.{key}: must be >= 1, got {getattr(self, key)}")
        if not 0 < self.logit_scale_max <= 10:
            raise ConfigError(f"model.logit_scale_max: must be in (0, 10], got {self.logit_scale_max}")
        if not 0 <= self.logit_scale_init <= self.logit_scale_max:
            raise ConfigError(f"model.logit_scale_init: must be in [0, logit_scale_max], got {self.logit_scale_init}")
        if not 2 <= self.max_text_len <= 77:
            raise ConfigError(f"model.max_text_len: must be in [2, 77], got {self.max_text_len}")


@dataclass(frozen=True, kw_only=True, slots=True)
class LossConfig:
    """Omnisource loss variant (clipvip_spec.md section 2.2)."""

    variant: Literal["vs", "vs_fc", "vs_vc", "vs_vc_fc", "vsc_fc", "vsc"] = "vsc_fc"
    """vs: L(V,S) only; vs_fc: (a); vs_vc: (b); vs_vc_fc: (c); vsc_fc: (d), the paper's final; vsc."""
    gather: bool = True
    """All-gather features across ranks (with gradients) so negatives come from the global batch."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PrepareJobConfig:
    """`clipvip prepare`: videos -> frame shards + one caption set."""

    run_name: str = "prepare"
    data: DataConfig
    frames: FramesConfig = field(default_factory=FramesConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass(frozen=True, kw_only=True, slots=True)
class LoaderConfig:
    """How pretrain's loader tasks run (pipeline/data/loader.py); the defaults keep a 32-rank
    run at the recipe's shapes fed (bench/ingest.py)."""

    steps_per_task: int = 4
    """Micro batches one Ray task builds (a task reads its steps' row groups and transforms them)."""
    cpus_per_task: float = 1.0
    """CPUs each loader task reserves beside the training workers (JPEG decode, sampling, tokenising)."""
    max_tasks_in_flight: int | None = None
    """Loader tasks a rank runs at once (None: as many as Ray Data's backpressure allows)."""
    prefetch_batches: int = 2
    """Micro batches ready ahead of the training step."""
    node_local: bool = True
    """Run a rank's loader tasks on its own node when it has room (soft affinity), so its micro
    batches (~58 MB each at the recipe's shapes) do not cross the network."""

    def __post_init__(self) -> None:
        if self.steps_per_task < 1 or self.prefetch_batches < 1:
            raise ConfigError("train.loader.steps_per_task and prefetch_batches must be >= 1")
        if self.cpus_per_task <= 0:
            raise ConfigError(f"train.loader.cpus_per_task: must be > 0, got {self.cpus_per_task}")
        if self.max_tasks_in_flight is not None and self.max_tasks_in_flight < 1:
            raise ConfigError(f"train.loader.max_tasks_in_flight: must be >= 1, got {self.max_tasks_in_flight}")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """Post-pretraining on Ray Train + DeepSpeed (clipvip_spec.md section 4.1)."""

    dataset_root: str = ""
    """A root written by `prepare` (local or s3://); required by pretrain, unused by finetune."""
    view: str = "default"
    """The training view under <root>/views/ (`clipvip pack`); its caption set gives the C and
    F<->C terms."""
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    micro_batch_size: int = 32
    """Clips a worker embeds in one forward (what GPU memory bounds)."""
    global_batch_size: int | None = None
    """Clips of one optimizer step: the contrastive batch, every one a negative for the others
    (1024 in the paper, section 4.1). None: micro_batch_size x num_workers. A multiple of that:
    each worker embeds its share in chunks of micro_batch_size and the loss still sees the whole
    global batch (gradient caching, pipeline/train/gradcache.py), so fewer GPUs train the same
    objective."""
    activation_checkpointing: bool = False
    """Recompute each encoder layer's activations in backward: less memory a chunk for ~1/3 more
    compute (a larger micro_batch_size, fewer chunks)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: `epochs` full epochs)."""
    epochs: int = 1
    lr: float = 5e-6
    weight_decay: float = 0.05
    warmup_ratio: float = 0.01
    grad_clip: float = 5.0
    zero_stage: int = 1
    precision: Literal["fp32", "bf16"] = "bf16"
    num_frames: int = 12
    image_size_px: int = 224
    seed: int = 42
    checkpoint_every_steps: int = 100
    keep_checkpoints: int = 3
    universal_checkpoint: bool = True
    """Each checkpoint also holds the full fp32 weights and Adam moments (pipeline/train/reshape.py),
    so the run can resume on another number of workers; costs one gather of the optimizer state
    and as many bytes again as DeepSpeed's own optimizer files per checkpoint."""
    storage_path: str = "out/runs"
    """Where Ray Train keeps run state and checkpoints (local or s3://)."""
    warm_start: str | None = None
    """Weights to start from, taken from another run (a checkpoint dir or an HF-format export);
    the optimizer and data position start fresh. Distinct from resume, which is automatic."""
    max_failures: int = 3
    """Worker-group restarts Ray Train attempts from the last checkpoint."""
    log_every_steps: int = 1
    log_sample_ids: bool = False
    """Log the clip ids of every global batch (MLflow artifacts samples/steps_<first>-<last>.json,
    at each checkpoint): which samples trained when, for audits and resume checks. One gather of
    the ids per step; about 8 bytes x global batch per step in MLflow."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)

    def __post_init__(self) -> None:
        for name in ("num_workers", "micro_batch_size", "epochs", "num_frames", "checkpoint_every_steps",
                     "keep_checkpoints", "log_every_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps: must be >= 1, got {self.max_steps}")
        per_step = self.micro_batch_size * self.num_workers
        if self.global_batch_size is not None and (self.global_batch_size < 1 or self.global_batch_size % per_step):
            raise ConfigError(f"train.global_batch_size: {self.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size x train.num_workers = {self.micro_batch_size} x "
                              f"{self.num_workers} = {per_step}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.zero_stage == 0 and self.grad_clip > 0:
            # DeepSpeed 0.19.7's non-ZeRO clip_grad_norm_ fails on CLIP's 0-dim logit_scale.
            raise ConfigError("train.zero_stage: 0 cannot clip gradients (DeepSpeed 0.19.7 fails on the 0-dim "
                              "logit_scale); use zero_stage >= 1 or train.grad_clip=0")
        if self.lr <= 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0 or not 0 <= self.warmup_ratio < 1:
            raise ConfigError("train.weight_decay/grad_clip must be >= 0 and train.warmup_ratio in [0, 1)")
        if self.image_size_px < 16:
            raise ConfigError(f"train.image_size_px: must be >= 16, got {self.image_size_px}")
        if self.max_failures < 0:
            raise ConfigError(f"train.max_failures: must be >= 0, got {self.max_failures}")

    def global_batch(self) -> int:
        """Clips of one optimizer step (global_batch_size, or micro_batch_size x num_workers)."""
        return self.global_batch_size or self.micro_batch_size * self.num_workers

    def chunks(self, world_size: int) -> int:
        """Forwards a worker makes per step at `world_size` workers: its share of the global batch
        over micro_batch_size.

        Raises:
            ValueError: the global batch does not split into whole micro batches at this size.
        """
        share, left = divmod(self.global_batch(), world_size)
        if left or share % self.micro_batch_size:
            raise ValueError(f"a global batch of {self.global_batch()} does not split into micro batches of "
                             f"{self.micro_batch_size} on {world_size} workers; set train.global_batch_size "
                             f"to a multiple of {self.micro_batch_size * world_size}")
        return share // self.micro_batch_size


@dataclass(frozen=True, kw_only=True, slots=True)
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str = "sqlite:///out/mlflow.db"
    """sqlite:///path locally; http://host:5000 for a tracking server (MLflow's file store is refused)."""
    experiment: str = "clipvip"
    system_metrics: bool = True
    register_model: str | None = "clip-vip"
    """Registered model name for the final weights (None: log them, do not register)."""

    def __post_init__(self) -> None:
        if self.tracking_uri.startswith("file:") or "://" not in self.tracking_uri:
            raise ConfigError(f"tracking.tracking_uri: use sqlite:///path or http(s)://host, got {self.tracking_uri!r} "
                              "(MLflow 3 refuses its file store)")
        refuse_credentials("tracking.tracking_uri", self.tracking_uri)


@dataclass(frozen=True, kw_only=True, slots=True)
class PretrainJobConfig:
    """`clipvip pretrain`: omnisource post-pretraining."""

    run_name: str = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if not self.run_name or "/" in self.run_name:
            raise ConfigError(f"run_name: must be a non-empty name without '/', got {self.run_name!r}")
        if not self.train.dataset_root:
            raise ConfigError("train.dataset_root: required key is missing (a root written by `prepare`)")


# --------------------------------------------------------------------------------------------
# Building dataclasses from dicts, with dotted-key errors


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return build_dataclass(tp, value, prefix=key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads `1e-3` as a string; accept what float() accepts.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def build_dataclass(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build `cls` from a dict; unknown or missing keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = build_dataclass(hints[name], {}, prefix=key)
            else:
                raise ConfigError(f"{key}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        if prefix and not msg.startswith(prefix):
            # Section validators name keys relative to the top; nested sections get the prefix.
            section = prefix.rsplit(".", 1)[-1]
            if msg.startswith(section + "."):
                msg = prefix + msg[len(section):]
        raise ConfigError(msg) from None


def _parse_scalar(text: str) -> Any:
    """`--set` values are YAML scalars/flow values: 3, 0.5, true, null, [a, b], 'str'."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = json.loads(json.dumps(raw))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. frames.fps=2")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: bad key {key!r}")
        node: Any = out
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):  # list items by index: eval.models.0.weights=...
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i])} has {len(node)} items, no item {p!r}")
                if last:
                    node[int(p)] = _parse_scalar(text)
                    break
                node = node[int(p)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i])} is not a section")
            if last:
                node[p] = _parse_scalar(text)
                break
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
    return out


def read_yaml_mapping(path: str, what: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; errors start with `what` (e.g. "--config x.yaml")."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{what}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def load_config(cls: type, path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Load a YAML recipe (or nothing), apply `a.b=c` overrides, build and validate `cls`."""
    raw = read_yaml_mapping(path, f"--config {path}") if path else {}
    return build_dataclass(cls, apply_overrides(raw, list(overrides)))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form (tuples become lists), e.g. to ship across Ray or log as params."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def fingerprint(obj: Any) -> str:
    """Stable short hash of plain data or a config dataclass."""
    if dataclasses.is_dataclass(obj):
        obj = to_dict(obj)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def local_path(path: str | None) -> str | None:
    """Ray workers run in another cwd: an existing relative local path becomes absolute."""
    if path is None or "://" in path or os.path.isabs(path) or not os.path.exists(path):
        return path
    return os.path.abspath(path)


def absolute_tracking(cfg: TrackingConfig) -> TrackingConfig:
    """A relative sqlite:///path becomes absolute (its directory created), so the driver and the
    Ray workers, which run in another cwd, write the same database."""
    uri = cfg.tracking_uri
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:////"):
        return cfg
    db = os.path.abspath(uri[len("sqlite:///"):])
    os.makedirs(os.path.dirname(db), exist_ok=True)
    return dataclasses.replace(cfg, tracking_uri="sqlite:///" + db)
