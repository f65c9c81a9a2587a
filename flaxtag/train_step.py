"""The train state and the jit-compiled train and eval steps over a device mesh.

The train step is one function of (state, batch) → (state, metrics). Its dropout key is derived from the run's
seed and the step number, never from Python state, so a resumed run draws the same masks. BatchNorm statistics
are those of the global batch: under `jax.jit` the batch is one array sharded over the mesh, and XLA reduces
across devices.
"""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from flaxtag import optim, sharding
from flaxtag.models import heads
from flaxtag.models.tagger import MusicTagger, crop_samples


@flax.struct.dataclass
class TrainState:
  """step: updates done. first_nonfinite_step: the first step whose loss or gradient norm was not finite, -1 while
  none was; carried on the device so every step is checked without a host round-trip (never checkpointed: a
  saved state has been checked)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  first_nonfinite_step: jax.Array

  @property
  def variables(self):
    return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(model: MusicTagger, tx: optax.GradientTransformation, rng: jax.Array, mesh) -> TrainState:
  """Initial state, replicated over the mesh."""

  def init(rng):
    variables = model.init(rng, jnp.zeros((1, crop_samples(model)), jnp.float32))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), first_nonfinite_step=jnp.full((), -1, jnp.int32))

  return jax.jit(init, out_shardings=sharding.replicated(mesh))(rng)


def make_train_step(model: MusicTagger, tx: optax.GradientTransformation, seed: int, mesh):
  """A jit-compiled step: batch {'audio': (B, crop), 'labels': (B, F)[, 'coarse_labels': (B, C)]}."""
  base_key = jax.random.key(seed)

  def loss_fn(params, state, batch, dropout_key):
    outputs, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch["audio"], train=True,
        rngs={"dropout": dropout_key}, mutable=["batch_stats"])
    loss, parts = heads.loss(model.head, outputs, batch["labels"], batch.get("coarse_labels"), model.hierarchy,
                             model.head_options)
    return loss, (parts, updates["batch_stats"])

  def step(state: TrainState, batch):
    dropout_key = jax.random.fold_in(base_key, state.step)
    (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state, batch, dropout_key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    first_nonfinite = jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step + 1,
                                state.first_nonfinite_step)
    new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           batch_stats=batch_stats, opt_state=opt_state, first_nonfinite_step=first_nonfinite)
    metrics = {"loss": loss, **parts, "grad_norm": grad_norm,
               "learning_rate": optim.current_learning_rate(opt_state),
               "optimizer_phase": optim.optimizer_phase(opt_state)}
    return new_state, metrics

  replicated = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, sharding.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def make_predict_step(model: MusicTagger, mesh):
  """A jit-compiled eval step on a global batch {'audio': (B, crops, samples), ...}.

  Returns crop-averaged sigmoid outputs `fine_probs` (and `coarse_probs` for hierarchical models; for a flat head
  they follow the max rule of SPEC §5) together with the batch's other entries (labels, mask, clip index),
  replicated so that every process holds the whole global batch in one row order.
  """

  def predict(variables, batch):
    audio = batch["audio"]
    size, crops = audio.shape[:2]
    outputs = model.apply(variables, audio.reshape(size * crops, *audio.shape[2:]), train=False)
    coarse = heads.coarse_outputs(outputs, model.hierarchy)
    average = lambda logits: jax.nn.sigmoid(logits).reshape(size, crops, -1).mean(1)
    result = {k: v for k, v in batch.items() if k != "audio"}
    result["fine_probs"] = average(outputs.fine_logits)
    if coarse is not None:
      result["coarse_probs"] = average(coarse)
    return result

  replicated = sharding.replicated(mesh)
  return jax.jit(sharding.per_device(predict, mesh), in_shardings=(replicated, sharding.batch_sharding(mesh)),
                 out_shardings=replicated)
