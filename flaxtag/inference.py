"""Inference API: a trained or converted model loaded from its workdir, and its predictions.

  tagger = flaxtag.Tagger.load("runs/spec_att")
  scores = tagger.tag_waveform(tagger.load_clip("song.mp3"))  # 16 evenly spaced crops, probabilities averaged
  scores.fine, scores.coarse                                  # (num_tags,), (num_coarse,) or None
  fine, coarse = tagger.predict(batch)                        # (B, samples), or (B, 96, frames) log-mel for Spec

Where crops start and how they are cut: `flaxtag.crops`. Many files, decoded in threads while the model runs:
`flaxtag.tag.iter_tag_files`.

Inference mode: dropout off, BatchNorm uses its running statistics. Every batch is split over all local devices
(`flaxtag.sharding`'s mesh over `jax.local_devices()`, the batch axis sharded over `data`, the variables
replicated; `Tagger._run` is the one place here that places arrays), with batch sizes rounded up to a multiple of
the device count, and each device runs the forward on its own rows (`sharding.per_device`). On a CPU,
`sharding.split_cpu()` (the tag, explain and eval commands call it) makes those devices one per core.
"""
import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flaxtag import audio, checkpoint, crops, sharding
from flaxtag.hierarchy import Hierarchy
from flaxtag.models import heads, tagger

BATCH_SIZE = 16
# Shorter clips are refused: a crop would be mostly zero padding, and its tags mostly about the padding.
MIN_CLIP_SECONDS = 1.0


@dataclasses.dataclass(frozen=True)
class Scores:
  """Tag probabilities of one clip.

  fine: (num_tags,) whole-clip probabilities (the mean over crops) or, for a timeline, (n, num_tags), one row a crop.
  coarse: the same for the coarse tags of a hierarchical model (derived by the max rule for a flat head that has a
    hierarchy); None for models without one.
  starts: (n,) start time in seconds of each crop scored.
  crop_seconds: length of one crop in seconds.
  duration: length of the clip in seconds.
  """
  fine: np.ndarray
  coarse: np.ndarray | None
  starts: np.ndarray
  crop_seconds: float
  duration: float

  @property
  def ends(self) -> np.ndarray:
    """(n,) end time of each crop in seconds; a crop zero-padded past the end of the clip ends with the clip."""
    return np.minimum(self.starts + self.crop_seconds, self.duration)


@dataclasses.dataclass(frozen=True)
class Inspection:
  """One forward pass of a batch, shown from inside (`Tagger.inspect`).

  fine, coarse: probabilities as `Tagger.predict` gives them.
  attention: for an attention back-end, every encoder layer's attention probabilities (after softmax, before
    dropout), (B, heads, T+1, T+1) each, token 0 being [CLS]; an empty list for CNN back-ends.
  head_attention: (B, num_coarse, num_fine), the coarse × fine map of a ResAtt (or GMP) head, else None.
  """
  fine: np.ndarray
  coarse: np.ndarray | None
  attention: list[np.ndarray]
  head_attention: np.ndarray | None


