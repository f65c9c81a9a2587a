"""The heads study: every candidate is a valid model, the statistics and tables are right, and the protocol chooses on
validation only, seals the test scores until every choice is made, and resumes from its records."""
import math
import re
import shutil
import sys
import time

import jax
import numpy as np
import pytest

import train_runs
from configs import study as study_config
from data_prep.synth_instruments import builds, render
from flaxtag import host, study
from flaxtag import eval as evaluation
from flaxtag import train
from flaxtag.errors import ConfigError
from flaxtag.hierarchy import Hierarchy
from flaxtag.models import heads, tagger

# synth_data_dir's build options (conftest.py): the end-to-end studies reuse its set.
TINY_SIZES = {"num_train": 16, "num_valid": 8, "num_test": 8, "clip_seconds": 5.0, "seed": 1, "augment": False}
EVERY_OVERRIDES = {name: overrides for names in study.HEAD_CANDIDATES.values() for name, overrides in names.items()}


@pytest.mark.parametrize("name", list(EVERY_OVERRIDES) + list(study.MODELS))
def test_every_candidate_and_model_is_a_valid_model_with_its_overrides(name):
  overrides = EVERY_OVERRIDES.get(name) or {**study.HEAD_CANDIDATES["gmp"]["gmp_cw1"], **study.MODELS[name]}
  config = study.variant_config(study_config.get_config(), overrides, seed=5)
  assert config.seed == 5
  for key, value in overrides.items():
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


def test_candidates_are_distinct_and_span_the_stated_grid():
  base = study_config.get_config()
  options = {name: heads.HeadOptions.from_dict(study.variant_config(base, o, 0).model.head_options)
             for name, o in EVERY_OVERRIDES.items()}
  assert len(set(zip(options.values(), (o["model.head"] for o in EVERY_OVERRIDES.values())))) == len(options)
  assert len(study.HEAD_CANDIDATES["resatt"]) == len(study.RESATT_FORMS) * len(study.COARSE_WEIGHTS)
  assert len(study.HEAD_CANDIDATES["multitask_hloss"]) == len(study.COARSE_WEIGHTS) * len(study.HIERARCHY_LOSS_WEIGHTS)
  assert list(study.HEAD_CANDIDATES["flat"]) == ["flat"]  # nothing to choose: no coarse loss


def test_study_config_runs_to_convergence_with_a_constant_rate():
  config = study_config.get_config()
  assert config.train.eval_every_epochs == 1 and config.train.early_stopping_patience == 5
  assert config.train.num_epochs >= 10 * config.train.early_stopping_patience
  assert config.optim.adam_decay_epochs == 0.0


def test_spec_cnnp_matches_spec_att_capacity_in_the_study_config():
  base = study_config.get_config()
  gmp = study.HEAD_CANDIDATES["gmp"]["gmp_cw1"]
  costs = {m: study.model_cost(study.variant_config(base, {**gmp, **c}, 0)) for m, c in study.MODELS.items()}
  assert costs["spec_att"]["parameters"] == 334_203 and costs["spec_cnnp"]["parameters"] == 333_403
  assert abs(costs["spec_cnnp"]["parameters"] / costs["spec_att"]["parameters"] - 1) < 0.1
  assert costs["raw_att"]["parameters"] == 301_745 and costs["raw_cnnl"]["parameters"] == 40_321  # as they are
  assert all(c["forward_flops"] > 0 for c in costs.values())


def test_compute_matched_epochs():
  assert study.compute_matched_epochs(20, 4e8, 4e8, 60) == 20
  assert study.compute_matched_epochs(20, 4e8, 2e8, 60) == 40  # half the FLOPs per step: twice the steps
  assert study.compute_matched_epochs(20, 4e8, 3e8, 60) == 27
  assert study.compute_matched_epochs(20, 4e8, 1e7, 60) == 60  # capped by the epoch budget
  assert study.compute_matched_epochs(1, 1.0, 10.0, 60) == 1


def test_training_record_best_and_stopping_epochs():
  records = [{"kind": "train", "step": 1, "loss": 1.0}] + [
      {"kind": "valid", "step": e, "epoch": e, "roc_auc": r} for e, r in enumerate([0.6, 0.8, 0.8, None, 0.7], 1)]
  assert study.training_record(records) == {"valid_roc_auc": 0.8, "best_epoch": 2, "stop_epoch": 5,
                                            "stopped_early": False}
  stopped = study.training_record(records + [{"kind": "early_stop", "step": 5, "epoch": 5, "best_step": 2}])
  assert stopped["stopped_early"]


