"""MSD top-50 (201,680 / 11,774 / 28,435 tracks), the same model and recipe as mtat_raw_cnnl."""
from configs import mtat_raw_cnnl


def get_config():
  config = mtat_raw_cnnl.get_config()
  config.data.name = "msd"
  return config
