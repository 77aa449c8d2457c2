"""Metrics against hand-computed cases and an independent literal port of insightface's loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from petal_fast.eval import (auc, cmc, kfold_splits, mate_ranks, rank_k, roc_curve, tar_at_far, tpir_at_fpir,
                             verification_accuracy)


def test_roc_small_hand_case():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    same = [1, 1, 0, 1, 0, 0]
    fpr, tpr, thr = roc_curve(scores, same)
    np.testing.assert_allclose(fpr, [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    assert auc(fpr, tpr) == pytest.approx(8 / 9)  # = P(genuine score > impostor score), counted by hand
    t = tar_at_far(scores, same, fars=(0.1, 0.34))
    assert t[0.1] == {"tar": pytest.approx(2 / 3), "threshold": 0.8, "fpr": 0.0, "resolved": False}
    assert t[0.34]["tar"] == 1.0 and t[0.34]["threshold"] == 0.6 and t[0.34]["resolved"]


def test_roc_ties_and_random_auc_matches_pair_count():
    fpr, tpr, _ = roc_curve([0.5, 0.5], [True, False])
    np.testing.assert_allclose(fpr, [0, 1])
    np.testing.assert_allclose(tpr, [0, 1])
    s = torch.rand(200).double().numpy().round(2)  # rounding creates ties
    y = torch.rand(200).numpy() < 0.4
    pos, neg = s[y], s[~y]
    mann_whitney = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auc(*roc_curve(s, y)[:2]) == pytest.approx(mann_whitney, abs=1e-12)


def test_kfold_splits_like_sklearn():
    splits = kfold_splits(23, 10)
    assert [len(te) for _, te in splits] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert np.array_equal(np.concatenate([te for _, te in splits]), np.arange(23))
    assert all(len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 23 for tr, te in splits)


def test_ten_fold_hand_case_two_folds():
    # fold 0 trains on pairs 2,3 (best t = 0.5, first of the ties) and scores 0.5 on pairs 0,1;
    # fold 1 trains on pairs 0,1 (best t = 1.5) and gets both of pairs 2,3 wrong.
    r = verification_accuracy([1.0, 2.0, 1.0, 2.0], [True, False, False, True], n_folds=2, thresholds=[0.5, 1.5, 2.5])
    assert r["fold_threshold"] == [0.5, 1.5]
    assert r["fold_accuracy"] == [0.5, 0.0] and r["accuracy"] == 0.25


def test_ten_fold_separable_toy_set():
    n = 60
    same = np.arange(n) % 2 == 0
    dist = np.where(same, 0.5, 2.0)
    r = verification_accuracy(dist, same)
    assert r["accuracy"] == 1.0 and r["accuracy_std"] == 0.0
    assert r["fold_threshold"] == pytest.approx([0.51] * 10)  # smallest grid threshold above 0.5


def _insightface_calculate_roc(thresholds, dist, actual_issame, nrof_folds=10):
    """Literal loop form of insightface's calculate_roc / calculate_accuracy (the oracle)."""
    def acc_at(t, d, a):
        p = d < t
        tp, fp = np.sum(p & a), np.sum(p & ~a)
        tn, fn = np.sum(~p & ~a), np.sum(~p & a)
        return (0 if tp + fn == 0 else tp / (tp + fn)), (0 if fp + tn == 0 else fp / (fp + tn)), (tp + tn) / d.size
    accuracy = []
    for train, test in kfold_splits(len(dist), nrof_folds):
        acc_train = [acc_at(t, dist[train], actual_issame[train])[2] for t in thresholds]
        accuracy.append(acc_at(thresholds[int(np.argmax(acc_train))], dist[test], actual_issame[test])[2])
    return np.array(accuracy)


