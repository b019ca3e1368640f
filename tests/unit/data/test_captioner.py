"""FrameCaptioner on the builtin tiny BLIP and GIT models (offline, CPU, real JPEGs)."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
from collections.abc import Iterator

import pytest
import torch

from pipeline.config import CaptionConfig
from pipeline.data.captioner import (
    CaptionResult,
    FrameCaptioner,
    builtin_model_dir,
    decode_image,
    resolve_dtype,
)
from pipeline.data.captioner_builtin import SPECIAL_TOKENS, vocabulary

BUILTINS = ("builtin:tiny-blip", "builtin:tiny-git")
WORDS = set(vocabulary()) - set(SPECIAL_TOKENS)


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Materialize builtins into a private cache, not the user's ~/.cache/clipvip."""
    path = str(tmp_path_factory.mktemp("clipvip_cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLIPVIP_CACHE_DIR", path)
        yield path


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    spin-waiting made generate() ~60x slower (measured: 0.07 s vs 4.6 s for 5 images)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_jpeg(seed: int, size: tuple[int, int] = (96, 72)) -> bytes:
    """A small scene: coloured background, a few shapes, some noise; distinct per seed."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = (int(v) for v in rng.integers(0, min(size) // 2, 2))
        x1, y1 = x0 + int(rng.integers(10, 40)), y0 + int(rng.integers(10, 40))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-20, 21, (size[1], size[0], 3))
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


IMAGES = [make_jpeg(seed) for seed in range(7)]


def captions(results: list[CaptionResult]) -> list[str | None]:
    return [r.caption for r in results]


@pytest.mark.parametrize("model", BUILTINS)
def test_builtin_captions_are_vocabulary_words(model: str) -> None:
    results = FrameCaptioner(CaptionConfig(model=model, batch_size=4)).caption(IMAGES)
    assert len(results) == len(IMAGES)
    for result in results:
        assert result.error is None and result.caption
        assert set(result.caption.split()) <= WORDS, result.caption
    # Random weights, but the image must still matter.
    assert len(set(captions(results))) > 1


@pytest.mark.parametrize("prompt", [None, "a photo of"])
@pytest.mark.parametrize("model", BUILTINS)
def test_batching_does_not_change_captions(model: str, prompt: str | None) -> None:
    one = FrameCaptioner(CaptionConfig(model=model, batch_size=1, prompt=prompt)).caption(IMAGES)
    many = FrameCaptioner(CaptionConfig(model=model, batch_size=3, prompt=prompt)).caption(IMAGES)
    assert captions(one) == captions(many)
    assert all(r.caption for r in many)


@pytest.mark.parametrize("model", BUILTINS)
def test_prompt_echo_is_stripped(model: str) -> None:
    # Both builtins echo the prompt in their output ids (BLIP with a new start token, GIT exactly).
    results = FrameCaptioner(CaptionConfig(model=model, prompt="a photo of")).caption(IMAGES[:3])
    for result in results:
        assert result.caption and not result.caption.startswith("a photo of"), result.caption
        assert set(result.caption.split()) <= WORDS


def test_git_prompt_ids_follow_the_model_card() -> None:
    # GIT's card builds prompt ids as [CLS] + words; a trailing [SEP] would tell the decoder the
    # text already ended.
    captioner = FrameCaptioner(CaptionConfig(model="builtin:tiny-git", prompt="a photo of"))
    ids = captioner._preprocess([decode_image(IMAGES[0])])["input_ids"][0].tolist()
    tokenizer = captioner._processor.tokenizer
    assert ids == [tokenizer.cls_token_id] + tokenizer("a photo of", add_special_tokens=False).input_ids


def test_bad_images_give_errors_and_the_rest_is_captioned() -> None:
    captioner = FrameCaptioner(CaptionConfig(model="builtin:tiny-blip", batch_size=2))
    clean = captioner.caption(IMAGES[:4])
    mixed = [IMAGES[0], IMAGES[1], b"not a jpeg", IMAGES[2][:300], IMAGES[2], None, IMAGES[3]]
    results = captioner.caption(mixed)  # type: ignore[arg-type]
    assert len(results) == len(mixed)
    for i in (2, 3, 5):
        assert results[i].caption is None
        assert results[i].error and results[i].error.startswith("cannot decode JPEG: "), results[i].error
        assert "0x" not in results[i].error  # no object addresses: same input, same message
    assert captions([results[i] for i in (0, 1, 4, 6)]) == captions(clean)
    assert captioner.caption([]) == []


class PickyProcessor:
    """Wraps a real processor; rejects 50x50 images, as processors do for shapes they cannot handle."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def __call__(self, *, images: list, **kwargs: object) -> object:
        if any(image.size == (50, 50) for image in images):
            raise ValueError("unsupported image size")
        return self.inner(images=images, **kwargs)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_image_rejected_by_processor_is_isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    captioner = FrameCaptioner(CaptionConfig(model="builtin:tiny-git", batch_size=4))
    clean = captioner.caption(IMAGES[:3])
    monkeypatch.setattr(captioner, "_processor", PickyProcessor(captioner._processor))
    results = captioner.caption([IMAGES[0], make_jpeg(99, size=(50, 50)), IMAGES[1], IMAGES[2]])
    assert results[1] == CaptionResult(None, "cannot preprocess image: ValueError: unsupported image size")
    assert captions([results[0], results[2], results[3]]) == captions(clean)


class TightMemory:
    """Wraps a real model's generate(): a batch over `limit` images runs out of memory, as a GPU
    does when caption.batch_size is too big for it (CPU tensors never do)."""

    def __init__(self, inner: object, limit: int) -> None:
        self.inner, self.limit, self.sizes = inner, limit, []

    def __call__(self, **kwargs: object) -> object:
        size = len(kwargs["pixel_values"])  # type: ignore[arg-type]
        self.sizes.append(size)
        if size > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory: tried a batch of {size}")
        return self.inner(**kwargs)


def test_a_batch_out_of_memory_is_split_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    captioner = FrameCaptioner(CaptionConfig(model="builtin:tiny-blip", batch_size=7))
    clean = captioner.caption(IMAGES)
    tight = TightMemory(captioner._model.generate, limit=2)
    monkeypatch.setattr(captioner._model, "generate", tight)
    assert captions(captioner.caption(IMAGES)) == captions(clean)
    assert tight.sizes == [7, 3, 1, 1, 1, 1, 1, 1, 1] and captioner.batch_limit == 1
    tight.sizes.clear()
    assert captions(captioner.caption(IMAGES)) == captions(clean)  # later calls start at the size that fit
    assert tight.sizes == [1] * 7
    tight.limit = 0
    with pytest.raises(RuntimeError, match="out of memory on a single image"):
        captioner.caption(IMAGES[:1])


def test_preprocessing_runs_beside_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    captioner = FrameCaptioner(CaptionConfig(model="builtin:tiny-blip", batch_size=2))
    clean = captioner.caption(IMAGES)
    threads: list[str] = []
    second_batch_started, overlapped = threading.Event(), []
    prepare, generate = captioner._prepare, captioner._generate

    def prep(*args):
        threads.append(threading.current_thread().name)
        if len(threads) == 2:
            second_batch_started.set()
        return prepare(*args)

    def gen(*args):
        if not overlapped:  # the first batch's generation waits for the second batch's preprocessing
            overlapped.append(second_batch_started.wait(timeout=60))
        return generate(*args)

    monkeypatch.setattr(captioner, "_prepare", prep)
    monkeypatch.setattr(captioner, "_generate", gen)
    assert captions(captioner.caption(IMAGES)) == captions(clean)
    assert overlapped == [True] and len(threads) == 4
    assert all(t.startswith("caption-preprocess") for t in threads)


def test_cuda_asked_for_and_not_visible_is_refused() -> None:
    with pytest.raises(RuntimeError, match=r"caption.device=cuda: no CUDA device is visible to the captioner on "
                                           r"node-7 \(CUDA_VISIBLE_DEVICES="):
        FrameCaptioner(CaptionConfig(model="builtin:tiny-blip", device="cuda"), where="node-7")
    assert FrameCaptioner(CaptionConfig(model="builtin:tiny-blip", device="cpu")).device == "cpu"


def test_identity_is_stable_and_discriminating() -> None:
    base = CaptionConfig(model="builtin:tiny-blip")
    first, second = FrameCaptioner(base), FrameCaptioner(base)
    ident = first.identity()
    assert ident == second.identity()
    assert json.loads(json.dumps(ident)) == ident
    assert ident["revision"].startswith("sha256:") and ident["dtype"] == "float32"
    assert ident["device_type"] == "cpu" and ident["model_class"] == "BlipForConditionalGeneration"
    # Two instances caption identically (seeded weights, greedy decoding).
    assert captions(first.caption(IMAGES)) == captions(second.caption(IMAGES))

    git = FrameCaptioner(CaptionConfig(model="builtin:tiny-git")).identity()
    assert git["revision"] != ident["revision"] and git["model_class"] == "GitForCausalLM"
    prompted = FrameCaptioner(CaptionConfig(model="builtin:tiny-blip", prompt="a photo of")).identity()
    longer = FrameCaptioner(CaptionConfig(model="builtin:tiny-blip", max_new_tokens=12)).identity()
    batched = FrameCaptioner(CaptionConfig(model="builtin:tiny-blip", batch_size=3)).identity()
    assert prompted != ident and longer != ident
    assert batched == ident  # batching does not change captions, so it is not identity


def test_local_directory_loads_like_the_builtin(tmp_path: object) -> None:
    copy = os.path.join(str(tmp_path), "my-captioner")
    shutil.copytree(builtin_model_dir("tiny-git"), copy)
    local = FrameCaptioner(CaptionConfig(model=copy))
    builtin = FrameCaptioner(CaptionConfig(model="builtin:tiny-git"))
    assert local.identity()["revision"] == builtin.identity()["revision"]
    assert captions(local.caption(IMAGES[:3])) == captions(builtin.caption(IMAGES[:3]))


def test_hub_id_resolves_to_cached_commit(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, a hub id loads from the HF cache and identity() reports the snapshot's commit."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(str(tmp_path), "models--clipvip-test--tiny-git")
    shutil.copytree(builtin_model_dir("tiny-git"), os.path.join(repo, "snapshots", commit))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    captioner = FrameCaptioner(CaptionConfig(model="clipvip-test/tiny-git"))
    assert captioner.identity()["revision"] == commit
    assert all(r.caption for r in captioner.caption(IMAGES[:2]))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("/nonexistent/clipvip/captioner", "local model directory not found"),
        ("./no-such-captioner-dir", "local model directory not found"),
        ("builtin:tiny-nothing", "unknown builtin captioner"),
        ("clipvip-test/not-cached-anywhere", "not reachable"),
    ],
)
def test_unloadable_model_is_a_clear_error(model: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        FrameCaptioner(CaptionConfig(model=model))
    assert model in str(info.value)


def test_directory_without_an_image_processor_is_refused(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "no-processor")
    shutil.copytree(builtin_model_dir("tiny-blip"), path)
    for name in ("processor_config.json", "preprocessor_config.json"):
        if os.path.exists(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    with pytest.raises(ValueError, match="processor failed"):
        FrameCaptioner(CaptionConfig(model=path))


def test_dtype_resolution() -> None:
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        FrameCaptioner(CaptionConfig(model="builtin:tiny-blip", dtype="float16"))


def test_materialization_is_byte_identical_and_race_free(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    dirs = []
    for sub in ("a", "b"):
        monkeypatch.setenv("CLIPVIP_CACHE_DIR", os.path.join(str(tmp_path), sub))
        dirs.append(builtin_model_dir("tiny-blip"))
    names = sorted(os.listdir(dirs[0]))
    assert names == sorted(os.listdir(dirs[1])) and "model.safetensors" in names
    for name in names:
        with open(os.path.join(dirs[0], name), "rb") as f0, open(os.path.join(dirs[1], name), "rb") as f1:
            assert f0.read() == f1.read(), name

    # Concurrent first use (several actors on a node) ends with one complete dir, no temp dirs.
    monkeypatch.setenv("CLIPVIP_CACHE_DIR", os.path.join(str(tmp_path), "race"))
    found: list[str] = []
    threads = [threading.Thread(target=lambda: found.append(builtin_model_dir("tiny-git"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(found) == 3 and len(set(found)) == 1
    assert os.listdir(os.path.dirname(found[0])) == [os.path.basename(found[0])]
    assert "model.safetensors" in os.listdir(found[0])


@pytest.mark.gpu
def test_gpu_auto_dtype_is_bfloat16() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no visible GPU")
    captioner = FrameCaptioner(CaptionConfig(model="builtin:tiny-blip"))
    assert captioner.identity()["device_type"] == "cuda" and captioner.identity()["dtype"] == "bfloat16"
    assert next(captioner._model.parameters()).dtype == torch.bfloat16
    assert all(r.caption for r in captioner.caption(IMAGES))


def test_real_size_builtins_have_the_published_shapes():
    """random-blip-large / random-git-large cost what BLIP-large / GIT-large cost (bench/gpu.py):
    their shapes, built on the meta device (no memory, no init), and a vocabulary padded to the
    real size that keeps the words' ids."""
    from pipeline.data import captioner_builtin as cb

    small, big = cb._token_ids(), cb._token_ids(30524)
    assert len(big) == 30524 and all(big[tok] == i for tok, i in small.items())
    sizes_m = {}
    for name, build in (("random-blip-large", cb._blip), ("random-git-large", cb._git)):
        with torch.device("meta"):
            model, processor = build(cb._SIZES[name])
        sizes_m[name] = round(sum(p.numel() for p in model.parameters()) / 1e6)
        assert processor.tokenizer.vocab_size == model.config.get_text_config().vocab_size
    assert sizes_m == {"random-blip-large": 446, "random-git-large": 394}
    assert {"random-blip-large", "random-git-large"} <= set(cb.BUILTIN_NAMES)
