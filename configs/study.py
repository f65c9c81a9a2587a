"""The heads study (`python -m flaxtag.study`, RESULTS.md): the demo's backbone and recipe on its pieces (dry), run to
convergence.

Every run validates after every epoch and stops after `train.early_stopping_patience` = 5 validations without a
better validation fine ROC-AUC; the 80-epoch budget is a ceiling that no run is meant to reach (RESULTS.md reports
each run's stopping epoch; the first run measured peaked at epoch 44 and stopped at 49). The Adam learning rate is
constant after the demo's half-epoch warm-up: a cosine decay to 0 at the last epoch would tie every run's schedule
to the ceiling, which early stopping makes arbitrary (a run stopping at epoch 15 of 80 would have seen a barely
decayed rate, one of 6 a fully decayed one).
flaxtag/study.py sets the head (or the model), its weights and the seed of each run.
"""
from configs import demo


def get_config():
  config = demo.get_config()
  config.train.num_epochs = 80
  config.train.eval_every_epochs = 1
  config.train.early_stopping_patience = 5
  config.optim.adam_decay_epochs = 0.0
  # Spec+CNN P at Spec+Att's capacity (333,403 against 334,203 parameters) for the four-model comparison.
  config.model.cnn_p.update(channels=96, embed_dim=128)
  return config
