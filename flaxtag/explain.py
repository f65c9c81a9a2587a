"""What an attention model looks at in one crop of a file (SPEC §8), as PNG figures and an .npz of the same arrays.

  python -m flaxtag.explain FILE --workdir W --out DIR [--tags guitar,piano] [--checkpoint best|latest|STEP]
      [--offset_seconds S] [--chunk_size 32]

The crop: the one starting at --offset_seconds (moved back to end with the file if it would run past it), or else
the loudest (highest RMS) of the file's 16 evaluation crops, which is rarely an intro or a fade. A file shorter than
a crop is zero-padded to one.

Written to DIR, named after FILE's stem:
  STEM_attention.png     the log-mel spectrogram with two strips under it, aligned in time: the last layer's [CLS]
                         query row over the audio tokens, summed over heads (the [CLS] key's own weight is left out
                         of the strip and given in its label), and the attention each audio token receives in the
                         first layer, summed over queries and heads.
  STEM_contribution.png  the spectrogram over the tag-wise contribution map of the chosen tags (default: the 5 most
                         probable in the crop): for token t, the tag probabilities with the last layer's attention
                         forced one-hot on t (every head, every query attends to t only).
  STEM_resatt.png        ResAtt models only: the head's coarse × fine attention map.
  STEM_explain.npz       the arrays of the figures (see `Explanation`).

Models without attention (CNN P / CNN L back-ends) are refused; `python -m flaxtag.tag FILE --timeline` shows how
their tags change over time.
"""
import dataclasses
import os
import sys

from absl import app
from absl import flags
import numpy as np

from flaxtag import audio, cli, crops, sharding
from flaxtag.errors import FlaxtagError
from flaxtag.inference import Tagger
from flaxtag.models import heads

DEFAULT_NUM_TAGS = 5
CHUNK_SIZE = 32


class ExplainError(FlaxtagError, ValueError):
  """The model or the request cannot be explained: no attention back-end, unknown tag names."""


@dataclasses.dataclass(frozen=True)
class Explanation:
  """SPEC §8 maps of one crop. Audio tokens are numbered 0..T-1; [CLS] is token 0 of the model's T+1.

  spectrogram: (n_mels, frames) log-mel (dB) of the crop, with the model's mel settings.
  frame_seconds: (frames,) centre time of each spectrogram frame, in seconds from the start of the file.
  token_seconds: (T,) centre time of each audio token.
  last_layer_cls: (T,) last layer, [CLS] query's attention to each audio token, summed over heads.
  last_layer_cls_self: the [CLS] query's attention to the [CLS] key in the last layer (left out of the strip).
  first_layer_received: (T,) first layer, attention each audio token receives, summed over queries and heads.
  first_layer_cls_received: the same for the [CLS] token.
  probabilities: (num_tags,) the crop's tag probabilities, unforced.
  contribution: (T+1, num_tags) tag probabilities with the last layer's attention one-hot on token t (row 0: on
    [CLS]; row t+1: on audio token t).
  coarse_probabilities, contribution_coarse: the same for the coarse tags of a hierarchical model, else None.
  tag_names, coarse_tag_names: names of the columns.
  chosen_tags: the tags plotted; names of fine, or, failing that, coarse tags.
  resatt_attention: (num_coarse, num_fine) the ResAtt head's attention map (for this crop), else None.
  offset_seconds, crop_seconds: where the crop starts in the file, and its length.
  """
  spectrogram: np.ndarray
  frame_seconds: np.ndarray
  token_seconds: np.ndarray
  last_layer_cls: np.ndarray
  last_layer_cls_self: float
  first_layer_received: np.ndarray
  first_layer_cls_received: float
  probabilities: np.ndarray
  contribution: np.ndarray
  coarse_probabilities: np.ndarray | None
  contribution_coarse: np.ndarray | None
  tag_names: list[str]
  coarse_tag_names: list[str] | None
  chosen_tags: list[str]
  resatt_attention: np.ndarray | None
  offset_seconds: float
  crop_seconds: float

  def chosen_contribution(self) -> np.ndarray:
    """(T, len(chosen_tags)): the contribution map of the chosen tags over the audio tokens."""
    columns = []
    for name in self.chosen_tags:
      if name in self.tag_names:
        columns.append(self.contribution[1:, self.tag_names.index(name)])
      else:
        columns.append(self.contribution_coarse[1:, self.coarse_tag_names.index(name)])
    return np.stack(columns, axis=1)

  def arrays(self) -> dict[str, np.ndarray]:
    """Everything as named numpy arrays (strings as unicode arrays, so np.load needs no pickle)."""
    out = {}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if value is not None:
        out[field.name] = np.asarray(value)
    out["chosen_contribution"] = self.chosen_contribution()
    return out


