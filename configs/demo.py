"""`make demo`: Spec+Att with the GMP head on the synthetic multi-instrument set, sized for a 2-core CPU.

A narrower model than the paper's (c=8, a 128-wide encoder) and Adam at 1e-3 throughout, so that the run fits in
minutes; everything else is the method of configs/synth.py.
"""
from configs import synth


def get_config():
  config = synth.get_config()
  config.data.data_dir = "demo_out/data"
  config.model.conv_channels = 8
  config.model.encoder.update(width=128, num_heads=4, mlp_dim=256, dropout=0.1, attention_dropout=0.1)
  config.train.batch_size = 32
  config.train.eval_batch_size = 32
  config.train.num_epochs = 8
  config.train.log_every_steps = 10
  config.optim.adam_lr = 1e-3
  return config