class Tagger:
  """A model with its variables, config and metadata (tag names, hierarchy), ready to tag audio."""

  def __init__(self, model: tagger.MusicTagger, variables, config: ml_collections.ConfigDict, metadata: dict,
               devices: Sequence[jax.Device] | None = None):
    self.model = model
    self.config = config
    self.metadata = metadata
    self.devices = list(devices) if devices else jax.local_devices()
    self.mesh = sharding.make_mesh(devices=self.devices)
    self._batch_sharding = sharding.batch_sharding(self.mesh)
    self.variables = jax.device_put(variables, sharding.replicated(self.mesh))
    self._probs_fn = jax.jit(sharding.per_device(self._probs_impl, self.mesh))
    self._inspect_fn = jax.jit(sharding.per_device(self._inspect_impl, self.mesh))

  @classmethod
  def load(cls, workdir, checkpoint_step: str | int = "best", devices: Sequence[jax.Device] | None = None
           ) -> "Tagger":
    """Loads `best` (by validation ROC-AUC), `latest`, or a step number from WORKDIR/checkpoints; for `best` and
    `latest`, a damaged step is named on stderr and the newest intact step loaded instead.

    `devices` (default: all local devices) are those batches are split over. The model computes in bfloat16 where
    the run did (`config.half_precision`), as its validation did.
    """
    manager = checkpoint.open_manager(workdir, read_only=True)

    def read(step):
      config, metadata = checkpoint.load_config(manager, step)
      hierarchy = None
      if metadata.get("hierarchy"):
        hierarchy = Hierarchy.from_mapping(metadata["hierarchy"], fine_tags=metadata.get("tag_names"),
                                           source=f"{workdir} checkpoint metadata")
      model = tagger.build_model(config.model, hierarchy, config.get("half_precision", False))
      return model, checkpoint.restore_variables(manager, step, tagger.abstract_variables(model)), config, metadata

    # A damaged 'best' or 'latest' step gives way to the newest intact one (named on stderr).
    step, (model, variables, config, metadata) = checkpoint.read_step(manager, checkpoint_step, read)
    manager.close()
    return cls(model, variables, config, {**metadata, "step": step}, devices)

  # --------------------------------------------------------------------------------------------------------------------
  # What the model is.

  @property
  def tag_names(self) -> list[str]:
    """Fine tag names in output order (`tag_i` where the checkpoint names none)."""
    names = self.metadata.get("tag_names")
    return list(names) if names else [f"tag_{i}" for i in range(self.model.num_tags)]

  @property
  def hierarchy(self) -> Hierarchy | None:
    return self.model.hierarchy

  @property
  def coarse_tag_names(self) -> list[str] | None:
    """Coarse tag names of a model with a hierarchy, else None."""
    return list(self.hierarchy.coarse_tags) if self.hierarchy else None

  @property
  def has_attention(self) -> bool:
    return tagger.has_attention(self.model)

  @property
  def sample_rate(self) -> int:
    return self.model.mel.sample_rate

  @property
  def crop_samples(self) -> int:
    return tagger.crop_samples(self.model)

  @property
  def crop_seconds(self) -> float:
    return self.crop_samples / self.sample_rate

  @property
  def min_clip_samples(self) -> int:
    """The shortest clip the model tags (MIN_CLIP_SECONDS)."""
    return int(MIN_CLIP_SECONDS * self.sample_rate)

  def round_batch(self, batch_size: int) -> int:
    """`batch_size` rounded up to a multiple of the number of devices."""
    n = len(self.devices)
    return max(1, -(-batch_size // n)) * n

  # --------------------------------------------------------------------------------------------------------------------
  # Batches of crops.

  def predict(self, batch, forced_attention=None, batch_size: int | None = None
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """Fine (B, num_tags) and coarse (B, num_coarse) probabilities, coarse None for a model without a hierarchy.

    forced_attention: optional (B, tokens + 1), replaces the last encoder layer's attention (SPEC §8).
    batch_size: run in chunks of this many rows, the last one padded, so one compiled program serves every chunk;
      default one chunk of the whole batch.
    """
    arrays = [batch] if forced_attention is None else [batch, forced_attention]
    probs = self._run(self._probs_fn, arrays, batch_size)
    fine = probs[:, :self.model.num_tags]
    return fine, (probs[:, self.model.num_tags:] if self.hierarchy else None)

  def probs(self, batch) -> np.ndarray:
    """Sigmoid probabilities of the (fine) tags, (B, num_tags)."""
    return self.predict(batch)[0]

  def inspect(self, batch) -> Inspection:
    """One forward pass with what it can show: probabilities, every encoder layer's attention, the head's map."""
    probs, layers, head_attention = self._run(self._inspect_fn, [batch])
    fine = probs[:, :self.model.num_tags]
    return Inspection(fine, probs[:, self.model.num_tags:] if self.hierarchy else None, layers, head_attention)

  def _probs_impl(self, variables, x, forced=None):
    return self._probabilities(self.model.apply(variables, x, train=False, forced_attention=forced))

  def _probabilities(self, out: heads.HeadOutputs):
    """Sigmoid of the fine logits, followed by the coarse ones where the model has a hierarchy."""
    logits = out.fine_logits
    coarse = heads.coarse_outputs(out, self.hierarchy)
    if coarse is not None:
      logits = jnp.concatenate([logits, coarse], axis=-1)
    return jax.nn.sigmoid(logits)

  def _inspect_impl(self, variables, x):
    out, state = self.model.apply(variables, x, train=False, mutable=["intermediates"])
    layers = state.get("intermediates", {}).get("backend", {})
    attention = [layers[f"layer_{i}"]["attention"][0] for i in range(len(layers))]
    head_attention = None
    if out.attention is not None:
      head_attention = jnp.broadcast_to(out.attention, (x.shape[0],) + out.attention.shape[1:])
    return self._probabilities(out), attention, head_attention

  def _run(self, fn, arrays: Sequence, batch_size: int | None = None):
    """fn(variables, *chunks) over chunks of `batch_size` rows (rounded up to a multiple of the device count) of
    `arrays`, the batch axis sharded over the devices; the last chunk is zero-padded. Returns numpy, unpadded."""
    n = len(arrays[0])
    if n == 0:
      raise ValueError("an empty batch")
    size = self.round_batch(batch_size or n)
    results = []
    for start in range(0, n, size):
      chunks = []
      for a in arrays:
        chunk = np.asarray(a[start:start + size], np.float32)
        padding = [(0, size - len(chunk))] + [(0, 0)] * (chunk.ndim - 1)
        chunks.append(jax.device_put(np.pad(chunk, padding), self._batch_sharding))
      results.append((fn(self.variables, *chunks), min(size, n - start)))
    # Converted after the loop, so that host work on the next chunk overlaps the device's work on this one.
    results = [jax.tree_util.tree_map(lambda y, k=k: np.asarray(y)[:k], out) for out, k in results]
    return jax.tree_util.tree_map(lambda *ys: np.concatenate(ys), *results)

  # --------------------------------------------------------------------------------------------------------------------
  # Clips.

  def load_clip(self, path) -> np.ndarray:
    """Decodes an audio file (any format libsndfile reads, any rate and channel count) to mono at the model's rate.

    Raises AudioError if the file is unreadable, shorter than MIN_CLIP_SECONDS, or silent.
    """
    return self.check_clip(audio.load_audio(path, self.sample_rate), path)

  def check_clip(self, waveform, path=None) -> np.ndarray:
    """`waveform` as float32 if it is one mono clip the model can tag; else AudioError (too short, silent)."""
    waveform = np.asarray(waveform, np.float32)
    if waveform.ndim != 1:
      raise ValueError(f"expected one mono waveform (samples,), got shape {waveform.shape}")
    return audio.check_clip(waveform, self.min_clip_samples, path, self.sample_rate)

  def tag_waveform(self, waveform, num_crops: int = crops.EVAL_CROPS, batch_size: int = BATCH_SIZE) -> Scores:
    """Whole-clip probabilities of one mono clip at the model's rate: the mean over its evaluation crops."""
    waveform = self.check_clip(waveform)
    offsets = crops.whole_clip_offsets(len(waveform), self.crop_samples, num_crops)
    fine, coarse = self.predict(crops.cut(waveform, offsets, self.crop_samples), batch_size=batch_size)
    return self.scores(fine, coarse, offsets, len(waveform), average=True)

  def timeline(self, waveform, hop_seconds: float | None = None, batch_size: int = BATCH_SIZE) -> Scores:
    """Probabilities of consecutive crops `hop_seconds` apart (default one crop length), one row a crop."""
    waveform = self.check_clip(waveform)
    offsets = crops.timeline_offsets(len(waveform), self.crop_samples, hop_seconds, self.sample_rate)
    fine, coarse = self.predict(crops.cut(waveform, offsets, self.crop_samples), batch_size=batch_size)
    return self.scores(fine, coarse, offsets, len(waveform), average=False)

  def scores(self, fine, coarse, offsets, num_samples, average: bool) -> Scores:
    """The Scores of a clip of `num_samples` from the probabilities of its crops starting at `offsets`: their mean
    with `average`, else one row a crop."""
    if average:
      fine, coarse = fine.mean(axis=0), (None if coarse is None else coarse.mean(axis=0))
    return Scores(fine, coarse, offsets / self.sample_rate, self.crop_seconds, num_samples / self.sample_rate)
