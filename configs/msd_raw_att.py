"""MSD top-50 (201,680 / 11,774 / 28,435 tracks), the same model and recipe as mtat_raw_att."""
from configs import mtat_raw_att


def get_config():
  config = mtat_raw_att.get_config()
  config.data.name = "msd"
  return config
