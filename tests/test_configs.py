"""Every shipped config, loaded as `--config FILE[:ARG]` loads it: the fields it changes from configs/base.py, a model
whose variables initialise (abstractly) to the shapes the config says, an optimizer that builds; the demo's schedule
follows its length; a bad argument names the valid variants; the hierarchy files of the instrument families are
found from any directory."""
import pathlib
import re

import pytest
from ml_collections.config_flags import config_flags

from configs import base, demo, mtat
from data_prep.synth_instruments import render
from flaxtag import optim
from flaxtag.errors import ConfigError
from flaxtag.hierarchy import Hierarchy, load_hierarchy
from flaxtag.models import heads, tagger

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"

# What each config changes from the base, written out: the values of the one-file-per-variant configs these
# arguments replaced (configs/mtat_raw_att.py, synth_resatt.py, ...), and of the demo and the study.
SYNTH = {"data.name": "synth_instruments", "model.num_tags": 25, "train.num_epochs": 20, "train.log_every_steps": 20,
         "optim.switch": "none"}
MTAT_MODELS = {"spec_att": {}, "raw_att": {"model.frontend": "raw"}, "spec_cnnp": {"model.backend": "cnn_p"},
               "raw_cnnl": {"model.frontend": "raw", "model.backend": "cnn_l"}}
RUNLOCAL = {"model.conv_channels": 8, "model.features.n_mels": 64, "model.encoder.width": 128,
            "model.encoder.num_heads": 4, "model.encoder.mlp_dim": 256, "train.batch_size": 8,
            "train.eval_batch_size": 8, "train.num_epochs": 2, "train.log_every_steps": 10}
DEMO = {**SYNTH, **RUNLOCAL, "model.head": "gmp", "data.data_dir": "demo_out/data", "model.encoder.dropout": 0.0,
        "model.encoder.attention_dropout": 0.0, "model.head_dropout": 0.1, "train.num_epochs": 24,
        "train.eval_every_epochs": 4, "train.log_every_steps": 25, "optim.adam_lr": 5e-4,
        "optim.adam_warmup_epochs": 0.5, "optim.adam_decay_epochs": 24.0}
HIERARCHIES = CONFIGS.parent / "data_prep" / "hierarchies"
MTAT_INSTRUMENTS = {"model.head": "gmp", "model.num_tags": 10,
                    "model.hierarchy_file": str(HIERARCHIES / "mtat_instruments.yaml")}
JAMENDO_INSTRUMENTS = {"data.name": "mtg_jamendo/instrument", "model.head": "gmp", "model.num_tags": 32,
                       "model.hierarchy_file": str(HIERARCHIES / "mtg_jamendo_instruments.yaml")}
INSTRUMENT_FAMILIES = ("mtat_instruments.py", "jamendo_instruments.py")
CHANGES = {
    "mtat.py": {},
    **{f"mtat.py:{variant}": changes for variant, changes in MTAT_MODELS.items()},
    **{f"msd.py:{variant}": {**changes, "data.name": "msd"} for variant, changes in MTAT_MODELS.items()},
    "synth.py": {**SYNTH, "model.head": "gmp"},
    "synth.py:flat": SYNTH,  # the base's head
    **{f"synth.py:{head}": {**SYNTH, "model.head": head}
       for head in ("multitask", "multitask_hloss", "top_down", "gmp", "resatt")},
    "mtat.py:raw_att,runlocal": {"model.frontend": "raw", **RUNLOCAL},
    "msd.py:runlocal": {"data.name": "msd", **RUNLOCAL},
    "synth.py:runlocal,resatt": {**SYNTH, **RUNLOCAL, "model.head": "resatt"},
    "demo.py": DEMO,
    # The base's validation every epoch and no decay: the study's keys are the demo's but for those.
    "study.py": {**{k: v for k, v in DEMO.items() if k not in ("train.eval_every_epochs", "optim.adam_decay_epochs")},
                 "train.num_epochs": 80, "train.early_stopping_patience": 5, "model.cnn_p.channels": 96,
                 "model.cnn_p.embed_dim": 128},
    "mtat_instruments.py": MTAT_INSTRUMENTS,
    "mtat_instruments.py:flat": {k: v for k, v in MTAT_INSTRUMENTS.items() if k != "model.head"},  # the base's head
    "mtat_instruments.py:resatt,runlocal": {**MTAT_INSTRUMENTS, **RUNLOCAL, "model.head": "resatt"},
    "jamendo_instruments.py": JAMENDO_INSTRUMENTS,
    "jamendo_instruments.py:top_down,runlocal": {**JAMENDO_INSTRUMENTS, **RUNLOCAL, "model.head": "top_down"},
}
# Every variant of every family, and each family shrunk.
EVERY_CONFIG = sorted({*CHANGES,
                       *(f"{family}:{variant}" for family in ("mtat.py", "msd.py") for variant in mtat.MODELS),
                       *(f"{family}:{head}" for family in ("synth.py", *INSTRUMENT_FAMILIES)
                         for head in heads.HEAD_NAMES),
                       *(f"{family}:runlocal" for family in ("mtat.py", "msd.py", "synth.py", *INSTRUMENT_FAMILIES))})