def test_ten_fold_matches_insightface_loop_on_random_pairs():
    same = torch.rand(157).numpy() < 0.5
    dist = np.where(same, 0.8, 1.4) + torch.randn(157).double().numpy() * 0.35
    th = np.arange(0, 4, 0.01)
    ours = verification_accuracy(dist, same)
    np.testing.assert_allclose(ours["fold_accuracy"], _insightface_calculate_roc(th, dist, same), atol=0)
    assert 0.5 < ours["accuracy"] < 1.0


def test_cmc_with_known_ranks():
    S = np.array([[0.9, 0.1, 0.2, 0.3],
                  [0.5, 0.4, 0.6, 0.1],
                  [0.2, 0.3, 0.1, 0.8]])
    ranks, mate = mate_ranks(S, [0, 1, 2], [0, 1, 2, -1])  # gallery item 3 is a distractor
    assert ranks.tolist() == [1, 3, 4] and mate.tolist() == [0.9, 0.4, 0.1]
    np.testing.assert_allclose(cmc(ranks), [1 / 3, 1 / 3, 2 / 3, 1.0])
    assert rank_k(ranks, (1, 3, 5)) == {1: pytest.approx(1 / 3), 3: pytest.approx(2 / 3), 5: 1.0}
    # Several gallery images of one identity: the best one counts; ties favour the mate.
    r2, _ = mate_ranks(np.array([[0.2, 0.7, 0.7, 0.1]]), [5], [5, 5, 6, 7])
    assert r2.tolist() == [1]
    # A probe without a mate has rank 0 and is left out of the closed-set CMC.
    r3, _ = mate_ranks(np.array([[0.2, 0.7], [0.3, 0.1]]), [1, 9], [1, 2])
    assert r3.tolist() == [2, 0] and cmc(r3).tolist() == [0.0, 1.0]


def test_tpir_at_fpir_hand_case():
    gallery = [0, 1, 2]
    rows = [[0.95, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.6], [0.72, 0.75, 0.1],   # mated, last at rank 2
            [0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.1, 0.1], [0.3, 0.2, 0.1]]     # non-mated, tops .9 .7 .5 .3
    probes = [0, 1, 2, 0, 7, 8, 9, 5]
    r = tpir_at_fpir(np.array(rows), probes, gallery, fpirs=(0.1, 0.25, 0.5, 1.0))
    assert r[0.25]["threshold"] == 0.7 and r[0.25]["fpir"] == 0.25 and r[0.25]["tpir"] == 0.5
    assert r[0.5]["threshold"] == 0.5 and r[0.5]["tpir"] == 0.75
    assert r[1.0]["threshold"] == -np.inf and r[1.0]["tpir"] == 0.75 and r[1.0]["fpir"] == 1.0
    assert r[0.1]["threshold"] == 0.9 and r[0.1]["tpir"] == 0.25 and not r[0.1]["resolved"]
    assert tpir_at_fpir(np.array(rows), probes, gallery, fpirs=(0.25,), rank=2)[0.25]["tpir"] == 0.75


def test_metric_bad_inputs():
    with pytest.raises(ValueError, match="equal length"):
        roc_curve([0.1, 0.2], [True])
    with pytest.raises(ValueError, match="NaN"):
        roc_curve([0.1, float("nan")], [True, False])
    with pytest.raises(ValueError, match="genuine and impostor"):
        roc_curve([0.1, 0.2], [True, True])
    with pytest.raises(TypeError, match="booleans"):
        roc_curve([0.1, 0.2], [0.5, 0.5])
    with pytest.raises(ValueError, match="FAR"):
        tar_at_far([0.1, 0.2], [True, False], fars=(0.0,))
    with pytest.raises(ValueError, match="n_folds"):
        verification_accuracy([0.1, 0.2], [True, False], n_folds=10)
    with pytest.raises(ValueError, match="scores must be"):
        mate_ranks(np.zeros((2, 3)) + 0.5, [0, 1], [0, 1])
    with pytest.raises(ValueError, match="mate"):
        cmc(np.array([0, 0]))
    with pytest.raises(ValueError, match="mated and non-mated"):
        tpir_at_fpir(np.eye(2) + 0.1, [0, 1], [0, 1])
