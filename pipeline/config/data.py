"""Sections of the data jobs: `prepare` (videos -> frame shards + a caption set), `recaption`
(a new caption set), `pack` (a training view) and `inspect`; and one downstream retrieval split
(MSR-VTT, DiDeMo, LSMDC, ActivityNet), which evaluate, finetune and pretrain's validation read.

Every job that reads or writes a dataset root names it `root`, at the top of its config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.config.build import ConfigError, check_root
from pipeline.config.common import RayConfig, StorageConfig, TrackingConfig, data_job_tracking


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """The sources `prepare` reads (the root it writes is the job's `root`)."""

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
class PrepareJobConfig:
    """`clipvip prepare`: videos -> frame shards + one caption set."""

    run_name: str = "prepare"
    root: str
    """Dataset root to write or grow (local path or s3://bucket/prefix)."""
    data: DataConfig
    frames: FramesConfig = field(default_factory=FramesConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    tracking: TrackingConfig = field(default_factory=data_job_tracking)
    """The job's MLflow run: params, progress per shard, final counts (pipeline/data/progress.py)."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        check_root(self.root)


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
    tracking: TrackingConfig = field(default_factory=data_job_tracking)
    """The job's MLflow run: params, progress per shard, final counts (pipeline/data/progress.py)."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        check_root(self.root)
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
    tracking: TrackingConfig = field(default_factory=data_job_tracking)
    """The job's MLflow run: params, progress per shard, final counts (pipeline/data/progress.py)."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        check_root(self.root)


@dataclass(frozen=True, kw_only=True, slots=True)
class InspectConfig:
    """`clipvip inspect ROOT`: only how to reach the root's storage."""

    storage: StorageConfig = field(default_factory=StorageConfig)


FORMATS = ("msrvtt", "didemo", "lsmdc", "activitynet")
VIDEO_FORMATS = ("video", "frames")
# Paragraph-to-video is the standard protocol for DiDeMo and ActivityNet (spec 3.3, pitfall).
_PARAGRAPH_FORMATS = ("didemo", "activitynet")
_NUM_FRAMES_DEFAULT = {"activitynet": 32}
_NUM_FRAMES_OTHER = 12


@dataclass(frozen=True, kw_only=True, slots=True)
class RetrievalDataConfig:
    """One retrieval split: annotation jsonl, where its videos are, and how to read its texts.

    Validation messages start with "data." so that `build_dataclass` rewrites them to the
    parent's key (a parent field named `data` under `eval` reports "eval.data.format: ...").
    """

    format: Literal["msrvtt", "didemo", "lsmdc", "activitynet"] = "msrvtt"
    """Dataset convention: video extension lookup and the paragraph / frame-count defaults."""
    annotations: str
    """Annotation jsonl (e.g. test1ka.jsonl), one {"clip_id", "text"} object per line; local or s3://."""
    video_root: str
    """Directory (or s3:// prefix) of videos, or of per-clip frame directories when video_format
    is "frames"."""
    video_format: Literal["video", "frames"] = "video"
    """"video": encoded files read with PyAV; "frames": pre-decoded JPEG directories."""
    paragraph: bool | None = None
    """Join all sentences of a video into one text; None: by format (didemo, activitynet)."""
    num_frames: int | None = None
    """Frames sampled per video; None: by format (activitynet 32, else 12)."""
    limit: int | None = None
    """Keep only the first N usable videos (smoke runs); None keeps all."""
    order_pairs: str | None = None
    """JSON file (local or s3://) of [[clip id, clip id], ...]: pairs of clips that differ only in
    frame order, each captioned with its own direction (the synthetic set's `<split>_pairs.json`).
    Evaluation and validation then also report `order/aware`, the percent of pairs ranked the right
    way round (pipeline/eval/metrics.py `order_awareness`; an order-blind model scores 50)."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"data.format: unknown {self.format!r}, expected one of {list(FORMATS)}")
        if self.video_format not in VIDEO_FORMATS:
            raise ConfigError(f"data.video_format: unknown {self.video_format!r}, expected one of "
                              f"{list(VIDEO_FORMATS)}")
        if not self.annotations:
            raise ConfigError("data.annotations: must be a jsonl path, got an empty string")
        if not self.video_root:
            raise ConfigError("data.video_root: must be a directory, got an empty string")
        if self.num_frames is not None and self.num_frames < 1:
            raise ConfigError(f"data.num_frames: must be >= 1 or null, got {self.num_frames}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit: must be >= 1 or null, got {self.limit}")

    def resolved_paragraph(self) -> bool:
        """`paragraph`, or the format's default (didemo, activitynet: True)."""
        return self.format in _PARAGRAPH_FORMATS if self.paragraph is None else self.paragraph

    def resolved_num_frames(self) -> int:
        """`num_frames`, or the format's default (activitynet 32, else 12)."""
        return _NUM_FRAMES_DEFAULT.get(self.format, _NUM_FRAMES_OTHER) if self.num_frames is None \
            else self.num_frames


def check_split_frames(key: str, split: RetrievalDataConfig | None, train_frames: int) -> None:
    """Training and its validation sample `train.num_frames` a video: a split's own `num_frames`
    (what evaluate uses) would be ignored there, so one that differs is refused."""
    if split is not None and split.num_frames is not None and split.num_frames != train_frames:
        raise ConfigError(f"{key}.num_frames: {split.num_frames} would be ignored; training and its validation "
                          f"sample train.num_frames ({train_frames}) a video. Leave it unset or equal")
