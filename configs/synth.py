"""The synthetic multi-instrument set (25 instruments in 8 families, `python -m data_prep.build synth_instruments`),
Spec+Att with a hierarchical head. Files synth_<head>.py pick the head; this one is GMP, the proposed head.

Sized for a CPU run: Adam throughout (the recipe's SGD stage is for 100+ epoch runs), fewer epochs.
"""
from configs import base


def get_config():
  config = base.get_config()
  config.data.name = "synth_instruments"
  config.model.num_tags = 25
  config.model.head = "gmp"
  config.train.num_epochs = 20
  config.train.log_every_steps = 20
  config.optim.switch = "none"
  return config
