from __future__ import annotations

import pytest

from pipeline.config import ConfigError, PrepareJobConfig, fingerprint, load_config

BASE = ["root=/tmp/root", "data.metadata=meta.jsonl", "data.video_root=/videos", "data.subtitles=subs.jsonl"]


def test_overrides_typed_and_nested():
    cfg = load_config(PrepareJobConfig, None, BASE + ["frames.fps=2", "caption.batch_size=4", "data.metadata=[a, b]"])
    assert cfg.frames.fps == 2.0 and isinstance(cfg.frames.fps, float)
    assert cfg.caption.batch_size == 4
    assert cfg.data.metadata == ("a", "b")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("frames.fpz=1", "frames.fpz: unknown key"),
        ("frames.fps=abc", "frames.fps: expected a number"),
        ("frames.fps=0", "frames.fps: must be in (0, 120]"),
        ("frames.backend=ffmpeg", "frames.backend: must be one of"),
        ("caption.batch_size=true", "caption.batch_size: expected an integer"),
        ("caption.set_name=a/b", "caption.set_name: must be a plain directory name"),
        ("data.clips_per_shard=0", "data.clips_per_shard: must be >= 1"),
        ("nokey", "expected key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(PrepareJobConfig, None, [*BASE, override])
    assert message in str(err.value)


def test_missing_required_key():
    with pytest.raises(ConfigError, match="data.video_root: required key is missing"):
        load_config(PrepareJobConfig, None, ["root=/r", "data.metadata=m", "data.subtitles=s"])


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(PrepareJobConfig, str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(PrepareJobConfig, str(bad))


def test_fingerprint_stable_and_sensitive():
    a = load_config(PrepareJobConfig, None, BASE)
    b = load_config(PrepareJobConfig, None, BASE)
    c = load_config(PrepareJobConfig, None, [*BASE, "frames.fps=2"])
    assert fingerprint(a.frames) == fingerprint(b.frames)
    assert fingerprint(a.frames) != fingerprint(c.frames)


def test_overrides_reach_list_items_and_name_bad_paths():
    from pipeline.config import apply_overrides

    raw = {"eval": {"models": [{"name": "a"}, {"name": "b"}]}, "x": 1}
    out = apply_overrides(raw, ["eval.models.1.weights=w/b", "eval.models.0.name=z"])
    assert out["eval"]["models"] == [{"name": "z"}, {"name": "b", "weights": "w/b"}]
    assert raw["eval"]["models"][1] == {"name": "b"}, "the input is not modified"
    with pytest.raises(ConfigError, match="has 2 items, no item '5'"):
        apply_overrides(raw, ["eval.models.5.name=q"])
    with pytest.raises(ConfigError, match="x is not a section"):
        apply_overrides(raw, ["x.y=1"])


@pytest.mark.parametrize("override", ["tracking.tracking_uri=https://alice:s3cr3t@mlflow.example:5000",
                                      "storage.s3_endpoint_url=http://AKIAXX:topsecret@127.0.0.1:9000"])
def test_credentials_in_uris_are_refused(override):
    from pipeline.config import PretrainJobConfig

    with pytest.raises(ConfigError) as err:
        load_config(PretrainJobConfig, None, ["run_name=r", "root=/d", override])
    key = override.split("=")[0]
    assert key in str(err.value) and "s3cr3t" not in str(err.value) and "topsecret" not in str(err.value)
    load_config(PretrainJobConfig, None, ["run_name=r", "root=/d",
                                         f"{key}=https://mlflow.example:5000"])


def test_clip_only_needs_pretrained_weights():
    from pipeline.config import ModelConfig

    with pytest.raises(ConfigError, match="model.pretrained_clip_only: set model.pretrained"):
        ModelConfig(pretrained_clip_only=True)
    assert ModelConfig(pretrained="out/runs/x-export", pretrained_clip_only=True).pretrained_clip_only


def test_global_batch_and_gradient_caching_chunks():
    from pipeline.config import PretrainJobConfig

    def train(*sets):
        return load_config(PretrainJobConfig, None, ["root=/data", *sets]).train

    plain = train("train.num_workers=4", "train.micro_batch_size=8")
    assert plain.global_batch() == 32 and plain.chunks(4) == 1
    cached = train("train.num_workers=4", "train.micro_batch_size=8", "train.global_batch_size=128")
    assert cached.global_batch() == 128 and cached.chunks(4) == 4 and cached.chunks(2) == 8 and cached.chunks(16) == 1
    with pytest.raises(ValueError, match="does not split into micro batches of 8 on 3 workers"):
        cached.chunks(3)
    with pytest.raises(ConfigError, match=r"train.global_batch_size: 100 is not a multiple of .* = 8 x 4 = 32"):
        train("train.num_workers=4", "train.micro_batch_size=8", "train.global_batch_size=100")


def _field_paths(cls, prefix=""):
    """Every (dotted path, owning class) of a config, through nested sections."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        yield path, cls
        for tp in (hints[f.name], *typing.get_args(hints[f.name])):
            if dataclasses.is_dataclass(tp):
                yield from _field_paths(tp, path + ".")
            for inner in typing.get_args(tp):  # tuple[EvalModelConfig, ...]
                if dataclasses.is_dataclass(inner):
                    yield from _field_paths(inner, path + ".")


def test_one_name_per_setting_across_jobs():
    """The dataset root is `root` at the top of every job that has one; the text length is only
    `model.max_text_len` (evaluate: each model's)."""
    import pipeline.config as c

    jobs = {c.PrepareJobConfig: True, c.RecaptionJobConfig: True, c.PackJobConfig: True,
            c.PretrainJobConfig: True, c.FinetuneJobConfig: False, c.EvaluateJobConfig: False}
    for job, has_root in jobs.items():
        paths = dict(_field_paths(job))
        roots = sorted(p for p in paths if p.rsplit(".", 1)[-1] in ("root", "dataset_root"))
        assert roots == (["root"] if has_root else []), (job.__name__, roots)
        text = sorted(p for p in paths if p.endswith("max_text_len"))
        assert all(paths[p] is c.ModelConfig for p in text), (job.__name__, text)


@pytest.mark.parametrize(("recipe", "cls", "old", "new"), [
    ("tiny.yaml", "PrepareJobConfig", "data.root=/r", "data.root: this setting is now root"),
    ("tiny_pretrain.yaml", "PretrainJobConfig", "train.dataset_root=/r", "train.dataset_root: this setting is now root"),
    ("tiny_finetune.yaml", "FinetuneJobConfig", "data.max_text_len=16",
     "data.max_text_len: this setting is now model.max_text_len"),
    ("tiny_finetune.yaml", "FinetuneJobConfig", "data.val_every_steps=3",
     "data.val_every_steps: this setting is now train.val_every_steps"),
    ("tiny_evaluate.yaml", "EvaluateJobConfig", "eval.max_text_len=16",
     "eval.max_text_len: this setting is now model.max_text_len of each eval.models entry"),
])
def test_renamed_keys_are_refused_naming_the_new_one(recipe, cls, old, new):
    import os

    import pipeline.config as c
    from tests.conftest import ROOT

    path = os.path.join(ROOT, "jobs", "configs", recipe)
    load_config(getattr(c, cls), path)  # the recipe itself loads
    with pytest.raises(ConfigError) as err:
        load_config(getattr(c, cls), path, [old])
    assert str(err.value).startswith(new)


def test_validation_splits_sample_the_training_frames():
    """pretrain's zero-shot `val` and finetune's splits are read at train.num_frames; a split's own
    num_frames (evaluate's) would be silently ignored, so a different one is refused."""
    import pipeline.config as c

    base = ["root=/r", "val.annotations=a.jsonl", "val.video_root=v", "train.num_frames=4"]
    cfg = load_config(c.PretrainJobConfig, None, base)
    assert cfg.val.annotations == "a.jsonl" and cfg.train.val_every_steps == 100
    assert load_config(c.PretrainJobConfig, None, [*base, "val.num_frames=4"]).val.num_frames == 4
    with pytest.raises(ConfigError, match=r"^val.num_frames: 12 would be ignored"):
        load_config(c.PretrainJobConfig, None, [*base, "val.num_frames=12"])
    with pytest.raises(ConfigError, match=r"^data.train.num_frames: 8 would be ignored"):
        load_config(c.FinetuneJobConfig, None, ["data.train.annotations=a", "data.train.video_root=v",
                                                "data.train.num_frames=8", "data.val_holdout=2"])
    with pytest.raises(ConfigError, match=r"^data.train.order_pairs: training uses no order pairs"):
        load_config(c.FinetuneJobConfig, None, ["data.train.annotations=a", "data.train.video_root=v",
                                                "data.train.order_pairs=p.json", "data.val_holdout=2"])


def test_tracking_uri_from_the_environment_without_credentials(monkeypatch):
    """MLflow's own $MLFLOW_TRACKING_URI is the default, stripped of user:password@ (which params
    and logs would copy; credentials come from MLFLOW_TRACKING_USERNAME/PASSWORD); a URI written
    with credentials in a recipe is refused."""
    from pipeline.config import TrackingConfig

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://me:secret@mlflow.example:5000/")
    assert TrackingConfig().tracking_uri == "https://mlflow.example:5000/"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert TrackingConfig().tracking_uri == "sqlite:///out/mlflow.db"
    with pytest.raises(ConfigError, match="tracking.tracking_uri: holds credentials"):
        TrackingConfig(tracking_uri="https://me:secret@mlflow.example:5000/")
