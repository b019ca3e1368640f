"""Retrieval metrics on a square similarity matrix: R@1/5/10, MdR, MnR, DSL, order awareness, tables.

Pure numpy (no torch, no Ray): the evaluation job and in-training validation both compute the
full similarity matrix and hand it here (clipvip_spec.md 5.1).

Rank of the ground truth (GT) of query i, whose GT candidate is column i:

    rank_i = 1 + #{j : S[i, j] > S[i, i]} + #{j < i : S[i, j] == S[i, i]}

i.e. the 1-based position of column i in the row sorted by descending score, ties broken by
ascending column index (a stable sort). Every query gets exactly one rank, so R@k, MdR and MnR
are always over N queries.

Not reproduced on purpose: the official `compute_metrics` subtracts the GT score from the
sorted row and takes `np.where(diff == 0)`. When the GT score is tied with k - 1 other scores,
that query yields k hits (one per tied sorted position), and R@k, MdR and MnR are then taken
over all hits, not over the N queries: a tied query is counted k times, always including its
best tied position, and the denominator is no longer N. Ties are rare with float features, so
on real models both definitions agree; ours gives exactly one rank per query, which is what
the metrics are defined on.

Shape legend: Q queries (rows), C candidates (columns), T texts, V videos; Q == C == N here.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

METRIC_KEYS = ("R1", "R5", "R10", "MdR", "MnR")
DSL_TEMPERATURE = 100.0
# Rows per block when ranking: bounds the boolean temporaries to ~_ROW_BLOCK * N bytes each.
_ROW_BLOCK = 1024


def _check_square(sim_QC: np.ndarray) -> np.ndarray:
    sim_QC = np.asarray(sim_QC)
    if sim_QC.ndim != 2 or sim_QC.shape[0] != sim_QC.shape[1]:
        raise ValueError(f"similarity matrix must be square (one GT per query on the diagonal), got shape "
                         f"{sim_QC.shape}")
    if sim_QC.shape[0] == 0:
        raise ValueError("similarity matrix is empty")
    if not np.issubdtype(sim_QC.dtype, np.number) or np.issubdtype(sim_QC.dtype, np.complexfloating):
        raise ValueError(f"similarity matrix must be real numbers, got dtype {sim_QC.dtype}")
    if np.issubdtype(sim_QC.dtype, np.floating):
        nan_rows = np.flatnonzero(np.isnan(sim_QC).any(axis=1))
        if len(nan_rows):
            raise ValueError(f"similarity matrix has NaN in {len(nan_rows)} row(s), first row {int(nan_rows[0])}: "
                             "a NaN feature (diverged model or empty input) makes every rank meaningless")
    return sim_QC


def gt_ranks(sim_QC: np.ndarray) -> np.ndarray:
    """1-based rank of each query's GT (column i for row i), ties by column index (module docstring).

    Args:
        sim_QC: [N, N] similarities, rows = queries.

    Returns:
        [N] int64 ranks in [1, N].

    Raises:
        ValueError: not square, empty, or NaN anywhere.
    """
    sim_QC = _check_square(sim_QC)
    n = sim_QC.shape[0]
    ranks_Q = np.empty(n, dtype=np.int64)
    cols_C = np.arange(n)
    for lo in range(0, n, _ROW_BLOCK):
        block_BC = sim_QC[lo:lo + _ROW_BLOCK]
        rows_B = np.arange(lo, lo + len(block_BC))
        gt_B1 = block_BC[np.arange(len(block_BC)), rows_B][:, None]
        greater_B = (block_BC > gt_B1).sum(axis=1)
        tied_before_B = ((block_BC == gt_B1) & (cols_C[None, :] < rows_B[:, None])).sum(axis=1)
        ranks_Q[lo:lo + len(block_BC)] = 1 + greater_B + tied_before_B
    return ranks_Q


def retrieval_metrics(sim_QC: np.ndarray) -> dict[str, float]:
    """R@1, R@5, R@10 (percent, 0-100), median rank MdR and mean rank MnR (1-based).

    Ties are broken deterministically: rank = 1 + #(scores > GT) + #(scores == GT at a lower
    column index), a stable descending sort by score then column index. The official np.where
    rule is not reproduced (it counts a tied query several times; see the module docstring).

    Args:
        sim_QC: [N, N] similarities, rows = queries, GT on the diagonal.

    Returns:
        {"R1", "R5", "R10", "MdR", "MnR"} as Python floats.

    Raises:
        ValueError: not square, empty, or NaN anywhere.
    """
    ranks_Q = gt_ranks(sim_QC)
    return {
        "R1": float(np.mean(ranks_Q <= 1) * 100.0),
        "R5": float(np.mean(ranks_Q <= 5) * 100.0),
        "R10": float(np.mean(ranks_Q <= 10) * 100.0),
        "MdR": float(np.median(ranks_Q)),
        "MnR": float(np.mean(ranks_Q)),
    }


def dsl(sim_QC: np.ndarray, temperature: float = DSL_TEMPERATURE) -> np.ndarray:
    """Dual softmax (inverted-softmax prior): S' = S * softmax(temperature * S, axis=0).

    The softmax runs over the query axis (rows, i.e. texts for t2v) separately for each
    candidate column, with the official fixed factor 100 rather than the learned logit scale.
    The column maximum is subtracted before exp, so large scores or temperatures cannot overflow.

    Args:
        sim_QC: [Q, C] similarities.
        temperature: softmax factor.

    Returns:
        [Q, C] re-weighted similarities, float (float32 input stays float32, as the official numpy).
    """
    sim_QC = np.asarray(sim_QC)
    sim_QC = sim_QC.astype(np.result_type(sim_QC.dtype, np.float32), copy=False)
    logits_QC = temperature * sim_QC
    exp_QC = np.exp(logits_QC - logits_QC.max(axis=0, keepdims=True))
    return sim_QC * (exp_QC / exp_QC.sum(axis=0, keepdims=True))


def t2v_v2t(sim_TV: np.ndarray, use_dsl: bool = False,
            v2t_dsl_axis: Literal["texts", "videos"] = "texts") -> dict[str, float]:
    """Text-to-video metrics on S and video-to-text metrics on S^T, keys "t2v/R1" ... "v2t/MnR".

    With `use_dsl`, t2v ranks rows of dsl(S) (softmax over texts for each video). For v2t the
    official `run_video_retrieval.py` ranks the transpose of that SAME matrix (`compute_metrics(
    sim_matrix.T)` after one `sim_matrix * np_softmax(sim_matrix * 100, axis=0)`), so the prior
    is normalised over the candidates (texts), not over the v2t queries: that is the default
    `v2t_dsl_axis="texts"`, kept for parity with published v2t numbers. `"videos"` applies
    the prior over the v2t queries instead, dsl(S^T) (the symmetric inverted softmax).

    Args:
        sim_TV: [N, N] text x video similarities, pair i on the diagonal.
        use_dsl: rank on DSL-reweighted similarities.
        v2t_dsl_axis: with use_dsl, which axis the v2t softmax prior runs over (see above).

    Returns:
        10 floats: f"{direction}/{key}" for direction in (t2v, v2t), key in METRIC_KEYS.
    """
    sim_TV = _check_square(sim_TV)
    if v2t_dsl_axis not in ("texts", "videos"):
        raise ValueError(f"v2t_dsl_axis: must be 'texts' or 'videos', got {v2t_dsl_axis!r}")
    t2v_TV = dsl(sim_TV) if use_dsl else sim_TV
    if not use_dsl:
        v2t_VT = sim_TV.T
    elif v2t_dsl_axis == "texts":
        v2t_VT = t2v_TV.T
    else:
        v2t_VT = dsl(sim_TV.T)
    out = {f"t2v/{k}": v for k, v in retrieval_metrics(t2v_TV).items()}
    out.update({f"v2t/{k}": v for k, v in retrieval_metrics(v2t_VT).items()})
    return out


ORDER_TIE = 1e-5
"""Pair margins within this are ties: an order-blind model's two features of a pair differ only by
float summation order (~1e-7), far below it; cosine similarities span [-1, 1]."""


def order_awareness(sim_TV: np.ndarray, pairs_P2: np.ndarray) -> float:
    """Percent of clip pairs ranked the right way round (0-100; an order-blind model scores 50).

    Each pair (i, j) is two clips that differ only in frame order (a clip and its time-reversed
    twin), text i describing clip i and text j clip j. The pair is right when the true matching
    scores above the swapped one, S[i, i] + S[j, j] > S[i, j] + S[j, i]; for dot-product scores that
    is (t_i - t_j) . (v_i - v_j) > 0, the texts' difference pointing the way of the videos'.
    A margin within ORDER_TIE counts half: a model that gives both clips the same features (mean
    pooling over the same frames) gets exactly 50, whatever its texts.

    Args:
        sim_TV: [N, N] text x video similarities, text i describing video i.
        pairs_P2: [P, 2] int indices into the N items.

    Returns:
        The percentage.

    Raises:
        ValueError: no pairs, an index out of range, or a pair of one item.
    """
    sim_TV = _check_square(sim_TV)
    pairs_P2 = np.asarray(pairs_P2, dtype=np.int64).reshape(-1, 2)
    if len(pairs_P2) == 0:
        raise ValueError("order_awareness needs at least one pair")
    if pairs_P2.min() < 0 or pairs_P2.max() >= len(sim_TV) or (pairs_P2[:, 0] == pairs_P2[:, 1]).any():
        raise ValueError(f"order pairs must be two distinct indices in [0, {len(sim_TV)}), got {pairs_P2.tolist()}")
    i, j = pairs_P2[:, 0], pairs_P2[:, 1]
    margin_P = (sim_TV[i, i] + sim_TV[j, j]) - (sim_TV[i, j] + sim_TV[j, i])
    score_P = np.where(margin_P > ORDER_TIE, 1.0, np.where(margin_P >= -ORDER_TIE, 0.5, 0.0))
    return float(score_P.mean() * 100.0)


def chance_r_at_k(n: int, k: int) -> float:
    """R@k in percent of a random ranking over n candidates: 100 * min(k, n) / n."""
    if n < 1 or k < 1:
        raise ValueError(f"chance_r_at_k needs n >= 1 and k >= 1, got n={n}, k={k}")
    return 100.0 * min(k, n) / n


_TABLE_COLUMNS = (("t2v R@1", "t2v/R1"), ("t2v R@5", "t2v/R5"), ("t2v R@10", "t2v/R10"),
                  ("t2v MdR", "t2v/MdR"), ("t2v MnR", "t2v/MnR"), ("v2t R@1", "v2t/R1"))
ORDER_KEY = "order/aware"
ORDER_COLUMN = ("order-aware %", ORDER_KEY)  # shown when some model has it (a split with order pairs)


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A plain aligned text table: one row per model, t2v R@1/5/10/MdR/MnR and v2t R@1.

    Args:
        results: model name -> metrics as returned by `t2v_v2t` (and ORDER_KEY); a missing key prints "-".

    Returns:
        Lines joined by "\\n" (header, rule, one line per model in insertion order), no trailing newline.
    """
    columns = _TABLE_COLUMNS + ((ORDER_COLUMN,) if any(ORDER_COLUMN[1] in m for m in results.values()) else ())
    header = ["model", *(title for title, _ in columns)]
    rows = [[name, *(f"{m[key]:.1f}" if key in m else "-" for _, key in columns)]
            for name, m in results.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # Names left-aligned, numbers right-aligned so decimal points line up.
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])
