"""`make demo`: builds the Spec+Att model of method A and runs it on a generated clip.

For now the model is untrained (random weights), so its probabilities say nothing yet; the demo shows that the
whole path, from a 16 kHz waveform through the on-device log-mel front-end to tag probabilities, works here.
"""
import time

import jax
import numpy as np

from configs import base
from flaxtag import audio, cli
from flaxtag.models import tagger


def generated_clip(seconds: float = 10.0, sample_rate: int = audio.SAMPLE_RATE) -> np.ndarray:
  """A chord of decaying harmonic tones, one note every half second."""
  t = np.arange(int(seconds * sample_rate)) / sample_rate
  clip = np.zeros_like(t)
  for i, f0 in enumerate(np.tile([220.0, 277.2, 329.6, 440.0], int(seconds))):
    start = i * 0.5
    envelope = np.where(t >= start, np.exp(-(t - start) * 3.0), 0.0)
    clip += envelope * sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 6))
  return (0.3 * clip / np.abs(clip).max()).astype(np.float32)


def main(argv):
  del argv
  config = base.get_config()
  model = tagger.build_model(config.model)
  start = time.perf_counter()
  variables = tagger.init_variables(model, jax.random.key(config.seed))
  clip = generated_clip()
  crop = tagger.crop_samples(model)
  crops = np.stack([clip[i:i + crop] for i in range(0, len(clip) - crop + 1, crop // 2)])
  probs = jax.nn.sigmoid(jax.jit(model.apply)(variables, crops).fine_logits)
  elapsed = time.perf_counter() - start
  print(f"model: {model.frontend} front-end + {model.backend} back-end, "
        f"{tagger.count_parameters(variables['params']):,} parameters (untrained)")
  print(f"input: a generated {len(clip) / audio.SAMPLE_RATE:.0f} s clip → {len(crops)} crops of {crop:,} samples")
  print(f"output: tag probabilities {tuple(probs.shape)}, mean {float(probs.mean()):.3f}, in {elapsed:.1f} s "
        f"on {jax.device_count()} {jax.devices()[0].platform.upper()} device(s)")


if __name__ == "__main__":
  cli.run(main)
