"""Pure parts of `pack`: the round-robin interleave, the frame resize, the view settings' checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, ViewConfig
from pipeline.data.pack import interleave, resize_jpeg, shard_name
from pipeline.data.view import ViewConflict, fingerprint, open_view
from pipeline.data.root import DatasetRoot


def test_interleave_takes_row_t_of_every_source_before_row_t_plus_1():
    order = interleave([3, 1, 2])
    assert order.tolist() == [[0, 0], [1, 0], [2, 0], [0, 1], [2, 1], [0, 2]]
    # c equal sources: every block of c consecutive rows holds c different sources
    blocks = interleave([5] * 4).reshape(5, 4, 2)
    assert all(sorted(b[:, 0].tolist()) == [0, 1, 2, 3] for b in blocks)
    assert interleave([]).shape == (0, 2)


def test_resize_jpeg_squashes_to_the_training_size():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 426, 3), dtype=np.uint8)).save(buf, "JPEG")
    with Image.open(io.BytesIO(resize_jpeg(buf.getvalue(), 224, 95))) as img:
        assert img.size == (224, 224) and img.format == "JPEG"
    with pytest.raises(ValueError, match="undecodable frame"):
        resize_jpeg(b"not a jpeg", 224, 95)


def test_view_settings_are_checked():
    with pytest.raises(ConfigError, match="view.rows_per_shard: must be a multiple of view.rows_per_group"):
        ViewConfig(rows_per_group=16, rows_per_shard=40)
    with pytest.raises(ConfigError, match="view.image_size_px"):
        ViewConfig(image_size_px=8)
    assert shard_name(3, 12) == "t00003-012"


def test_a_view_name_is_taken_for_good(tmp_path):
    root = DatasetRoot(str(tmp_path))
    settings = {"caption_set": "a", "image_size_px": 224, "rows_per_group": 16}
    meta = open_view(root, "v", settings)
    assert meta["status"] == "in_progress" and meta["fingerprint"] == fingerprint(settings)
    assert open_view(root, "v", dict(settings)) == meta
    with pytest.raises(ViewConflict, match=r"caption_set: a -> b; rows_per_group: 16 -> 32"):
        open_view(root, "v", dict(settings, caption_set="b", rows_per_group=32))
