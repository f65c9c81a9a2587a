"""MTAT top-50, Spec+CNN P: the Pons front-end and CNN back-end."""
from configs import base


def get_config():
  config = base.get_config()
  config.model.frontend = "spec"
  config.model.backend = "cnn_p"
  return config
