"""Omnisource cross-modal contrastive losses of CLIP-ViP (clipvip_spec.md section 2.2).

Sources: V video, S subtitle, F middle frame, C caption of the middle frame; row i of every
source comes from the same clip. Features are the model's L2-normalised embeddings; the losses
do not normalise again. `logit_scale` is the LOG of the logit multiplier, already clamped by the
model (ModelConfig.logit_scale_max); the loss computes exp(logit_scale) and nothing else.

Terms (each CE has mean reduction over rows; a pair loss is the SUM of its two directions):
- "vs"/"vc"/"fc": symmetric InfoNCE L(X, Y) = CE(X Y^T g, diag) + CE(Y X^T g, diag)
  (`NCELearnableTempLoss` in the official code).
- "vsc": video vs both texts with shared negatives. Video->text rows have 2N-1 logits:
  v2s row i = [VS_ii, VS_ij (j != i), VC_ij (j != i)] and v2c row i = [VC_ii, VC_ij (j != i),
  VS_ij (j != i)]; the other positive of the same video is excluded. Text->video (s2v, c2v) are
  ordinary CEs. Implemented as N + N logits with the excluded entries at -inf, which is exactly
  a CE over the remaining 2N-1 (exp(-inf) = 0).
- Variants (LossConfig.variant): vs; vs_fc (a); vs_vc (b); vs_vc_fc (c); vsc_fc (d, the paper's
  final objective, 6 CE terms); vsc.

Output: a flat dict. Keys ending in `_loss` are the named terms (with grad); "loss" is their sum
(with grad); the other keys ("v2s", "s2v", ...) are the individual CE terms, detached, for logging.

Cross-rank semantics (open_clip "local loss + gather with grad"). With gather on, every source is
all-gathered with gradients (distributed.py), and rank r scores only ITS OWN B rows against all N
gathered columns, for both directions of every term; memory is O(B x N), not O(N x N).
Let L be the single-process loss on the concatenated global batch and L_r the loss on rank r.
Every CE is a mean over rows and each global row lives on exactly one rank, so L = (1/W) sum_r L_r.
The gather's backward sums the gradients of all ranks, so rank r's parameter gradient is the
gradient of sum_s L_s through rank r's features, and the data-parallel AVERAGE (DDP, DeepSpeed)
gives (1/W) grad(sum_s L_s) = grad(L). Hence:
    averaged parameter gradient == grad of the single-process global loss (exactly, not 1/W);
    mean over ranks of the returned loss == the single-process global loss.
This is what the official code gets with old (summing) horovod; with recent (averaging) horovod
it would get grad(L) / W (spec 2.3, version unverified). We take the W-independent form so that
lr and grad clipping mean the same thing at any worker count for a fixed global batch; keep it in
mind when copying the official clip norm (5.0), which may have applied to grad(L) / W.

Duplicate clips (same clip id twice in the global batch, e.g. with resampling): a duplicate is
never a negative. Differing from the official code (which has no id mask), every column whose id
equals the row's id, other than the row's own pair, is removed from the denominator (logit -inf).
We mask rather than use UMT-style multi-positive soft targets because masking keeps a
single-target CE: with distinct ids it is bit-for-bit the plain CE, its minimum stays 0 (soft
targets over k identical texts floor at log k, which makes logged losses jump with the duplicate
count), and it never claims that two different subtitle windows are equally good positives.
In "vsc" the rule is uniform: in the positive source's block, same-id columns other than the
pair are masked; in the other source's block, all same-id columns are masked (with distinct ids
that is exactly the excluded "other positive").

Logits and CE are computed in fp32 whatever the feature dtype (bf16 logits at scale 100-200 lose
the resolution InfoNCE needs); features are cast to fp32 before the gather so the backward sums of
the gathered gradients are fp32 too.

Shape legend: B rows on this rank, W world size, N = W * B global rows, D embedding width,
K logits per row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import LossConfig
from pipeline.model.distributed import all_gather_no_grad, all_gather_with_grad, rank_and_world_size

__all__ = [
    "LOSS_VARIANTS",
    "NCELearnableTempLoss",
    "OmnisourceLoss",
    "build_loss",
    "hash_clip_ids",
]

# variant -> loss terms; each term is "<x><y>" (symmetric pair) or "vsc" (shared negatives)
LOSS_VARIANTS: dict[str, tuple[str, ...]] = {
    "vs": ("vs",),
    "vs_fc": ("vs", "fc"),  # (a)
    "vs_vc": ("vs", "vc"),  # (b)
    "vs_vc_fc": ("vs", "vc", "fc"),  # (c)
    "vsc_fc": ("vsc", "fc"),  # (d), final
    "vsc": ("vsc",),
}
_SOURCES = {"v": "video", "s": "subtitle", "f": "frame", "c": "caption"}


def hash_clip_ids(clip_ids: Sequence[str], device: torch.device | str | None = None) -> Tensor:
    """Stable int64 ids for string clip ids (first 8 bytes of blake2b), for the duplicate mask.

    Python's hash() is salted per process, so it would disagree across ranks; blake2b does not.
    Collisions (probability ~ N^2 / 2^64 per batch) would only drop one negative.

    Args:
        clip_ids: B clip id strings.
        device: device of the result.

    Returns:
        [B] int64.
    """
    values = [
        int.from_bytes(hashlib.blake2b(c.encode("utf-8"), digest_size=8).digest(), "little", signed=True)
        for c in clip_ids
    ]
    return torch.tensor(values, dtype=torch.int64, device=device).reshape(len(values))


class _GlobalBatch:
    """Local rows, gathered columns, targets and duplicate masks shared by all loss terms."""

    def __init__(
        self,
        feats_BD: dict[str, Tensor],
        logit_scale: Tensor,
        clip_ids: Tensor | Sequence[str] | None,
        gather: bool,
    ) -> None:
        shapes = {name: tuple(x.shape) for name, x in feats_BD.items()}
        first = next(iter(feats_BD.values()))
        if first.dim() != 2 or any(s != tuple(first.shape) for s in shapes.values()):
            raise ValueError(f"features must all be [B, D] with the same B and D, got {shapes}")
        num_rows, device = first.shape[0], first.device
        rank, world_size = rank_and_world_size() if gather else (0, 1)

        self.scale = logit_scale.float().exp().reshape(())
        self.local_BD = {name: x.float() for name, x in feats_BD.items()}
        # Gather is the identity at world size 1, so single-process runs take the same path.
        self.glob_ND = {
            name: all_gather_with_grad(x) if world_size > 1 else x for name, x in self.local_BD.items()
        }
        self.target_B = rank * num_rows + torch.arange(num_rows, device=device)
        num_global = world_size * num_rows
        if clip_ids is None:
            # Row index as id: all distinct, so only the pair itself is "same clip".
            ids_B, ids_N = self.target_B, torch.arange(num_global, device=device)
        else:
            ids_B = clip_ids if isinstance(clip_ids, Tensor) else hash_clip_ids(clip_ids, device)
            ids_B = ids_B.to(device=device, dtype=torch.int64)
            if tuple(ids_B.shape) != (num_rows,):
                raise ValueError(f"clip ids must be [B]=[{num_rows}], got {tuple(ids_B.shape)}")
            ids_N = all_gather_no_grad(ids_B) if world_size > 1 else ids_B
        pair_BN = F.one_hot(self.target_B, num_global).bool()
        self.same_BN = ids_B[:, None] == ids_N[None, :]
        self.dup_BN = self.same_BN & ~pair_BN
        self._logits: dict[tuple[str, str], Tensor] = {}

    def logits(self, row: str, col: str) -> Tensor:
        """g * local(row) @ global(col)^T, [B, N] fp32, memoised per (row, col)."""
        key = (row, col)
        if key not in self._logits:
            self._logits[key] = self.scale * self.local_BD[row] @ self.glob_ND[col].T
        return self._logits[key]

    def pair_ce(self, row: str, col: str) -> Tensor:
        """CE of each local `row` against all `col`s, positive = its pair, duplicates masked."""
        logits_BN = self.logits(row, col).masked_fill(self.dup_BN, float("-inf"))
        return F.cross_entropy(logits_BN, self.target_B)

    def shared_ce(self, row: str, pos: str, other: str) -> Tensor:
        """CE over [pos block, other block] (2N-1 live logits), positive = pair in `pos` block."""
        pos_BN = self.logits(row, pos).masked_fill(self.dup_BN, float("-inf"))
        other_BN = self.logits(row, other).masked_fill(self.same_BN, float("-inf"))
        return F.cross_entropy(torch.cat([pos_BN, other_BN], dim=1), self.target_B)


def _symmetric_terms(gb: _GlobalBatch, x: str, y: str) -> dict[str, Tensor]:
    return {f"{x}2{y}": gb.pair_ce(x, y), f"{y}2{x}": gb.pair_ce(y, x)}


def _vsc_terms(gb: _GlobalBatch) -> dict[str, Tensor]:
    return {
        "v2s": gb.shared_ce("v", pos="s", other="c"),
        "v2c": gb.shared_ce("v", pos="c", other="s"),
        "s2v": gb.pair_ce("s", "v"),
        "c2v": gb.pair_ce("c", "v"),
    }


def _collect(named_terms: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """{term: {ce_name: ce}} -> {"<term>_loss", "loss", ce_name (detached)}."""
    out: dict[str, Tensor] = {}
    total: Tensor | None = None
    for term, ces in named_terms.items():
        term_loss = torch.stack(list(ces.values())).sum()
        out[f"{term}_loss"] = term_loss
        total = term_loss if total is None else total + term_loss
        out.update({name: ce.detach() for name, ce in ces.items()})
    assert total is not None
    out["loss"] = total
    return out


class NCELearnableTempLoss(nn.Module):
    """Symmetric InfoNCE between videos and texts (fine-tuning; spec 2.2, sum of directions).

    L = CE(V T^T g, diag) + CE(T V^T g, diag), g = exp(logit_scale). No parameters: the logit
    scale belongs to the model.

    Args:
        gather: all-gather features across ranks with gradients (local-loss semantics, see the
            module docstring); ignored when torch.distributed is not initialised.
    """

    def __init__(self, gather: bool = True) -> None:
        super().__init__()
        self.gather = gather

    def forward(
        self,
        video_BD: Tensor,
        text_BD: Tensor,
        logit_scale: Tensor,
        clip_ids: Tensor | Sequence[str] | None = None,
    ) -> dict[str, Tensor]:
        """Compute the loss for this rank's rows.

        Args:
            video_BD: [B, D] L2-normalised video embeddings (any float dtype).
            text_BD: [B, D] L2-normalised text embeddings; row i pairs with video row i.
            logit_scale: [] or [1] log multiplier, already clamped.
            clip_ids: optional [B] int64 ids or B strings; equal ids are never negatives.

        Returns:
            {"vt_loss", "loss"} fp32 scalars with grad, and detached {"v2t", "t2v"}.
        """
        gb = _GlobalBatch({"v": video_BD, "t": text_BD}, logit_scale, clip_ids, self.gather)
        return _collect({"vt": _symmetric_terms(gb, "v", "t")})


class OmnisourceLoss(nn.Module):
    """CLIP-ViP post-pretraining loss, one of LOSS_VARIANTS (default "vsc_fc", variant (d)).

    No parameters: the logit scale belongs to the model.

    Args:
        variant: key of LOSS_VARIANTS.
        gather: all-gather features across ranks with gradients (local-loss semantics, see the
            module docstring); ignored when torch.distributed is not initialised.
    """

    def __init__(self, variant: str = "vsc_fc", gather: bool = True) -> None:
        super().__init__()
        if variant not in LOSS_VARIANTS:
            raise ValueError(f"unknown loss variant {variant!r}; expected one of {sorted(LOSS_VARIANTS)}")
        self.variant = variant
        self.gather = gather
        self.terms = LOSS_VARIANTS[variant]

    @property
    def sources(self) -> tuple[str, ...]:
        """Feature names this variant needs, e.g. ("video", "subtitle", "frame", "caption").

        Lets the caller skip the frame branch of the model for variants without "f".
        """
        letters = "".join(self.terms)
        return tuple(name for letter, name in _SOURCES.items() if letter in letters)

    def forward(
        self,
        video_BD: Tensor,
        subtitle_BD: Tensor,
        logit_scale: Tensor,
        frame_BD: Tensor | None = None,
        caption_BD: Tensor | None = None,
        clip_ids: Tensor | Sequence[str] | None = None,
    ) -> dict[str, Tensor]:
        """Compute the loss for this rank's rows.

        Args:
            video_BD: [B, D] L2-normalised video embeddings (any float dtype).
            subtitle_BD: [B, D] subtitle embeddings.
            logit_scale: [] or [1] log multiplier, already clamped.
            frame_BD: [B, D] middle-frame embeddings; required by variants with "fc".
            caption_BD: [B, D] caption embeddings; required by variants with "vc", "vsc" or "fc".
            clip_ids: optional [B] int64 ids or B strings; equal ids are never negatives.

        Returns:
            fp32 scalars: "<term>_loss" per term and their sum "loss" (with grad); the CE terms
            ("v2s", "s2v", "v2c", "c2v", "f2c", "c2f" as the variant has them) detached.
        """
        given = {"v": video_BD, "s": subtitle_BD, "f": frame_BD, "c": caption_BD}
        needed = set("".join(self.terms))
        missing = [_SOURCES[k] + "_BD" for k in "vsfc" if k in needed and given[k] is None]
        if missing:
            raise ValueError(f"loss variant {self.variant!r} needs {', '.join(missing)}")
        feats_BD = {k: x for k, x in given.items() if k in needed and x is not None}
        gb = _GlobalBatch(feats_BD, logit_scale, clip_ids, self.gather)
        terms = {t: (_vsc_terms(gb) if t == "vsc" else _symmetric_terms(gb, t[0], t[1])) for t in self.terms}
        return _collect(terms)


def build_loss(cfg: LossConfig) -> OmnisourceLoss:
    """The post-pretraining loss described by `cfg` (variant, gather)."""
    return OmnisourceLoss(variant=cfg.variant, gather=cfg.gather)
