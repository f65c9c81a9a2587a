"""Synthetic multi-instrument set, Spec+Att with the 'flat' head (see configs/synth.py)."""
from configs import synth


def get_config():
  config = synth.get_config()
  config.model.head = "flat"
  return config
