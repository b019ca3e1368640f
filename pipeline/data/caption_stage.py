"""The caption stage of `prepare` (stage 2) and `recaption` (its only stage): a Ray Data actor pool
of captioners, one whole shard per call.

The pool is sized by `caption_pool` from the recipe, not only from what the cluster holds when the
job starts: both cluster files scale GPU nodes from zero, so a pool sized at start would caption
the corpus on one actor. With `caption.device=cuda` every actor reserves GPUs, so Ray Data's
pending actors are resource demand the autoscaler answers with GPU nodes, and the pool grows up to
`caption.max_actors` as they join.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import CaptionConfig, to_dict
from pipeline.data import captions as capsets
from pipeline.data.root import DatasetRoot, Shard
from pipeline.utils import fs


@dataclass(frozen=True, slots=True)
class CaptionPool:
    device: str
    """"cuda" or "cpu": where each actor runs the captioner."""
    num_gpus: float
    """GPUs each actor reserves (logical with device cpu); 0 = a CPU actor."""
    min_actors: int
    max_actors: int

    def remote_args(self) -> dict[str, Any]:
        return {"num_gpus": self.num_gpus} if self.num_gpus else {"num_cpus": 1}

    def describe(self) -> str:
        per = f"{self.num_gpus:g} GPU" if self.num_gpus else "1 CPU"
        return f"captioner on {self.device}, {per} per actor, {self.min_actors}-{self.max_actors} actors"


def caption_pool(caption: CaptionConfig, cluster_gpus: float) -> CaptionPool:
    """The actor pool for `caption` on a cluster that holds `cluster_gpus` GPUs now."""
    device = caption.device if caption.device != "auto" else ("cuda" if cluster_gpus > 0 else "cpu")
    if caption.num_gpus_per_actor is not None and (caption.device != "auto" or device == "cuda"):
        gpus = caption.num_gpus_per_actor
    else:
        gpus = 1.0 if device == "cuda" else 0.0
    if caption.max_actors is not None:
        top = caption.max_actors
    else:
        top = int(cluster_gpus / gpus) if gpus else 1
    return CaptionPool(device, gpus, caption.min_actors, max(top, caption.min_actors))


class WaitingForGpus:
    """While no shard has been captioned, says once per `every_s` when the pool's actors cannot
    start because the cluster lacks the GPUs they reserve (a node group that scales from zero is
    still coming, or none ever will), instead of a silent stall. `seen()` on the first result."""

    def __init__(self, pool: CaptionPool, log: Callable[[str], Any], tag: str, every_s: float = 60.0) -> None:
        self.pool, self.log, self.tag, self.every_s = pool, log, tag, every_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="caption-pool-watch", daemon=True)

    def __enter__(self) -> WaitingForGpus:
        if self.pool.num_gpus:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seen()

    def seen(self) -> None:
        self._done.set()

    def _run(self) -> None:
        import ray  # noqa: PLC0415

        while not self._done.wait(self.every_s):
            gpus = float(ray.cluster_resources().get("GPU", 0))
            if gpus < self.pool.num_gpus:
                self.log(f"[{self.tag}] waiting for a node with a GPU: each caption actor reserves "
                         f"{self.pool.num_gpus:g} and the cluster has {gpus:g} now (decoding goes on)")


def add_caption_stage(ds: Any, caption: CaptionConfig, pool: CaptionPool, root: DatasetRoot, set_fp: str,
                      frames_per_clip: int = 1) -> Any:
    """`ds` (rows with a `unit` column: {"part", "unit"} JSON) with `caption_json` added by the pool."""
    import ray.data  # noqa: PLC0415

    return ds.map_batches(
        ShardCaptionStage,
        fn_constructor_kwargs={"caption_cfg": to_dict(caption), "root": root.uri, "set_fp": set_fp,
                               "s3": asdict(root.opts), "frames_per_clip": frames_per_clip, "device": pool.device},
        batch_size=1, compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        **pool.remote_args())


class ShardCaptionStage:
    """Caption actor: loads the captioner once, then captions whole shards (batch_size=1); input
    columns pass through, `caption_json` (the caption part's sidecar) is added.

    Raises (at start):
        RuntimeError: device "cuda" and no CUDA device visible here; the message names the node.
    """

    def __init__(self, caption_cfg: dict[str, Any], root: str, set_fp: str, s3: dict[str, Any],
                 frames_per_clip: int = 1, device: str = "cpu") -> None:
        import ray  # noqa: PLC0415

        from pipeline.config import build_dataclass  # noqa: PLC0415
        from pipeline.data.captioner import FrameCaptioner  # noqa: PLC0415  heavy: torch/transformers

        self.cfg = build_dataclass(CaptionConfig, caption_cfg)
        self.root, self.set_fp = DatasetRoot(root, fs.S3Options(**s3)), set_fp
        self.frames_per_clip = frames_per_clip
        self.captioner = FrameCaptioner(self.cfg, device=device,
                                        where=f"Ray node {ray.util.get_node_ip_address()}")

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = []
        for unit in batch["unit"]:
            d = json.loads(unit)
            side = capsets.caption_shard(self.root, self.cfg.set_name, Shard(d["part"], int(d["unit"])),
                                         self.captioner, self.set_fp, frames_per_clip=self.frames_per_clip)
            out.append(json.dumps(side))
        return dict(batch, caption_json=out)
