"""The heads study (`python -m flaxtag.study`, RESULTS.md): the demo's backbone and recipe, shorter, on its pieces (dry).

Six epochs instead of the demo's 24 (validated after the 3rd and the 6th) keep the study (13 variants × 3 seeds)
to hours on a 2-core CPU; the Adam schedule still decays to 0 at the last epoch. flaxtag/study.py sets the head
(or the model) and the seed of each run.
"""
from configs import demo


def get_config():
  config = demo.get_config()
  config.train.num_epochs = 6
  config.train.eval_every_epochs = 3
  return config
