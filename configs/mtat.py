"""MagnaTagATune top-50, the four models of method A with the paper's recipe: `--config configs/mtat.py:VARIANT`.

  spec_att   Spec+Att, the proposed model (Pons front-end, Transformer back-end); the default.
  raw_att    Raw+Att: the sample-level CNN front-end (270 tokens) and the attention back-end.
  spec_cnnp  Spec+CNN P: the Pons front-end and CNN back-end.
  raw_cnnl   Raw+CNN L: the sample-level CNN of Lee et al. (c=16).

`configs/mtat.py:VARIANT,runlocal` shrinks the run for a laptop (base.runlocal).
"""
from configs import base

# variant → its model's front-end and back-end
MODELS = {
    "spec_att": dict(frontend="spec", backend="attention"),
    "raw_att": dict(frontend="raw", backend="attention"),
    "spec_cnnp": dict(frontend="spec", backend="cnn_p"),
    "raw_cnnl": dict(frontend="raw", backend="cnn_l"),
}


def get_config(arg: str = ""):
  variant, runlocal = base.parse_arg(arg, MODELS, default="spec_att")
  config = base.get_config()
  config.model.update(MODELS[variant])
  return base.runlocal(config) if runlocal else config