def _runs(scores: dict) -> list[dict]:
  return [{"run": name, "seed": s, "valid_roc_auc": v} for name, values in scores.items() for s, v in enumerate(values)]


def test_choice_is_the_best_mean_validation_score_over_the_selection_seeds():
  candidates = {"flat": {"flat": {}}, "gmp": {"gmp_cw0.5": {}, "gmp_cw1": {}}, "resatt": {"a": {}, "b": {}, "c": {}}}
  runs = _runs({"gmp_cw0.5": [0.80, 0.70, 0.99], "gmp_cw1": [0.76, 0.76, 0.0], "a": [0.5, 0.7], "b": [0.6, 0.6],
                "c": [0.55, 0.6]})
  assert study.choose(runs, candidates, [0, 1]) == {"flat": "flat", "gmp": "gmp_cw1", "resatt": "a"}  # a ties b: first
  table = study.selection_table(runs, candidates, [0, 1])
  assert [(r["run"], r["chosen"]) for r in table] == [("gmp_cw0.5", False), ("gmp_cw1", True), ("a", True),
                                                      ("b", False), ("c", False)]
  assert table[0]["valid_roc_auc"] == pytest.approx(0.75)
  with pytest.raises(ConfigError, match=r"'gmp_cw0\.5' has no validation score for seeds \[3\]"):
    study.choose(runs, candidates, [0, 3])


def test_second_stage_tries_each_heads_first_choice_at_the_lower_coarse_weight():
  first = {"flat": "flat", "multitask": "multitask_cw1", "top_down": "top_down_cw0.5", "gmp": "gmp_cw0.5",
           "multitask_hloss": "multitask_hloss_cw1_hl10", "resatt": "resatt_masked_cw0.5"}
  stage = study.second_stage(study.HEAD_CANDIDATES, first)
  assert study.SECOND_STAGE_COARSE_WEIGHT < min(study.COARSE_WEIGHTS)
  assert {v: list(names) for v, names in stage.items()} == {
      "multitask": ["multitask_cw0.25"], "top_down": ["top_down_cw0.25"], "gmp": ["gmp_cw0.25"],
      "multitask_hloss": ["multitask_hloss_cw0.25_hl10"], "resatt": ["resatt_masked_cw0.25"]}  # flat has no w_c
  for variant, names in stage.items():  # the first choice's overrides, its coarse weight alone changed
    assert names == {n: {**study.HEAD_CANDIDATES[variant][first[variant]], study.COARSE_WEIGHT: 0.25} for n in names}
  runs = _runs({"gmp_cw0.5": [0.80, 0.70], "gmp_cw1": [0.76, 0.76], "gmp_cw0.25": [0.70, 0.84]})
  candidates = {"flat": study.HEAD_CANDIDATES["flat"], "gmp": study.HEAD_CANDIDATES["gmp"]}
  both = study.selection_candidates(runs, candidates, [0, 1])
  assert list(both["gmp"]) == ["gmp_cw0.5", "gmp_cw1", "gmp_cw0.25"] and list(both["flat"]) == ["flat"]
  assert study.choose(runs, both, [0, 1])["gmp"] == "gmp_cw0.25"  # 0.77 against 0.75 and 0.76
  assert study.choose(runs, candidates, [0, 1])["gmp"] == "gmp_cw1"  # the first stage's choice


def test_final_variants_at_matched_capacity_and_compute():
  base = study_config.get_config()
  final = study.final_variants(base, study.HEAD_CANDIDATES, {"flat": "flat", "multitask": "multitask_cw1",
                                                             "top_down": "top_down_cw0.5", "gmp": "gmp_cw0.5",
                                                             "multitask_hloss": "multitask_hloss_cw1_hl10",
                                                             "resatt": "resatt_masked_cw1"}, study.MODELS, 20)
  assert final["resatt"] == ("resatt_masked_cw1", study.HEAD_CANDIDATES["resatt"]["resatt_masked_cw1"])
  assert final["spec_cnnp"][1] == {"model.head": "gmp", "model.head_options.coarse_weight": 0.5,
                                   "model.backend": "cnn_p"}
  epochs = {v: o["train.num_epochs"] for v, (_, o) in final.items() if v.endswith("_compute")}
  # Forward FLOPs per crop (XLA): Spec+Att 4.68e8, Spec+CNN P 3.66e8, Raw+Att 2.62e8, Raw+CNN L 2.4e7.
  assert epochs == {"spec_att_compute": 20, "spec_cnnp_compute": 26, "raw_att_compute": 36, "raw_cnnl_compute": 80}
  assert all(final[v][1]["train.early_stopping_patience"] == 0 for v in epochs)
  assert "spec_att" not in final  # Spec+Att at matched capacity is `gmp`


