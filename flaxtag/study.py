"""The hierarchical-heads study of RESULTS.md: every head of SPEC §5, and the four models, on the synthetic set.

  python -m flaxtag.study [--out study_out] [--seeds 0,1,2] [--variants gmp,resatt,...] [--config.train.num_epochs=8]

Every variant trains the same backbone with the same budget (configs/study.py) for each seed, then its best
checkpoint (by validation ROC-AUC) is evaluated on the test split. Results go to `<out>/results.jsonl`, one line per
finished (variant, seed), and the tables (mean ± standard deviation over seeds) to `<out>/results.md`. A rerun
skips what is finished and resumes an interrupted run, so the study can be stopped and continued at any point.
"""
import json
import os
import time

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from data_prep import build
from flaxtag import cli, sharding, train
from flaxtag import eval as evaluation
from flaxtag.errors import ConfigError


def _resatt(**changes) -> dict:
  """A ResAtt variant: one change from the direct-base, softmax, unmasked, input-independent form, spelt out in full
  so that a variant's meaning does not move with the library's defaults."""
  form = {"base": "direct", "attention": "softmax", "masked": False, "input_dependent": False, **changes}
  return {"model.head": "resatt", **{f"model.head_options.resatt_{k}": v for k, v in form.items()}}


# Heads on the study's Spec+Att backbone. ResAtt's form is a config choice (SPEC §5); these are the variants measured.
HEAD_VARIANTS = {
    "flat": {"model.head": "flat"},
    "multitask": {"model.head": "multitask"},
    "multitask_hloss": {"model.head": "multitask_hloss"},
    "top_down": {"model.head": "top_down"},
    "gmp": {"model.head": "gmp"},
    "resatt": _resatt(),
    "resatt_sigmoid": _resatt(attention="sigmoid"),
    "resatt_masked": _resatt(masked=True),
    "resatt_input_dependent": _resatt(input_dependent=True),
    "resatt_gmp_base": _resatt(base="gmp"),
}
# The four models of method A with the GMP head, the same budget. Spec+Att is the `gmp` head variant.
MODEL_VARIANTS = {
    "raw_att": {"model.head": "gmp", "model.frontend": "raw"},
    "spec_cnnp": {"model.head": "gmp", "model.backend": "cnn_p"},
    "raw_cnnl": {"model.head": "gmp", "model.frontend": "raw", "model.backend": "cnn_l"},
}
VARIANTS = {**HEAD_VARIANTS, **MODEL_VARIANTS}
# What results.md reports per variant: (key in a results line, column title).
COLUMNS = (("roc_auc", "fine ROC-AUC"), ("pr_auc", "fine PR-AUC"), ("coarse_roc_auc", "coarse ROC-AUC"),
           ("coarse_pr_auc", "coarse PR-AUC"), ("violation_rate", "violation rate"))


def variant_config(base_config, variant: str, seed: int):
  """The study config of one (variant, seed)."""
  if variant not in VARIANTS:
    raise ConfigError(f"unknown study variant {variant!r}; valid variants are {list(VARIANTS)}.")
  config = base_config.copy_and_resolve_references()
  config.update_from_flattened_dict({**VARIANTS[variant], "seed": seed})
  return config


