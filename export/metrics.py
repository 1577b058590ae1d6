"""Detection metrics as the field reports them (UniversalFakeDetect / GenImage tables).

Labels: 1 = fake (the positive class), 0 = real. Scores: p(fake).
AP is the step-wise area under the precision-recall curve (sum over thresholds of
recall gain x precision, scikit-learn's `average_precision_score`); AUC is the
probability that a random fake scores above a random real, ties counting one half.
"""

from __future__ import annotations

import numpy as np


def _check(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, s = np.asarray(y).astype(int).reshape(-1), np.asarray(s, np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    return y, s


def roc_curve(y, s) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold (descending), from (0, 0)."""
    y, s = _check(y, s)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the end of each run of equal scores
    tp, fp = np.cumsum(y)[last], np.cumsum(1 - y)[last]
    p, n = max(int(y.sum()), 1), max(int(len(y) - y.sum()), 1)
    return np.r_[0.0, fp / n], np.r_[0.0, tp / p], np.r_[np.inf, s[last]]


def pr_curve(y, s) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at every distinct threshold (descending)."""
    y, s = _check(y, s)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / max(int(y.sum()), 1)
    return precision, recall


def average_precision(y, s) -> float:
    y, _ = _check(y, s)
    if y.sum() == 0:
        return float("nan")
    precision, recall = pr_curve(y, s)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(y, s) -> float:
    y, s = _check(y, s)
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    # Mann-Whitney U from mid-ranks: ties between a fake and a real count one half.
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0  # mean of 1-based ranks a+1..b
    u = ranks[y == 1].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def accuracies(y, s, threshold: float) -> dict[str, float]:
    """Accuracy on real, on fake and their mean, deciding fake when p(fake) >= threshold."""
    y, s = _check(y, s)
    fake = s >= threshold
    real_acc = float(np.mean(~fake[y == 0])) if (y == 0).any() else float("nan")
    fake_acc = float(np.mean(fake[y == 1])) if (y == 1).any() else float("nan")
    return {"acc_real": real_acc, "acc_fake": fake_acc, "acc_mean": float(np.nanmean([real_acc, fake_acc]))}


def summary(y, s, threshold: float) -> dict[str, float]:
    """acc real / fake / mean at `threshold`, AP, AUC, counts, and the FPR / TPR a gateway sees."""
    y, s = _check(y, s)
    acc = accuracies(y, s, threshold)
    return {
        **acc,
        "ap": average_precision(y, s),
        "auc": roc_auc(y, s),
        "fpr": 1.0 - acc["acc_real"],
        "tpr": acc["acc_fake"],
        "n_real": int((y == 0).sum()),
        "n_fake": int((y == 1).sum()),
    }


def threshold_for_fpr(p_real, target_fpr: float) -> float:
    """The lowest threshold at which at most `target_fpr` of these real images are called fake.

    With n reals, k = floor(target * n) of them may score at or above it: the threshold sits
    just above the (k+1)-th highest real score (so ties cannot push the FPR over the target).
    """
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target FPR must be in [0, 1), got {target_fpr}")
    p = np.sort(np.asarray(p_real, np.float64).reshape(-1))[::-1]
    if not len(p):
        raise ValueError("threshold calibration needs real images in the validation split")
    k = int(np.floor(target_fpr * len(p) + 1e-9))
    if k >= len(p):
        return float(p[-1])
    return float(np.nextafter(p[k], np.inf))


def generator_groups(y, generators) -> dict[str, np.ndarray]:
    """Row masks per generator: its fakes against its own reals where the dataset groups reals
    by generator (UniversalFakeDetect), else against all reals (GenImage-style shared reals)."""
    y = np.asarray(y).astype(int).reshape(-1)
    g = np.asarray(generators).astype(str).reshape(-1)
    groups = {}
    for name in sorted({str(x) for x in g[y == 1] if x}):
        reals = (y == 0) & (g == name)
        groups[name] = (reals if reals.any() else y == 0) | ((y == 1) & (g == name))
    return groups


def by_generator(y, s, generators, threshold: float) -> dict[str, dict[str, float]]:
    """`summary` per generator (see generator_groups), then "mean" (the average of the
    generator rows, as papers report) and "all" (every image pooled)."""
    y, s = _check(y, s)
    rows = {name: summary(y[m], s[m], threshold) for name, m in generator_groups(y, generators).items()}
    if rows:
        keys = ("acc_real", "acc_fake", "acc_mean", "ap", "auc", "fpr", "tpr")
        rows["mean"] = {k: float(np.nanmean([r[k] for r in rows.values()])) for k in keys}
    rows["all"] = summary(y, s, threshold)
    return rows
