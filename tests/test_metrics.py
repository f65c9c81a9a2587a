"""Tests of flaxtag.metrics against scikit-learn and hand cases."""
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from flaxtag import metrics
from flaxtag.hierarchy import Hierarchy


def _random_case(seed, n=300, t=12, decimals=1):
  rng = np.random.default_rng(seed)
  y_true = (rng.random((n, t)) < rng.uniform(0.02, 0.6, size=t)).astype(np.int64)
  # Scores correlated with labels, rounded so that ties are common.
  y_score = np.round(np.clip(0.3 * y_true + rng.random((n, t)) * 0.8, 0, 1), decimals)
  return y_true, y_score


@pytest.mark.parametrize("seed", range(5))
def test_single_tag_matches_sklearn_with_ties(seed):
  y_true, y_score = _random_case(seed)
  for t in range(y_true.shape[1]):
    assert metrics.roc_auc(y_true[:, t], y_score[:, t]) == pytest.approx(
        roc_auc_score(y_true[:, t], y_score[:, t]), rel=1e-12)
    assert metrics.average_precision(y_true[:, t], y_score[:, t]) == pytest.approx(
        average_precision_score(y_true[:, t], y_score[:, t]), rel=1e-12)


def test_hand_case_with_ties():
  y = [0, 1, 1, 0, 1]
  s = [0.5, 0.5, 0.9, 0.1, 0.1]
  # Pairs (pos, neg): 0.5v0.5 ½, 0.5v0.1 1, 0.9v0.5 1, 0.9v0.1 1, 0.1v0.5 0, 0.1v0.1 ½ → 4/6.
  assert metrics.roc_auc(y, s) == pytest.approx(4 / 6)
  # Thresholds 0.9: R=1/3, P=1; 0.5: R=2/3, P=2/3; 0.1: R=1, P=3/5.
  assert metrics.average_precision(y, s) == pytest.approx(1 / 3 + 1 / 3 * 2 / 3 + 1 / 3 * 3 / 5)


def test_all_scores_tied():
  y = np.array([0, 1, 0, 1, 1])
  s = np.full(5, 0.3)
  assert metrics.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
  assert metrics.average_precision(y, s) == pytest.approx(average_precision_score(y, s))


def test_tag_metrics_matches_sklearn_and_leaves_out_degenerate_tags():
  y_true, y_score = _random_case(7, n=500, t=10)
  y_true[:, 2] = 0
  y_true[:, 6] = 1
  names = [f"tag{t}" for t in range(10)]
  out = metrics.tag_metrics(y_true, y_score, names)
  assert out["left_out"] == {"tag2": "no positive example", "tag6": "no negative example"}
  assert "tag2" in out["note"] and "tag6" in out["note"]
  kept = [t for t in range(10) if t not in (2, 6)]
  assert out["evaluated"] == [names[t] for t in kept]
  expected_auc = [roc_auc_score(y_true[:, t], y_score[:, t]) for t in kept]
  expected_ap = [average_precision_score(y_true[:, t], y_score[:, t]) for t in kept]
  np.testing.assert_allclose([out["roc_auc"][names[t]] for t in kept], expected_auc, rtol=1e-12)
  np.testing.assert_allclose([out["pr_auc"][names[t]] for t in kept], expected_ap, rtol=1e-12)
  assert out["macro_roc_auc"] == pytest.approx(np.mean(expected_auc), rel=1e-12)
  assert out["macro_pr_auc"] == pytest.approx(np.mean(expected_ap), rel=1e-12)


def test_tag_metrics_none_evaluable():
  out = metrics.tag_metrics(np.zeros((4, 2)), np.random.default_rng(0).random((4, 2)), ["a", "b"])
  assert math.isnan(out["macro_roc_auc"]) and math.isnan(out["macro_pr_auc"])
  assert out["evaluated"] == [] and set(out["left_out"]) == {"a", "b"}
  assert "undefined" in out["note"]
  out = metrics.tag_metrics(np.zeros((0, 2)), np.zeros((0, 2)), ["a", "b"])
  assert out["left_out"] == {"a": "no example", "b": "no example"}


def test_undefined_single_tag_is_nan():
  assert math.isnan(metrics.roc_auc([1, 1], [0.2, 0.3]))
  assert math.isnan(metrics.average_precision([0, 0], [0.2, 0.3]))


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="0/1"):
    metrics.roc_auc([0, 2], [0.1, 0.2])
  with pytest.raises(ValueError, match="NaN"):
    metrics.roc_auc([0, 1], [0.1, float("nan")])
  with pytest.raises(ValueError, match="tag names"):
    metrics.tag_metrics(np.zeros((3, 2)), np.zeros((3, 2)), ["a"])


def test_hierarchy_violation_rate_hand_case():
  h = Hierarchy.from_mapping({"strings": ["violin", "cello"], "keys": ["piano"]},
                             fine_tags=("violin", "piano", "cello"))
  fine = np.array([[0.9, 0.1, 0.2],
                   [0.5, 0.6, 0.7]])
  coarse = np.array([[0.8, 0.3],   # violin 0.9 > strings 0.8: one violation.
                     [0.7, 0.6]])  # cello 0.7 == strings 0.7 is no violation; piano 0.6 == keys 0.6 neither.
  assert metrics.hierarchy_violation_rate(fine, coarse, h) == pytest.approx(1 / 6)
  assert metrics.hierarchy_violation_rate(fine, np.ones((2, 2)), h) == 0.0
  # Rounding-level excess is not a violation; a real one is.
  assert metrics.hierarchy_violation_rate(coarse[:, h.parent] + 5e-7, coarse, h) == 0.0
  assert metrics.hierarchy_violation_rate(coarse[:, h.parent] + 1e-4, coarse, h) == 1.0
