"""The recipe's optimizer: Adam, then SGD with Nesterov momentum, switched inside one optax transformation.

A run's `config.optim` (`recipe_config()`, changed by config files and flags) counts in epochs, the unit a user
thinks in. `in_steps(config.optim, steps_per_epoch)` turns it into update counts, once, where the run starts and the
number of steps per epoch is known; `make_optimizer` takes that schedule. It returns one `optax.chain` whose state
has the same pytree structure for the whole run (both inner states are always kept), so a checkpoint taken before
the switch restores into the same target as one taken after it. The switch happens at a fixed step
(`switch='step'`, the recipe), when SWATS decides (`switch='swats'`, Keskar & Socher 2017), or never
(`switch='none'`).

Steps are counted globally from 0: update number `count` is an Adam update while `count < switch_step` (=
`switch_epoch` × steps per epoch) and an SGD update from then on; an SGD learning-rate boundary `b` (from
`sgd_lr_drop_epochs`) applies to the updates with `count >= b`. With SWATS, `switch_epoch` and `sgd_lr` are unused:
the switch step and the SGD lr are estimated, and the boundaries (still global steps) scale the estimated lr. SWATS'
`swats_epsilon` is absolute (1e-9 in the paper), so it depends on the scale of the lr; with float32 noise on the
estimate, a larger value may be needed for the switch to happen at all.

Short runs that never switch (`switch='none'`, e.g. the demo) may shape Adam's lr: a linear warm-up over
`adam_warmup_epochs`, then a cosine decay to 0 reached after `adam_decay_epochs` (0 turns either off; the recipe uses
neither).

At each epoch end the training loop reads `switch_state(opt_state).switch_count` and the SGD lr boundaries: when the
switch or an lr drop happened within that epoch, the recipe reloads the best *parameters* so far and keeps the
current optimizer state, which carries the switch, the step count and a fresh momentum buffer.
"""
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from flaxtag.errors import ConfigError

SWITCHES = ("step", "swats", "none")

def recipe_config() -> ml_collections.ConfigDict:
  """The recipe (SPEC §4) as a run's `config.optim`, in epochs: Adam 1e-4 for 60 epochs, then SGD 1e-3, ×0.1 at
  epochs 80 and 100."""
  c = ml_collections.ConfigDict()
  c.switch = "step"
  c.adam_lr = 1e-4
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  c.adam_warmup_epochs = 0.0
  c.adam_decay_epochs = 0.0
  c.sgd_lr = 1e-3
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 1e-4
  c.switch_epoch = 60
  c.sgd_lr_drop_epochs = (80, 100)
  c.sgd_lr_decay = 0.1
  c.swats_epsilon = 1e-9
  return c


def in_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> ml_collections.FrozenConfigDict:
  """`make_optimizer`'s schedule from a run's `config.optim`: its epochs become update counts (rounded down).

  Raises ConfigError, naming the fields of `config.optim`, if it cannot describe the optimizer.
  """
  validate_optim_config(config)
  values = config.to_dict()
  to_steps = lambda epochs: int(epochs * steps_per_epoch)
  values["switch_step"] = to_steps(values.pop("switch_epoch"))
  values["sgd_lr_boundaries"] = tuple(map(to_steps, values.pop("sgd_lr_drop_epochs")))
  for name in ("adam_warmup", "adam_decay"):
    values[f"{name}_steps"] = to_steps(values.pop(f"{name}_epochs"))
  if len(set(values["sgd_lr_boundaries"])) < len(values["sgd_lr_boundaries"]):
    raise ConfigError(f"optim.sgd_lr_drop_epochs={tuple(config.sgd_lr_drop_epochs)} fall on the same step at "
                      f"{steps_per_epoch} steps per epoch; space them further apart.")
  return ml_collections.FrozenConfigDict(values)


