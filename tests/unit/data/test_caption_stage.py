"""The caption actor pool follows the recipe, not only the GPUs present at start."""

from __future__ import annotations

import pytest

from pipeline.config import CaptionConfig, ConfigError
from pipeline.data.caption_stage import CaptionPool, caption_pool


@pytest.mark.parametrize(("cfg", "gpus", "pool"), [
    # auto: GPUs present -> one GPU per actor, one actor per GPU; none -> one CPU actor
    (CaptionConfig(), 4, CaptionPool("cuda", 1.0, 1, 4)),
    (CaptionConfig(), 0, CaptionPool("cpu", 0.0, 1, 1)),
    (CaptionConfig(num_gpus_per_actor=0.5), 4, CaptionPool("cuda", 0.5, 1, 8)),
    (CaptionConfig(num_gpus_per_actor=0.5), 0, CaptionPool("cpu", 0.0, 1, 1)),  # auto on CPUs ignores it
    # cuda on a cluster whose GPU nodes scale from zero: actors reserve GPUs (the autoscaler's demand)
    # and the pool may grow to max_actors as GPU nodes join
    (CaptionConfig(device="cuda", max_actors=8), 0, CaptionPool("cuda", 1.0, 1, 8)),
    (CaptionConfig(device="cuda", num_gpus_per_actor=0.5, min_actors=2), 0, CaptionPool("cuda", 0.5, 2, 2)),
    # cpu with logical GPUs: actors land on the nodes that offer them
    (CaptionConfig(device="cpu", num_gpus_per_actor=1, max_actors=3), 1, CaptionPool("cpu", 1.0, 1, 3)),
    (CaptionConfig(device="cpu", max_actors=2), 8, CaptionPool("cpu", 0.0, 1, 2)),
])
def test_caption_pool(cfg: CaptionConfig, gpus: float, pool: CaptionPool) -> None:
    assert caption_pool(cfg, gpus) == pool


def test_remote_args_and_description() -> None:
    assert CaptionPool("cuda", 0.5, 1, 8).remote_args() == {"num_gpus": 0.5}
    assert CaptionPool("cpu", 0.0, 1, 1).remote_args() == {"num_cpus": 1}
    assert CaptionPool("cuda", 0.5, 1, 8).describe() == "captioner on cuda, 0.5 GPU per actor, 1-8 actors"


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"device": "tpu"}, "caption.device"),
    ({"device": "cuda", "num_gpus_per_actor": 0}, "caption.num_gpus_per_actor"),
    ({"num_gpus_per_actor": -1}, "caption.num_gpus_per_actor"),
    ({"min_actors": 0}, "caption.min_actors"),
    ({"min_actors": 3, "max_actors": 2}, "caption.max_actors"),
])
def test_bad_pool_settings_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        CaptionConfig(**kwargs)


def test_decode_reservation_follows_the_unit():
    from pipeline.config import PrepareJobConfig, load_config
    from pipeline.data.memory import GIB, decode_reservation

    def cfg(*extra):
        return load_config(PrepareJobConfig, None, ["root=/r", "data.metadata=/m", "data.video_root=/v",
                                                    "data.subtitles=/s", "frames.max_frames=48", *extra])

    assert decode_reservation(cfg(), 512) == 2 * GIB  # 0.35 + 2.8 x 512 x 49 x 25 KB = 1.99 GiB
    assert decode_reservation(cfg(), 64) == 3 * GIB // 4  # a small unit reserves less
    assert decode_reservation(cfg("data.video_root=s3://b/v"), 512) == 2 * GIB + GIB // 4  # + 64 MiB read whole
    assert decode_reservation(cfg("frames.short_side_px=480"), 512) == 7 * GIB  # 4x the pixels: 6.89 GiB
    assert decode_reservation(cfg("ray.decode_memory_gb=3"), 512) == 3 * GIB  # set: as set