def test_paired_deltas_against_numpy():
  flat = [0.80, 0.82, 0.81]
  gmp = [0.83, 0.84, 0.85]
  top_down = [0.81, 0.80, 0.83]
  results = [{"variant": v, "seed": s, "roc_auc": x} for v, xs in (("flat", flat), ("gmp", gmp), ("top_down", top_down))
             for s, x in enumerate(xs)]
  results.append({"variant": "resatt", "seed": 2, "roc_auc": 0.9})  # one seed: no spread
  results.append({"variant": "multitask", "seed": 7, "roc_auc": 0.9})  # no flat run of that seed: not paired
  rows = {r["variant"]: r for r in study.paired_deltas(results, ["flat", "gmp", "top_down", "resatt", "multitask"],
                                                       "roc_auc")}
  assert list(rows) == ["gmp", "top_down", "resatt"]
  for variant, xs in (("gmp", gmp), ("top_down", top_down)):
    deltas = np.subtract(xs, flat)
    assert rows[variant]["deltas"] == pytest.approx(deltas.tolist())
    assert rows[variant]["mean"] == pytest.approx(deltas.mean())
    assert rows[variant]["sd"] == pytest.approx(deltas.std(ddof=1))
    assert rows[variant]["exceeds"] == (abs(deltas.mean()) > 2 * deltas.std(ddof=1) / math.sqrt(3))
  assert rows["gmp"]["exceeds"] and not rows["top_down"]["exceeds"]  # +0.030 ± 0.010 and +0.003 ± 0.021
  assert rows["resatt"] == {"variant": "resatt", "seeds": [2], "deltas": [pytest.approx(0.09)],
                            "mean": pytest.approx(0.09), "sd": None, "exceeds": False}


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


def test_progress_counts_the_runs_and_the_time_left():
  assert study.progress([], 5) == "[1/5]"
  assert study.progress([{"seconds": 900.0}, {"seconds": 1100.0}], 5) == "[3/5], about 0.8 h left at 17 min a run"
  # The median: one run that spent an hour stopped does not move the estimate.
  runs = [{"seconds": s} for s in (900.0, 1000.0, 6000.0)]
  assert study.progress(runs, 6) == "[4/6], about 0.8 h left at 17 min a run"
  # The full study: 16 candidates and 5 second-stage ones x 2 selection seeds; flat x 3 seeds, the 5 chosen heads x
  # the third seed; 3 models at matched capacity and 4 at matched compute, x 3 seeds.
  assert study.planned_runs(study.HEAD_CANDIDATES, study.MODELS, [0, 1, 2], [0, 1]) == 32 + 10 + 3 + 5 + 21


def _announced(out: str) -> list[str]:
  """The '[k/total]' of every run the study announced."""
  return re.findall(r"^== .*, seed \d+ \[(\d+/\d+)\]", out, re.MULTILINE)


def test_a_stopped_runs_time_counts_when_it_resumes(tmp_path, monkeypatch):
  """A stop request ends a start with SystemExit: its time is kept, and the finished run's `seconds` add it."""
  def stopped(config, workdir):
    time.sleep(0.2)
    sys.exit(0)

  monkeypatch.setattr(train, "train_and_evaluate", stopped)
  with pytest.raises(SystemExit):
    study._train(study_config.get_config(), str(tmp_path), "gmp", "gmp_cw1", {}, 0, 1, None)
  workdir = tmp_path / "runs" / "gmp_cw1" / "seed_0"
  first = float((workdir / "study_seconds.txt").read_text())
  assert 0.2 <= first < 5
  assert study.add_training_seconds(str(workdir), 100.0) == pytest.approx(first + 100.0, abs=0.05)
  assert not (tmp_path / "runs.jsonl").exists()  # not recorded as finished


