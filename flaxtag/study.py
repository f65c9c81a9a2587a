"""The hierarchical-heads study of RESULTS.md: does joint training (GMP, ResAtt, ...) beat no joint training (flat)?

  python -m flaxtag.study [--out study_out] [--seeds 0,1,2] [--selection_seeds 0,1] [--config.train.num_epochs=80]

Every run trains the study's Spec+Att backbone (configs/study.py) until early stopping on the validation fine
ROC-AUC. The protocol chooses on the validation split alone and seals the test scores until the end:

1. selection, in two stages: every candidate of a head with more than one (`HEAD_CANDIDATES`: the ResAtt forms, the
   coarse weight w_c, λ of the hierarchy loss) trains for each selection seed; then each head's best of those again
   at a lower w_c (`second_stage`); each head keeps the candidate of either stage with the best mean validation fine
   ROC-AUC (`choose`);
2. final: the chosen candidate of every head, and the four models with the GMP head at matched capacity and at matched
   compute (`final_variants`), train for each seed (a selection run with the same seed is reused);
3. test: as soon as a run finishes, its best checkpoint is scored on the test split and on the same test pieces
   rendered with the held-out SoundFont (FluidR3_GM; skipped with a note where it is not installed), and the scores
   are kept apart, in `<out>/test_scores.jsonl`. Nothing reads them until every choice is made and every final run
   trained, and only the final runs' are reported: nothing is chosen on either. They are taken at once, not at the
   end, because the study outlives the machines it runs on: its records move on, its checkpoints do not.

`<out>/runs.jsonl` gets one line per finished training run (its best validation score, best and stopping epochs, the
machine that finished it),
`<out>/test_scores.jsonl` one per scored run, `<out>/results.jsonl` one per final run, `<out>/results.md` the tables.
A rerun skips what is recorded and resumes an interrupted run, so the study can be stopped and continued at any point,
also on another machine with only the two records (this repository keeps `study_out`'s).
"""
import json
import math
import os
import time

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from data_prep.synth_instruments import builds, render
from flaxtag import checkpoint, cli, host, sharding, train
from flaxtag import eval as evaluation
from flaxtag.errors import ConfigError
from flaxtag.hierarchy import Hierarchy
from flaxtag.models import tagger


def _resatt(**changes) -> dict:
  """A ResAtt form: one change from the direct-base, softmax, unmasked, input-independent form, spelt out in full
  so that a form's meaning does not move with the library's defaults."""
  form = {"base": "direct", "attention": "softmax", "masked": False, "input_dependent": False, **changes}
  return {"model.head": "resatt", **{f"model.head_options.resatt_{k}": v for k, v in form.items()}}


# The candidate grid of the selection pass. ResAtt forms: those the 6-epoch study showed to differ (the sigmoid map
# lost on every column; the input-dependent map matched the fixed one within 0.002).
RESATT_FORMS = {"resatt": _resatt(), "resatt_masked": _resatt(masked=True), "resatt_gmp_base": _resatt(base="gmp")}
COARSE_WEIGHTS = (0.5, 1.0)  # w_c of every head with a coarse BCE
# The second selection stage tries every head's first-stage choice again at this w_c: the first stage chose the grid's
# lowest weight for every head (0.007-0.026 above w_c = 1, on both seeds), so the best may lie lower (w_c = 0 is flat).
SECOND_STAGE_COARSE_WEIGHT = 0.25
HIERARCHY_LOSS_WEIGHTS = (1.0, 10.0)  # λ of multitask_hloss (λ = 1 barely moved the violations at 6 epochs)
SELECTION_SEEDS = (0, 1)
# Matched compute: every model trains for the forward FLOPs of this many epochs of Spec+Att.
COMPUTE_BUDGET_EPOCHS = 20
# A mean paired delta "exceeds the seed spread" when |mean| > SPREAD_FACTOR × its standard error (sd / √n).
SPREAD_FACTOR = 2.0


COARSE_WEIGHT = "model.head_options.coarse_weight"


