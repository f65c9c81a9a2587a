"""Evaluation (SPEC §7): 16-crop predictions over a split, the metric report, and `python -m flaxtag.eval`.

  python -m flaxtag.eval --workdir runs/spec_att [--checkpoint best|latest|STEP] [--split test] [--data_dir D]
                         [--output report.json] [--predictions preds.npz]

The library part (`predict_split`, `report`) is also what the trainer runs after every epoch.
"""
import json

from absl import flags
import jax
import numpy as np
from tqdm import tqdm

from flaxtag import cli, input_pipeline, metrics, sharding
from flaxtag.hierarchy import Hierarchy, LabelSelection
from flaxtag.inference import Tagger
from flaxtag.models.tagger import crop_samples
from flaxtag.train_step import make_predict_step


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


def evaluate_split(predict_step, variables, mesh, data_dir, dataset: str, split: str, batch_size: int,
                   crop_len: int, tag_names, hierarchy: Hierarchy | None, num_clips: int,
                   selection: LabelSelection | None = None, progress: bool = True
                   ) -> tuple[dict, dict[str, np.ndarray]]:
  """The 16-crop evaluation of one split, shared by training's validation and `evaluate_checkpoint`: every process
  reads its share of the clips in global batches of `batch_size`, its labels through `selection` (see
  `input_pipeline.label_selection`). Returns (report, predictions)."""
  local_batch = batch_size // jax.process_count()
  batches = input_pipeline.eval_batches(data_dir, dataset, split=split, batch_size=local_batch, crop_len=crop_len,
                                        selection=selection)
  num_batches = input_pipeline.num_eval_batches(num_clips, local_batch, jax.process_count())
  shown = progress and jax.process_index() == 0
  predictions = predict_split(predict_step, variables, batches, mesh, num_batches,
                              progress=f"{split} ({num_clips} clips)" if shown else None)
  return report(predictions, tag_names, hierarchy), predictions


def evaluate_checkpoint(workdir, checkpoint_step="best", split="test", data_dir=None, batch_size=None):
  """Loads a checkpoint read-only, runs the 16-crop evaluation of `split` over all local devices.

  The checkpoint's tags (all of the dataset's, or those of the hierarchy file it was trained with) are read from
  the dataset's columns of the same names, every one of which must be there. Returns (report, predictions,
  tagger). `data_dir` and the batch size default to the run's config.
  """
  tagger = Tagger.load(workdir, checkpoint_step)
  config = tagger.config
  data_dir = data_dir or config.data.data_dir
  info = input_pipeline.dataset_info(data_dir, config.data.name)
  selection = input_pipeline.label_selection(info, tagger.tag_names, tagger.hierarchy,
                                             source=f"the checkpoint of {workdir}")
  input_pipeline.check_split(info, split)
  mesh = sharding.make_mesh()
  data = mesh.shape[sharding.DATA_AXIS]
  # Rounded up to a multiple of the devices (one per core on a CPU): the padded rows are masked out.
  size = -(-(batch_size or config.train.eval_batch_size) // data) * data
  sharding.check_global_batch_size(size, mesh, "--batch_size")
  result, predictions = evaluate_split(make_predict_step(tagger.model, mesh), tagger.variables, mesh, data_dir,
                                       config.data.name, split, size, crop_samples(tagger.model), tagger.tag_names,
                                       tagger.model.hierarchy, info.split_sizes[split], selection)
  result.update(split=split, dataset=config.data.name, data=info.describe(split), data_dir=str(data_dir),
                checkpoint_step=tagger.metadata["step"], workdir=str(workdir))
  return result, predictions, tagger


def format_report(result: dict, per_tag: bool = True) -> str:
  """A readable console summary: the data, macro scores per level, then per-tag scores (worst first)."""
  data = result["data"]
  build = "/".join(filter(None, (data["name"], data["config"])))
  lines = [f"{build} {data['version']}, split {result['split']}: {result['num_clips']} clips; checkpoint step "
           f"{result['checkpoint_step']} of {result['workdir']}"]
  if "provenance" in data:
    lines.append("dataset provenance: " + ", ".join(f"{k} {v}" for k, v in data["provenance"].items()))
  for level in ("fine", "coarse"):
    if level not in result:
      continue
    m = result[level]
    lines.append(f"{level:>6}: macro ROC-AUC {m['macro_roc_auc']:.4f}  PR-AUC {m['macro_pr_auc']:.4f}  "
                 f"({len(m['evaluated'])} tags)")
    if m["left_out"]:
      lines.append("        left out of the means: " + ", ".join(f"{t} ({why})" for t, why in m["left_out"].items()))
  if "violation_rate" in result:
    lines.append(f"hierarchy violation rate: {result['violation_rate']:.4f}")
  if per_tag:
    m = result["fine"]
    width = max(len(t) for t in m["evaluated"]) + 2 if m["evaluated"] else 6
    lines.append(f"\n{'tag':<{width}}{'ROC-AUC':>9}{'PR-AUC':>9}")
    for tag in sorted(m["evaluated"], key=lambda t: m["roc_auc"][t]):
      lines.append(f"{tag:<{width}}{m['roc_auc'][tag]:>9.4f}{m['pr_auc'][tag]:>9.4f}")
  return "\n".join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  # One device per core, as tag and explain: XLA:CPU runs many of one device's ops on one thread.
  sharding.split_cpu()
  for path in (f.output, f.predictions):
    if path:
      cli.make_output_folder(path)
  result, predictions, tagger = evaluate_checkpoint(f.workdir, f.checkpoint, f.split, f.data_dir, f.batch_size)
  print(format_report(result))
  if f.output:
    with open(f.output, "w") as out:
      json.dump(result, out, indent=1, default=float)
    print(f"report: {f.output}")
  if f.predictions:
    np.savez(f.predictions, tag_names=np.array(tagger.tag_names), **predictions)
    print(f"per-clip predictions: {f.predictions}")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Run directory with checkpoints/ (from flaxtag.train or convert).", required=True)
  flags.DEFINE_string("checkpoint", "best", "best | latest | a step number.")
  flags.DEFINE_string("split", "test", "Dataset split to evaluate.")
  flags.DEFINE_string("data_dir", None, "Where the dataset was built; default: the run's config.")
  flags.DEFINE_integer("batch_size", None, "Clips per batch (×16 crops), rounded up to a multiple of the devices; "
                       "default: the run's config.")
  flags.DEFINE_string("output", None, "Write the full report (per-tag metrics) as JSON here.")
  flags.DEFINE_string("predictions", None, "Save per-clip probabilities and labels (.npz) here.")
  cli.run(main)
