"""Plot-ready views of pipeline outputs, for the notebooks in notebooks/ (pure: no Ray, no MLflow).

- images: JPEG bytes or uint8 arrays -> one RGB strip (a clip's frames in a row) or a grid of
  strips, as numpy arrays for `imshow`;
- a dataset root: frame rows, every caption set joined to the frames by shard position, the
  quarantine tables and their reasons counted by stage;
- MLflow: runs of an experiment by name prefix, metric histories, metric keys grouped by what
  they measure. The caller passes an `MlflowClient` (any object with its methods), so the
  MLflow import stays in pipeline/tracking.py and the notebooks;
- retrieval: the top k of a row of similarities, ties broken as the metrics break them.

Tables are `pyarrow.Table`s (`.to_pandas()` renders them in a notebook).
Shape legend: H, W image height and width in pixels, 3 RGB channels.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.data.captions import complete_caption_sets
from pipeline.data.index import FRAMES, captions_kind, read_index
from pipeline.data.retry import superseded_clips
from pipeline.data.root import DatasetRoot, Shard
from pipeline.utils import fs

ImageLike = bytes | np.ndarray

# ---------------------------------------------------------------------------------------------
# Images


def to_rgb(image: ImageLike, height_px: int | None = None) -> np.ndarray:
    """[H, W, 3] uint8 from JPEG/PNG bytes or an [H, W, 3] / [H, W] uint8 array.

    Args:
        image: encoded bytes or a decoded array.
        height_px: resize to this height keeping the aspect ratio (bicubic); None keeps the size.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(image))) as img:
            pil = img.convert("RGB")
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise ValueError(f"expected a uint8 [H, W] or [H, W, 3] array, got {arr.dtype} {arr.shape}")
        pil = Image.fromarray(arr).convert("RGB")
    if height_px is not None and pil.height != height_px:
        width_px = max(1, round(pil.width * height_px / pil.height))
        pil = pil.resize((width_px, height_px), Image.Resampling.BICUBIC)
    return np.asarray(pil, dtype=np.uint8)


def frame_strip(frames: Sequence[ImageLike], height_px: int = 64, gap_px: int = 2,
                fill: int = 255) -> np.ndarray:
    """A clip's frames side by side, all scaled to `height_px`: [height_px, W, 3] uint8.

    Frames are separated by `gap_px` columns of `fill`; no frames give a [height_px, 0, 3] array.
    """
    tiles = [to_rgb(f, height_px) for f in frames]
    if not tiles:
        return np.full((height_px, 0, 3), fill, np.uint8)
    gap = np.full((height_px, gap_px, 3), fill, np.uint8)
    parts = [tiles[0]]
    for tile in tiles[1:]:
        parts += [gap, tile]
    return np.concatenate(parts, axis=1)


def frame_grid(rows: Sequence[Sequence[ImageLike]], height_px: int = 64, gap_px: int = 2,
               fill: int = 255) -> np.ndarray:
    """One `frame_strip` per row, stacked; shorter rows are padded with `fill` on the right.

    Returns:
        [R * height_px + (R - 1) * gap_px, max strip width, 3] uint8.
    """
    if not rows:
        raise ValueError("frame_grid needs at least one row")
    strips = [frame_strip(r, height_px, gap_px, fill) for r in rows]
    width_px = max(s.shape[1] for s in strips)
    out = np.full((len(strips) * (height_px + gap_px) - gap_px, width_px, 3), fill, np.uint8)
    for i, strip in enumerate(strips):
        top = i * (height_px + gap_px)
        out[top:top + height_px, :strip.shape[1]] = strip
    return out


# ---------------------------------------------------------------------------------------------
# Dataset root


def shards(root: str, opts: fs.S3Options | None = None) -> list[Shard]:
    """Frame shards of a prepared root, in index order (manifest + frames index: two reads)."""
    droot = DatasetRoot(root, opts)
    index = read_index(droot, FRAMES, droot.parts(droot.open(require_complete=False)))
    return [Shard(p, u) for p, u in zip(index.column("part").to_pylist(), index.column("unit").to_pylist())]


def _read(uri: str, opts: fs.S3Options, columns: Sequence[str]) -> pa.Table:

    return fs.read_parquet(uri, opts, list(columns))


def read_frame_rows(root: str, columns: Sequence[str] = ("clip_id", "subtitle", "frames"),
                    limit: int | None = None, opts: fs.S3Options | None = None) -> list[dict[str, Any]]:
    """The first `limit` clips of a root (all when None), in shard order, projected columns only.

    Shards are read one at a time and reading stops once `limit` rows are in hand.
    """
    droot = DatasetRoot(root, opts)
    out: list[dict[str, Any]] = []
    for shard in shards(root, droot.opts):
        if limit is not None and len(out) >= limit:
            break
        out += _read(droot.frames_uri(shard), droot.opts, columns).to_pylist()
    return out if limit is None else out[:limit]


