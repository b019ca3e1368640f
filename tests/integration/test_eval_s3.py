"""`evaluate` and `finetune` read S3 as `prepare` does: the synthetic retrieval split uploaded to
a moto server on loopback that counts every request, read back through the real code.

Targets: a split costs 1 GET (annotations) + 1 listing (video_root), never a request per item;
a small video is ONE GET per load (count and decode passes share it), a large one each 8 MiB
block at most once; a frame directory is one listing + one GET per chosen frame; S3 gives the
same items, pixels, training batches and metrics as the local copy; a read that keeps failing
is a BadSample naming the URI and the S3 error.
"""

from __future__ import annotations

import json
import math
import os
import re

import boto3
import numpy as np
import pytest

from pipeline.data.sampling import BadSample
from pipeline.config import RetrievalDataConfig
from pipeline.eval.formats import RetrievalItem, read_items
from pipeline.eval.video import load_clip
from pipeline.utils import fs
from tests.faultproxy import FaultProxy

BUCKET = "evals3"
SIZE_PX, NUM_FRAMES = 32, 4
FRAME_CLIPS = 2  # test videos also stored as JPEG frame directories


def _put_tree(client, local_dir: str, prefix: str) -> None:
    for dirpath, _, names in os.walk(local_dir):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            client.upload_file(path, BUCKET, f"{prefix}/{rel}")


@pytest.fixture(scope="module")
def split(s3_counting, sample_data, tmp_path_factory):
    """The retrieval sample locally and under s3://evals3/retrieval (videos, frame directories of
    the first test videos, annotations, batch groups); `log` counts the endpoint's requests."""
    import av

    endpoint, log = s3_counting
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    rows = [json.loads(line) for line in open(sample_data.retrieval_jsonl, encoding="utf-8")]
    frames = tmp_path_factory.mktemp("frames")
    for row in rows[:FRAME_CLIPS]:
        clip_dir = frames / row["clip_id"]
        os.makedirs(clip_dir)
        with av.open(os.path.join(sample_data.retrieval_video_root, row["clip_id"] + ".mp4")) as c:
            for k, frame in enumerate(c.decode(video=0)):
                frame.to_image().save(clip_dir / f"{row['clip_id']}_{k:03d}.jpg", quality=90)
    _put_tree(client, sample_data.retrieval_video_root, "retrieval/videos")
    _put_tree(client, str(frames), "retrieval/frames")
    for path in (sample_data.retrieval_jsonl, sample_data.retrieval_train_jsonl, sample_data.retrieval_val_jsonl,
                 sample_data.retrieval_train_pairs):
        client.upload_file(path, BUCKET, f"retrieval/{os.path.basename(path)}")
    return {"endpoint": endpoint, "log": log, "opts": fs.S3Options(endpoint_url=endpoint),
            "local": sample_data, "frames": str(frames), "rows": rows, "s3": f"s3://{BUCKET}/retrieval"}


def _listings(requests) -> list:
    return [r for r in requests if r[0] == "GET" and "list-type=2" in r[2]]


def _same_items(local, remote, local_root: str, s3_root: str) -> None:
    assert [i.clip_id for i in remote] == [i.clip_id for i in local]
    assert [i.texts for i in remote] == [i.texts for i in local]
    assert [i.num_frames_hint for i in remote] == [i.num_frames_hint for i in local]
    assert [os.path.relpath(i.video_path, local_root) for i in local] == [
        i.video_path[len(s3_root) + 1:] for i in remote]


@pytest.mark.parametrize("video_format", ["video", "frames"])
def test_read_items_is_one_get_and_one_listing(split, video_format):
    local_root = split["local"].retrieval_video_root if video_format == "video" else split["frames"]
    s3_root = f"{split['s3']}/{'videos' if video_format == 'video' else 'frames'}"
    ann = os.path.basename(split["local"].retrieval_jsonl)
    local_cfg = RetrievalDataConfig(annotations=split["local"].retrieval_jsonl, video_root=local_root,
                                    video_format=video_format)
    s3_cfg = RetrievalDataConfig(annotations=f"{split['s3']}/{ann}", video_root=s3_root, video_format=video_format)
    local, local_skipped = read_items(local_cfg)
    mark = split["log"].mark()
    remote, remote_skipped = read_items(s3_cfg, split["opts"])
    requests = split["log"].since(mark)
    assert len(requests) == 2, requests
    assert [r[:2] for r in requests if r not in _listings(requests)] == [("GET", f"/{BUCKET}/retrieval/{ann}")]
    assert len(_listings(requests)) == 1, requests
    _same_items(local, remote, local_root, s3_root)
    assert [k for k, _ in remote_skipped] == [k for k, _ in local_skipped]
    if video_format == "video":
        assert len(remote) == len(split["rows"])
        assert [i.size_bytes for i in remote] == [os.path.getsize(i.video_path) for i in local]
    else:
        assert len(remote) == FRAME_CLIPS  # the other rows have no frame directory, on S3 as locally


