"""Sections of `clipvip pretrain` (omnisource post-pretraining, CLIP-ViP paper section 3): the
model, the loss, the training loop and its loader. `finetune` reuses them (`retrieval.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config.build import ConfigError, check_root
from pipeline.config.common import RayConfig, StorageConfig, TrackingConfig
from pipeline.config.data import RetrievalDataConfig, check_split_frames


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
    """Text tokens, padded and truncated, wherever this model reads text: 70 for post-pretraining;
    50 for MSR-VTT and LSMDC, 70 for DiDeMo and ActivityNet paragraphs (as the official configs)."""
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

    view: str = "default"
    """Pretrain: the training view under <root>/views/ (`clipvip pack`); its caption set gives the C and
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
    adamw_impl: Literal["auto", "fused"] = "auto"
    """torch AdamW's kernel: "auto" is torch's choice (a loop over tensors on CPU, multi-tensor
    foreach on GPU), "fused" its fused kernel. The same update, not bit-identical: the tiny demo's
    robustness bench flips it to perturb rounding (bench/demo_robustness.py)."""
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
    val_every_steps: int = 100
    """Retrieval validation every this many steps and at the end: finetune on `data.val` (picks the
    best weights), pretrain on `val` when given (zero-shot, as the official code every 1,000 steps)."""
    profile_steps: tuple[int, ...] = ()
    """[a, b]: rank 0 records a torch.profiler trace of optimizer steps a..b (1-based) and logs it
    as the MLflow artifact profiles/steps_<a>-<b>.json (pipeline/train/profile.py)."""
    peak_tflops: float | None = None
    """One device's peak TFLOP/s, for MFU (train/mfu). None: from the GPU's name (dense bf16 peaks
    in pipeline/model/flops.py); on a CPU or an unlisted GPU, MFU is left out rather than guessed."""
    log_sample_ids: bool = False
    """Log the clip ids of every global batch (MLflow artifacts samples/steps_<first>-<last>.json,
    at each checkpoint): which samples trained when, for audits and resume checks. One gather of
    the ids per step; about 8 bytes x global batch per step in MLflow."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)

    def __post_init__(self) -> None:
        for name in ("num_workers", "micro_batch_size", "epochs", "num_frames", "checkpoint_every_steps",
                     "keep_checkpoints", "log_every_steps", "val_every_steps"):
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
        if self.profile_steps and (len(self.profile_steps) != 2 or not 1 <= self.profile_steps[0] <= self.profile_steps[1]):
            raise ConfigError(f"train.profile_steps: [first, last] optimizer steps with 1 <= first <= last, "
                              f"got {list(self.profile_steps)}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"train.peak_tflops: must be > 0 or null, got {self.peak_tflops}")

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
class PretrainJobConfig:
    """`clipvip pretrain`: omnisource post-pretraining."""

    run_name: str = "pretrain"
    root: str
    """Dataset root written by `prepare` (local or s3://); training reads its view `train.view`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig
    val: RetrievalDataConfig | None = None
    """A retrieval split (any format evaluate reads) for zero-shot validation every
    train.val_every_steps and at the end: t2v/v2t R@1/5/10, MdR, MnR as val/ metrics, the best
    t2v R@1 and its step in the summary. None: no validation."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if not self.run_name or "/" in self.run_name:
            raise ConfigError(f"run_name: must be a non-empty name without '/', got {self.run_name!r}")
        check_root(self.root)
        check_split_frames("val", self.val, self.train.num_frames)
