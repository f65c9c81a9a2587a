"""Base config: method A's Spec+Att on MagnaTagATune (top-50, clean split), with the paper's recipe.

One file per family of runs (mtat.py, msd.py, synth.py, mtat_instruments.py, jamendo_instruments.py) imports this
and takes an argument after a colon, big_vision style: a variant of the family and/or `runlocal`, which shrinks the
run for a laptop. On the command line:
  --config configs/mtat.py:raw_cnnl --config.model.conv_channels=8
  --config configs/synth.py:resatt,runlocal
"""
import pathlib
from collections.abc import Collection

import ml_collections

from flaxtag import optim
from flaxtag.errors import ConfigError
from flaxtag.hierarchy import load_hierarchy
from flaxtag.models import heads

RUNLOCAL = "runlocal"
# The shipped hierarchy files, found from this package so that configs work from any directory.
HIERARCHIES = pathlib.Path(__file__).resolve().parents[1] / "data_prep" / "hierarchies"


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
  model.hierarchy_file = ""  # coarse → fine JSON/YAML, over all or some dataset tags; empty: the dataset's own
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
  model.cnn_p = ml_collections.ConfigDict(dict(channels=512, embed_dim=500))  # CNN P's widths (SPEC §3)

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
  train.early_stopping_patience = 0  # end after this many validations in a row without a better ROC-AUC; 0: never

  config.optim = optim.recipe_config()  # Adam 1e-4 → SGD (Nesterov 0.9, wd 1e-4) 1e-3 at epoch 60, ×0.1 at 80, 100

  config.half_precision = False  # bfloat16 compute on GPU/TPU; parameters stay float32
  config.seed = 0
  return config


def parse_arg(arg: str, variants: Collection[str], default: str) -> tuple[str, bool]:
  """(variant, runlocal) of a family's argument 'VARIANT', 'VARIANT,runlocal', 'runlocal' or ''; the variant is
  `default` when none is named."""
  tokens = [token for token in arg.split(",") if token]
  named = [token for token in tokens if token != RUNLOCAL]
  if len(named) > 1 or any(token not in variants for token in named):
    raise ConfigError(f"bad config argument {arg!r}: valid variants are {list(variants)} (default {default!r}), "
                      f"optionally followed by ',{RUNLOCAL}' to shrink the run for a laptop")
  return (named[0] if named else default), RUNLOCAL in tokens


def hierarchy_family(arg: str, dataset: str, file_name: str) -> ml_collections.ConfigDict:
  """A family `HEAD[,runlocal]` (any head of flaxtag.models.heads, default GMP) training on `dataset` with the
  shipped hierarchy file `file_name`, over some of the dataset's tags: model.num_tags follows the file."""
  head, shrink = parse_arg(arg, heads.HEAD_NAMES, default=heads.GMP)
  config = get_config()
  config.data.name = dataset
  config.model.head = head
  config.model.hierarchy_file = str(HIERARCHIES / file_name)
  config.model.num_tags = load_hierarchy(config.model.hierarchy_file).num_fine
  return runlocal(config) if shrink else config


def runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a run for a laptop's CPU: a small model (c=8, 64 mel bands, a 128-wide encoder of 4 heads; the demo's,
  which builds on this), batch 8 (one example per device of the tests' 8-device CPU mesh) and 2 epochs."""
  config.model.conv_channels = 8
  config.model.features.n_mels = 64
  config.model.encoder.update(width=128, num_heads=4, mlp_dim=256)
  config.train.batch_size = 8
  config.train.eval_batch_size = 8
  config.train.num_epochs = 2
  config.train.log_every_steps = 10
  return config
