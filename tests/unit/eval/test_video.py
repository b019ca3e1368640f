"""load_clip: which frames are picked (read back from their brightness), shapes, train jitter, bad input.

Frame k of every test video is a flat grey of value BASE + STEP * k, so the mean of a decoded,
resized frame tells which source frame it shows despite compression.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from pipeline.data.sampling import BadSample, sample_frame_indices
from pipeline.data.synthetic_render import encode_video
from pipeline.eval import video
from pipeline.eval.formats import RetrievalItem
from pipeline.eval.video import count_frames, list_frame_files, load_clip

NUM_FRAMES = 20
BASE, STEP = 10, 12
WIDTH_PX, HEIGHT_PX = 64, 48
SIZE_PX = 32


def grey(k: int, shape=(HEIGHT_PX, WIDTH_PX)) -> np.ndarray:
    return np.full((*shape, 3), BASE + STEP * k, dtype=np.uint8)


def shown_frames(frames_THWC: np.ndarray) -> list[int]:
    return [int(round((float(f.mean()) - BASE) / STEP)) for f in frames_THWC]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    paths = {}
    for ext in (".mp4", ".mkv"):  # mp4 stores a frame count, mkv does not (demux-count path)
        paths[ext] = str(root / f"clip{ext}")
        encode_video(paths[ext], (grey(k) for k in range(NUM_FRAMES)), fps=10.0, crf=10)
    return paths


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_test_sampling_picks_uniform_frames(videos, ext):
    item = RetrievalItem("clip", videos[ext], ("text",))
    frames = load_clip(item, "video", 5, SIZE_PX, train=False, rng=None)
    assert frames.shape == (5, SIZE_PX, SIZE_PX, 3) and frames.dtype == np.uint8
    assert shown_frames(frames) == [0, 4, 9, 14, 19]  # linspace(0, 19, 5) truncated
    assert count_frames(videos[ext]) == NUM_FRAMES


def test_mkv_has_no_stored_count(videos):
    import av

    with av.open(videos[".mkv"]) as c:
        assert c.streams.video[0].frames == 0
    with av.open(videos[".mp4"]) as c:
        assert c.streams.video[0].frames == NUM_FRAMES


def test_train_sampling_is_reproducible(videos):
    item = RetrievalItem("clip", videos[".mp4"], ("text",))
    a = load_clip(item, "video", 6, SIZE_PX, train=True, rng=np.random.default_rng(7))
    b = load_clip(item, "video", 6, SIZE_PX, train=True, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    expected = sample_frame_indices(NUM_FRAMES, 6, True, np.random.default_rng(7)).tolist()
    assert shown_frames(a) == expected
    draws = {tuple(shown_frames(load_clip(item, "video", 6, SIZE_PX, True, np.random.default_rng(s))))
             for s in range(6)}
    assert len(draws) > 1  # the jitter does move the frames
    with pytest.raises(ValueError, match="rng"):
        load_clip(item, "video", 6, SIZE_PX, train=True, rng=None)


def test_more_frames_than_video_repeats(videos):
    frames = load_clip(RetrievalItem("clip", videos[".mp4"], ("t",)), "video", 30, SIZE_PX, False, None)
    assert frames.shape == (30, SIZE_PX, SIZE_PX, 3)
    assert shown_frames(frames) == np.linspace(0, NUM_FRAMES - 1, 30).astype(int).tolist()


def test_overcounted_video_resamples_over_decoded_frames(videos, monkeypatch):
    monkeypatch.setattr(video, "count_frames", lambda path: NUM_FRAMES + 5)  # header claims 25
    frames = load_clip(RetrievalItem("clip", videos[".mp4"], ("t",)), "video", 5, SIZE_PX, False, None)
    assert shown_frames(frames) == [0, 4, 9, 14, 19]  # linspace over the 20 that decode, not [0, 6, ..., 24]


def test_squash_resize_keeps_no_crop(tmp_path):
    # Left half black, right half white: a squash keeps the split in the middle; a centre crop would not.
    img = np.zeros((48, 96, 3), np.uint8)
    img[:, 48:] = 255
    path = str(tmp_path / "wide.mp4")
    encode_video(path, [img] * 3, fps=10.0, crf=10)
    (frame,) = load_clip(RetrievalItem("wide", path, ("t",)), "video", 1, SIZE_PX, False, None)
    assert frame[:, :12].max() < 40 and frame[:, -12:].min() > 215


def write_frame_dir(root, clip_id: str, num: int) -> str:
    d = os.path.join(root, clip_id)
    os.makedirs(d, exist_ok=True)
    for k in range(num):
        Image.fromarray(grey(k, (36, 40))).save(os.path.join(d, f"{clip_id}_{k:03d}.jpg"), quality=95)
    return d


def test_frame_dir_sampling(tmp_path):
    d = write_frame_dir(tmp_path, "v_abc", 12)
    open(os.path.join(d, "notes.txt"), "w").close()
    Image.fromarray(grey(19, (36, 40))).save(os.path.join(d, "v_other_000.jpg"))
    assert [os.path.basename(p) for p in list_frame_files(d, "v_abc")] == [f"v_abc_{k:03d}.jpg" for k in range(12)]
    item = RetrievalItem("v_abc", d, ("t",), num_frames_hint=12)
    frames = load_clip(item, "frames", 4, SIZE_PX, train=False, rng=None)
    assert frames.shape == (4, SIZE_PX, SIZE_PX, 3) and frames.dtype == np.uint8
    assert shown_frames(frames) == [0, 3, 7, 11]
    a = load_clip(item, "frames", 4, SIZE_PX, True, np.random.default_rng(3))
    assert shown_frames(a) == sample_frame_indices(12, 4, True, np.random.default_rng(3)).tolist()


def test_frame_dir_sorts_numerically(tmp_path):
    d = tmp_path / "c"
    os.makedirs(d)
    for k in (0, 1, 2, 10):  # "c_10" sorts before "c_2" as text
        Image.fromarray(grey(k, (8, 8))).save(d / f"c_{k}.jpg")
    assert [os.path.basename(p) for p in list_frame_files(str(d), "c")] == ["c_0.jpg", "c_1.jpg", "c_2.jpg",
                                                                            "c_10.jpg"]


def test_bad_inputs_raise_bad_sample(tmp_path, videos):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(BadSample, match=r"junk\.mp4"):
        load_clip(RetrievalItem("junk", str(junk), ("t",)), "video", 4, SIZE_PX, False, None)
    data = open(videos[".mp4"], "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadSample, match=r"cut\.mp4"):
        load_clip(RetrievalItem("cut", str(cut), ("t",)), "video", 4, SIZE_PX, False, None)
    with pytest.raises(BadSample, match="missing"):
        load_clip(RetrievalItem("missing", str(tmp_path / "missing.mp4"), ("t",)), "video", 4, SIZE_PX, False, None)
    empty = tmp_path / "empty"
    os.makedirs(empty)
    with pytest.raises(BadSample, match="no frames"):
        load_clip(RetrievalItem("empty", str(empty), ("t",)), "frames", 4, SIZE_PX, False, None)
    d = write_frame_dir(tmp_path, "broken", 4)
    with open(os.path.join(d, "broken_003.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(BadSample, match=r"broken_003\.jpg"):
        load_clip(RetrievalItem("broken", d, ("t",)), "frames", 4, SIZE_PX, False, None)
    with pytest.raises(ValueError, match="video_format"):
        load_clip(RetrievalItem("x", d, ("t",)), "gif", 4, SIZE_PX, False, None)