def test_an_empty_prefix_names_video_root(split):
    cfg = RetrievalDataConfig(annotations=f"{split['s3']}/test.jsonl", video_root=f"{split['s3']}/nothing")
    with pytest.raises(ValueError, match=rf"video_root 's3://{BUCKET}/retrieval/nothing': no objects"):
        read_items(cfg, split["opts"])


def test_load_clip_fetches_a_video_once(split):
    local, _ = read_items(RetrievalDataConfig(annotations=split["local"].retrieval_jsonl,
                                              video_root=split["local"].retrieval_video_root))
    remote, _ = read_items(RetrievalDataConfig(annotations=f"{split['s3']}/test.jsonl",
                                               video_root=f"{split['s3']}/videos"), split["opts"])
    log = split["log"]
    # Small blocks and no whole read: the BlockFile path, each block fetched at most once a load.
    blocks = fs.S3Options(endpoint_url=split["endpoint"], whole_read_max_bytes=0, block_bytes=16 << 10)
    for a, b in zip(local, remote, strict=True):
        expected = load_clip(a, "video", NUM_FRAMES, SIZE_PX, False, None)
        path = b.video_path[len("s3:/"):]
        mark = log.mark()
        got = load_clip(b, "video", NUM_FRAMES, SIZE_PX, False, None, opts=split["opts"])
        assert log.since(mark) == [("GET", path, "")], log.since(mark)
        np.testing.assert_array_equal(got, expected)
        mark = log.mark()
        got = load_clip(b, "video", NUM_FRAMES, SIZE_PX, True, np.random.default_rng(5), opts=blocks)
        gets, nbytes = log.bytes_since(mark, path)
        assert len(log.since(mark)) == gets <= math.ceil(b.size_bytes / (16 << 10)), gets
        assert nbytes <= b.size_bytes
        np.testing.assert_array_equal(got, load_clip(a, "video", NUM_FRAMES, SIZE_PX, True, np.random.default_rng(5)))


def test_frame_directories_list_once_and_get_each_chosen_frame(split):
    ann = split["local"].retrieval_jsonl
    local, _ = read_items(RetrievalDataConfig(annotations=ann, video_root=split["frames"], video_format="frames"))
    remote, _ = read_items(RetrievalDataConfig(annotations=f"{split['s3']}/test.jsonl",
                                               video_root=f"{split['s3']}/frames", video_format="frames"),
                           split["opts"])
    log = split["log"]
    for a, b in zip(local, remote, strict=True):
        mark = log.mark()
        got = load_clip(b, "frames", NUM_FRAMES, SIZE_PX, False, None, opts=split["opts"])
        requests = log.since(mark)
        assert len(_listings(requests)) == 1 and len(requests) == 1 + NUM_FRAMES, requests
        np.testing.assert_array_equal(got, load_clip(a, "frames", NUM_FRAMES, SIZE_PX, False, None))


def test_a_read_that_keeps_failing_is_a_bad_sample(split):
    (item, *_), _ = read_items(RetrievalDataConfig(annotations=f"{split['s3']}/test.jsonl",
                                                   video_root=f"{split['s3']}/videos"), split["opts"])
    fast = dict(retry_attempts=3, retry_base_s=0.001, retry_max_s=0.01)
    with FaultProxy(split["endpoint"], fail_paths=(item.video_path[len("s3:/"):],)) as proxy:
        opts = fs.S3Options(endpoint_url=proxy.endpoint, **fast)
        with pytest.raises(BadSample, match=rf"{re.escape(item.video_path)}: S3 read failed: .*gave up after 3 attempts"):
            load_clip(item, "video", NUM_FRAMES, SIZE_PX, False, None, opts=opts)
        assert proxy.requests == 3
        frame_dir = fs.join(split["s3"], "frames", split["rows"][0]["clip_id"])
        frame = fs.join(frame_dir, f"{split['rows'][0]['clip_id']}_000.jpg")
    with FaultProxy(split["endpoint"], fail_paths=(frame[len("s3:/"):],)) as proxy:
        opts = fs.S3Options(endpoint_url=proxy.endpoint, **fast)
        with pytest.raises(BadSample, match=r"_000\.jpg: S3 read failed: TransientS3Error"):
            load_clip(RetrievalItem(split["rows"][0]["clip_id"], frame_dir, ("t",)), "frames", NUM_FRAMES, SIZE_PX,
                      False, None, opts=opts)