def read_results(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def summarize(results: list[dict], variants) -> list[dict]:
  """Per variant (in the given order, those with results): mean and sample standard deviation over seeds."""
  rows = []
  for variant in variants:
    runs = [r for r in results if r["variant"] == variant]
    if not runs:
      continue
    row = {"variant": variant, "seeds": sorted(r["seed"] for r in runs)}
    for key, _ in COLUMNS:
      values = np.array([r[key] for r in runs if r.get(key) is not None], np.float64)
      if values.size:
        row[key] = (float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else None)
    rows.append(row)
  return rows


def _cell(stat) -> str:
  if stat is None:
    return "–"
  mean, std = stat
  return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def markdown_table(rows: list[dict]) -> str:
  header = "| variant | " + " | ".join(title for _, title in COLUMNS) + " | seeds |"
  lines = [header, "|" + " --- |" * (len(COLUMNS) + 2)]
  for row in rows:
    cells = [_cell(row.get(key)) for key, _ in COLUMNS]
    lines.append(f"| {row['variant']} | " + " | ".join(cells) + f" | {len(row['seeds'])} |")
  return "\n".join(lines)


def run_study(base_config, out: str, variants, seeds, data_options: dict) -> list[dict]:
  """Trains and tests every (variant, seed) not yet in `<out>/results.jsonl`; returns all results.

  `data_options` are synth_instruments' build options (sizes, augment, ...): the set is built if missing.
  """
  configs = {(v, s): variant_config(base_config, v, s) for s in seeds for v in variants}  # a bad name fails here
  summary = build.build("synth_instruments", base_config.data.data_dir, num_workers=os.cpu_count() or 1,
                        **data_options)
  print(("reused " if summary.get("reused") else "built ") + summary["path"], flush=True)
  results_path = os.path.join(out, "results.jsonl")
  done = {(r["variant"], r["seed"]) for r in read_results(results_path)}
  # Seed by seed, so that an interrupted study has compared every variant once before it repeats any.
  todo = [(v, s) for s in seeds for v in variants if (v, s) not in done]
  print(f"{len(variants) * len(seeds) - len(todo)} of {len(variants) * len(seeds)} runs already done; "
        f"results in {results_path}", flush=True)
  for i, (variant, seed) in enumerate(todo, 1):
    print(f"\n== [{i}/{len(todo)}] {variant}, seed {seed}", flush=True)
    workdir = os.path.join(out, "runs", variant, f"seed_{seed}")
    start = time.time()
    valid = train.train_and_evaluate(configs[variant, seed], workdir)
    result, _, _ = evaluation.evaluate_checkpoint(workdir, "best", "test")
    test = evaluation.headline(result)
    line = {"variant": variant, "seed": seed, **test, "valid_roc_auc": valid.get("roc_auc"),
            "checkpoint_step": result["checkpoint_step"], "seconds": round(time.time() - start, 1),
            "overrides": VARIANTS[variant]}
    print("test: " + ", ".join(f"{k} {v:.4f}" for k, v in test.items()), flush=True)
    with open(results_path, "a") as f:
      f.write(json.dumps(line) + "\n")
    jax.clear_caches()  # each variant compiles new functions; keep memory flat over the study
  return read_results(results_path)


def write_tables(results: list[dict], out: str, base_config) -> str:
  heads = markdown_table(summarize(results, HEAD_VARIANTS))
  models = markdown_table(summarize(results, ["gmp", *MODEL_VARIANTS]))
  text = (f"## Heads (Spec+Att backbone)\n\n{heads}\n\n## Models (GMP head; `gmp` is Spec+Att)\n\n{models}\n\n"
          f"Test split, best checkpoint by validation fine ROC-AUC; mean ± sample standard deviation over seeds.\n"
          f"Budget per run: {base_config.train.num_epochs} epochs, batch {base_config.train.batch_size}.\n")
  path = os.path.join(out, "results.md")
  with open(path, "w") as f:
    f.write(text)
  return path


def main(argv):
  del argv
  sharding.split_cpu(8)  # the demo's 8 CPU devices (flaxtag.demo): the runs it measures are the demo's
  f = flags.FLAGS
  config = f.config
  config.data.data_dir = f.data_dir
  seeds = [int(s) for s in f.seeds]
  variants = f.variants or list(VARIANTS)
  os.makedirs(f.out, exist_ok=True)
  # The clips of RESULTS.md: the demo's before it had several SoundFonts and augmentations (TimGM6mb alone, not
  # augmented: exactly what synth_instruments 1.0.0 rendered).
  results = run_study(config, f.out, variants, seeds,
                      {"num_train": f.num_train, "num_valid": f.num_valid, "num_test": f.num_test, "augment": False})
  path = write_tables(results, f.out, config)
  with open(path) as table:
    print("\n" + table.read())
  print(f"tables: {path}")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "..", "configs", "study.py"),
                                  "Config shared by every run of the study.", lock_config=True)
  flags.DEFINE_string("out", "study_out", "Where the runs, results.jsonl and results.md go.")
  flags.DEFINE_string("data_dir", "study_out/data",
                      "The synthetic set: the demo's clips as RESULTS.md measured them (built here if missing).")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; each variant trains once per seed.")
  flags.DEFINE_list("variants", [], f"Variants to run (default all): {', '.join(VARIANTS)}.")
  flags.DEFINE_integer("num_train", 1000, "Training clips of the synthetic set, if it is built here.")
  flags.DEFINE_integer("num_valid", 100, "Validation clips.")
  flags.DEFINE_integer("num_test", 200, "Test clips.")
  cli.run(main)