@pytest.mark.slow
def test_protocol_chooses_on_validation_seals_the_test_scores_and_resumes_from_its_records(
    synth_data_dir, tmp_path, monkeypatch, capsys):
  """A tiny study end to end: selection of gmp's coarse weight in two stages, the final pass of flat and the chosen
  gmp (reusing its selection run: one seed for both passes, to keep this short). Each run is scored on the test
  split and its held-out rendering when it finishes, into the sealed file, which neither the runs' records nor the
  choice read; the results are the final runs' scores only. A rerun with the records alone (checkpoints deleted, as
  on another machine) trains and evaluates nothing."""
  events = []
  train_and_evaluate, evaluate_checkpoint = train.train_and_evaluate, evaluation.evaluate_checkpoint

  def traced_train(config, workdir):
    events.append(("train", str(workdir)))
    return train_and_evaluate(config, workdir)

  def traced_evaluate(workdir, checkpoint_step="best", split="test", data_dir=None, batch_size=None):
    events.append((split, str(workdir), data_dir))
    return evaluate_checkpoint(workdir, checkpoint_step, split, data_dir, batch_size)

  monkeypatch.setattr(train, "train_and_evaluate", traced_train)
  monkeypatch.setattr(evaluation, "evaluate_checkpoint", traced_evaluate)
  config = train_runs.run_config(synth_data_dir, **{"train.num_epochs": 2, "train.eval_every_epochs": 1,
                                                    "train.early_stopping_patience": 1})
  candidates = {"flat": study.HEAD_CANDIDATES["flat"], "gmp": study.HEAD_CANDIDATES["gmp"]}
  results = study.run_study(config, str(tmp_path), TINY_SIZES, [0], [0], candidates, models={})

  runs = study.read_lines(tmp_path / "runs.jsonl")
  for r in runs:  # the time of every start, here one, and the machine and JAX that finished it
    assert r["seconds"] == float((tmp_path / "runs" / r["run"] / "seed_0" / "study_seconds.txt").read_text())
    assert r["machine"] == host.describe() and r["jax"] == jax.__version__
  assert not any("roc_auc" in r or study.HELD_OUT + "roc_auc" in r for r in runs)  # validation only
  chosen = study.choose(runs, {**candidates, "gmp": {**candidates["gmp"], "gmp_cw0.25": {}}}, [0])["gmp"]
  trained = [(r["run"], r["seed"]) for r in runs]
  assert trained == [("gmp_cw0.5", 0), ("gmp_cw1", 0), ("gmp_cw0.25", 0), ("flat", 0)]  # the chosen gmp is reused
  assert _announced(capsys.readouterr().out) == ["1/4", "2/4", "3/4", "4/4"]
  # Patience 1: a run stops one validation after its best, or at its last epoch.
  assert all(r["stop_epoch"] == (r["best_epoch"] + 1 if r["stopped_early"] else 2) for r in runs)
  held_out = render.find_soundfont(builds.HELD_OUT_SOUNDFONT) is not None
  per_run = 1 + (2 if held_out else 1)  # trained, then scored on the test split (and its held-out rendering)
  assert len(events) == 4 * per_run
  for i, (name, _) in enumerate(trained):
    workdir = str(tmp_path / "runs" / name / "seed_0")
    run_events = events[i * per_run:(i + 1) * per_run]
    assert run_events[0] == ("train", workdir) and all(e[:2] == ("test", workdir) for e in run_events[1:])
  sealed = study.read_lines(tmp_path / study.TEST_SCORES)
  assert [(r["run"], r["seed"]) for r in sealed] == trained
  assert sorted((r["variant"], r["seed"], r["run"]) for r in results) == [("flat", 0, "flat"), ("gmp", 0, chosen)]
  assert all(("heldout_roc_auc" in r) == held_out and "coarse_roc_auc" in r for r in results)
  result, _, _ = evaluate_checkpoint(str(tmp_path / "runs" / chosen / "seed_0"), "best", "test")
  line = next(r for r in results if r["variant"] == "gmp")
  for key, value in evaluation.headline(result).items():
    assert line[key] == pytest.approx(value, abs=1e-6)

  # test_scores.jsonl lost: the final runs are scored again from their checkpoints, to the same figures.
  (tmp_path / study.TEST_SCORES).unlink()
  events.clear()
  assert study.run_study(config, str(tmp_path), TINY_SIZES, [0], [0], candidates, models={}) == results
  assert {e[1] for e in events} == {str(tmp_path / "runs" / n / "seed_0") for n in ("flat", chosen)}
  assert all(e[0] == "test" for e in events)
  # The records alone, as on another machine: nothing is trained or evaluated.
  events.clear()
  shutil.rmtree(tmp_path / "runs")
  assert study.run_study(config, str(tmp_path), TINY_SIZES, [0], [0], candidates, models={}) == results
  assert not events
  # Neither the scores nor the checkpoints: one clear error naming what to do.
  (tmp_path / study.TEST_SCORES).unlink()
  with pytest.raises(ConfigError, match="has no line in .*test_scores.jsonl and no checkpoint"):
    study.run_study(config, str(tmp_path), TINY_SIZES, [0], [0], candidates, models={})
  text = open(study.write_tables(results, runs, str(tmp_path), candidates, [0])).read()
  assert f"| gmp | {chosen} |" in text and "| gmp | fine ROC-AUC |" in text
  assert study.read_lines(tmp_path / "results.jsonl") == results


