"""Sections of the retrieval jobs, `clipvip evaluate` and `clipvip finetune` (CLIP-ViP paper
section 4.1), on downstream splits (`data.RetrievalDataConfig`). Fine-tuning reuses pretrain's
model, train, tracking, storage and ray sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config.build import ConfigError
from pipeline.config.common import RayConfig, StorageConfig, TrackingConfig
from pipeline.config.data import RetrievalDataConfig, check_split_frames
from pipeline.config.train import ModelConfig, TrainConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalModelConfig:
    """One model to evaluate; several are compared side by side in one report."""

    name: str
    """Label in reports and metric names (e.g. clip-vip, meanpool-baseline)."""
    weights: str | None = None
    """Our HF-format export, an official CLIP-ViP `.pt`, an HF CLIP id/dir, or a `finetune`/
    `pretrain` checkpoint dir. None: random init from `model.preset` (smoke tests only)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture switches (proxies, pooling, attention); shapes come from `weights`."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or " " in self.name:
            raise ConfigError(f"name: must be a non-empty name without '/' or spaces, got {self.name!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalConfig:
    data: RetrievalDataConfig
    models: tuple[EvalModelConfig, ...]
    image_size_px: int = 224
    batch_size: int = 16
    """Videos per encoder call (per actor)."""
    num_encoders: int = 1
    """Encoder actors (one model replica each); decode runs in CPU tasks beside them."""
    encoder_gpus: float = 0.0
    decode_cpus: float = 1.0
    dsl: bool = True
    """Also report DSL post-processing (spec 5.1); plain numbers are always reported."""
    out: str = "out/eval"
    """Where results.json and the similarity matrices go (local or s3://)."""

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("eval.models: list at least one model")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"eval.models: names must be unique, got {names}")
        if self.batch_size < 1 or self.num_encoders < 1:
            raise ConfigError("eval.batch_size and eval.num_encoders must be >= 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class EvaluateJobConfig:
    """`clipvip evaluate`: text<->video retrieval metrics for one or more models."""

    run_name: str = "evaluate"
    eval: EvalConfig
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(system_metrics=False,
                                                                            register_model=None))
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass(frozen=True, kw_only=True, slots=True)
class FinetuneDataConfig:
    """Train/validation data of `finetune` (the test split is `evaluate`'s business)."""

    train: RetrievalDataConfig
    val: RetrievalDataConfig | None = None
    """Held-out split for model selection. None: `val_holdout` videos of `train` are held out."""
    val_holdout: int = 0
    """Videos of `train` held out for validation when `val` is None (chosen by clip-id hash)."""
    select_metric: Literal["t2v/R1", "t2v/R5", "t2v/R10", "v2t/R1"] = "t2v/R1"
    """Validation metric that picks the best checkpoint (never the test split, unlike the
    official code, which kept model_best.pt by test R@1; spec 4.2)."""
    cache_decoded_mb: int = 0
    """Per-worker memory for keeping decoded training clips across epochs (0: decode every
    visit). Worth it when the split's resized frames fit (small or low-resolution splits)."""
    decode_threads: int = 2
    """Threads per worker decoding the next batch while the current one trains."""
    batch_groups: str | None = None
    """JSON file: a list of clip-id lists (e.g. a clip and its time-reversed copy). Each group is
    kept inside one global batch, as in-batch hard negatives; other videos are shuffled as usual.
    Not in the paper (plain random batches there); the synthetic recipe uses it because its
    order-only pairs are otherwise rarely in one batch (README, Known limits)."""

    def __post_init__(self) -> None:
        if self.cache_decoded_mb < 0 or self.decode_threads < 1:
            raise ConfigError("data.cache_decoded_mb must be >= 0 and data.decode_threads >= 1")
        if self.val is None and self.val_holdout < 2:
            raise ConfigError("data.val: give a validation split, or data.val_holdout >= 2 videos of train")
        if self.val is not None and self.val_holdout:
            raise ConfigError("data.val_holdout: use either data.val or data.val_holdout, not both")
        if self.train.order_pairs:
            raise ConfigError("data.train.order_pairs: training uses no order pairs; give them to data.val "
                              "(validation then reports order/aware), or keep pairs in one batch with data.batch_groups")


@dataclass(frozen=True, kw_only=True, slots=True)
class FinetuneJobConfig:
    """`clipvip finetune`: symmetric InfoNCE on a downstream retrieval set (spec 4.2)."""

    run_name: str = "finetune"
    model: ModelConfig = field(default_factory=ModelConfig)
    """`model.pretrained` (or `train.warm_start`) names the post-pretrained weights."""
    train: TrainConfig
    data: FinetuneDataConfig
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if not self.run_name or "/" in self.run_name:
            raise ConfigError(f"run_name: must be a non-empty name without '/', got {self.run_name!r}")
        check_split_frames("data.train", self.data.train, self.train.num_frames)
        check_split_frames("data.val", self.data.val, self.train.num_frames)
