"""Method B on real instruments: the shipped hierarchy files over some of MTAT's and MTG-Jamendo's tags, and a tiny
GMP model trained on the miniature MTAT with `configs/mtat_instruments.py`: the labels it reads, the checkpoint's
tags, hierarchy and provenance, and what `eval` and `tag` report."""
import csv
import io
import json

import numpy as np
import pytest
import soundfile
from ml_collections.config_flags import config_flags

import fixtures_data
from data_prep.mtat import mtat
from flaxtag import checkpoint, eval as evaluation, input_pipeline, tag, train
from flaxtag.errors import HierarchyError
from flaxtag.hierarchy import LabelSelection, load_hierarchy
from flaxtag.inference import Tagger
from train_runs import OVERRIDES, REPO

HIERARCHIES = REPO / "data_prep" / "hierarchies"
JAMENDO_TSV = REPO.parent / "shared" / "mtg_jamendo" / "autotagging_instrument.tsv"
PROVENANCE = {"split": "official", "max_seconds": 30}
# mtat_instruments.yaml, written out: the fine tags in the file's order, and each coarse tag's children.
MTAT_FINE = ("violin", "cello", "harp", "guitar", "sitar", "piano", "harpsichord", "synth", "flute", "drums")
MTAT_FAMILIES = {"strings": ("violin", "cello", "harp"), "plucked": ("guitar", "sitar"),
                 "keyboards": ("piano", "harpsichord", "synth"), "winds": ("flute",), "percussion": ("drums",)}


def _selection(path, dataset_tags):
  hierarchy = load_hierarchy(path)
  return LabelSelection.create(dataset_tags, hierarchy.fine_tags, hierarchy, source=str(path))


def test_the_mtat_hierarchy_names_only_top50_tags():
  selection = _selection(HIERARCHIES / "mtat_instruments.yaml", mtat.TOP50)
  assert selection.tag_names == MTAT_FINE
  assert selection.hierarchy.to_mapping() == {c: list(f) for c, f in MTAT_FAMILIES.items()}
  annotated = [c for c, j in zip(selection.hierarchy.coarse_tags, selection.direct_coarse) if j >= 0]
  assert annotated == ["strings"]


def test_the_jamendo_hierarchy_names_only_its_41_instrument_tags():
  if not JAMENDO_TSV.exists():
    pytest.skip(f"{JAMENDO_TSV} is not here")
  with open(JAMENDO_TSV, encoding="utf-8") as f:
    rows = list(csv.reader(f, delimiter="\t"))[1:]
  tags = sorted({t.removeprefix("instrument---") for row in rows for t in row[5:]})
  assert len(tags) == 41 and all("---" not in t for t in tags)
  selection = _selection(HIERARCHIES / "mtg_jamendo_instruments.yaml", tags)
  coarse = selection.hierarchy.coarse_tags
  annotated = {c for c, j in zip(coarse, selection.direct_coarse) if j >= 0}
  assert annotated == {"guitar", "bass", "strings", "keyboard", "percussion", "brass"}
  # What the file's comment says it leaves out, and nothing else.
  assert set(tags) - set(selection.tag_names) - annotated == {"voice", "orchestra", "beat"}


# ---------------------------------------------------------------------------------------------------------------------
# A run on the miniature MTAT


