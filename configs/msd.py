"""MSD top-50 (201,680 / 11,774 / 28,435 tracks), the same models and recipe as configs/mtat.py, whose variants it
takes: `--config configs/msd.py:raw_cnnl`."""
from configs import mtat


def get_config(arg: str = ""):
  config = mtat.get_config(arg)
  config.data.name = "msd"
  return config
