"""MTAT top-50, Spec+Att: the proposed model of method A (Pons front-end, Transformer back-end)."""
from configs import base


def get_config():
  return base.get_config()