def _coarse_weight(w: float) -> dict:
  return {COARSE_WEIGHT: w}


# Per head of the final pass, its candidates: run name → config overrides.
HEAD_CANDIDATES = {
    "flat": {"flat": {"model.head": "flat"}},
    **{head: {f"{head}_cw{w:g}": {"model.head": head, **_coarse_weight(w)} for w in COARSE_WEIGHTS}
       for head in ("multitask", "top_down", "gmp")},
    "multitask_hloss": {
        f"multitask_hloss_cw{w:g}_hl{h:g}": {"model.head": "multitask_hloss", **_coarse_weight(w),
                                             "model.head_options.hierarchy_loss_weight": h}
        for w in COARSE_WEIGHTS for h in HIERARCHY_LOSS_WEIGHTS},
    "resatt": {f"{form}_cw{w:g}": {**overrides, **_coarse_weight(w)}
               for form, overrides in RESATT_FORMS.items() for w in COARSE_WEIGHTS},
}
# The four models of method A, each with the GMP head as `gmp` chose it. Spec+Att is the study's backbone; Spec+CNN P
# takes configs/study.py's model.cnn_p widths (Spec+Att's capacity); the Raw models are as they are.
MODELS = {
    "spec_att": {},
    "spec_cnnp": {"model.backend": "cnn_p"},
    "raw_att": {"model.frontend": "raw"},
    "raw_cnnl": {"model.frontend": "raw", "model.backend": "cnn_l"},
}
# What the tables report per variant: (key in a results line, column title); held-out keys are prefixed.
COLUMNS = (("roc_auc", "fine ROC-AUC"), ("pr_auc", "fine PR-AUC"), ("coarse_roc_auc", "coarse ROC-AUC"),
           ("coarse_pr_auc", "coarse PR-AUC"), ("violation_rate", "violation rate"))
HELD_OUT = "heldout_"
TEST_SCORES = "test_scores.jsonl"  # sealed: read only for the final runs, after every choice
DELTA_KEYS = (("roc_auc", "fine ROC-AUC"), ("coarse_roc_auc", "coarse ROC-AUC"),
              (HELD_OUT + "roc_auc", "held-out fine ROC-AUC"), (HELD_OUT + "coarse_roc_auc", "held-out coarse ROC-AUC"))


def variant_config(base_config, overrides: dict, seed: int):
  """The study config of one run: the base config with `overrides` and `seed`."""
  config = base_config.copy_and_resolve_references()
  config.update_from_flattened_dict({**overrides, "seed": seed})
  return config


def model_cost(config) -> dict:
  """The model's parameter count and the FLOPs of its forward pass on one training crop (XLA's cost analysis)."""
  model = tagger.build_model(config.model, Hierarchy.from_mapping(render.hierarchy()))
  variables = tagger.abstract_variables(model)
  crop = jax.ShapeDtypeStruct((1, tagger.crop_samples(model)), jnp.float32)
  cost = jax.jit(model.apply).lower(variables, crop).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older JAX: one dict per computation
  return {"parameters": tagger.count_parameters(variables["params"]), "forward_flops": float(cost["flops"])}


def compute_matched_epochs(budget_epochs: int, reference_flops: float, flops: float, max_epochs: int) -> int:
  """Epochs of a model whose forward pass costs `flops` for the training FLOPs of `budget_epochs` epochs of one
  costing `reference_flops`: every model sees the same batches per epoch, and training costs about 3 forwards for
  every model, so epochs × forward FLOPs is the training FLOP budget. Rounded, at least 1, at most `max_epochs` (a
  model that cheap gets less than the budget: Raw+CNN L's ~390 epochs would take half a day per seed on a CPU, whose
  time does not shrink with the FLOPs of so small a model)."""
  return min(max_epochs, max(1, round(budget_epochs * reference_flops / flops)))