def test_results_md_has_the_selection_the_tables_the_deltas_and_the_runs(tmp_path):
  candidates = {"flat": study.HEAD_CANDIDATES["flat"], "gmp": study.HEAD_CANDIDATES["gmp"]}
  runs = _runs({"gmp_cw0.5": [0.7, 0.7], "gmp_cw1": [0.8, 0.8], "gmp_cw0.25": [0.75, 0.76]})
  variants = ["flat", "gmp", "spec_cnnp", "spec_att_compute", "raw_att_compute"]
  results = [{"variant": v, "run": v, "seed": s, "roc_auc": 0.8 + 0.01 * i + 0.001 * s,
              "heldout_roc_auc": 0.7 + 0.01 * i, "parameters": 1000 + i, "forward_flops": 2e9, "epochs_budget": 60,
              "best_epoch": 10 + s, "stop_epoch": 15 + s, "stopped_early": True}
             for i, v in enumerate(variants) for s in range(3)]
  text = open(study.write_tables(results, runs, str(tmp_path), candidates, [0, 1])).read()
  assert "| gmp | 1 | gmp_cw1 | 0.8000 | yes |" in text and "| gmp | 1 | gmp_cw0.5 | 0.7000 |  |" in text
  assert "| gmp | 2 | gmp_cw0.25 | 0.7550 |  |" in text  # the first choice at the second stage's weight
  assert "| gmp | fine ROC-AUC | +0.0100, +0.0100, +0.0100 | +0.0100 | 0.0000 | yes |" in text
  assert "| gmp | held-out fine ROC-AUC | +0.0100, +0.0100, +0.0100 | +0.0100 | 0.0000 | yes |" in text
  assert "| spec_cnnp | fine ROC-AUC | +0.0100, +0.0100, +0.0100 | +0.0100 | 0.0000 | yes |" in text  # against gmp
  assert "| raw_att_compute | fine ROC-AUC | +0.0100, +0.0100, +0.0100 |" in text  # against spec_att_compute
  assert "| spec_cnnp | spec_cnnp | 1,002 | 2.000 | 60 | 10, 11, 12 | 15, 16, 17 | 3 |" in text


def test_held_out_build_is_skipped_with_a_note_without_the_soundfont(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(render, "find_soundfont", lambda filename: None)
  assert builds.build_held_out(str(tmp_path / "heldout"), {"num_test": 8}) is None
  note = "note: skipped: FluidR3_GM.sf2 (apt-get install fluid-soundfont-gm) is not installed"
  assert note in capsys.readouterr().out
  assert not (tmp_path / "heldout").exists()


@pytest.mark.slow
def test_protocol_trains_and_tests_the_models_at_matched_capacity_and_compute(synth_data_dir, tmp_path, capsys):
  """The models' part of the final pass on the tiny model: Raw+CNN L beside Spec+Att at matched capacity, and both at
  matched compute (1 epoch of Spec+Att's FLOPs; Raw+CNN L's cheaper forward gets more epochs, up to the budget)."""
  config = train_runs.run_config(synth_data_dir, **{"train.num_epochs": 2, "train.early_stopping_patience": 1})
  candidates = {"gmp": {"gmp_cw1": study.HEAD_CANDIDATES["gmp"]["gmp_cw1"]}}
  models = {"spec_att": {}, "raw_cnnl": study.MODELS["raw_cnnl"]}
  results = study.run_study(config, str(tmp_path), TINY_SIZES, [0], [], candidates, models, budget_epochs=1)
  assert [r["variant"] for r in results] == ["gmp", "raw_cnnl", "spec_att_compute", "raw_cnnl_compute"]
  assert _announced(capsys.readouterr().out) == ["1/4", "2/4", "3/4", "4/4"]
  by_variant = {r["variant"]: r for r in results}
  flops = {v: by_variant[v]["forward_flops"] for v in ("gmp", "raw_cnnl")}
  assert by_variant["spec_att_compute"]["epochs_budget"] == 1
  assert by_variant["raw_cnnl_compute"]["epochs_budget"] == study.compute_matched_epochs(1, flops["gmp"],
                                                                                         flops["raw_cnnl"], 2)
  assert not by_variant["spec_att_compute"]["stopped_early"] and by_variant["spec_att_compute"]["stop_epoch"] == 1
  assert all("roc_auc" in r for r in results)
