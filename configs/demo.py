"""`make demo`: Spec+Att with the GMP head on the synthetic multi-instrument set, sized for a 2-core CPU.

A narrower model than the paper's (c=8, a 128-wide encoder) trained for minutes, not days: batch 8 (four times
the updates per epoch of batch 32, which learned markedly slower per epoch here), Adam with a short warm-up and a
cosine decay to 0 at the last epoch, and little dropout (a 12-epoch run underfits; dropout only slowed it).
Everything else is the method of configs/synth.py. Measured figures: README.md.
"""
from configs import synth


def get_config():
  config = synth.get_config()
  config.data.data_dir = "demo_out/data"
  config.model.conv_channels = 8
  config.model.encoder.update(width=128, num_heads=4, mlp_dim=256, dropout=0.0, attention_dropout=0.0)
  config.model.head_dropout = 0.1
  config.train.batch_size = 8
  config.train.eval_batch_size = 8
  config.train.num_epochs = 12
  config.train.log_every_steps = 25
  config.optim.adam_lr = 5e-4
  config.optim.adam_warmup_epochs = 0.5
  # The decay ends with the run, also when --config.train.num_epochs changes it.
  config.optim.adam_decay_epochs = config.train.get_ref("num_epochs").to_float()
  return config
