"""Caption-set helpers: frame spreading, schema, fingerprints, caption_set.json life cycle, the
counted column read, and caption_shard on a real Parquet frame shard (local files, no Ray)."""

from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import schema
from pipeline.config import CaptionConfig, fingerprint
from pipeline.data import captions as capsets
from pipeline.data.captioner import CaptionResult, decode_image
from pipeline.data.index import FRAMES_INDEX_SCHEMA, IndexWriter, captions_kind, captions_row
from pipeline.data.root import DatasetRoot, Shard
from pipeline.data.shards import write_table_atomic
from pipeline.utils import fs

OPTS = fs.S3Options()
PART = "p0"


def jpeg(seed: int, size: int = 48) -> bytes:
    img = Image.effect_noise((size, size), 40 + seed).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class LengthCaptioner:
    """A deterministic stand-in captioner: the caption names the image's byte length; bytes
    that do not decode as an image fail, as FrameCaptioner reports them."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def caption(self, images):
        self.calls.append(len(images))
        out = []
        for data in images:
            try:
                decode_image(data)
                out.append(CaptionResult(f"len {len(data)}", None))
            except Exception as e:  # noqa: BLE001
                out.append(CaptionResult(None, f"cannot decode JPEG: {type(e).__name__}"))
        return out

    def identity(self):
        return {"model": "length", "revision": "r1"}


def write_frame_shard(root: DatasetRoot, index: int, frames_per_row: list[int],
                      bad_middle: set[int] = frozenset()) -> pa.Table:
    rows = []
    for r, n in enumerate(frames_per_row):
        frames = [jpeg(100 * r + i) for i in range(n)]
        rows.append({"clip_id": f"v{index}.{r}.mp4", "video_id": f"v{index}", "source_uri": f"/videos/v{index}.mp4",
                     "start_s": 0.0, "end_s": 1.0, "subtitle": "hi", "frames": frames,
                     "frame_times_s": [float(i) for i in range(n)],
                     "middle_frame": b"broken" if r in bad_middle else jpeg(1000 + r),
                     "middle_frame_time_s": 0.5, "height": 48, "width": 48, "source_fps": 30.0})
    table = pa.Table.from_pylist(rows, schema=schema.FRAME_SCHEMA)
    write_table_atomic(root.frames_uri(Shard(PART, index)), table, OPTS)
    return table


def frames_index(units: int) -> pa.Table:
    return pa.Table.from_pylist([{"part": PART, "unit": u, "videos": 1, "clips": 2, "rows": 2, "quarantined": 0,
                                  "quarantined_by_stage": "{}", "frames": 4, "bytes": 1, "sha256": "s",
                                  "clip_ids_sha256": "c", "min_clip_id": "a", "max_clip_id": "b"} for u in range(units)],
                                schema=FRAMES_INDEX_SCHEMA)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(1, 1), (8, 1), (8, 3), (12, 12), (30, 4), (2, 5), (3, 64)])
def test_spread_indices_uniform(n, k):
    idx = capsets.spread_indices(n, k)
    assert len(idx) == k and idx == sorted(idx) and all(0 <= i < n for i in idx)
    if k <= n:
        assert len(set(idx)) == k, "distinct frames when there are enough"
        # Segment centres: every pick lies inside its own k-th of the clip.
        assert all(j * n / k <= i < (j + 1) * n / k for j, i in enumerate(idx))


def test_spread_indices_edges():
    assert capsets.spread_indices(0, 3) == []
    assert capsets.spread_indices(8, 1) == [4]
    with pytest.raises(ValueError):
        capsets.spread_indices(5, 0)


def test_caption_schema():
    assert schema.caption_schema(1) == schema.CAPTION_SCHEMA
    s3 = schema.caption_schema(3)
    assert s3.names == ["clip_id", "caption", "frame_captions", "frame_caption_indices"]
    assert s3.field("frame_captions").type == pa.list_(pa.string())


def test_set_fingerprint_keeps_prepare_identity():
    cfg = CaptionConfig(model="builtin:tiny-git")
    # k = 1 must equal what prepare has always written, so existing sets stay recognised.
    assert capsets.set_fingerprint(cfg, "F") == fingerprint({"captioner": cfg.identity(), "frames": "F"})
    fps = {capsets.set_fingerprint(cfg, "F", 1), capsets.set_fingerprint(cfg, "F", 3),
           capsets.set_fingerprint(cfg, "G", 1), capsets.set_fingerprint(CaptionConfig(model="x"), "F"),
           capsets.set_fingerprint(CaptionConfig(model="builtin:tiny-git", prompt="a photo of"), "F")}
    assert len(fps) == 5
    # Batching and resources change speed, not captions.
    assert capsets.set_fingerprint(CaptionConfig(model="builtin:tiny-git", batch_size=1, max_actors=4), "F") == \
        capsets.set_fingerprint(cfg, "F")


def test_open_caption_set_life_cycle(tmp_path):
    root = DatasetRoot(str(tmp_path))
    cfg = CaptionConfig(set_name="s", model="m")
    meta = capsets.open_caption_set(root, cfg, "F", frames_per_clip=2)
    assert meta["status"] == "in_progress" and meta["frames_per_clip"] == 2
    assert capsets.open_caption_set(root, cfg, "F", frames_per_clip=2) == meta
    with pytest.raises(capsets.CaptionSetConflict, match="'s'.*never overwritten"):
        capsets.open_caption_set(root, CaptionConfig(set_name="s", model="other"), "F", frames_per_clip=2)
    with pytest.raises(capsets.CaptionSetConflict, match="frames_per_clip 2"):
        capsets.open_caption_set(root, cfg, "F")
    forced = capsets.open_caption_set(root, CaptionConfig(set_name="s", model="other"), "F", force=True)
    assert forced["config"]["model"] == "other"


def test_read_columns_counts_only_projected_bytes(tmp_path):
    uri = str(tmp_path / "f.parquet")
    big = [os.urandom(20_000) for _ in range(64)]
    table = pa.table({"clip_id": [f"c{i}" for i in range(64)], "big": big, "small": [b"x" * 100] * 64})
    write_table_atomic(uri, table, OPTS)
    got, nbytes = capsets.read_columns(uri, OPTS, ["clip_id", "small"])
    assert got.column("clip_id").to_pylist() == table.column("clip_id").to_pylist()
    size = os.path.getsize(uri)
    assert 0 < nbytes < size * 0.05, (nbytes, size)
    _, all_bytes = capsets.read_columns(uri, OPTS, ["clip_id", "big", "small"])
    assert size * 0.95 < all_bytes <= size


def test_caption_shard_middle_and_k_frames(tmp_path):
    root = DatasetRoot(str(tmp_path))
    shard = Shard(PART, 0)
    frames = write_frame_shard(root, 0, [5, 1, 3], bad_middle={1})
    before = open(root.frames_uri(shard), "rb").read()
    captioner = LengthCaptioner()
    side = capsets.caption_shard(root, "k3", shard, captioner, "FP", frames_per_clip=3)
    assert (side["rows"], side["captioned"], side["failed"], side["skipped"]) == (3, 2, 1, False)
    # Row 1 has one frame: its 3 picks repeat frame 0, captioned once (3 middles + 3 + 1 + 3 images).
    assert side["images"] == captioner.calls[0] == 3 + 3 + 1 + 3
    assert side["frame_captions"] == 9 and side["frame_captions_failed"] == 0
    assert side["null_rows"] == [1] and (side["part"], side["unit"]) == (PART, 0)
    out = pq.read_table(root.caption_uri("k3", shard)).to_pylist()
    assert [r["clip_id"] for r in out] == frames.column("clip_id").to_pylist()
    assert out[1]["caption"] is None
    # `caption` is the middle frame's caption, never one of the k frames'.
    assert [out[0]["caption"], out[2]["caption"]] == [f"len {len(frames.column('middle_frame')[r].as_py())}"
                                                      for r in (0, 2)]
    for row, fr in zip(out, frames.column("frames").to_pylist()):
        assert row["frame_caption_indices"] == capsets.spread_indices(len(fr), 3)
        assert row["frame_captions"] == [f"len {len(fr[i])}" for i in row["frame_caption_indices"]]
    (q,) = pq.read_table(root.caption_quarantine_uri("k3", shard)).to_pylist()
    assert (q["clip_id"], q["video_id"], q["stage"]) == ("v0.1.mp4", "v0", schema.STAGE_CAPTION)
    assert open(root.frames_uri(shard), "rb").read() == before
    again = capsets.caption_shard(root, "k3", shard, captioner, "FP", frames_per_clip=3)
    assert again["skipped"] and len(captioner.calls) == 1, "a done part is never redone"


def test_caption_shard_k1_reads_little(tmp_path):
    root = DatasetRoot(str(tmp_path))
    shard = Shard(PART, 0)
    write_frame_shard(root, 0, [12] * 16)
    side = capsets.caption_shard(root, "mid", shard, LengthCaptioner(), "FP")
    assert pq.read_table(root.caption_uri("mid", shard)).schema == schema.CAPTION_SCHEMA
    assert side["bytes_read"] < 0.15 * fs.file_size(root.frames_uri(shard)), "middle frames, not all frames"
    assert not os.path.exists(root.caption_quarantine_uri("mid", shard))


def test_finish_and_manifest_listing(tmp_path):
    root = DatasetRoot(str(tmp_path))
    root.write_manifest({"status": "complete", "caption_sets": ["a"], "parts": [{"name": PART}]})
    for u in range(2):
        write_frame_shard(root, u, [2, 2])
    meta = capsets.open_caption_set(root, CaptionConfig(set_name="b", model="m"), "F")
    writer = IndexWriter(root, captions_kind("b"))
    writer.add(captions_row(capsets.caption_shard(root, "b", Shard(PART, 0), LengthCaptioner(), meta["fingerprint"])))
    writer.flush()
    with pytest.raises(RuntimeError, match="1 parts not done"):
        capsets.finish_caption_set(root, meta, frames_index(2), [PART])
    assert capsets.complete_caption_sets(root) == []
    writer.add(captions_row(capsets.caption_shard(root, "b", Shard(PART, 1), LengthCaptioner(), meta["fingerprint"])))
    writer.flush()
    done = capsets.finish_caption_set(root, meta, frames_index(2), [PART], wall_s=1.5)
    assert done["status"] == "complete" and done["counts"]["captioned"] == 4 and done["counts"]["shards"] == 2
    assert done["captioner"] == [{"model": "length", "revision": "r1"}] and done["timings_s"]["wall_last_run"] == 1.5
    assert fs.list_files(root.index_pending_dir(captions_kind("b")), OPTS) == [], "fragments merged and removed"
    # A set that covers the root is immutable: finishing it again writes nothing.
    mtime = os.stat(root.caption_set_uri("b")).st_mtime_ns
    capsets.finish_caption_set(root, done, frames_index(2), [PART], wall_s=9.0)
    assert os.stat(root.caption_set_uri("b")).st_mtime_ns == mtime
    # A grown root (3 frame shards) is no longer covered: finishing needs the new part.
    assert not capsets.covers(done, 3)
    with pytest.raises(RuntimeError, match="1 parts not done"):
        capsets.finish_caption_set(root, done, frames_index(3), [PART])
    assert capsets.refresh_manifest_caption_sets(root) == ["b"]
    assert json.load(open(os.path.join(root.uri, "manifest.json")))["caption_sets"] == ["b"]
    (desc,) = capsets.describe_caption_sets(root, [PART])
    assert desc["parts_done"] == 2 and desc["name"] == "b"
