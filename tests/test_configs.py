"""Every shipped config describes a model and an optimizer that build; the demo's schedule follows its length."""
import importlib
import pathlib

import pytest

from configs import base, demo
from data_prep.synth_instruments import render
from flaxtag import optim
from flaxtag.hierarchy import Hierarchy
from flaxtag.models import heads, tagger

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py")
                 if p.stem != "__init__")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_its_model_and_optimizer(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  hierarchy = Hierarchy.from_mapping(render.hierarchy()) if config.model.head != heads.FLAT else None
  model = tagger.build_model(config.model, hierarchy)
  assert model.num_tags == config.model.num_tags
  optim.make_optimizer(optim.in_steps(config.optim, steps_per_epoch=10))
  assert config.train.batch_size % 8 == 0  # splits over the 8-device CPU mesh of the demo and the tests


def test_demo_learning_rate_decays_to_zero_at_the_last_epoch_of_any_length():
  config = demo.get_config()
  config.train.num_epochs = 20
  steps = optim.in_steps(config.optim, steps_per_epoch=125)
  assert (steps.adam_warmup_steps, steps.adam_decay_steps) == (62, 2500)


def test_base_config_head_options_are_the_library_defaults():
  assert heads.HeadOptions.from_dict(base.get_config().model.head_options) == heads.HeadOptions()