def load(spec: str):
  """The config of `--config configs/SPEC`, parsed as the command line parses it."""
  return config_flags.ConfigFileFlagParser(name="config").parse(str(CONFIGS / spec))


def flatten(config) -> dict:
  return dict(_items(config.to_dict()))


def _items(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _items(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def test_the_config_files_are_the_families_the_demo_and_the_study():
  assert sorted(p.name for p in CONFIGS.glob("*.py")) == [
      "__init__.py", "base.py", "demo.py", "jamendo_instruments.py", "msd.py", "mtat.py", "mtat_instruments.py",
      "study.py", "synth.py"]


@pytest.mark.parametrize("spec", list(CHANGES))
def test_each_config_changes_exactly_its_fields_from_the_base(spec):
  base_values, values = flatten(base.get_config()), flatten(load(spec))
  assert values.keys() == base_values.keys()
  assert {key: value for key, value in values.items() if value != base_values[key]} == CHANGES[spec]


@pytest.mark.parametrize("spec", EVERY_CONFIG)
def test_every_config_initialises_its_model_and_builds_its_optimizer(spec):
  config = load(spec)
  if config.model.hierarchy_file:
    hierarchy = load_hierarchy(config.model.hierarchy_file)
  else:
    hierarchy = Hierarchy.from_mapping(render.hierarchy()) if heads.needs_hierarchy(config.model.head) else None
  model = tagger.build_model(config.model, hierarchy)
  params = tagger.abstract_variables(model)["params"]  # jax.eval_shape: shapes that do not fit fail here
  embedding = {"attention": config.model.encoder.width, "cnn_p": 500, "cnn_l": 512}[config.model.backend]
  assert params["head"]["fine"]["kernel"].shape == (embedding, config.model.num_tags)
  optim.make_optimizer(optim.in_steps(config.optim, steps_per_epoch=10))
  assert config.train.batch_size % 8 == 0  # splits over the tests' 8-device CPU mesh (and any CPU of 1, 2, 4, 8 cores)


@pytest.mark.parametrize("spec", ["mtat.py:small", "msd.py:spec_att,raw_att", "synth.py:resatt,runlocl",
                                  "mtat_instruments.py:spec_att", "jamendo_instruments.py:gpm"])
def test_a_bad_argument_names_the_valid_variants(spec):
  family, arg = spec.split(":")
  valid = {"mtat.py": mtat.MODELS, "msd.py": mtat.MODELS}.get(family, heads.HEAD_NAMES)
  with pytest.raises(ConfigError, match=re.escape(f"bad config argument '{arg}': valid variants are {list(valid)}")):
    load(spec)


def test_demo_learning_rate_decays_to_zero_at_the_last_epoch_of_any_length():
  config = demo.get_config()
  config.train.num_epochs = 20
  steps = optim.in_steps(config.optim, steps_per_epoch=125)
  assert (steps.adam_warmup_steps, steps.adam_decay_steps) == (62, 2500)


def test_base_config_head_options_are_the_library_defaults():
  assert heads.HeadOptions.from_dict(base.get_config().model.head_options) == heads.HeadOptions()


@pytest.mark.parametrize("family", INSTRUMENT_FAMILIES)
def test_instrument_families_find_their_hierarchy_from_any_directory(family, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = load(family)
  assert pathlib.Path(config.model.hierarchy_file).is_absolute()
  assert config.model.num_tags == load_hierarchy(config.model.hierarchy_file).num_fine
