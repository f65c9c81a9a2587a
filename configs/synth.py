"""The synthetic multi-instrument set (25 instruments in 8 families, `python -m data_prep.build synth_instruments`),
Spec+Att with a hierarchical head: `--config configs/synth.py:HEAD`, any head of flaxtag.models.heads (flat,
multitask, multitask_hloss, top_down, gmp, resatt); the default is GMP, the proposed head.

Sized for a CPU run: Adam throughout (the recipe's SGD stage is for 100+ epoch runs), fewer epochs.
`configs/synth.py:HEAD,runlocal` shrinks it further (base.runlocal).
"""
from configs import base
from flaxtag.models import heads


def get_config(arg: str = ""):
  head, runlocal = base.parse_arg(arg, heads.HEAD_NAMES, default=heads.GMP)
  config = base.get_config()
  config.data.name = "synth_instruments"
  config.model.num_tags = 25
  config.model.head = head
  config.train.num_epochs = 20
  config.train.log_every_steps = 20
  config.optim.switch = "none"
  return base.runlocal(config) if runlocal else config
