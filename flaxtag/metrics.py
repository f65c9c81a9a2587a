"""Evaluation metrics (SPEC §7), in numpy, equal to scikit-learn's per tag, ties included.

For one tag, sort the clips by decreasing score; clips with equal scores form a tie group, and a threshold can only
fall between groups. With TP/FP counted down to the end of each group:
  ROC-AUC = P(score of a positive > score of a negative) + ½·P(equal), the area under the trapezoidal ROC curve:
    Σ over positives of (#negatives scored lower + ½·#negatives scored equal) / (#pos·#neg).
  AP = Σ_n (R_n − R_{n−1})·P_n over thresholds: a group raises recall by its positives / #pos at the precision
    reached at its end, so AP = mean over positives of the precision at the end of their tie group.
Both are computed for all tags at once from one sort of the (N, T) score matrix.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flaxtag.hierarchy import Hierarchy


def _check_pair(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
  y_true = np.asarray(y_true)
  y_score = np.asarray(y_score, np.float64)
  if y_true.shape != y_score.shape or y_true.ndim != 2:
    raise ValueError(f"y_true {y_true.shape} and y_score {y_score.shape} must be equal (N, T) shapes")
  if not np.isin(y_true, (0, 1)).all():
    raise ValueError("y_true must hold only 0/1 (or boolean) labels")
  if np.isnan(y_score).any():
    raise ValueError("y_score contains NaN")
  return y_true.astype(bool), y_score


def _roc_auc_and_ap(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-column ROC-AUC and AP of (N, T) labels and scores; NaN where a column lacks positives or negatives."""
  n, _ = y_true.shape
  order = np.argsort(-y_score, axis=0, kind="stable")
  score = np.take_along_axis(y_score, order, axis=0)
  pos = np.take_along_axis(y_true, order, axis=0)
  tp = np.cumsum(pos, axis=0)
  fp = np.cumsum(~pos, axis=0)
  fp_before = fp - ~pos  # Negatives strictly before each row.

  rows = np.arange(n)[:, None]
  starts_group = np.ones_like(pos)
  starts_group[1:] = score[1:] != score[:-1]
  ends_group = np.ones_like(pos)
  ends_group[:-1] = starts_group[1:]
  group_start = np.maximum.accumulate(np.where(starts_group, rows, 0), axis=0)
  group_end = np.minimum.accumulate(np.where(ends_group, rows, n)[::-1], axis=0)[::-1]

  num_pos = tp[-1].astype(np.float64) if n else np.zeros(y_true.shape[1])
  num_neg = n - num_pos
  with np.errstate(divide="ignore", invalid="ignore"):
    fp_end = np.take_along_axis(fp, group_end, axis=0)
    fp_start = np.take_along_axis(fp_before, group_start, axis=0)
    # Negatives scored lower, plus half of those scored equal, for each positive.
    wins = np.where(pos, num_neg - 0.5 * (fp_end + fp_start), 0.0).sum(axis=0)
    auc = wins / (num_pos * num_neg)
    precision_at_end = np.take_along_axis(tp, group_end, axis=0) / (group_end + 1)
    ap = np.where(pos, precision_at_end, 0.0).sum(axis=0) / num_pos
  undefined = (num_pos == 0) | (num_neg == 0)
  return np.where(undefined, np.nan, auc), np.where(undefined, np.nan, ap)


def roc_auc(y_true, y_score) -> float:
  """ROC-AUC of one tag (as sklearn's `roc_auc_score`); NaN when there is no positive or no negative."""
  y_true, y_score = _check_pair(np.reshape(y_true, (-1, 1)), np.reshape(y_score, (-1, 1)))
  return float(_roc_auc_and_ap(y_true, y_score)[0][0])


def average_precision(y_true, y_score) -> float:
  """Average precision (PR-AUC) of one tag (as sklearn's `average_precision_score`); NaN when it is undefined."""
  y_true, y_score = _check_pair(np.reshape(y_true, (-1, 1)), np.reshape(y_score, (-1, 1)))
  return float(_roc_auc_and_ap(y_true, y_score)[1][0])


def tag_metrics(y_true, y_score, tag_names: Sequence[str]) -> dict:
  """Per-tag and macro ROC-AUC / PR-AUC of (N, T) labels and scores.

  A tag with no positive or no negative example is left out of the macro means and named in `left_out`.

  Returns:
    A dict with
      roc_auc, pr_auc: {tag: value} for the evaluated tags;
      macro_roc_auc, macro_pr_auc: unweighted means over the evaluated tags (NaN only when no tag is evaluable);
      evaluated: the evaluated tag names; left_out: {tag: reason} for the others;
      note: a sentence saying what was left out, or '' when nothing was.
  """
  tag_names = list(tag_names)
  y_true, y_score = _check_pair(y_true, y_score)
  if len(tag_names) != y_true.shape[1]:
    raise ValueError(f"{len(tag_names)} tag names for {y_true.shape[1]} columns")
  auc, ap = _roc_auc_and_ap(y_true, y_score)
  num_pos = y_true.sum(axis=0)
  left_out = {}
  for t, name in enumerate(tag_names):
    if y_true.shape[0] == 0:
      left_out[name] = "no example"
    elif num_pos[t] == 0:
      left_out[name] = "no positive example"
    elif num_pos[t] == y_true.shape[0]:
      left_out[name] = "no negative example"
  evaluated = [name for name in tag_names if name not in left_out]
  keep = np.array([name not in left_out for name in tag_names], bool)
  if evaluated:
    macro_auc, macro_ap = float(auc[keep].mean()), float(ap[keep].mean())
    note = f"left out of the macro means: {sorted(left_out)}" if left_out else ""
  else:
    macro_auc = macro_ap = float("nan")
    note = "no tag has both a positive and a negative example: the macro means are undefined (NaN)"
  return {
      "roc_auc": {name: float(v) for name, v, k in zip(tag_names, auc, keep) if k},
      "pr_auc": {name: float(v) for name, v, k in zip(tag_names, ap, keep) if k},
      "macro_roc_auc": macro_auc,
      "macro_pr_auc": macro_ap,
      "evaluated": evaluated,
      "left_out": left_out,
      "note": note,
  }


# A fine probability "exceeds" its parent's only by more than float32 rounding: heads such as GMP give the parent
# exactly the largest child's value, and which of two equal numbers rounds higher is noise, not a violation.
VIOLATION_TOLERANCE = 1e-6


def hierarchy_violation_rate(fine_probs, coarse_probs, hierarchy: Hierarchy) -> float:
  """Share of (clip, fine tag) pairs whose fine probability exceeds its parent's (by more than
  VIOLATION_TOLERANCE); NaN for no pair."""
  fine_probs = np.asarray(fine_probs)
  coarse_probs = np.asarray(coarse_probs)
  if fine_probs.shape[-1] != hierarchy.num_fine or coarse_probs.shape[-1] != hierarchy.num_coarse:
    raise ValueError(f"fine {fine_probs.shape} / coarse {coarse_probs.shape} probabilities do not fit a hierarchy "
                     f"of {hierarchy.num_fine} fine and {hierarchy.num_coarse} coarse tags")
  if fine_probs.size == 0:
    return float("nan")
  return float(np.mean(fine_probs > coarse_probs[..., hierarchy.parent] + VIOLATION_TOLERANCE))