def training_record(records: list[dict]) -> dict:
  """A finished run's metrics.jsonl records → its best validation fine ROC-AUC, the epoch of that best (the first
  one, as early stopping counts), the last validated epoch, and whether early stopping ended it."""
  valid = [r for r in records if r["kind"] == "valid"]
  scored = [r for r in valid if r.get("roc_auc") is not None and math.isfinite(r["roc_auc"])]
  best = max(scored, key=lambda r: r["roc_auc"], default=None)  # max keeps the first of equal scores
  return {"valid_roc_auc": best and best["roc_auc"], "best_epoch": best and best["epoch"],
          "stop_epoch": valid[-1]["epoch"] if valid else None,
          "stopped_early": any(r["kind"] == "early_stop" for r in records)}


def selection_table(runs: list[dict], candidates: dict, seeds) -> list[dict]:
  """Per candidate of every head with more than one: its mean validation fine ROC-AUC over `seeds`, and whether it
  is the head's choice (the highest mean; the first in grid order among equals)."""
  rows = []
  for variant, names in candidates.items():
    if len(names) < 2:
      continue
    scores = {}
    for name in names:
      values = {r["seed"]: r["valid_roc_auc"] for r in runs if r["run"] == name and r["seed"] in seeds}
      if len(values) < len(seeds) or None in values.values():
        raise ConfigError(f"selection run {name!r} has no validation score for seeds "
                          f"{sorted(set(seeds) - {s for s, v in values.items() if v is not None})}.")
      scores[name] = float(np.mean(list(values.values())))
    chosen = max(scores, key=scores.get)
    rows += [{"variant": variant, "run": name, "valid_roc_auc": score, "chosen": name == chosen}
             for name, score in scores.items()]
  return rows


def choose(runs: list[dict], candidates: dict, seeds) -> dict[str, str]:
  """Per head: the run name of its chosen candidate (the only one where it has one)."""
  chosen = {variant: next(iter(names)) for variant, names in candidates.items()}
  chosen.update({r["variant"]: r["run"] for r in selection_table(runs, candidates, seeds) if r["chosen"]})
  return chosen


def has_coarse_weight_grid(names: dict) -> bool:
  """Whether a head's candidates include coarse weights to choose from (flat's one candidate has none)."""
  return len(names) > 1 and all(COARSE_WEIGHT in overrides for overrides in names.values())


def second_stage(candidates: dict, first_choice: dict[str, str]) -> dict[str, dict]:
  """Per head with a coarse-weight grid, its first-stage choice at SECOND_STAGE_COARSE_WEIGHT: {run name: overrides},
  the name the choice's with its `_cw<w>` changed."""
  stage = {}
  for variant, names in candidates.items():
    if has_coarse_weight_grid(names):
      name, overrides = first_choice[variant], names[first_choice[variant]]
      weight = SECOND_STAGE_COARSE_WEIGHT
      stage[variant] = {name.replace(f"_cw{overrides[COARSE_WEIGHT]:g}", f"_cw{weight:g}"):
                        {**overrides, **_coarse_weight(weight)}}
  return stage


def selection_candidates(runs: list[dict], candidates: dict, seeds) -> dict:
  """Both selection stages' candidates per head: `candidates`, then the second stage's, which follow from the first
  stage's choice by `runs` (every first-stage run must be there)."""
  extra = second_stage(candidates, choose(runs, candidates, seeds))
  return {variant: {**names, **extra.get(variant, {})} for variant, names in candidates.items()}


