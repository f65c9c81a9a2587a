"""MTAT top-50, Raw+Att: the sample-level CNN front-end (270 tokens) and the attention back-end."""
from configs import base


def get_config():
  config = base.get_config()
  config.model.frontend = "raw"
  config.model.backend = "attention"
  return config
