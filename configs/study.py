"""The heads study (`python -m flaxtag.study`, RESULTS.md): the demo's backbone and budget for every variant.

flaxtag/study.py sets the head (or the model) and the seed of each run on top of this.
"""
from configs import demo


def get_config():
  config = demo.get_config()
  config.data.data_dir = "study_out/data"
  return config