@pytest.fixture(scope="module")
def mtat_instruments(tmp_path_factory):
  """The miniature MTAT (top50_clean), built with a provenance in its metadata, as the new builders write it:
  (data_dir, {clip_id: {tag: 0/1}} read from the annotation rows of the raw tree)."""
  root = tmp_path_factory.mktemp("mtat_instruments")
  fixtures_data.make_mtat_tree(root / "raw", n_per_folder=4)
  data_dir = fixtures_data.build_dataset("mtat/top50_clean", root / "raw", root / "data")
  metadata_file = input_pipeline.dataset_dir(data_dir, "mtat/top50_clean") / "metadata.json"
  metadata_file.write_text(json.dumps({**json.loads(metadata_file.read_text()), "provenance": PROVENANCE}))
  with open(root / "raw" / "annotations_final.csv", newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  return data_dir, {row["clip_id"]: {t: int(row[t]) for t in fixtures_data.MTAT_TAGS} for row in rows}


def _run_config(data_dir, **extra):
  config = config_flags.ConfigFileFlagParser(name="config").parse(f"{REPO / 'configs' / 'mtat_instruments.py'}:gmp")
  config.update_from_flattened_dict({**OVERRIDES, "data.data_dir": str(data_dir), "train.num_epochs": 1, **extra})
  return config


def _expected(annotations: dict[str, int]) -> tuple[list[int], list[int]]:
  """Fine and coarse targets of a clip, from its annotation row: a family is present where a child is, or where
  the family is itself an annotated tag (MTAT's `strings`)."""
  fine = [annotations[t] for t in MTAT_FINE]
  coarse = [max([annotations[c] if c in mtat.TOP50 else 0] + [annotations[t] for t in children])
            for c, children in MTAT_FAMILIES.items()]
  return fine, coarse


@pytest.fixture(scope="module")
def trained(mtat_instruments, tmp_path_factory):
  data_dir, _ = mtat_instruments
  workdir = tmp_path_factory.mktemp("mtat_instruments_run")
  train.train_and_evaluate(_run_config(data_dir), str(workdir))
  return workdir


def test_training_batches_hold_the_selected_columns_and_or_the_strings_annotation(mtat_instruments):
  data_dir, annotations = mtat_instruments
  run = train.setup(_run_config(data_dir))
  assert run.tag_names == MTAT_FINE and run.model.num_tags == 10
  batch = next(input_pipeline.train_iterator(data_dir, "mtat/top50_clean", batch_size=8, crop_len=4096, seed=0,
                                             process_index=0, process_count=1, selection=run.selection))
  ids = input_pipeline.clip_ids(data_dir, "mtat/top50_clean", "train")
  records = input_pipeline.epoch_permutation(len(ids), 0, 0)[:8]  # step 0 of a 1-process run: the first 8
  expected = [_expected(annotations[ids[r]]) for r in records]
  np.testing.assert_array_equal(batch["labels"], [fine for fine, _ in expected])
  np.testing.assert_array_equal(batch["coarse_labels"], [coarse for _, coarse in expected])
  # The miniature data has clips tagged `strings` without any of its children: their family is present.
  strings_only = [i for i in ids if annotations[i]["strings"] and not any(annotations[i][t] for t in MTAT_FAMILIES
                                                                           ["strings"])]
  assert strings_only and all(_expected(annotations[i])[1][0] == 1 for i in strings_only)


def test_an_unknown_tag_in_the_hierarchy_file_names_the_closest_dataset_tags(mtat_instruments, tmp_path):
  path = tmp_path / "typo.yaml"
  path.write_text("strings: [violins, cello]\n")
  with pytest.raises(HierarchyError, match=rf"^{path}: 'violins' is not a tag of mtat/top50_clean; closest: "
                     r"'violin'"):
    train.setup(_run_config(mtat_instruments[0], **{"model.hierarchy_file": str(path), "model.num_tags": 2}))


def test_num_tags_must_be_the_number_of_fine_tags_of_the_file(mtat_instruments):
  from flaxtag.errors import ConfigError  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match=r"model.num_tags=50 but the hierarchy file .*mtat_instruments.yaml names 10 "
                     r"tags; set --config.model.num_tags=10"):
    train.setup(_run_config(mtat_instruments[0], **{"model.num_tags": 50}))