def final_variants(base_config, candidates: dict, chosen: dict[str, str], models: dict,
                   budget_epochs: int) -> dict[str, tuple[str, dict]]:
  """The final pass: variant → (run name, config overrides). Every head at its chosen candidate; with `models`, the
  four models with `gmp`'s head at matched capacity (`<model>`, early stopping as every run) and at matched compute
  (`<model>_compute`: `compute_matched_epochs` of Spec+Att's `budget_epochs`, at most the config's epoch budget, no
  early stopping)."""
  final = {variant: (chosen[variant], candidates[variant][chosen[variant]]) for variant in candidates}
  if not models:
    return final
  gmp = candidates["gmp"][chosen["gmp"]]
  costs = {name: model_cost(variant_config(base_config, {**gmp, **changes}, 0)) for name, changes in models.items()}
  for name, changes in models.items():
    if changes:  # Spec+Att at matched capacity is `gmp` itself
      final[name] = (name, {**gmp, **changes})
  for name, changes in models.items():
    epochs = compute_matched_epochs(budget_epochs, costs["spec_att"]["forward_flops"], costs[name]["forward_flops"],
                                    base_config.train.num_epochs)
    final[f"{name}_compute"] = (f"{name}_compute", {**gmp, **changes, "train.num_epochs": epochs,
                                                    "train.early_stopping_patience": 0})
  return final


