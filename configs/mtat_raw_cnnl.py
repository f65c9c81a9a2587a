"""MTAT top-50, Raw+CNN L: the sample-level CNN of Lee et al. (c=16)."""
from configs import base


def get_config():
  config = base.get_config()
  config.model.frontend = "raw"
  config.model.backend = "cnn_l"
  return config
