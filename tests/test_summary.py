"""`flaxtag.summary` for the four models and every head: its table and totals against independent counts."""
import math
import pathlib
import re
import subprocess
import sys

import jax
import pytest

from configs import base
from flaxtag import summary
from flaxtag.hierarchy import load_hierarchy
from flaxtag.models import heads, tagger

import reference_numpy

REPO = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference"
HIERARCHY = load_hierarchy(REPO / "data_prep" / "synth_instruments" / "hierarchy.json")
# name (its variant of configs/mtat.py) → (front-end, back-end, the reference's architecture in the layout file)
MODELS = {"spec_att": ("spec", "attention", "pons_won"),
          "raw_att": ("raw", "attention", "lee_won"),
          "spec_cnnp": ("spec", "cnn_p", "pons_pons"),
          "raw_cnnl": ("raw", "cnn_l", "lee_lee")}
EMBEDDING = {"attention": 512, "cnn_p": 500, "cnn_l": 512}  # SPEC §3


def build(model_name, head, num_tags):
  frontend, backend, _ = MODELS[model_name]
  config = base.get_config()
  config.model.update(frontend=frontend, backend=backend, head=head, num_tags=num_tags)
  return tagger.build_model(config.model, HIERARCHY if head != heads.FLAT else None)


def sizes(tree) -> int:
  return sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree))


def totals(text: str) -> tuple[int, int]:
  """(trainable parameters, BatchNorm statistics) as the summary prints them."""
  trainable = int(re.search(r"^trainable parameters: ([\d,]+)$", text, re.M).group(1).replace(",", ""))
  stats = int(re.search(r"^BatchNorm statistics \(not trained\): ([\d,]+)$", text, re.M).group(1).replace(",", ""))
  return trainable, stats


def reference_counts(architecture) -> tuple[int, int]:
  """(parameters, BatchNorm running statistics) of the reference state_dict's layout."""
  layout = reference_numpy.read_layout(REFERENCE / reference_numpy.LAYOUT_FILE)[architecture]
  stats = [key for key in layout if key.endswith(("running_mean", "running_var"))]
  params = [key for key in layout if key not in stats and not key.endswith("num_batches_tracked")]
  return sum(math.prod(layout[k]) for k in params), sum(math.prod(layout[k]) for k in stats)


@pytest.mark.parametrize("head", heads.HEAD_NAMES)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_summary_rows_and_totals(model_name, head):
  num_tags = HIERARCHY.num_fine
  model = build(model_name, head, num_tags)
  variables = tagger.abstract_variables(model)
  rows = {name: (shape, count) for name, shape, count in summary.layer_rows(model, depth=2)}
  # The three stages split the parameters, and each stage's are its own.
  assert [name for name in rows if "/" not in name] == ["frontend", "backend", "head"]
  for stage in ("frontend", "backend", "head"):
    assert rows[stage][1] == sizes(variables["params"][stage])
  # The head's row counts what the head itself initialises for this embedding, tags and hierarchy.
  embedding = EMBEDDING[MODELS[model_name][1]]
  head_params = jax.eval_shape(lambda rng: heads.init_params(rng, head, embedding, num_tags, model.hierarchy,
                                                             model.head_options), jax.random.key(0))
  assert rows["head"][1] == sizes(head_params)
  assert rows["backend"][0] == f"(1, {embedding})"
  assert totals(summary.summary_text(model)) == (sizes(variables["params"]), sizes(variables["batch_stats"]))


@pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"reference files not found at {REFERENCE}")
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.slow
def test_summary_command_counts_the_reference_models(model_name):
  """The real command on each model's config: the reference state_dict's parameters and running statistics."""
  config = REPO / "configs" / f"mtat.py:{model_name}"
  done = subprocess.run([sys.executable, "-m", "flaxtag.summary", "--config", str(config)], capture_output=True,
                        text=True, cwd=REPO, check=False)
  assert done.returncode == 0, done.stderr
  assert totals(done.stdout) == reference_counts(MODELS[model_name][2])


@pytest.mark.parametrize("head", heads.HEAD_NAMES)
@pytest.mark.slow
def test_summary_command_for_every_head(head, tmp_path):
  """Spec+Att on the synthetic instruments without the dataset built: the hierarchy is the one data_prep ships."""
  config = REPO / "configs" / f"synth.py:{head}"
  done = subprocess.run([sys.executable, "-m", "flaxtag.summary", "--config", str(config), "--depth=1",
                         f"--config.data.data_dir={tmp_path}"], capture_output=True, text=True, cwd=REPO, check=False)
  assert done.returncode == 0, done.stderr
  assert f"head '{head}'" in done.stdout
  model = build("spec_att", head, HIERARCHY.num_fine)
  variables = tagger.abstract_variables(model)
  assert totals(done.stdout) == (sizes(variables["params"]), sizes(variables["batch_stats"]))
  assert re.search(rf"^head +{sizes(variables['params']['head']):,}$", done.stdout, re.M)