def _is_epoch_count(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and x >= 0


def validate_optim_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError if `config` (a run's `config.optim`, in epochs) cannot describe the optimizer."""
  missing = sorted(set(recipe_config().keys()) - set(config.keys()))
  if missing:
    raise ConfigError(f"optim config lacks {missing}; start from flaxtag.optim.recipe_config().")
  if config.switch not in SWITCHES:
    raise ConfigError(f"optim.switch={config.switch!r} is unknown; valid values: {', '.join(SWITCHES)}.")
  for name in ("adam_lr", "sgd_lr", "swats_epsilon"):
    if not config[name] > 0:
      raise ConfigError(f"optim.{name}={config[name]!r} must be positive.")
  for name in ("adam_b1", "adam_b2", "momentum"):
    if not 0 <= config[name] < 1:
      raise ConfigError(f"optim.{name}={config[name]!r} must be in [0, 1).")
  for name in ("adam_eps", "weight_decay", "sgd_lr_decay"):
    if not config[name] >= 0:
      raise ConfigError(f"optim.{name}={config[name]!r} must be non-negative.")
  if config.nesterov and config.momentum == 0:
    raise ConfigError("optim.nesterov=True needs optim.momentum > 0 (as in PyTorch's SGD).")
  for name in ("switch_epoch", "adam_warmup_epochs", "adam_decay_epochs"):
    if not _is_epoch_count(config[name]):
      raise ConfigError(f"optim.{name}={config[name]!r} must be a non-negative number of epochs.")
  drops = tuple(config.sgd_lr_drop_epochs)
  if not all(_is_epoch_count(e) for e in drops):
    raise ConfigError(f"optim.sgd_lr_drop_epochs={drops} must be non-negative numbers of epochs.")
  if any(b >= a for b, a in zip(drops, drops[1:])):
    raise ConfigError(f"optim.sgd_lr_drop_epochs={drops} must be strictly increasing.")
  if config.switch == "step" and drops and drops[0] < config.switch_epoch:
    raise ConfigError(
        f"optim.sgd_lr_drop_epochs={drops} starts before optim.switch_epoch={config.switch_epoch}; "
        "the SGD lr can only decay after SGD has taken over.")


class AdamThenSgdState(NamedTuple):
  """State of `scale_by_adam_then_sgd`; every field exists in every phase and every switch mode."""
  count: jax.Array  # int32, updates done so far.
  phase: jax.Array  # int32, phase of the next update: 0 Adam, 1 SGD.
  switch_count: jax.Array  # int32, count of the first SGD update; -1 while unknown (SWATS) or never ('none').
  learning_rate: jax.Array  # float32, lr of the next update.
  sgd_lr: jax.Array  # float32, SGD lr before boundary decays: config's, or SWATS' estimate once switched.
  swats_lambda: jax.Array  # float32, SWATS' running lr estimate λ_k (not bias-corrected).
  adam: optax.OptState
  sgd: optax.OptState


def _tree_vdot(a, b) -> jax.Array:
  return sum(jnp.vdot(x, y).astype(jnp.float32) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def scale_by_adam_then_sgd(schedule: ml_collections.FrozenConfigDict) -> optax.GradientTransformation:
  """Emits lr·direction (to be negated): Adam's before the switch, PyTorch SGD's (Nesterov, coupled wd) after."""
  adam = optax.scale_by_adam(b1=schedule.adam_b1, b2=schedule.adam_b2, eps=schedule.adam_eps)
  # optax.trace starts from a zero buffer, so its first step gives buf = g, like PyTorch's buffer initialised to g.
  sgd = optax.chain(optax.add_decayed_weights(schedule.weight_decay),
                    optax.trace(decay=schedule.momentum, nesterov=schedule.nesterov))
  mode = schedule.switch
  boundaries = tuple(schedule.sgd_lr_boundaries)
  b2 = schedule.adam_b2

  def adam_lr_at(count):
    lr = jnp.float32(schedule.adam_lr)
    if schedule.adam_warmup_steps:
      lr = lr * jnp.minimum(1.0, (count + 1) / schedule.adam_warmup_steps)
    if schedule.adam_decay_steps:
      progress = jnp.minimum(count, schedule.adam_decay_steps) / schedule.adam_decay_steps
      lr = lr * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    return lr

  def next_lr(count, phase, sgd_lr):
    for b in boundaries:
      sgd_lr = jnp.where(count >= b, sgd_lr * schedule.sgd_lr_decay, sgd_lr)
    return jnp.where(phase == 1, sgd_lr, adam_lr_at(count)).astype(jnp.float32)

  def phase_at(count):
    return (count >= schedule.switch_step).astype(jnp.int32) if mode == "step" else jnp.zeros([], jnp.int32)

  def init_fn(params):
    count = jnp.zeros([], jnp.int32)
    phase = phase_at(count)
    sgd_lr = jnp.float32(schedule.sgd_lr if mode == "step" else 0.0)
    return AdamThenSgdState(
        count=count, phase=phase,
        switch_count=jnp.int32(schedule.switch_step if mode == "step" else -1),
        learning_rate=next_lr(count, phase, sgd_lr), sgd_lr=sgd_lr, swats_lambda=jnp.zeros([], jnp.float32),
        adam=adam.init(params), sgd=sgd.init(params))

  def update_fn(updates, state, params=None):
    lr = state.learning_rate

    def adam_branch():
      direction, adam_state = adam.update(updates, state.adam)
      swats_lambda, switch_now, sgd_lr = state.swats_lambda, jnp.array(False), state.sgd_lr
      if mode == "swats":
        # Keskar & Socher's estimate of the SGD lr whose step, projected on the Adam step p, equals p. The paper
        # does this per parameter group; here it is global over the whole parameter tree.
        step = jax.tree.map(lambda d: -lr * d, direction)
        p_g = _tree_vdot(step, updates)
        defined = p_g != 0
        gamma = _tree_vdot(step, step) / jnp.where(defined, -p_g, 1.0)
        swats_lambda = jnp.where(defined, b2 * swats_lambda + (1 - b2) * gamma, swats_lambda)
        k = adam_state.count
        # 1 - β2^k without float32 cancellation (1 - 0.999 in float32 is off by 1e-5 relative).
        lambda_hat = swats_lambda / -jnp.expm1(k.astype(jnp.float32) * math.log(b2))
        # Not in the paper: a negative or non-finite estimate (Adam step not a descent direction) cannot be an lr.
        switch_now = (defined & (k > 1) & (jnp.abs(lambda_hat - gamma) < schedule.swats_epsilon)
                      & (lambda_hat > 0) & jnp.isfinite(lambda_hat))
        # The paper steps by (1 - β1)·Λ times an undamped momentum buffer; with momentum μ that buffer (and
        # Nesterov's g + μ·buf) tends to g / (1 - μ), so the PyTorch-style lr is (1 - μ)·Λ.
        sgd_lr = jnp.where(switch_now, (1 - schedule.momentum) * lambda_hat, sgd_lr).astype(jnp.float32)
      return direction, adam_state, state.sgd, swats_lambda, switch_now, sgd_lr

    def sgd_branch():
      direction, sgd_state = sgd.update(updates, state.sgd, params)
      return direction, state.adam, sgd_state, state.swats_lambda, jnp.array(False), state.sgd_lr

    # lax.cond runs one branch only, so Adam's moments stay frozen after the switch and the SGD buffer stays zero
    # (fresh) before it.
    direction, adam_state, sgd_state, swats_lambda, switch_now, sgd_lr = jax.lax.cond(
        state.phase == 1, sgd_branch, adam_branch)
    count = optax.safe_increment(state.count)
    if mode == "swats":
      phase = jnp.maximum(state.phase, switch_now.astype(jnp.int32))
      switch_count = jnp.where(switch_now, count, state.switch_count)
    else:
      phase, switch_count = phase_at(count), state.switch_count
    new_state = AdamThenSgdState(
        count=count, phase=phase, switch_count=switch_count, learning_rate=next_lr(count, phase, sgd_lr),
        sgd_lr=sgd_lr, swats_lambda=swats_lambda, adam=adam_state, sgd=sgd_state)
    return jax.tree.map(lambda d: (lr * d).astype(d.dtype), direction), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(schedule: ml_collections.FrozenConfigDict) -> optax.GradientTransformation:
  """The recipe's optimizer from `in_steps(config.optim, steps_per_epoch)`; `update` needs `params` (for the
  weight decay)."""
  return optax.chain(scale_by_adam_then_sgd(schedule), optax.scale(-1.0))


def switch_state(opt_state: Any) -> AdamThenSgdState:
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, AdamThenSgdState))
           if isinstance(s, AdamThenSgdState)]
  if len(found) != 1:
    raise ValueError(f"expected one AdamThenSgdState in the optimizer state, found {len(found)}.")
  return found[0]


def optimizer_phase(opt_state: Any) -> jax.Array:
  """0 if the next update is Adam, 1 if it is SGD (a metric of every train step)."""
  return switch_state(opt_state).phase


def current_learning_rate(opt_state: Any) -> jax.Array:
  """The learning rate of the next update, for logging."""
  return switch_state(opt_state).learning_rate
