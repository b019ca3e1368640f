"""The source index of a pack: a dataset root joined with one caption set, before any frame is read.

`DatasetIndex.open` reads the root's manifest, the caption set's `caption_set.json` and the two
shard indexes: four object reads whatever the number of shards. It checks that the caption set
is complete, made from these frames and aligned with them shard by shard, and knows which rows
have a null caption (left out of a view). `clipvip pack` plans its tasks from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import schema
from pipeline.data.index import FRAMES, captions_kind, read_index
from pipeline.data.root import DatasetRoot, Shard
from pipeline.data.sampling import ShardLayout
from pipeline.utils import fs


@dataclass(frozen=True)
class DatasetIndex:
    """What a pack knows about a root and caption set before reading any frames (plain data).

    Built from the root's manifest, the caption set's `caption_set.json` and the two shard
    indexes: four object reads whatever the number of shards.

    Attributes:
        root: dataset root (local path or s3://).
        caption_set: caption set joined to the frames by shard position.
        opts: how to reach S3.
        layout: shard ordinals (index order), rows per shard and excluded (null-caption) rows.
        part_names: metadata parts in registration order.
        shard_part / shard_unit: [S] part (position in part_names) and unit of each ordinal.
        num_null_captions: rows excluded because their caption is null.
        fingerprint: the root's frames fingerprint (from manifest.json).
        capset: the caption set's `caption_set.json`.
    """

    root: str
    caption_set: str
    opts: fs.S3Options
    layout: ShardLayout
    part_names: tuple[str, ...]
    shard_part: np.ndarray
    shard_unit: np.ndarray
    num_null_captions: int
    fingerprint: str
    capset: dict[str, Any]

    @property
    def num_rows(self) -> int:
        """N: rows that take part in the epoch order."""
        return self.layout.total

    def shard(self, ordinal: int) -> Shard:
        return Shard(self.part_names[int(self.shard_part[ordinal])], int(self.shard_unit[ordinal]))

    @classmethod
    def open(cls, root: str, caption_set: str, opts: fs.S3Options | None = None) -> DatasetIndex:
        """Read manifest, caption set and both shard indexes; fail fast on anything unusable.

        Raises:
            ValueError: root not prepared or incomplete; caption set missing (the message lists
                the sets that exist), incomplete, or made from other frames; a part missing, with
                another row count or other clip ids than its frame shard.
        """
        droot = DatasetRoot(root, opts)
        manifest = droot.open()
        capset = _open_caption_set(droot, caption_set, manifest)
        order = droot.parts(manifest)
        frames = read_index(droot, FRAMES, order, pending=False)
        caps = read_index(droot, captions_kind(caption_set), order, pending=False)
        f_keys = list(zip(frames.column("part").to_pylist(), frames.column("unit").to_pylist()))
        c_rows = {k: i for i, k in enumerate(zip(caps.column("part").to_pylist(), caps.column("unit").to_pylist()))}
        missing = [f"{p}/{schema.part_name(u)}" for p, u in f_keys if (p, u) not in c_rows]
        if missing:
            raise ValueError(f"caption set {caption_set!r} is incomplete: no part for {len(missing)} frame shards "
                             f"(first: {missing[:3]}) under {droot.caption_set_dir(caption_set)}; run recaption")
        rows = frames.column("rows").to_pylist()
        f_sha = frames.column("clip_ids_sha256").to_pylist()
        c_rows_col, c_sha, nulls = (caps.column(c).to_pylist() for c in ("rows", "clip_ids_sha256", "null_rows"))
        excluded: dict[int, np.ndarray] = {}
        for ordinal, key in enumerate(f_keys):
            c = c_rows[key]
            name = f"{key[0]}/{schema.part_name(key[1])}"
            if c_rows_col[c] != rows[ordinal]:
                raise ValueError(f"caption set {caption_set!r} part {name} has {c_rows_col[c]} rows but the frame "
                                 f"shard has {rows[ordinal]}")
            if c_sha[c] != f_sha[ordinal]:
                raise ValueError(f"caption set {caption_set!r} part {name} lists other clip ids (or another order) "
                                 f"than its frame shard; the set is misaligned, recaption it")
            if nulls[c]:
                excluded[ordinal] = np.array(nulls[c], dtype=np.int64)
        part_pos = {p: i for i, p in enumerate(order)}
        layout = ShardLayout(shard_ids=np.arange(len(f_keys), dtype=np.int64),
                             num_rows=np.array(rows, dtype=np.int64), excluded=excluded)
        return cls(root=root, caption_set=caption_set, opts=droot.opts, layout=layout, part_names=tuple(order),
                   shard_part=np.array([part_pos[p] for p, _ in f_keys], dtype=np.int32),
                   shard_unit=np.array([u for _, u in f_keys], dtype=np.int32),
                   num_null_captions=sum(len(r) for r in excluded.values()),
                   fingerprint=str(manifest.get("fingerprint", "")), capset=capset)


def _open_caption_set(root: DatasetRoot, name: str, manifest: dict[str, Any]) -> dict[str, Any]:
    meta = fs.read_json_or_none(root.caption_set_uri(name), root.opts)
    if meta is None:
        from pipeline.data.captions import caption_set_names  # noqa: PLC0415

        raise ValueError(f"caption set {name!r} not found under {root.path('captions')}; "
                         f"existing sets: {caption_set_names(root) or 'none'}")
    if meta.get("status") != "complete":
        raise ValueError(f"caption set {name!r} is incomplete (status {meta.get('status')!r}); "
                         "finish it with prepare/recaption before training")
    want = manifest.get("fingerprint")
    if meta.get("frames_fingerprint") not in (None, want):
        raise ValueError(f"caption set {name!r} was made from other frames "
                         f"({meta.get('frames_fingerprint')} != {want}); recaption this root")
    return meta