def caption_table(root: str, sets: Sequence[str] | None = None,
                  opts: fs.S3Options | None = None) -> pa.Table:
    """Every clip with its subtitle and one caption column per caption set.

    Caption parts are aligned row for row with the frame shard of the same name (the dataset
    contract), so the join is by position; the clip ids are checked, never assumed.

    Args:
        root: a prepared dataset root.
        sets: caption set names (columns, in this order); None = every complete set, by name.
        opts: how to reach S3.

    Returns:
        Columns shard (`<part>/part-NNNNN`), clip_id, video_id, subtitle, then one string column
        per set (null where that captioner failed on the clip).

    Raises:
        ValueError: a caption part lists other clip ids (or another order) than its frame shard.
    """
    droot = DatasetRoot(root, opts)
    names = list(complete_caption_sets(droot) if sets is None else sets)
    pieces = []
    for shard in shards(root, droot.opts):
        frames = _read(droot.frames_uri(shard), droot.opts, ["clip_id", "video_id", "subtitle"])
        cols = {"shard": pa.array([shard.stem] * frames.num_rows, pa.string()), "clip_id": frames["clip_id"],
                "video_id": frames["video_id"], "subtitle": frames["subtitle"]}
        for name in names:
            caps = _read(droot.caption_uri(name, shard), droot.opts, ["clip_id", "caption"])
            if caps["clip_id"].to_pylist() != frames["clip_id"].to_pylist():
                raise ValueError(f"caption set {name!r} part {shard.stem} is not aligned with its frame shard: "
                                 "other clip ids or another order")
            cols[name] = caps["caption"]
        pieces.append(pa.table(cols))
    if not pieces:
        fields = [("shard", pa.string()), ("clip_id", pa.string()), ("video_id", pa.string()),
                  ("subtitle", pa.string())] + [(n, pa.string()) for n in names]
        return pa.schema(fields).empty_table()
    return pa.concat_tables(pieces)


_PATH_RE = re.compile(r"(?:[a-z][a-z0-9+.-]*://)?[^\s:'\"()]*/[^\s:'\"()]*(?::\d+)?", re.IGNORECASE)
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")


def error_reason(error: str) -> str:
    """A quarantine error without its specifics, so that rows with the same cause count together.

    Paths and URIs (with a `:line` suffix) become `<path>`, numbers become `#`:
    "span 3.00-9.50 s starts after the video ends (5.00 s)" -> "span #-# s starts after the
    video ends (# s)".
    """
    return _NUMBER_RE.sub("#", _PATH_RE.sub("<path>", error)).strip()


def quarantine_table(root: str, opts: fs.S3Options | None = None) -> pa.Table:
    """Every quarantine row of a root: prepare's (per shard, per metadata part, the subtitle
    table's) and each complete caption set's; only files the indexes say exist are read.

    Returns:
        Columns source ("prepare" or "caption/<set>"), clip_id, video_id, stage, reason
        (`error_reason`), error; no rows when nothing was quarantined.
    """
    droot = DatasetRoot(root, opts)
    manifest = droot.open(require_complete=False)
    order = droot.parts(manifest)
    frames = read_index(droot, FRAMES, order)
    uris = [("prepare", p, droot.quarantine_uri(Shard(p, u))) for p, u, q in
            zip(*(frames.column(c).to_pylist() for c in ("part", "unit", "quarantined"))) if q]
    uris += [("prepare", "", droot.metadata_quarantine_uri(p["name"])) for p in manifest.get("parts", []) if p["issues"]]
    uris += [("prepare", "", u) for u in fs.list_files(droot.path("quarantine", "subtitles"), droot.opts, ".parquet")]
    for name in complete_caption_sets(droot):
        caps = read_index(droot, captions_kind(name), order)
        uris += [(f"caption/{name}", "", droot.caption_quarantine_uri(name, Shard(p, u))) for p, u, n in
                 zip(*(caps.column(c).to_pylist() for c in ("part", "unit", "failed"))) if n]
    superseded = superseded_clips(droot, manifest.get("parts", []))  # rows a later retry replaced
    cols: dict[str, list[str]] = {k: [] for k in ("source", "clip_id", "video_id", "stage", "reason", "error")}
    for source, part, uri in uris:
        data = fs.read_bytes_or_none(uri, droot.opts)
        if data is None:
            continue
        for row in fs.parquet_from_bytes(data, ["clip_id", "video_id", "stage", "error"]).to_pylist():
            if (part, row["clip_id"]) in superseded:
                continue
            cols["source"].append(source)
            for key in ("clip_id", "video_id", "stage", "error"):
                cols[key].append(row[key])
            cols["reason"].append(error_reason(row["error"]))
    return pa.table({k: pa.array(v, pa.string()) for k, v in cols.items()})