def test_finetune_reads_its_splits_and_batches_from_s3(split):
    """The driver's split reading (pipeline/train/run.py) and a worker's batches (RankBatches with the
    decoded-frame cache) on s3:// inputs equal the local ones."""
    from pipeline.config import load_config
    from pipeline.config import FinetuneJobConfig
    from pipeline.train.retrieval_data import (
        FrameCache,
        RankBatches,
        RetrievalLoaderSpec,
    )
    from pipeline.train.run import finetune_data

    local = split["local"]

    def data(root: str, videos: str, pairs: str, *extra: str):
        cfg = load_config(FinetuneJobConfig, None, [
            "model.preset=tiny", "train.micro_batch_size=2", f"data.train.annotations={root}/train.jsonl",
            f"data.train.video_root={videos}", f"data.val.annotations={root}/val.jsonl", f"data.val.video_root={videos}",
            f"data.batch_groups={pairs}", *extra])
        return cfg, finetune_data(cfg)[:3]

    base = os.path.dirname(local.retrieval_jsonl)
    _, (train, val, groups) = data(base, local.retrieval_video_root, local.retrieval_train_pairs)
    cfg, (s3_train, s3_val, s3_groups) = data(split["s3"], f"{split['s3']}/videos",
                                              f"{split['s3']}/train_pairs.json",
                                              f"storage.s3_endpoint_url={split['endpoint']}")
    _same_items(train, s3_train, local.retrieval_video_root, f"{split['s3']}/videos")
    _same_items(val, s3_val, local.retrieval_video_root, f"{split['s3']}/videos")
    assert s3_groups == groups and groups
    loader = RetrievalLoaderSpec(video_format="video", num_frames=NUM_FRAMES, size_px=SIZE_PX, max_text_len=16,
                                   micro_batch=2, seed=0, opts=fs.S3Options.of(cfg.storage))
    world = len(train) // loader.micro_batch  # one step of the epoch, rank 0's two videos
    mark = split["log"].mark()
    (got,) = list(RankBatches(s3_train, loader, 0, 0, world, FrameCache(64 << 20), s3_groups)(0))
    assert len(split["log"].since(mark)) == 2, "one GET per video of the batch"
    (expected,) = list(RankBatches(train, loader, 0, 0, world, None, groups)(0))
    # The cache decodes every frame and samples from memory: the same frames as a sampled decode.
    for key in ("frames", "text_ids", "clip_id", "skipped"):
        assert np.array_equal(got[key].numpy(), expected[key].numpy()), key


def test_evaluate_on_s3_matches_local(ray_local, split, tmp_path):
    """In-process `run_evaluate` (as test_retrieval.py): same metrics and similarity matrix, and
    the whole job costs 1 GET of annotations + 1 listing + 1 GET per video, from the Ray tasks."""
    from pipeline.config import EvaluateJobConfig, load_config
    from pipeline.eval.evaluate import resolve_paths, run_evaluate

    def evaluate(name: str, annotations: str, video_root: str):
        cfg = resolve_paths(load_config(EvaluateJobConfig, None, [
            f"run_name={name}", f"eval.data.annotations={annotations}", f"eval.data.video_root={video_root}",
            f"eval.data.num_frames={NUM_FRAMES}", f"eval.image_size_px={SIZE_PX}",
            "eval.dsl=false", f"eval.out={tmp_path}", "tracking.enabled=false", "ray.progress_bars=false",
            f"storage.s3_endpoint_url={split['endpoint']}", "eval.models=[{name: m, model: {preset: tiny, max_text_len: 16}}]"]))
        return run_evaluate(cfg, log=lambda *_: None)

    local = evaluate("local", split["local"].retrieval_jsonl, split["local"].retrieval_video_root)
    mark = split["log"].mark()
    remote = evaluate("s3", f"{split['s3']}/test.jsonl", f"{split['s3']}/videos")
    requests = split["log"].since(mark)
    n = len(split["rows"])
    assert remote.num_evaluated == local.num_evaluated == n and not remote.failed
    assert remote.results == local.results
    np.testing.assert_array_equal(np.load(tmp_path / "s3" / "sim_m.npz")["sim_TV"],
                                  np.load(tmp_path / "local" / "sim_m.npz")["sim_TV"])
    videos = sorted(r[1] for r in requests if r[1].startswith(f"/{BUCKET}/retrieval/videos/"))
    assert len(_listings(requests)) == 1 and len(requests) == 2 + n, requests
    assert videos == sorted(f"/{BUCKET}/retrieval/videos/{r['clip_id']}.mp4" for r in split["rows"])
    assert all(r[0] == "GET" for r in requests)
