"""Face recognition metrics on numpy arrays: ROC, TAR@FAR, 10-fold accuracy, CMC, TPIR@FPIR.

Conventions: a *score* is a similarity (higher = more likely the same identity, e.g. cosine); a
*distance* is insightface's squared Euclidean distance between L2-normalised embeddings
(``2 − 2·cos``). Pairs are accepted when ``score ≥ threshold`` (ROC) or ``distance < threshold``
(insightface's 10-fold protocol, reproduced as in its ``verification.py``).
"""
from __future__ import annotations

import numpy as np


def _check_pairs(values, issame, name: str) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.float64)
    y = np.asarray(issame)
    if v.ndim != 1 or y.shape != v.shape:
        raise ValueError(f"{name} and issame must be 1-D of equal length, got {v.shape} and {y.shape}")
    if y.dtype.kind not in "biu":
        raise TypeError(f"issame must hold booleans, got dtype {y.dtype}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return v, y.astype(bool)


def roc_curve(scores, issame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC of ``accept ⇔ score ≥ t`` over every distinct score: (fpr, tpr, thresholds).

    Starts at (0, 0) with threshold +inf; thresholds decrease; both classes must be present.
    """
    s, y = _check_pairs(scores, issame, "scores")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC needs genuine and impostor pairs, got {n_pos} genuine and {n_neg} impostor")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return (np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, s[last]])


def auc(fpr, tpr) -> float:
    """Area under a ROC curve by the trapezoid rule."""
    fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) * 0.5))


def tar_at_far(scores, issame, fars=(1e-4, 1e-3, 1e-2, 1e-1)) -> dict[float, dict]:
    """TAR at each FAR: the largest TPR whose FPR ≤ FAR, with its threshold.

    With N impostor pairs FAR values below 1/N can only be met at FPR = 0; ``resolved`` says whether
    FAR·N ≥ 1 (the operating point is then backed by at least one impostor).
    """
    fpr, tpr, thr = roc_curve(scores, issame)
    n_neg = int((~np.asarray(issame, bool)).sum())
    out = {}
    for far in fars:
        if not 0.0 < far <= 1.0:
            raise ValueError(f"FAR values must lie in (0, 1], got {far}")
        ok = np.nonzero(fpr <= far + 1e-12)[0]
        j = ok[np.argmax(tpr[ok])]
        out[float(far)] = {"tar": float(tpr[j]), "threshold": float(thr[j]), "fpr": float(fpr[j]),
                           "resolved": bool(far * n_neg >= 1.0)}
    return out


def kfold_splits(n: int, n_folds: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    """sklearn ``KFold(n_splits, shuffle=False)`` splits (insightface's ``LFold``): contiguous folds,
    the first ``n % n_folds`` one element longer."""
    if not 2 <= n_folds <= n:
        raise ValueError(f"n_folds must lie in [2, number of pairs = {n}], got {n_folds}")
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    idx, out, start = np.arange(n), [], 0
    for size in sizes:
        test = idx[start:start + size]
        out.append((np.r_[idx[:start], idx[start + size:]], test))
        start += size
    return out


def _accuracy_per_threshold(dist: np.ndarray, same: np.ndarray, thresholds: np.ndarray):
    """(tpr, fpr, acc) of ``predict same ⇔ dist < t`` for every threshold, as insightface computes them."""
    pred = dist[None, :] < thresholds[:, None]
    tp = (pred & same).sum(1)
    fp = (pred & ~same).sum(1)
    tn = (~pred & ~same).sum(1)
    fn = (~pred & same).sum(1)
    tpr = np.where(tp + fn == 0, 0.0, tp / np.maximum(tp + fn, 1))
    fpr = np.where(fp + tn == 0, 0.0, fp / np.maximum(fp + tn, 1))
    return tpr, fpr, (tp + tn) / dist.size


def verification_accuracy(distances, issame, n_folds: int = 10, thresholds=None) -> dict:
    """insightface's 10-fold protocol: per fold pick the threshold with the best training accuracy
    (``argmax``: the smallest such threshold) and report accuracy on the held-out fold.

    ``distances`` are squared L2 distances of normalised embeddings; ``thresholds`` default to
    ``arange(0, 4, 0.01)``. Returns mean/std accuracy, per-fold accuracies and thresholds, and the
    fold-averaged (tpr, fpr) curve over the thresholds.
    """
    d, y = _check_pairs(distances, issame, "distances")
    th = np.arange(0, 4, 0.01) if thresholds is None else np.asarray(thresholds, np.float64)
    if th.ndim != 1 or th.size == 0:
        raise ValueError("thresholds must be a non-empty 1-D sequence")
    accs, best, tprs, fprs = [], [], [], []
    for train, test in kfold_splits(len(d), n_folds):
        _, _, acc_train = _accuracy_per_threshold(d[train], y[train], th)
        b = int(np.argmax(acc_train))
        tpr, fpr, _ = _accuracy_per_threshold(d[test], y[test], th)
        _, _, acc = _accuracy_per_threshold(d[test], y[test], th[b:b + 1])
        accs.append(float(acc[0]))
        best.append(float(th[b]))
        tprs.append(tpr)
        fprs.append(fpr)
    return {"accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)), "fold_accuracy": accs,
            "fold_threshold": best, "best_threshold": float(np.mean(best)),
            "tpr": np.mean(tprs, 0), "fpr": np.mean(fprs, 0), "thresholds": th}


def _check_identification(scores, probe_labels, gallery_labels):
    S = np.asarray(scores, np.float64)
    p, g = np.asarray(probe_labels), np.asarray(gallery_labels)
    if S.ndim != 2 or S.shape != (len(p), len(g)):
        raise ValueError(f"scores must be (num_probes, num_gallery) = ({len(p)}, {len(g)}), got {S.shape}")
    if not np.isfinite(S).all():
        raise ValueError("scores contain NaN or infinite values")
    return S, p, g


def mate_ranks(scores, probe_labels, gallery_labels) -> tuple[np.ndarray, np.ndarray]:
    """Rank (1-based) of each probe's best-scoring mate in the gallery and that mate's score.

    rank = 1 + number of gallery items scoring strictly higher than the best mate (ties favour the
    mate). Probes without a mate get rank 0 and score −inf. Distractors are gallery items whose label
    matches no probe (e.g. −1).
    """
    S, p, g = _check_identification(scores, probe_labels, gallery_labels)
    is_mate = p[:, None] == g[None, :]
    mate_score = np.where(is_mate, S, -np.inf).max(1)
    has = is_mate.any(1)
    ranks = np.where(has, 1 + (S > mate_score[:, None]).sum(1), 0)
    return ranks, mate_score


def cmc(ranks, max_rank: int | None = None) -> np.ndarray:
    """Cumulative match characteristic: ``cmc[k−1]`` = fraction of mated probes with rank ≤ k."""
    r = np.asarray(ranks)
    r = r[r > 0]
    if r.size == 0:
        raise ValueError("CMC needs at least one probe with a mate in the gallery")
    k = int(max_rank or r.max())
    return np.array([(r <= j).mean() for j in range(1, k + 1)])


def rank_k(ranks, ks=(1, 5, 20)) -> dict[int, float]:
    """Identification rate at each rank k (closed set, over mated probes)."""
    r = np.asarray(ranks)
    r = r[r > 0]
    if r.size == 0:
        raise ValueError("rank-k needs at least one probe with a mate in the gallery")
    return {int(k): float((r <= k).mean()) for k in ks}


def tpir_at_fpir(scores, probe_labels, gallery_labels, fpirs=(1e-3, 1e-2, 1e-1), rank: int = 1) -> dict[float, dict]:
    """Open-set identification (IJB-S / IJB-C 1:N): TPIR at each FPIR.

    Non-mated probes (no mate in the gallery) set the threshold t: FPIR(t) = fraction of them whose top
    gallery score exceeds t, and t is the smallest threshold with FPIR ≤ target (a top score of a
    non-mated probe). TPIR(t) = fraction of mated probes whose mate is within ``rank`` and scores > t.
    """
    S, p, g = _check_identification(scores, probe_labels, gallery_labels)
    ranks, mate_score = mate_ranks(S, p, g)
    mated = ranks > 0
    if mated.all() or not mated.any():
        raise ValueError("open-set identification needs both mated and non-mated probes")
    top = np.sort(S[~mated].max(1))[::-1]
    out = {}
    for f in fpirs:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"FPIR values must lie in (0, 1], got {f}")
        k = int(np.floor(f * len(top) + 1e-9))
        t = top[k] if k < len(top) else -np.inf  # at most k non-mated top scores exceed t
        hit = (ranks[mated] <= rank) & (mate_score[mated] > t)
        out[float(f)] = {"tpir": float(hit.mean()), "threshold": float(t), "fpir": float((top > t).mean()),
                         "resolved": bool(f * len(top) >= 1.0)}
    return out
