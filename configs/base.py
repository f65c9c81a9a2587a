"""Base config: method A's Spec+Att on MagnaTagATune (top-50, clean split), with the paper's recipe.

Experiment files import this and change a few fields. On the command line:
  --config configs/mtat_spec_att.py --config.model.conv_channels=8
"""
import ml_collections

from flaxtag import optim


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.model = model = ml_collections.ConfigDict()
  model.frontend = "spec"  # 'spec' | 'raw'
  model.backend = "attention"  # 'attention' | 'cnn_p' (after spec) | 'cnn_l' (after raw)
  model.conv_channels = 16  # c of SPEC §2 (16 in A's training recipe, 8 in its visualisation model)
  model.num_tags = 50
  model.head = "flat"  # flat | multitask | multitask_hloss | top_down | gmp | resatt
  # heads.HeadOptions' defaults; the ResAtt form (masked softmax over a direct base) is the study's (RESULTS.md).
  model.head_options = ml_collections.ConfigDict(dict(
      coarse_weight=1.0, hierarchy_loss_weight=1.0, resatt_base="direct", resatt_attention="softmax",
      resatt_input_dependent=False, resatt_masked=True, resatt_dim=64, resatt_lambda_init=1.0))
  model.hierarchy_file = ""  # coarse → fine JSON/YAML; empty: the dataset's own (hierarchical sets)
  model.head_dropout = 0.5
  model.features = ml_collections.ConfigDict(dict(
      sample_rate=16000, n_fft=512, hop_length=256, n_mels=96, f_min=0.0, f_max=8000.0,
      mel_scale="slaney",  # 'slaney' (librosa's default, A's reference) | 'htk' (torchaudio's default)
      db_scale="power",  # 'power': 10·log10 | 'amplitude': A's code, 20·log10 of the power spectrogram
      top_db=80.0))
  model.encoder = ml_collections.ConfigDict(dict(
      width=512, num_layers=2, num_heads=8, mlp_dim=2048, dropout=0.4, attention_dropout=0.4,
      layer_norm_epsilon=1e-12,
      cls_token="fixed",  # 'fixed' (A's RandomState(0) vector) | 'learned'
      positions="sinusoidal",  # 'sinusoidal' | 'learned' (A's visualisation model)
      max_positions=512))

  config.data = data = ml_collections.ConfigDict()
  data.name = "mtat/top50_clean"  # a dataset built by `python -m data_prep.build`
  data.data_dir = "~/tensorflow_datasets"
  data.worker_count = 0  # grain worker processes per host; 0 reads in threads, fastest here (BENCHMARKS.md)

  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 16  # global: split over all devices of all hosts
  train.eval_batch_size = 16  # clips (×16 crops each)
  train.num_epochs = 200
  train.log_every_steps = 50
  train.eval_every_epochs = 1  # validation (16 crops per clip) after every k-th epoch and the last
  train.checkpoints_to_keep = 2  # the latest k, plus the best by validation ROC-AUC

  config.optim = optim.recipe_config()  # Adam 1e-4 → SGD (Nesterov 0.9, wd 1e-4) 1e-3 at epoch 60, ×0.1 at 80, 100

  config.half_precision = False  # bfloat16 compute on GPU/TPU; parameters stay float32
  config.seed = 0
  return config