def refuse_without_attention(tagger: Tagger, workdir=None):
  """Raises ExplainError unless the model has an attention back-end."""
  if not tagger.has_attention:
    where = f" in {workdir}" if workdir else ""
    raise ExplainError(
        f"the model{where} is {tagger.model.frontend}+{tagger.model.backend}: a CNN back-end has no self-attention, "
        "so there are no attention or contribution maps to show. See how its tags change over time instead: "
        f"python -m flaxtag.tag FILE --workdir {workdir or 'W'} --timeline")


def select_crop(tagger: Tagger, waveform: np.ndarray, offset_seconds: float | None = None) -> tuple[np.ndarray, int]:
  """(crop, start sample): at `offset_seconds` (kept inside the file), else the loudest evaluation crop."""
  if offset_seconds is None:
    start = crops.loudest_offset(waveform, tagger.crop_samples)
  else:
    if offset_seconds < 0:
      raise ExplainError(f"--offset_seconds must be >= 0, got {offset_seconds}.")
    start = min(int(round(offset_seconds * tagger.sample_rate)), max(len(waveform) - tagger.crop_samples, 0))
  return crops.cut(waveform, [start], tagger.crop_samples)[0], start


def contribution_map(tagger: Tagger, crop: np.ndarray, num_tokens: int, chunk_size: int = CHUNK_SIZE):
  """(fine (T+1, F), coarse (T+1, C) or None): probabilities with the last layer's attention one-hot on each token.

  The T+1 forward passes run in equal chunks of about `chunk_size` rows, so the model compiles once.
  """
  num_chunks = -(-num_tokens // chunk_size)
  size = tagger.round_batch(-(-num_tokens // num_chunks))
  repeated = np.broadcast_to(crop, (num_tokens, len(crop)))
  return tagger.predict(repeated, forced_attention=np.eye(num_tokens, dtype=np.float32), batch_size=size)


def _check_tags(tagger: Tagger, tags):
  known = set(tagger.tag_names) | set(tagger.coarse_tag_names or [])
  unknown = [t for t in tags or () if t not in known]
  if unknown:
    coarse = f"; coarse tags: {', '.join(tagger.coarse_tag_names)}" if tagger.coarse_tag_names else ""
    raise ExplainError(f"unknown tag(s) {', '.join(unknown)}. The model's tags: {', '.join(tagger.tag_names)}"
                       f"{coarse}.")


def _top_tags(tagger: Tagger, probabilities) -> list[str]:
  return [tagger.tag_names[i] for i in np.argsort(-probabilities, kind="stable")[:DEFAULT_NUM_TAGS]]


def explain(tagger: Tagger, waveform: np.ndarray, tags=None, offset_seconds: float | None = None,
            chunk_size: int = CHUNK_SIZE) -> Explanation:
  """The SPEC §8 maps of one crop of a mono clip at the model's rate (see the module docstring for which crop)."""
  refuse_without_attention(tagger)
  _check_tags(tagger, tags)
  waveform = tagger.check_clip(waveform)
  crop, start = select_crop(tagger, waveform, offset_seconds)
  seen = tagger.inspect(crop[None])
  first, last = seen.attention[0][0], seen.attention[-1][0]  # (heads, T+1, T+1)
  cls_row = last[:, 0, :].sum(axis=0)
  received = first.sum(axis=(0, 1))
  contribution, contribution_coarse = contribution_map(tagger, crop, last.shape[-1], chunk_size)
  resatt = seen.head_attention[0] if heads.HEADS[tagger.model.head].learned_map else None

  sr, mel = tagger.sample_rate, tagger.model.mel
  spectrogram = np.asarray(audio.log_mel_spectrogram(crop[None], mel))[0]
  num_tokens = last.shape[-1] - 1
  if tagger.model.frontend == "spec":  # a token is an STFT frame, centred on its hop
    token_samples = np.arange(num_tokens) * mel.hop_length
  else:
    token_samples = (np.arange(num_tokens) + 0.5) * (len(crop) / num_tokens)
  return Explanation(
      spectrogram=spectrogram,
      frame_seconds=(start + np.arange(spectrogram.shape[1]) * mel.hop_length) / sr,
      token_seconds=(start + token_samples) / sr,
      last_layer_cls=cls_row[1:],
      last_layer_cls_self=float(cls_row[0]),
      first_layer_received=received[1:],
      first_layer_cls_received=float(received[0]),
      probabilities=seen.fine[0],
      contribution=contribution,
      coarse_probabilities=None if seen.coarse is None else seen.coarse[0],
      contribution_coarse=contribution_coarse,
      tag_names=tagger.tag_names,
      coarse_tag_names=tagger.coarse_tag_names,
      chosen_tags=list(tags) if tags else _top_tags(tagger, seen.fine[0]),
      resatt_attention=resatt,
      offset_seconds=start / sr,
      crop_seconds=len(crop) / sr)


def save(explanation: Explanation, out_dir, stem: str, title: str = "") -> list[str]:
  """Writes the figures and the .npz to `out_dir`; returns their paths."""
  from flaxtag import plots  # pylint: disable=g-import-not-at-top  (matplotlib is slow to import)
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, f"{stem}_attention.png"), os.path.join(out_dir, f"{stem}_contribution.png")]
  plots.attention_figure(explanation, title).savefig(paths[0])
  plots.contribution_figure(explanation, title).savefig(paths[1])
  if explanation.resatt_attention is not None:
    paths.append(os.path.join(out_dir, f"{stem}_resatt.png"))
    plots.resatt_figure(explanation, title).savefig(paths[-1])
  paths.append(os.path.join(out_dir, f"{stem}_explain.npz"))
  np.savez(paths[-1], **explanation.arrays())
  return paths


def define_flags():
  """The command line's flags, defined only when run as a program: other modules define flags of the same names."""
  flags.DEFINE_string("workdir", None, "Run directory holding the checkpoints.", required=True)
  flags.DEFINE_string("out", None, "Directory for the figures and the .npz.", required=True)
  flags.DEFINE_list("tags", [], "Tags of the contribution map (default: the 5 most probable in the crop).")
  flags.DEFINE_string("checkpoint", "best", "'best' (by validation ROC-AUC), 'latest', or a step number.")
  flags.DEFINE_float("offset_seconds", None, "Start of the crop in seconds (default: the loudest crop).")
  flags.DEFINE_integer("chunk_size", CHUNK_SIZE, "Forced-attention passes per batch.", lower_bound=1)


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m flaxtag.explain FILE --workdir W --out DIR [--tags a,b]")
  f, path = flags.FLAGS, argv[1]
  # One device per core: XLA:CPU runs many of one device's ops on one thread (1.5x the crops/s on 2 cores).
  sharding.split_cpu()
  tagger = Tagger.load(f.workdir, f.checkpoint)
  refuse_without_attention(tagger, f.workdir)
  stem = os.path.splitext(os.path.basename(path))[0]
  cli.make_output_folder(os.path.join(f.out, f"{stem}_explain.npz"))  # before the work, as eval and tag
  explanation = explain(tagger, tagger.load_clip(path), f.tags, f.offset_seconds, f.chunk_size)
  start = explanation.offset_seconds
  print(f"{path}: crop {start:.2f}-{start + explanation.crop_seconds:.2f} s; "
        f"tags {', '.join(explanation.chosen_tags)}", file=sys.stderr)
  for written in save(explanation, f.out, stem, title=os.path.basename(path)):
    print(f"wrote {written}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
