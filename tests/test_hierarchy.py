"""Tests of flaxtag.hierarchy."""
import json

import numpy as np
import pytest

from flaxtag.errors import HierarchyError
from flaxtag.hierarchy import Hierarchy, LabelSelection, load_hierarchy

MAPPING = {"strings": ["violin", "cello"], "keys": ["piano"], "winds": ["flute", "oboe"]}
DATASET_FINE = ("piano", "flute", "violin", "oboe", "cello")


def test_from_mapping_follows_dataset_order():
  h = Hierarchy.from_mapping(MAPPING, fine_tags=DATASET_FINE)
  assert h.coarse_tags == ("strings", "keys", "winds")
  assert h.fine_tags == DATASET_FINE
  np.testing.assert_array_equal(h.parent, [1, 2, 0, 2, 0])
  assert (h.num_coarse, h.num_fine) == (3, 5)
  np.testing.assert_array_equal(h.mask, [[0, 0, 1, 0, 1], [1, 0, 0, 0, 0], [0, 1, 0, 1, 0]])
  assert h.mask.dtype == np.float32
  assert h.children("winds") == ("flute", "oboe")
  assert h.children("strings") == ("violin", "cello")


def test_from_mapping_without_dataset_order():
  h = Hierarchy.from_mapping(MAPPING)
  assert h.fine_tags == ("violin", "cello", "piano", "flute", "oboe")
  np.testing.assert_array_equal(h.parent, [0, 0, 1, 2, 2])


