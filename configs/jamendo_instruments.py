"""Method B on real instruments: MTG-Jamendo's instrument tags in families (data_prep/hierarchies/
mtg_jamendo_instruments.yaml), Spec+Att with a hierarchical head: `--config configs/jamendo_instruments.py:HEAD`,
any head of flaxtag.models.heads; the default is GMP. The model trains and is evaluated on the file's fine tags
only, with the base's recipe. `configs/jamendo_instruments.py:HEAD,runlocal` shrinks the run for a laptop.
"""
from configs import base


def get_config(arg: str = ""):
  return base.hierarchy_family(arg, "mtg_jamendo/instrument", "mtg_jamendo_instruments.yaml")
