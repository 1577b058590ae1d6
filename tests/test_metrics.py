"""Metrics against values worked out by hand on small cases."""

from __future__ import annotations

import numpy as np
import pytest
from itemrt.export import metrics


def test_auc_and_ap_hand_computed():
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    # Fake/real pairs ranked right: (0.35>0.1), (0.8>0.1), (0.8>0.4); wrong: (0.35<0.4) -> 3/4.
    assert metrics.roc_auc(y, s) == pytest.approx(0.75)
    # Descending: 0.8 (fake) P=1 R=.5; 0.4 (real); 0.35 (fake) P=2/3 R=1 -> .5*1 + .5*2/3.
    assert metrics.average_precision(y, s) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_ties_count_one_half():
    y, s = [0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]
    # 0.9 beats both reals (2), 0.5 ties 0.5 (1/2) and beats 0.2 (1) -> 3.5 / 4.
    assert metrics.roc_auc(y, s) == pytest.approx(0.875)
    # Thresholds 0.9: P=1 R=.5; 0.5 (a fake and a real at once): P=2/3 R=1 -> .5 + .5*2/3.
    assert metrics.average_precision(y, s) == pytest.approx(0.5 + 0.5 * 2 / 3)
    fpr, tpr, thr = metrics.roc_curve(y, s)
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0] and tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert thr[1:].tolist() == [0.9, 0.5, 0.2]


def test_perfect_and_inverted_rankings():
    y = [0, 0, 1, 1]
    assert metrics.roc_auc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metrics.average_precision(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metrics.roc_auc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert metrics.average_precision(y, [0.9, 0.8, 0.2, 0.1]) == pytest.approx(0.5 * 1 / 3 + 0.5 * 2 / 4)
    assert np.isnan(metrics.roc_auc([1, 1], [0.2, 0.3]))


def test_accuracies_at_a_threshold():
    a = metrics.accuracies([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9], 0.5)  # p >= threshold is fake
    assert a == {"acc_real": 0.5, "acc_fake": 1.0, "acc_mean": 0.75}
    s = metrics.summary([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9], 0.5)
    assert (s["fpr"], s["tpr"], s["n_real"], s["n_fake"]) == (0.5, 1.0, 2, 2)


def test_threshold_for_a_target_fpr():
    reals = [0.1, 0.2, 0.3, 0.4, 0.9]
    t = metrics.threshold_for_fpr(reals, 0.2)  # one of five reals may be called fake: just above 0.4
    assert 0.4 < t < 0.4 + 1e-12 and np.mean(np.array(reals) >= t) == 0.2
    assert metrics.threshold_for_fpr(reals, 0.0) > 0.9
    # Tied reals cannot be split: the FPR stays under the target rather than over it.
    t = metrics.threshold_for_fpr([0.5, 0.5, 0.1], 0.34)
    assert np.mean(np.array([0.5, 0.5, 0.1]) >= t) == 0.0
    with pytest.raises(ValueError):
        metrics.threshold_for_fpr([], 0.1)
    with pytest.raises(ValueError):
        metrics.threshold_for_fpr(reals, 1.0)


def test_per_generator_rows():
    # UniversalFakeDetect style: each generator has its own reals.
    y = [0, 1, 0, 1]
    g = ["gan", "gan", "sd", "sd"]
    rows = metrics.by_generator(y, [0.1, 0.9, 0.6, 0.7], g, 0.5)
    assert (rows["gan"]["acc_real"], rows["sd"]["acc_real"]) == (1.0, 0.0)
    assert rows["mean"]["acc_real"] == 0.5 and rows["all"]["n_real"] == 2
    # GenImage style: reals carry no generator and are shared by every generator's row.
    rows = metrics.by_generator([0, 0, 1, 1], [0.1, 0.6, 0.9, 0.4], ["", "", "gan", "sd"], 0.5)
    assert rows["gan"]["n_real"] == rows["sd"]["n_real"] == 2
    assert rows["gan"]["auc"] == 1.0 and rows["sd"]["auc"] == 0.5
