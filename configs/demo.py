"""`make demo`: Spec+Att with the GMP head on the synthetic multi-instrument set, sized for a 2-core CPU.

A smaller model than the paper's (configs/synth.py:gmp,runlocal: c=8, 64 mel bands, a 128-wide encoder) trained for
minutes, not days. Choices measured on this set (validation fine ROC-AUC by epoch, BENCHMARKS.md): batch 8 learns
far faster per epoch than batch 32 (four times the updates); Adam with a short warm-up and a cosine decay to 0 at the
last epoch; little dropout (these short runs underfit, and dropout only slowed them); 64 mel bands learn as fast per
epoch as 96 at ~25 % less time per step; validation every 4 epochs; 1,500 training clips (`python -m flaxtag.demo`'s
default) for 24 epochs: 1,500 for 20 validated better than 1,000 for 24 (25 % more steps, more pieces), and 24
epochs of 1,500 better than 20 once one CPU device per core made the steps faster (BENCHMARKS.md).
Everything else is the method of configs/synth.py.
"""
from configs import synth


def get_config():
  config = synth.get_config("gmp,runlocal")
  config.data.data_dir = "demo_out/data"
  config.model.encoder.update(dropout=0.0, attention_dropout=0.0)
  config.model.head_dropout = 0.1
  config.train.num_epochs = 24
  config.train.eval_every_epochs = 4
  config.train.log_every_steps = 25
  config.optim.adam_lr = 5e-4
  config.optim.adam_warmup_epochs = 0.5
  # The decay ends with the run, also when --config.train.num_epochs changes it.
  config.optim.adam_decay_epochs = config.train.get_ref("num_epochs").to_float()
  return config