def read_lines(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _append(path: str, line: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(line) + "\n")


def _workdir(out: str, name: str, seed: int) -> str:
  return os.path.join(out, "runs", name, f"seed_{seed}")


def add_training_seconds(workdir: str, seconds: float) -> float:
  """Adds one start's wall-clock seconds to the run's total in `<workdir>/study_seconds.txt` and returns the total:
  a run stopped and resumed is timed over all its starts (time while the process was paused counts too)."""
  path, total = os.path.join(workdir, "study_seconds.txt"), seconds
  if os.path.exists(path):
    with open(path) as f:
      total += float(f.read())
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    f.write(f"{total:.1f}\n")
  return total


def planned_runs(candidates: dict, models: dict, seeds, selection_seeds) -> int:
  """How many training runs `run_study` makes: every candidate of a head with more than one, and its second-stage
  candidate where it has one, for each selection seed; in the final pass, each head for each seed its selection did
  not train (a head with one candidate has no selection), and with `models` the other models at matched capacity and
  all of them at matched compute."""
  selection = sum((len(names) + has_coarse_weight_grid(names)) * len(selection_seeds)
                  for names in candidates.values() if len(names) > 1)
  heads = sum(len(set(seeds) - (set(selection_seeds) if len(names) > 1 else set())) for names in candidates.values())
  return selection + heads + ((2 * len(models) - 1) * len(seeds) if models else 0)


def progress(runs: list[dict], total: int) -> str:
  """'[k/total]' for the next run, and the time left at the median time of the finished runs (a run stopped and
  resumed counts the time between, so one such run would pull a mean far up)."""
  line = f"[{len(runs) + 1}/{total}]"
  if runs:
    median = float(np.median([r["seconds"] for r in runs]))
    line += f", about {(total - len(runs)) * median / 3600:.1f} h left at {median / 60:.0f} min a run"
  return line


def _train(base_config, out: str, variant: str, name: str, overrides: dict, seed: int, total: int,
           held_out_dir) -> None:
  """Trains one run unless `<out>/runs.jsonl` has it; scores it into `<out>/test_scores.jsonl` (sealed until the
  end), then appends its line to runs.jsonl."""
  path = os.path.join(out, "runs.jsonl")
  runs = read_lines(path)
  if any((r["run"], r["seed"]) == (name, seed) for r in runs):
    return
  print(f"\n== {name} ({variant}), seed {seed} {progress(runs, total)}", flush=True)
  workdir, start = _workdir(out, name, seed), time.time()
  config = variant_config(base_config, overrides, seed)
  try:
    train.train_and_evaluate(config, workdir)
  finally:  # also when a stop request ends this start (SystemExit): the run resumes later
    seconds = add_training_seconds(workdir, time.time() - start)
  _seal_scores(out, name, seed, held_out_dir)
  record = training_record(read_lines(os.path.join(workdir, "metrics.jsonl")))
  _append(path, {"variant": variant, "run": name, "seed": seed, **record, **model_cost(config),
                 "epochs_budget": config.train.num_epochs, "seconds": round(seconds, 1), "machine": host.describe(),
                 "jax": jax.__version__, "overrides": overrides})
  jax.clear_caches()  # each variant compiles new functions; keep memory flat over the study


def run_study(base_config, out: str, data_options: dict, seeds, selection_seeds, candidates=None, models=None,
              budget_epochs: int = COMPUTE_BUDGET_EPOCHS) -> list[dict]:
  """Runs the protocol (module docstring) for what `<out>` does not have yet; returns the results lines.

  `data_options` are synth_instruments' build options (sizes, augment, ...): the set, and its test pieces with the
  held-out SoundFont, are built if missing. `candidates` and `models` default to HEAD_CANDIDATES and MODELS.
  """
  candidates = HEAD_CANDIDATES if candidates is None else candidates
  models = MODELS if models is None else models
  builds.build_set(base_config.data.data_dir, data_options)
  held_out = builds.build_held_out(os.path.join(out, "data_heldout"), data_options)
  total = planned_runs(candidates, models, seeds, selection_seeds)

  def select(stage_candidates):
    # Seed by seed, so that an interrupted stage has tried every candidate once before it repeats any.
    for seed in selection_seeds:
      for variant, names in stage_candidates.items():
        for name, overrides in names.items() if len(names) > 1 else ():
          _train(base_config, out, variant, name, overrides, seed, total, held_out)

  select(candidates)
  candidates = selection_candidates(read_lines(os.path.join(out, "runs.jsonl")), candidates, selection_seeds)
  select(candidates)  # the first stage's runs are recorded: the second stage's train
  chosen = choose(read_lines(os.path.join(out, "runs.jsonl")), candidates, selection_seeds)
  print("chosen on validation: " + ", ".join(f"{v} {n}" for v, n in chosen.items()), flush=True)
  final = final_variants(base_config, candidates, chosen, models, budget_epochs)
  for seed in seeds:
    for variant, (name, overrides) in final.items():
      _train(base_config, out, variant, name, overrides, seed, total, held_out)
  # Only now, once every choice is made and every run trained, the sealed scores are read: the final runs' only.
  runs = {(r["run"], r["seed"]): r for r in read_lines(os.path.join(out, "runs.jsonl"))}
  scores = {(r["run"], r["seed"]): r for r in read_lines(os.path.join(out, TEST_SCORES))}  # the last of repeats
  for seed in seeds:
    for name, _ in final.values():
      if (name, seed) not in scores:
        scores[name, seed] = _score_recorded_run(out, name, seed, held_out)
  results = [{**runs[name, seed], "variant": variant, **scores[name, seed]}
             for seed in seeds for variant, (name, _) in final.items()]
  with open(os.path.join(out, "results.jsonl"), "w") as f:
    f.writelines(json.dumps(line) + "\n" for line in results)
  return results


def _score_recorded_run(out: str, name: str, seed: int, held_out_dir) -> dict:
  """The sealed scores of a recorded run that test_scores.jsonl lacks (the file lost or not copied), from its
  checkpoint where this machine has it; appended there."""
  workdir = _workdir(out, name, seed)
  if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    raise ConfigError(f"run {name!r}, seed {seed}, is in {os.path.join(out, 'runs.jsonl')} but has no line in "
                      f"{os.path.join(out, TEST_SCORES)} and no checkpoint in {workdir}: copy that file from where the "
                      "run was trained, or delete the run's line from runs.jsonl to train it again.")
  return _seal_scores(out, name, seed, held_out_dir)


def _seal_scores(out: str, name: str, seed: int, held_out_dir) -> dict:
  """Scores the run's best checkpoint (`final_scores`) and appends the line to `<out>/test_scores.jsonl`."""
  line = {"run": name, "seed": seed, **final_scores(_workdir(out, name, seed), held_out_dir)}
  _append(os.path.join(out, TEST_SCORES), line)
  return line


def final_scores(workdir: str, held_out_dir) -> dict:
  """The best checkpoint's headline scores on the test split and, with `held_out_dir`, on its held-out rendering."""
  scores = evaluation.headline(evaluation.evaluate_checkpoint(workdir, "best", "test")[0])
  if held_out_dir is not None:
    result = evaluation.evaluate_checkpoint(workdir, "best", "test", data_dir=held_out_dir)[0]
    scores.update({HELD_OUT + k: v for k, v in evaluation.headline(result).items()})
  print(f"{workdir}: scored on the test pieces (sealed until the end)", flush=True)
  return scores


def summarize(results: list[dict], variants, columns=COLUMNS) -> list[dict]:
  """Per variant (in the given order, those with results): mean and sample standard deviation over seeds."""
  rows = []
  for variant in variants:
    runs = [r for r in results if r["variant"] == variant]
    if not runs:
      continue
    row = {"variant": variant, "seeds": sorted(r["seed"] for r in runs)}
    for key, _ in columns:
      values = np.array([r[key] for r in runs if r.get(key) is not None], np.float64)
      if values.size:
        row[key] = (float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else None)
    rows.append(row)
  return rows


def paired_deltas(results: list[dict], variants, key: str, baseline: str = "flat") -> list[dict]:
  """Per variant but `baseline`: its per-seed deltas against the baseline's run of the same seed (same data order
  and initialisation), their mean and sample standard deviation, and whether the mean exceeds the seed spread:
  |mean| > SPREAD_FACTOR × sd / √n (with one seed, never)."""
  base = {r["seed"]: r[key] for r in results if r["variant"] == baseline and r.get(key) is not None}
  rows = []
  for variant in variants:
    pairs = sorted((r["seed"], r[key] - base[r["seed"]]) for r in results
                   if variant != baseline and r["variant"] == variant and r.get(key) is not None and r["seed"] in base)
    if not pairs:
      continue
    deltas = np.array([d for _, d in pairs], np.float64)
    mean = float(deltas.mean())
    sd = float(deltas.std(ddof=1)) if deltas.size > 1 else None
    rows.append({"variant": variant, "seeds": [s for s, _ in pairs], "deltas": deltas.tolist(), "mean": mean,
                 "sd": sd, "exceeds": sd is not None and abs(mean) > SPREAD_FACTOR * sd / math.sqrt(deltas.size)})
  return rows


def _cell(stat) -> str:
  if stat is None:
    return "–"
  mean, std = stat
  return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _table(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def markdown_table(rows: list[dict], columns=COLUMNS) -> str:
  return _table(["variant", *(title for _, title in columns), "seeds"],
                [[row["variant"], *(_cell(row.get(key)) for key, _ in columns), len(row["seeds"])] for row in rows])


def delta_table(results: list[dict], variants, baseline: str) -> str:
  rows = []
  for key, title in DELTA_KEYS:
    for d in paired_deltas(results, variants, key, baseline):
      rows.append([d["variant"], title, ", ".join(f"{x:+.4f}" for x in d["deltas"]), f"{d['mean']:+.4f}",
                   "–" if d["sd"] is None else f"{d['sd']:.4f}", "yes" if d["exceeds"] else "no"])
  return _table(["variant", "score", f"per-seed Δ vs {baseline}", "mean Δ", "sd", "exceeds spread"], rows)


def runs_table(results: list[dict], variants) -> str:
  rows = []
  for variant in variants:
    runs = sorted((r for r in results if r["variant"] == variant), key=lambda r: r["seed"])
    if runs:
      rows.append([variant, runs[0]["run"], f"{runs[0]['parameters']:,}", f"{runs[0]['forward_flops'] / 1e9:.3f}",
                   runs[0]["epochs_budget"], ", ".join(str(r["best_epoch"]) for r in runs),
                   ", ".join(str(r["stop_epoch"]) for r in runs), sum(r["stopped_early"] for r in runs)])
  return _table(["variant", "run", "parameters", "forward GFLOPs / crop", "epoch budget", "best epochs",
                 "stopping epochs", "stopped early"], rows)


def write_tables(results: list[dict], runs: list[dict], out: str, candidates=None, selection_seeds=SELECTION_SEEDS
                 ) -> str:
  candidates = HEAD_CANDIDATES if candidates is None else candidates
  heads = list(candidates)
  models = ["gmp", *(m for m in MODELS if m != "spec_att")]
  compute = [f"{m}_compute" for m in MODELS]
  held_out = tuple((HELD_OUT + key, title) for key, title in COLUMNS)
  selection = _table(["head", "stage", "candidate", "mean valid fine ROC-AUC", "chosen"],
                     [[r["variant"], 1 if r["run"] in candidates[r["variant"]] else 2, r["run"],
                       f"{r['valid_roc_auc']:.4f}", "yes" if r["chosen"] else ""]
                      for r in selection_table(runs, selection_candidates(runs, candidates, selection_seeds),
                                               selection_seeds)])
  every = heads + models[1:] + compute
  text = "\n\n".join([
      f"## Selection (validation split, seeds {', '.join(map(str, selection_seeds))})", selection,
      "## Heads (Spec+Att backbone), test split", markdown_table(summarize(results, heads)),
      "## Heads, the same test pieces rendered with the held-out SoundFont",
      markdown_table(summarize(results, heads, held_out), held_out),
      f"## Paired per-seed deltas against flat (exceeds spread: |mean| > {SPREAD_FACTOR:g} × sd / √n)",
      delta_table(results, heads, "flat"),
      "## Models (GMP head; `gmp` is Spec+Att), matched capacity: test split",
      markdown_table(summarize(results, models)),
      "Held-out SoundFont:", markdown_table(summarize(results, models, held_out), held_out),
      "Paired per-seed deltas against Spec+Att (`gmp`):", delta_table(results, models, "gmp"),
      f"## Models, matched compute (the forward FLOPs of {COMPUTE_BUDGET_EPOCHS} epochs of Spec+Att, at most the epoch "
      "budget): test split", markdown_table(summarize(results, compute)),
      "Held-out SoundFont:", markdown_table(summarize(results, compute, held_out), held_out),
      "Paired per-seed deltas against Spec+Att:", delta_table(results, compute, "spec_att_compute"),
      "## Runs", runs_table(results, every),
      "Best checkpoint by validation fine ROC-AUC; mean ± sample standard deviation over seeds.\n"])
  path = os.path.join(out, "results.md")
  with open(path, "w") as f:
    f.write(text)
  return path


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  sharding.split_cpu_for_training(config.train)
  config.data.data_dir = f.data_dir
  os.makedirs(f.out, exist_ok=True)
  # The clips of RESULTS.md: the demo's before it had several SoundFonts and augmentations (TimGM6mb alone, not
  # augmented: exactly what synth_instruments 1.0.0 rendered).
  data_options = {"num_train": f.num_train, "num_valid": f.num_valid, "num_test": f.num_test, "augment": False}
  selection_seeds = [int(s) for s in f.selection_seeds]
  results = run_study(config, f.out, data_options, [int(s) for s in f.seeds], selection_seeds)
  path = write_tables(results, read_lines(os.path.join(f.out, "runs.jsonl")), f.out, selection_seeds=selection_seeds)
  with open(path) as table:
    print("\n" + table.read())
  print(f"tables: {path}")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "..", "configs", "study.py"),
                                  "Config shared by every run of the study.", lock_config=True)
  flags.DEFINE_string("out", "study_out", "Where the runs, runs.jsonl, results.jsonl and results.md go.")
  flags.DEFINE_string("data_dir", "study_out/data",
                      "The synthetic set: the demo's clips as RESULTS.md measured them (built here if missing).")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the final pass; each final variant trains once per seed.")
  flags.DEFINE_list("selection_seeds", [str(s) for s in SELECTION_SEEDS], "Seeds of the selection pass.")
  flags.DEFINE_integer("num_train", 1000, "Training clips of the synthetic set, if it is built here.")
  flags.DEFINE_integer("num_valid", 100, "Validation clips.")
  flags.DEFINE_integer("num_test", 200, "Test clips.")
  cli.run(main)