def count_reasons(quarantine: pa.Table) -> pa.Table:
    """Rows of `quarantine_table` counted per (source, stage, reason), most frequent first."""
    counts = quarantine.group_by(["source", "stage", "reason"]).aggregate([("clip_id", "count")])
    counts = counts.rename_columns(["count" if c == "clip_id_count" else c for c in counts.column_names])
    return counts.select(["source", "stage", "reason", "count"]).sort_by(
        [("count", "descending"), ("source", "ascending"), ("stage", "ascending"), ("reason", "ascending")])


# ---------------------------------------------------------------------------------------------
# MLflow (the caller passes an MlflowClient)


@dataclass(frozen=True, slots=True)
class RunRef:
    """An MLflow run found by name."""

    name: str
    run_id: str
    status: str


def find_runs(client: Any, experiment: str, prefix: str = "") -> list[RunRef]:
    """Runs of `experiment` whose name starts with `prefix`, sorted by name.

    A name logged more than once (a demo run twice into the same store) yields its newest run.
    No experiment of that name gives [].
    """
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    newest: dict[str, Any] = {}
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]):
        name = run.info.run_name or run.info.run_id
        if name.startswith(prefix) and name not in newest:
            newest[name] = run
    return [RunRef(n, r.info.run_id, r.info.status) for n, r in sorted(newest.items())]


def metric_history(client: Any, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric, by step; a step logged twice keeps its latest value.

    A key the run never logged gives two empty arrays.
    """
    latest: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    steps = sorted(latest)
    return np.array(steps, np.int64), np.array([latest[s][1] for s in steps], np.float64)


def metric_histories(client: Any, run_id: str, keys: Sequence[str] | None = None
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`metric_history` of each key (None = every metric the run logged), keys sorted."""
    if keys is None:
        keys = list(client.get_run(run_id).data.metrics)
    return {k: metric_history(client, run_id, k) for k in sorted(keys)}


# Groups in plotting order; a key goes to the first group whose test accepts it.
METRIC_GROUPS = (
    ("loss", lambda k: k.startswith("train/") and k.endswith("loss")),
    ("lr", lambda k: k == "train/lr"),
    ("grad_norm", lambda k: k == "train/grad_norm"),
    ("samples_per_s", lambda k: k in ("train/samples_per_s", "train/samples_per_s_per_worker")),
    ("efficiency", lambda k: k in ("train/tflops_per_worker", "train/mfu")),
    ("validation", lambda k: k.startswith("val/")),
    ("system", lambda k: k.startswith("system/")),
)


def group_metric_keys(keys: Sequence[str]) -> dict[str, list[str]]:
    """Metric keys by what they measure: every group of METRIC_GROUPS (possibly empty) + "other".

    Loss terms are `train/*loss` (`train/loss` is their sum), system metrics are MLflow's
    `system/*`, validation metrics `val/*`; keys within a group are sorted.
    """
    groups: dict[str, list[str]] = {name: [] for name, _ in METRIC_GROUPS}
    groups["other"] = []
    for key in sorted(keys):
        name = next((n for n, accepts in METRIC_GROUPS if accepts(key)), "other")
        groups[name].append(key)
    return groups


# ---------------------------------------------------------------------------------------------
# Retrieval


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k highest scores, best first; ties keep the lower index first
    (the order `pipeline.eval.metrics` ranks by). k larger than the row gives the whole row."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"top_k expects a 1-d row of scores, got shape {scores.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


# ---------------------------------------------------------------------------------------------
# What a figure shows, for the notebooks' tests

FIGURE_MIME = "application/vnd.clipvip.figure+json"
"""The output type `show` adds beside each figure's PNG."""


def figure_summary(fig: Any) -> dict[str, Any]:
    """What `fig` draws, axes by axes: title, axis labels, each line's label, points and last
    point, images and their shapes, bars. A blank or wrong plot shows here as missing series or
    wrong lengths (tests/integration/test_notebooks.py)."""
    axes = []
    for ax in fig.axes:
        lines = []
        for line in ax.get_lines():
            x, y = np.asarray(line.get_xdata(), np.float64), np.asarray(line.get_ydata(), np.float64)
            lines.append({"label": str(line.get_label()), "n": int(len(x)), "x": x.tolist(),
                          "finite": bool(np.isfinite(y).all()), "y_last": float(y[-1]) if len(y) else None})
        axes.append({"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(), "lines": lines,
                     "images": [list(im.get_array().shape) for im in ax.get_images()],
                     "bars": len(ax.patches), "texts": [t.get_text() for t in ax.texts]})
    return {"suptitle": fig.get_suptitle(), "axes": axes}


def show(fig: Any) -> None:
    """`plt.show()` for a notebook, plus `figure_summary(fig)` as a FIGURE_MIME output."""
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from IPython.display import display  # noqa: PLC0415

    summary = figure_summary(fig)
    plt.show()
    display({FIGURE_MIME: summary}, raw=True)
