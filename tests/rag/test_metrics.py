"""recall@k, MRR and NDCG@k against values computed by hand."""

from __future__ import annotations

import math

import pytest

from lmforge.rag.metrics import evaluate, ndcg_at_k, recall_at_k, reciprocal_rank

RANKED = ["d3", "d1", "d7", "d2", "d9"]
GOLD = {"d1", "d2", "d8"}


def test_recall_by_hand():
    assert recall_at_k(RANKED, GOLD, 1) == 0.0
    assert recall_at_k(RANKED, GOLD, 2) == pytest.approx(1 / 3)
    assert recall_at_k(RANKED, GOLD, 5) == pytest.approx(2 / 3)


def test_mrr_by_hand():
    assert reciprocal_rank(RANKED, GOLD) == 0.5
    assert reciprocal_rank(["x", "y"], GOLD) == 0.0
    assert reciprocal_rank(RANKED, GOLD, k=1) == 0.0


def test_ndcg_by_hand():
    # relevant at ranks 2 and 4: DCG = 1/log2(3) + 1/log2(5); ideal (3 relevant, k=5) = 1 + 1/log2(3) + 1/2
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    assert ndcg_at_k(RANKED, GOLD, 5) == pytest.approx(dcg / (1 + 1 / math.log2(3) + 0.5))
    # k=2: DCG = 1/log2(3), ideal = 1 + 1/log2(3)
    assert ndcg_at_k(RANKED, GOLD, 2) == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert ndcg_at_k(["d1", "d2", "d8"], GOLD, 3) == pytest.approx(1.0)


def test_evaluate_means_and_errors():
    out = evaluate([RANKED, ["d8"]], [GOLD, {"d8"}], ks=(1,))
    assert out["recall@1"] == pytest.approx(0.5) and out["mrr"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="relevant"):
        recall_at_k(RANKED, set(), 3)
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k(RANKED, GOLD, 0)
    with pytest.raises(ValueError):
        evaluate([], [])
