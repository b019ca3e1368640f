"""Every typed job config, in one place: `from pipeline.config import PretrainJobConfig`.

Each job's config is a frozen dataclass of sections; components receive only their own section
(`FramesConfig` goes to frame code, and so on). One name per setting across the jobs: the dataset
root is `root` in prepare, recaption, pack and pretrain; the text length is `model.max_text_len`.

    build.py      YAML + `--set` overrides -> dataclasses, dotted-key errors, renamed keys
    common.py     storage, ray, cluster shape, tracking
    data.py       prepare, recaption, pack, inspect; a downstream retrieval split
    train.py      model, loss, loader, pretrain
    retrieval.py  downstream splits, evaluate, finetune
"""

from pipeline.config.build import (
    MOVED,
    ConfigError,
    apply_overrides,
    build_dataclass,
    fingerprint,
    load_config,
    local_path,
    read_yaml_mapping,
    refuse_credentials,
    to_dict,
)
from pipeline.config.common import ClusterShape, RayConfig, StorageConfig, TrackingConfig, absolute_tracking
from pipeline.config.data import (
    CaptionConfig,
    DataConfig,
    FramesConfig,
    InspectConfig,
    PackJobConfig,
    PrepareJobConfig,
    RecaptionJobConfig,
    RetrievalDataConfig,
    ViewConfig,
)
from pipeline.config.retrieval import (
    EvalConfig,
    EvalModelConfig,
    EvaluateJobConfig,
    FinetuneDataConfig,
    FinetuneJobConfig,
)
from pipeline.config.train import LoaderConfig, LossConfig, ModelConfig, PretrainJobConfig, TrainConfig

__all__ = [
    "MOVED", "CaptionConfig", "ClusterShape", "ConfigError", "DataConfig", "EvalConfig", "EvalModelConfig",
    "EvaluateJobConfig", "FinetuneDataConfig", "FinetuneJobConfig", "FramesConfig", "InspectConfig", "LoaderConfig",
    "LossConfig", "ModelConfig", "PackJobConfig", "PrepareJobConfig", "PretrainJobConfig", "RayConfig", "RecaptionJobConfig",
    "RetrievalDataConfig", "StorageConfig", "TrackingConfig", "TrainConfig", "ViewConfig", "absolute_tracking",
    "apply_overrides", "build_dataclass", "fingerprint", "load_config", "local_path", "read_yaml_mapping",
    "refuse_credentials", "to_dict",
]