def test_coarse_targets_any_child_or_direct():
  h = Hierarchy.from_mapping(MAPPING, fine_tags=DATASET_FINE)
  fine = np.array([[0, 0, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(h.coarse_targets(fine), [[1, 0, 0], [0, 1, 1], [0, 0, 0]])
  direct = np.array([[0, 0, 0], [0, 0, 0], [0, 0, 1]], np.float32)
  np.testing.assert_array_equal(h.coarse_targets(fine, direct), [[1, 0, 0], [0, 1, 1], [0, 0, 1]])
  # Batched over any leading axes, dtype kept.
  out = h.coarse_targets(np.stack([fine, fine]).astype(bool))
  assert out.shape == (2, 3, 3) and out.dtype == bool


def test_hashable_and_equal_by_value():
  a = Hierarchy.from_mapping(MAPPING, fine_tags=DATASET_FINE)
  b = Hierarchy.from_mapping(dict(MAPPING), fine_tags=list(DATASET_FINE))
  assert a == b and hash(a) == hash(b)
  assert a != Hierarchy.from_mapping(MAPPING)
  with pytest.raises(ValueError):
    a.parent[0] = 2  # Read-only: a static jit argument must not change.


def test_json_round_trip():
  h = Hierarchy.from_mapping(MAPPING, fine_tags=DATASET_FINE)
  assert json.loads(h.to_json()) == {"strings": ["violin", "cello"], "keys": ["piano"], "winds": ["flute", "oboe"]}
  assert Hierarchy.from_json(h.to_json(), fine_tags=h.fine_tags) == h
  g = Hierarchy.from_mapping(MAPPING)
  assert Hierarchy.from_json(g.to_json()) == g
  assert Hierarchy.from_mapping(h.to_mapping(), fine_tags=DATASET_FINE) == h


@pytest.mark.parametrize("ext", ["json", "yaml", "yml"])
def test_load_file(tmp_path, ext):
  path = tmp_path / f"h.{ext}"
  if ext == "json":
    path.write_text(json.dumps(MAPPING))
  else:
    path.write_text("strings: [violin, cello]\nkeys:\n  - piano\nwinds: [flute, oboe]\n")
  assert load_hierarchy(path, fine_tags=DATASET_FINE) == Hierarchy.from_mapping(MAPPING, fine_tags=DATASET_FINE)


@pytest.mark.parametrize("mapping, fine_tags, message", [
    ({"a": ["x"], "b": ["x", "y"]}, None, "'x' is listed under both 'a' and 'b'"),
    ({"a": ["x", "x"]}, None, "'x' is listed twice"),
    ({"a": ["x"], "b": []}, None, "'b' has no fine tags"),
    ({"a": ["x", "z"]}, ("x",), "fine tag 'z' is not a tag of the dataset"),
    ({"a": ["x"]}, ("x", "y"), "fine tag 'y' has no coarse parent"),
    ({"a": "x"}, None, "must map to a list"),
    (["x", "y"], None, "expected a non-empty mapping"),
    ({}, None, "expected a non-empty mapping"),
    ({"a": ["x", 3]}, None, "fine tag 3 under 'a' is not a string"),
])
def test_invalid_mappings_name_the_tag_and_file(tmp_path, mapping, fine_tags, message):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(mapping))
  with pytest.raises(HierarchyError, match="bad.json") as info:
    load_hierarchy(path, fine_tags=fine_tags)
  assert message in str(info.value)


def test_malformed_files(tmp_path):
  (tmp_path / "h.json").write_text('{"a": ["x"')
  with pytest.raises(HierarchyError, match="h.json: malformed JSON"):
    load_hierarchy(tmp_path / "h.json")
  (tmp_path / "h.yaml").write_text("a: [x\n")
  with pytest.raises(HierarchyError, match="h.yaml: malformed YAML"):
    load_hierarchy(tmp_path / "h.yaml")
  (tmp_path / "h.txt").write_text("{}")
  with pytest.raises(HierarchyError, match="unknown hierarchy file type"):
    load_hierarchy(tmp_path / "h.txt")
  with pytest.raises(HierarchyError, match="cannot read"):
    load_hierarchy(tmp_path / "missing.yaml")


# A dataset with an annotated family tag ('strings') and tags outside the hierarchy ('rock', 'drums').
SUBSET_DATASET = ("rock", "violin", "strings", "piano", "cello", "drums")
SUBSET = {"strings": ["cello", "violin"], "keys": ["piano"]}


def test_label_selection_reads_the_named_columns_in_the_file_order_and_ors_annotated_coarse_tags():
  h = Hierarchy.from_mapping(SUBSET)
  selection = LabelSelection.create(SUBSET_DATASET, h.fine_tags, h)
  assert selection.tag_names == ("cello", "violin", "piano")
  np.testing.assert_array_equal(selection.columns, [4, 1, 3])
  np.testing.assert_array_equal(selection.direct_coarse, [2, -1])  # 'strings' is annotated, 'keys' is not
  labels = np.array([
      [1, 0, 1, 0, 0, 1],  # strings annotated, none of its children: strings 1
      [0, 1, 0, 0, 0, 0],  # violin only, strings not annotated: strings 1
      [1, 0, 0, 1, 0, 1],  # piano: keys 1; rock and drums ignored
      [0, 0, 0, 0, 0, 0]], np.float32)  # nothing (a padding row)
  out = selection.apply(labels)
  np.testing.assert_array_equal(out["labels"], [[0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]])
  np.testing.assert_array_equal(out["coarse_labels"], [[1, 0], [1, 0], [0, 1], [0, 0]])
  assert out["labels"].dtype == out["coarse_labels"].dtype == np.float32
  flat = LabelSelection.create(SUBSET_DATASET, ["drums", "rock"])
  assert flat.apply(labels).keys() == {"labels"}
  np.testing.assert_array_equal(flat.apply(labels)["labels"], labels[:, [5, 0]])


def test_label_selection_names_an_unknown_tag_and_the_closest_dataset_tags():
  h = Hierarchy.from_mapping({"strings": ["violins", "cello"], "keys": ["pianoo", "organ"]})
  with pytest.raises(HierarchyError, match=r"^h.yaml: 'violins' is not a tag of mtat \(nor are \['pianoo', "
                     r"'organ'\]\); closest: 'violin'$"):
    LabelSelection.create(SUBSET_DATASET, h.fine_tags, h, source="h.yaml", dataset="mtat")
  with pytest.raises(HierarchyError, match=r"'organ' is not a tag of the dataset$"):  # nothing close: no suggestion
    LabelSelection.create(SUBSET_DATASET, ["organ"])