def test_a_hierarchy_file_over_every_dataset_tag_keeps_the_dataset_order(mtat_instruments, tmp_path):
  """As whole-dataset hierarchy files always have: the same model and the same labels as before subsets."""
  path = tmp_path / "all.yaml"
  path.write_text(json.dumps({"first": list(mtat.TOP50[25:]), "second": list(mtat.TOP50[:25])}))
  run = train.setup(_run_config(mtat_instruments[0], **{"model.hierarchy_file": str(path), "model.num_tags": 50}))
  assert run.tag_names == mtat.TOP50 and run.model.hierarchy.fine_tags == mtat.TOP50
  np.testing.assert_array_equal(run.selection.columns, np.arange(50))


@pytest.mark.slow
def test_the_checkpoint_keeps_the_selected_tags_hierarchy_and_provenance(trained):
  manager = checkpoint.open_manager(trained, read_only=True)
  _, metadata = checkpoint.load_config(manager, manager.latest_step())
  assert metadata["tag_names"] == list(MTAT_FINE)
  assert metadata["hierarchy"] == {c: list(f) for c, f in MTAT_FAMILIES.items()}
  assert metadata["data"] == {"name": "mtat", "config": "top50_clean", "version": "1.0.0",
                              "splits": {"train": 37, "valid": 2}, "provenance": PROVENANCE}


@pytest.mark.slow
def test_eval_reads_the_selected_columns_and_reports_the_selected_tags_and_provenance(trained, mtat_instruments):
  data_dir, annotations = mtat_instruments
  result, predictions, tagger = evaluation.evaluate_checkpoint(trained, "latest", "test")
  assert tagger.tag_names == list(MTAT_FINE) and tagger.coarse_tag_names == list(MTAT_FAMILIES)
  ids = input_pipeline.clip_ids(data_dir, "mtat/top50_clean", "test")
  expected = [_expected(annotations[ids[i]]) for i in predictions["clip_index"]]
  np.testing.assert_array_equal(predictions["labels"], [fine for fine, _ in expected])
  np.testing.assert_array_equal(predictions["coarse_labels"], [coarse for _, coarse in expected])
  assert set(result["fine"]["evaluated"]) | set(result["fine"]["left_out"]) == set(MTAT_FINE)
  assert set(result["coarse"]["evaluated"]) | set(result["coarse"]["left_out"]) == set(MTAT_FAMILIES)
  assert result["data"] == {"name": "mtat", "config": "top50_clean", "version": "1.0.0", "splits": {"test": 10},
                            "provenance": PROVENANCE}
  assert json.loads(json.dumps(result, default=float))["data"] == result["data"]  # as `--output` writes it
  text = evaluation.format_report(result)
  assert text.startswith("mtat/top50_clean 1.0.0, split test: 10 clips; checkpoint step 4 of ")
  assert "dataset provenance: split official, max_seconds 30" in text
  assert "guitar" in text and "classical" not in text


@pytest.mark.slow
def test_tag_reports_the_selected_tags(trained, tmp_path):
  path = tmp_path / "clip.wav"
  soundfile.write(path, 0.1 * np.sin(2 * np.pi * 440 * np.arange(80000) / 16000), 16000)
  out, err = io.StringIO(), io.StringIO()
  assert tag.tag_paths(Tagger.load(trained), [str(path)], "json", out=out, err=err) == 0, err.getvalue()
  (entry,) = json.loads(out.getvalue())
  assert list(entry["tags"]) == list(MTAT_FINE) and list(entry["coarse_tags"]) == list(MTAT_FAMILIES)


def test_eval_of_a_checkpoint_whose_tags_the_dataset_lacks_is_an_error(mtat_instruments, tmp_path):
  import tiny_models  # pylint: disable=g-import-not-at-top
  tiny_models.save_tiny_model(tmp_path / "w", tag_names=["guitar", "violins"])  # a run on mtat/top50_clean
  with pytest.raises(HierarchyError, match=r"'violins' is not a tag of mtat/top50_clean; closest: 'violin'"):
    evaluation.evaluate_checkpoint(tmp_path / "w", "latest", "test", data_dir=mtat_instruments[0])
