"""Retrieval metrics: hand-computed matrices, the tie rule, DSL, and spec 7 test 12 (1000 x 1000 parity)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.eval import metrics
from pipeline.eval.metrics import (ORDER_KEY, chance_r_at_k, dsl, format_table, gt_ranks, order_awareness,
                                   retrieval_metrics, t2v_v2t)


def reference_ranks(sim_QC: np.ndarray) -> np.ndarray:
    """The rank definition written directly: position of column i in a stable descending sort of row i."""
    order_QC = np.argsort(-sim_QC, axis=1, kind="stable")
    return np.array([int(np.flatnonzero(order_QC[i] == i)[0]) + 1 for i in range(len(sim_QC))])


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    return {"R1": 100 * np.mean(ranks <= 1), "R5": 100 * np.mean(ranks <= 5), "R10": 100 * np.mean(ranks <= 10),
            "MdR": float(np.median(ranks)), "MnR": float(np.mean(ranks))}


def official_compute_metrics(sim_QC: np.ndarray) -> dict[str, float]:
    """The official np.where formulation (clipvip_spec.md 5.1), for tie-free parity only."""
    diff = np.sort(-sim_QC, axis=1) - np.diag(-sim_QC)[:, None]
    hits = np.where(diff == 0)[1]
    return {"R1": 100 * np.sum(hits == 0) / len(hits), "R5": 100 * np.sum(hits < 5) / len(hits),
            "R10": 100 * np.sum(hits < 10) / len(hits), "MdR": float(np.median(hits) + 1),
            "MnR": float(np.mean(hits) + 1)}


# ---------------------------------------------------------------------------------------------
# Hand-computed


def test_perfect_diagonal():
    assert retrieval_metrics(np.eye(7)) == {"R1": 100.0, "R5": 100.0, "R10": 100.0, "MdR": 1.0, "MnR": 1.0}


def test_reversed_gt_is_always_last():
    sim = 1.0 - np.eye(12)  # GT scores 0, every other candidate 1
    assert gt_ranks(sim).tolist() == [12] * 12
    assert retrieval_metrics(sim) == {"R1": 0.0, "R5": 0.0, "R10": 0.0, "MdR": 12.0, "MnR": 12.0}


def test_5x5_by_hand():
    sim = np.array([
        [0.9, 0.1, 0.2, 0.3, 0.4],  # GT 0.9 highest -> rank 1
        [0.8, 0.5, 0.7, 0.1, 0.2],  # 0.8, 0.7 above 0.5 -> rank 3
        [0.1, 0.9, 0.6, 0.3, 0.2],  # 0.9 above 0.6 -> rank 2
        [0.5, 0.6, 0.7, 0.1, 0.8],  # all above 0.1 -> rank 5
        [0.2, 0.1, 0.3, 0.4, 0.5],  # GT 0.5 highest -> rank 1
    ])
    assert gt_ranks(sim).tolist() == [1, 3, 2, 5, 1]
    assert retrieval_metrics(sim) == pytest.approx({"R1": 40.0, "R5": 100.0, "R10": 100.0, "MdR": 2.0, "MnR": 2.4})


def test_ties_count_only_lower_columns():
    sim = np.array([
        [0.5, 0.5, 0.5, 0.1],  # tied with cols 1, 2 (higher index) -> rank 1
        [0.5, 0.5, 0.9, 0.5],  # 0.9 above; tie with col 0 (lower) counts, col 3 not -> rank 3
        [0.2, 0.2, 0.2, 0.2],  # tied with cols 0, 1 -> rank 3
        [0.7, 0.1, 0.3, 0.3],  # 0.7 above; tie with col 2 (lower) -> rank 3
    ])
    assert gt_ranks(sim).tolist() == [1, 3, 3, 3]
    assert gt_ranks(sim).tolist() == reference_ranks(sim).tolist()


@pytest.mark.parametrize("n", [1, 4, 9])
def test_all_equal_matrix_gives_ranks_one_to_n(n):
    sim = np.full((n, n), 0.3, dtype=np.float32)
    assert gt_ranks(sim).tolist() == list(range(1, n + 1))
    got = retrieval_metrics(sim)
    assert got == pytest.approx({"R1": 100 / n, "R5": 100 * min(5, n) / n, "R10": 100 * min(10, n) / n,
                                 "MdR": (n + 1) / 2, "MnR": (n + 1) / 2})


def test_nan_and_bad_shapes_are_rejected():
    sim = np.eye(4)
    sim[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(sim)
    with pytest.raises(ValueError, match="NaN"):
        t2v_v2t(sim)
    with pytest.raises(ValueError, match="square"):
        retrieval_metrics(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="square"):
        retrieval_metrics(np.zeros(3))
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(np.zeros((0, 0)))


def test_dsl_3x3_by_hand():
    # S = ln(M) / 100, so exp(100 * S) = M and the column softmax is M / column sum.
    m = np.array([[4.0, 1.0, 2.0], [2.0, 3.0, 1.0], [2.0, 4.0, 1.0]])
    sim = np.log(m) / 100
    ln2, ln3, ln4 = math.log(2), math.log(3), math.log(4)
    expected = np.array([
        [ln4 / 100 * 4 / 8, 0.0, ln2 / 100 * 2 / 4],
        [ln2 / 100 * 2 / 8, ln3 / 100 * 3 / 8, 0.0],
        [ln2 / 100 * 2 / 8, ln4 / 100 * 4 / 8, 0.0],
    ])
    np.testing.assert_allclose(dsl(sim), expected, rtol=1e-12, atol=1e-15)
    # temperature 1 on S' = ln(M): softmax is M / column sum again
    np.testing.assert_allclose(dsl(np.log(m), temperature=1.0), np.log(m) * m / m.sum(axis=0), rtol=1e-12)


def test_dsl_is_stable_and_keeps_float32():
    sim = np.array([[1000.0, -1000.0], [999.0, 5.0]], dtype=np.float32)
    out = dsl(sim)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(out[:, 0], [1000.0, 0.0], atol=1e-3)


def test_v2t_is_t2v_of_the_transpose():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(40, 40)) + 1.5 * np.eye(40)
    got = t2v_v2t(sim)
    assert sorted(got) == sorted(f"{d}/{k}" for d in ("t2v", "v2t") for k in metrics.METRIC_KEYS)
    assert {k[4:]: v for k, v in got.items() if k.startswith("t2v/")} == retrieval_metrics(sim)
    assert {k[4:]: v for k, v in got.items() if k.startswith("v2t/")} == retrieval_metrics(sim.T)
    assert got["t2v/R1"] != got["v2t/R1"] or got["t2v/MnR"] != got["v2t/MnR"]  # the matrix is not symmetric


def test_dsl_axes_for_t2v_and_v2t():
    rng = np.random.default_rng(1)
    sim = (0.2 + 0.02 * rng.normal(size=(60, 60)) + 0.01 * np.eye(60)).astype(np.float32)
    official = t2v_v2t(sim, use_dsl=True)
    assert {k[4:]: v for k, v in official.items() if k.startswith("t2v/")} == retrieval_metrics(dsl(sim))
    assert {k[4:]: v for k, v in official.items() if k.startswith("v2t/")} == retrieval_metrics(dsl(sim).T)
    symmetric = t2v_v2t(sim, use_dsl=True, v2t_dsl_axis="videos")
    assert {k[4:]: v for k, v in symmetric.items() if k.startswith("v2t/")} == retrieval_metrics(dsl(sim.T))
    assert {k: v for k, v in symmetric.items() if k.startswith("t2v/")} == \
        {k: v for k, v in official.items() if k.startswith("t2v/")}
    assert any(symmetric[f"v2t/{k}"] != official[f"v2t/{k}"] for k in metrics.METRIC_KEYS)
    assert any(official[f"t2v/{k}"] != t2v_v2t(sim)[f"t2v/{k}"] for k in metrics.METRIC_KEYS)


# ---------------------------------------------------------------------------------------------
# Spec 7 test 12: parity on a random 1000 x 1000 matrix


@pytest.mark.parametrize("block", [1024, 37])
def test_random_1000_matches_reference(monkeypatch, block):
    monkeypatch.setattr(metrics, "_ROW_BLOCK", block)
    rng = np.random.default_rng(12)
    sim = (rng.normal(size=(1000, 1000)) + 2.5 * np.eye(1000)).astype(np.float32)
    ranks = gt_ranks(sim)
    np.testing.assert_array_equal(ranks, reference_ranks(sim))
    got = retrieval_metrics(sim)
    assert got == pytest.approx(metrics_from_ranks(ranks))
    assert 0 < got["R1"] < 100 and got["MdR"] > 1
    # Without ties the official np.where formulation gives the same numbers.
    assert got == pytest.approx(official_compute_metrics(sim))


@pytest.mark.parametrize("block", [1024, 37])
def test_random_1000_with_heavy_ties_matches_reference(monkeypatch, block):
    monkeypatch.setattr(metrics, "_ROW_BLOCK", block)
    rng = np.random.default_rng(13)
    sim = rng.integers(0, 6, size=(1000, 1000)).astype(np.float64)
    ranks = gt_ranks(sim)
    np.testing.assert_array_equal(ranks, reference_ranks(sim))
    assert retrieval_metrics(sim) == pytest.approx(metrics_from_ranks(ranks))
    # ... and here the official rule drifts: it counts every tied position of a query.
    assert official_compute_metrics(sim)["R1"] != pytest.approx(retrieval_metrics(sim)["R1"])


# ---------------------------------------------------------------------------------------------
# Reporting


def test_chance_r_at_k():
    assert chance_r_at_k(1000, 1) == pytest.approx(0.1)
    assert chance_r_at_k(1000, 10) == pytest.approx(1.0)
    assert chance_r_at_k(3, 5) == 100.0
    with pytest.raises(ValueError):
        chance_r_at_k(0, 1)


def test_format_table_aligns_models():
    results = {"clip-vip-b32": t2v_v2t(np.eye(5)), "zero-shot": {"t2v/R1": 31.66, "t2v/MdR": 3.0}}
    table = format_table(results)
    lines = table.split("\n")
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[0].split() == ["model", "t2v", "R@1", "t2v", "R@5", "t2v", "R@10", "t2v", "MdR", "t2v", "MnR",
                                "v2t", "R@1"]
    assert lines[2].split() == ["clip-vip-b32", "100.0", "100.0", "100.0", "1.0", "1.0", "100.0"]
    assert lines[3].split() == ["zero-shot", "31.7", "-", "-", "3.0", "-", "-"]


def test_order_awareness_by_hand():
    # Items 0/1 and 2/3 are forward/backward twins; text i describes video i.
    sim_TV = np.array([
        [0.9, 0.5, 0.1, 0.0],  # pair (0, 1): 0.9 + 0.8 > 0.5 + 0.2 -> right
        [0.2, 0.8, 0.0, 0.1],
        [0.1, 0.0, 0.3, 0.7],  # pair (2, 3): 0.3 + 0.4 < 0.7 + 0.6 -> wrong
        [0.0, 0.1, 0.6, 0.4],
    ])
    assert order_awareness(sim_TV, [(0, 1), (2, 3)]) == 50.0
    assert order_awareness(sim_TV, [(0, 1)]) == 100.0
    assert order_awareness(sim_TV, [(2, 3)]) == 0.0
    # Which clip of the pair is called "forward" does not matter.
    assert order_awareness(sim_TV, [(1, 0), (3, 2)]) == 50.0


def test_order_blind_features_score_exactly_50_whatever_the_texts():
    rng = np.random.default_rng(0)
    texts = rng.normal(size=(8, 16))
    videos = rng.normal(size=(4, 16))
    # Twins get the same features up to float summation order (what mean pooling of the same
    # frames in reverse order gives); the texts of a pair differ as much as they like.
    video_NP = np.repeat(videos, 2, axis=0)
    video_NP[1::2] += rng.normal(scale=1e-8, size=(4, 16))
    pairs = [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert order_awareness(texts @ video_NP.T, pairs) == 50.0
    # An order-aware model that gets the twins apart the right way round scores 100.
    video_NP[1::2] = -video_NP[0::2]
    text_NP = video_NP + rng.normal(scale=0.01, size=video_NP.shape)
    assert order_awareness(text_NP @ video_NP.T, pairs) == 100.0
    assert order_awareness(text_NP @ video_NP[[1, 0, 3, 2, 5, 4, 7, 6]].T, pairs) == 0.0


def test_order_awareness_rejects_bad_pairs():
    sim_TV = np.eye(4)
    for bad in ([], [(0, 4)], [(1, 1)], [(-1, 0)]):
        with pytest.raises(ValueError, match="pair"):
            order_awareness(sim_TV, bad)


def test_format_table_shows_the_order_column_only_when_measured():
    plain = {"a": {"t2v/R1": 10.0}}
    assert "order-aware" not in format_table(plain)
    table = format_table({"a": {"t2v/R1": 10.0, ORDER_KEY: 87.5}, "b": {"t2v/R1": 5.0}})
    assert "order-aware %" in table.splitlines()[0] and "87.5" in table and table.splitlines()[-1].endswith("-")
