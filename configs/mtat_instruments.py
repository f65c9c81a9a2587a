"""Method B on real instruments: MTAT top-50's instrument tags in families (data_prep/hierarchies/
mtat_instruments.yaml), Spec+Att with a hierarchical head: `--config configs/mtat_instruments.py:HEAD`, any head of
flaxtag.models.heads; the default is GMP. The model trains and is evaluated on the file's fine tags only, with the
base's recipe (the paper's, for MTAT). `configs/mtat_instruments.py:HEAD,runlocal` shrinks the run for a laptop.
"""
from configs import base


def get_config(arg: str = ""):
  return base.hierarchy_family(arg, "mtat/top50_clean", "mtat_instruments.yaml")
