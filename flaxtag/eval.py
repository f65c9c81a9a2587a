"""Evaluation (SPEC §7): 16-crop predictions over a split and the metric report.

The library part (`predict_split`, `report`) is used by the trainer after every epoch and by
`python -m flaxtag.eval`.
"""
import numpy as np
from tqdm import tqdm

from flaxtag import metrics, sharding
from flaxtag.hierarchy import Hierarchy


def predict_split(predict_step, variables, batches, mesh, num_batches: int | None = None,
                  progress: str | None = None) -> dict[str, np.ndarray]:
  """Runs `predict_step` over this process's eval batches; returns the whole split's rows, ordered by clip index.

  Keys: fine_probs, labels, clip_index, and coarse_probs / coarse_labels where the model or data has them.
  """
  parts = []
  for batch in tqdm(batches, total=num_batches, desc=progress, disable=progress is None, leave=False):
    out = predict_step(variables, sharding.global_batch(batch, mesh))
    parts.append({k: np.asarray(v) for k, v in out.items()})
  rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  keep = rows.pop("mask").astype(bool)
  rows = {k: v[keep] for k, v in rows.items()}
  order = np.argsort(rows["clip_index"], kind="stable")
  return {k: v[order] for k, v in rows.items()}


def report(predictions: dict[str, np.ndarray], tag_names, hierarchy: Hierarchy | None = None) -> dict:
  """Macro and per-tag ROC-AUC / PR-AUC per level, the hierarchy violation rate, and the number of clips."""
  result = {"num_clips": int(len(predictions["clip_index"])),
            "fine": metrics.tag_metrics(predictions["labels"], predictions["fine_probs"], list(tag_names))}
  if hierarchy is not None and "coarse_probs" in predictions:
    coarse_labels = predictions.get("coarse_labels")
    if coarse_labels is None:
      coarse_labels = hierarchy.coarse_targets(predictions["labels"])
    result["coarse"] = metrics.tag_metrics(coarse_labels, predictions["coarse_probs"], list(hierarchy.coarse_tags))
    result["violation_rate"] = metrics.hierarchy_violation_rate(
        predictions["fine_probs"], predictions["coarse_probs"], hierarchy)
  return result


def headline(result: dict) -> dict[str, float]:
  """The scalars worth logging: macro ROC-AUC / PR-AUC per level and the violation rate."""
  scalars = {"roc_auc": result["fine"]["macro_roc_auc"], "pr_auc": result["fine"]["macro_pr_auc"]}
  if "coarse" in result:
    scalars.update(coarse_roc_auc=result["coarse"]["macro_roc_auc"], coarse_pr_auc=result["coarse"]["macro_pr_auc"],
                   violation_rate=result["violation_rate"])
  return scalars
