"""The heads study: every variant is a valid model, the tables are right, a rerun skips what is done."""
import json

import numpy as np
import pytest

import train_runs
from configs import study as study_config
from data_prep.synth_instruments import render
from flaxtag import study
from flaxtag.errors import ConfigError
from flaxtag.hierarchy import Hierarchy
from flaxtag.models import heads, tagger


@pytest.mark.parametrize("variant", list(study.VARIANTS))
def test_every_variant_is_a_valid_model_with_its_overrides(variant):
  config = study.variant_config(study_config.get_config(), variant, seed=5)
  assert config.seed == 5
  for key, value in study.VARIANTS[variant].items():
    node = config
    for part in key.split("."):
      node = node[part]
    assert node == value
  hierarchy = Hierarchy.from_mapping(render.hierarchy())
  model = tagger.build_model(config.model, hierarchy)
  assert model.head == config.model.head
  assert model.head in heads.HEAD_NAMES
  params = tagger.abstract_variables(model)["params"]  # jax.eval_shape: shapes that do not fit fail here
  assert params["head"]["fine"]["kernel"].shape[-1] == hierarchy.num_fine


def test_resatt_variants_are_distinct_and_the_default_is_one_of_them():
  base = study_config.get_config()
  options = {v: heads.HeadOptions.from_dict(study.variant_config(base, v, 0).model.head_options)
             for v in study.HEAD_VARIANTS if v.startswith("resatt")}
  assert len(set(options.values())) == len(options) == 5
  assert options["resatt_masked"] == heads.HeadOptions()  # the measured choice of RESULTS.md


def test_unknown_variant_is_a_config_error():
  with pytest.raises(ConfigError, match="resatt_sigmoid"):
    study.variant_config(study_config.get_config(), "resatt_sigmod", 0)


def test_tables_report_mean_and_sample_std_over_seeds():
  results = [{"variant": "gmp", "seed": s, "roc_auc": r, "pr_auc": 0.5, "coarse_roc_auc": 0.9, "coarse_pr_auc": 0.8,
              "violation_rate": 0.0} for s, r in enumerate([0.91, 0.93, 0.95])]
  results.append({"variant": "flat", "seed": 0, "roc_auc": 0.8, "pr_auc": 0.4})
  rows = study.summarize(results, ["flat", "gmp", "resatt"])
  assert [r["variant"] for r in rows] == ["flat", "gmp"]
  mean, std = rows[1]["roc_auc"]
  assert mean == pytest.approx(0.93) and std == pytest.approx(np.std([0.91, 0.93, 0.95], ddof=1))
  assert rows[0]["roc_auc"] == (0.8, None) and "coarse_roc_auc" not in rows[0]
  table = study.markdown_table(rows).splitlines()
  assert table[2] == "| flat | 0.8000 | 0.4000 | – | – | – | 1 |"
  assert table[3] == "| gmp | 0.9300 ± 0.0200 | 0.5000 ± 0.0000 | 0.9000 ± 0.0000 | 0.8000 ± 0.0000 | 0.0000 ± 0.0000 | 3 |"


@pytest.mark.slow
def test_study_trains_tests_and_resumes(synth_data_dir, tmp_path):
  """A one-variant, one-seed study of the tiny model: its line equals a fresh evaluation of its best checkpoint,
  and a rerun adds nothing. Its run validates every 2nd epoch (as the study's config does every 3rd) and the last."""
  from flaxtag import checkpoint, eval as evaluation  # pylint: disable=g-import-not-at-top
  config = train_runs.run_config(synth_data_dir, **{"train.eval_every_epochs": 2})
  sizes = {"num_train": 16, "num_valid": 8, "num_test": 8, "clip_seconds": 5.0, "seed": 1}  # synth_data_dir's
  results = study.run_study(config, str(tmp_path), ["top_down"], [3], sizes)
  assert [(r["variant"], r["seed"]) for r in results] == [("top_down", 3)]
  workdir = tmp_path / "runs" / "top_down" / "seed_3"
  valid = train_runs.records(workdir, "valid")
  assert [r["epoch"] for r in valid] == [2, 3]
  manager = checkpoint.open_manager(workdir, read_only=True)
  assert set(manager.all_steps()) == {4, 6}  # every epoch is saved (the latest 2 kept); the best is a validated one
  roc_auc_at = {r["step"]: r["roc_auc"] for r in valid}
  best = checkpoint.resolve_step(manager, "best")
  assert roc_auc_at[best] == max(roc_auc_at.values()) and best == results[0]["checkpoint_step"]
  result, _, _ = evaluation.evaluate_checkpoint(workdir, "best", "test")
  for key, value in evaluation.headline(result).items():
    assert results[0][key] == pytest.approx(value, abs=1e-6)
  assert study.run_study(config, str(tmp_path), ["top_down"], [3], sizes) == results
  with open(tmp_path / "results.jsonl") as f:
    assert len([json.loads(line) for line in f]) == 1
  path = study.write_tables(results, str(tmp_path), config)
  assert "| top_down |" in open(path).read()
