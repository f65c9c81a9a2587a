"""The Adam→SGD optimizer against optax.adam and an independent NumPy transcription of PyTorch's SGD."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxtag import optim
from flaxtag.errors import ConfigError

NUM_STEPS = 7


def _config(**overrides):
  """The recipe with `overrides` at one step per epoch, so that epochs count updates."""
  c = optim.recipe_config()
  c.update(overrides)
  return optim.in_steps(c, steps_per_epoch=1)


def _params_and_grads(seed=0, num_steps=NUM_STEPS):
  rng = np.random.default_rng(seed)
  params = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(num_steps)]
  return jax.tree.map(jnp.asarray, params), [jax.tree.map(jnp.asarray, g) for g in grads]


def _run(tx, params, grads):
  """Applies `grads` one by one under jit; returns the updates, the states before each update, and the params."""
  update = jax.jit(tx.update)
  state = jax.jit(tx.init)(params)
  updates_seq, states, params_seq = [], [state], [params]
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    updates_seq.append(updates)
    states.append(state)
    params_seq.append(params)
  return updates_seq, states, params_seq


def _torch_sgd_reference(params, grads, lrs, momentum=0.9, weight_decay=1e-4, nesterov=True):
  """PyTorch's SGD (dampening 0) in float64, from a fresh momentum buffer; returns the updates p_new - p."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  buf, out = None, []
  for g, lr in zip(grads, lrs):
    d = {k: np.asarray(g[k], np.float64) + weight_decay * p[k] for k in p}
    buf = {k: d[k].copy() for k in p} if buf is None else {k: momentum * buf[k] + d[k] for k in p}
    step = {k: d[k] + momentum * buf[k] for k in p} if nesterov else buf
    out.append({k: -lr * step[k] for k in p})
    p = {k: p[k] + out[-1][k] for k in p}
  return out


def _switch_state(opt_state):
  return opt_state[0]  # make_optimizer's chain: (AdamThenSgdState, EmptyState)


def _assert_trees_close(actual, expected, rtol, atol=0.0):
  for k in expected:
    np.testing.assert_allclose(np.asarray(actual[k]), np.asarray(expected[k]), rtol=rtol, atol=atol, err_msg=k)


def test_adam_phase_equals_optax_adam():
  params, grads = _params_and_grads()
  ours, states, _ = _run(optim.make_optimizer(_config(switch_epoch=3, sgd_lr_drop_epochs=())), params, grads)
  adam, _, _ = _run(optax.adam(1e-4), params, grads[:3])
  for step in range(3):
    assert int(optim.optimizer_phase(states[step])) == 0
    _assert_trees_close(ours[step], adam[step], rtol=1e-7)
  assert int(optim.optimizer_phase(states[3])) == 1


def test_sgd_phase_equals_pytorch_sgd_with_fresh_buffer_and_lr_boundaries():
  switch_step, boundaries = 2, (4, 5)
  params, grads = _params_and_grads(seed=1)
  ours, states, params_seq = _run(
      optim.make_optimizer(_config(switch_epoch=switch_step, sgd_lr_drop_epochs=boundaries)), params, grads)
  lrs = [1e-4, 1e-4, 1e-3, 1e-3, 1e-4, 1e-5, 1e-5]
  np.testing.assert_allclose([float(optim.current_learning_rate(s)) for s in states[:-1]], lrs, rtol=1e-6)
  assert [int(optim.optimizer_phase(s)) for s in states] == [0, 0, 1, 1, 1, 1, 1, 1]
  expected = _torch_sgd_reference(params_seq[switch_step], grads[switch_step:], lrs[switch_step:])
  for ours_step, expected_step in zip(ours[switch_step:], expected):
    _assert_trees_close(ours_step, expected_step, rtol=1e-6, atol=1e-12)


def test_pytorch_sgd_itself_if_available():
  torch = pytest.importorskip("torch")
  switch_step = 2
  params, grads = _params_and_grads(seed=2)
  ours, _, params_seq = _run(optim.make_optimizer(_config(switch_epoch=switch_step, sgd_lr_drop_epochs=())),
                             params, grads)
  tparams = [torch.tensor(np.asarray(v), dtype=torch.float64, requires_grad=True)
             for v in params_seq[switch_step].values()]
  sgd = torch.optim.SGD(tparams, lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
  for ours_step, g in zip(ours[switch_step:], grads[switch_step:]):
    before = [t.detach().clone() for t in tparams]
    for t, gk in zip(tparams, g.values()):
      t.grad = torch.tensor(np.asarray(gk), dtype=torch.float64)
    sgd.step()
    for t, b, u in zip(tparams, before, ours_step.values()):
      # Our float32 update against float64: where g + weight_decay·p nearly cancels, the relative error of a small
      # element reaches ~3e-5 (seed 2), so the tolerance is relative to the step's largest update.
      np.testing.assert_allclose(np.asarray(u), (t.detach() - b).numpy(), rtol=1e-6, atol=1e-6 * np.abs(u).max())


def test_adam_moments_frozen_and_sgd_buffer_fresh():
  params, grads = _params_and_grads()
  _, states, _ = _run(optim.make_optimizer(_config(switch_epoch=3, sgd_lr_drop_epochs=())), params, grads)
  adam_at_switch = _switch_state(states[3]).adam
  for s in (states[0], states[3]):
    assert all(not np.any(np.asarray(t)) for t in jax.tree.leaves(_switch_state(s).sgd))
  for s in states[4:]:
    jax.tree.map(np.testing.assert_array_equal, _switch_state(s).adam, adam_at_switch)
  assert int(_switch_state(states[-1]).count) == NUM_STEPS


def _shapes(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def test_state_structure_is_fixed_across_the_switch_and_modes():
  params, grads = _params_and_grads()
  _, states, _ = _run(optim.make_optimizer(_config(switch_epoch=3)), params, grads)
  first = jax.tree_util.tree_structure(states[0])
  assert all(jax.tree_util.tree_structure(s) == first for s in states)
  assert all(_shapes(s) == _shapes(states[0]) for s in states)
  for switch in ("swats", "none"):
    other = optim.make_optimizer(_config(switch=switch)).init(params)
    assert jax.tree_util.tree_structure(other) == first
    assert _shapes(other) == _shapes(states[0])


def test_none_is_adam_throughout():
  params, grads = _params_and_grads(seed=3)
  ours, states, _ = _run(optim.make_optimizer(_config(switch="none", switch_epoch=1)), params, grads)
  adam, _, _ = _run(optax.adam(1e-4), params, grads)
  for ours_step, adam_step in zip(ours, adam):
    _assert_trees_close(ours_step, adam_step, rtol=1e-7)
  assert all(int(optim.optimizer_phase(s)) == 0 for s in states)


def test_adam_warmup_and_cosine_decay_equal_adam_with_that_schedule():
  params, grads = _params_and_grads(seed=4)
  config = _config(switch="none", adam_lr=1e-3, adam_warmup_epochs=2, adam_decay_epochs=5)
  ours, states, _ = _run(optim.make_optimizer(config), params, grads)
  # Update k: lr·min(1, (k+1)/2)·½(1 + cos(π·min(k, 5)/5)), written out.
  c = [0.5 * (1 + np.cos(np.pi * k / 5)) for k in range(6)]
  lrs = 1e-3 * np.array([0.5 * c[0], c[1], c[2], c[3], c[4], 0.0, 0.0])
  np.testing.assert_allclose([float(optim.current_learning_rate(s)) for s in states[:-1]], lrs, rtol=1e-6, atol=1e-12)
  adam, _, _ = _run(optax.adam(lambda count: jnp.asarray(lrs, jnp.float32)[count]), params, grads)
  for ours_step, adam_step in zip(ours, adam):
    _assert_trees_close(ours_step, adam_step, rtol=1e-6, atol=1e-12)


def test_schedule_epochs_become_steps():
  config = optim.recipe_config()
  config.update(switch="none", adam_warmup_epochs=0.5, adam_decay_epochs=8)
  steps = optim.in_steps(config, steps_per_epoch=31)
  assert (steps.adam_warmup_steps, steps.adam_decay_steps) == (15, 248)


def _quadratic_grads(x, curvature):
  return {k: curvature[k] * x[k] for k in x}


def _quadratic():
  rng = np.random.default_rng(4)
  x0 = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=(3,))}
  curvature = {k: rng.uniform(0.5, 2.0, size=v.shape) for k, v in x0.items()}
  return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), x0), jax.tree.map(
      lambda v: jnp.asarray(v, jnp.float32), curvature)


def test_swats_estimate_equals_paper_formula():
  # A huge epsilon makes SWATS switch at the first step allowed (k = 2), with a lr that NumPy can check.
  x, curvature = _quadratic()
  tx = optim.make_optimizer(_config(switch="swats", swats_epsilon=1e9, adam_lr=1e-2, sgd_lr_drop_epochs=()))
  update = jax.jit(tx.update)
  adam = optax.adam(1e-2)
  adam_update = jax.jit(adam.update)
  adam_state = adam.init(x)
  state = tx.init(x)
  b2, lam = 0.999, 0.0
  for k in (1, 2):
    g = _quadratic_grads(x, curvature)
    p, adam_state = adam_update(g, adam_state)
    ours, state = update(g, state, x)
    _assert_trees_close(ours, p, rtol=1e-7)
    p_flat = np.concatenate([np.ravel(p[n]) for n in sorted(p)]).astype(np.float64)
    g_flat = np.concatenate([np.ravel(g[n]) for n in sorted(g)]).astype(np.float64)
    gamma = p_flat @ p_flat / -(p_flat @ g_flat)
    lam = b2 * lam + (1 - b2) * gamma
    x = optax.apply_updates(x, ours)
    assert int(optim.optimizer_phase(state)) == (k == 2)
  expected_lr = (1 - 0.9) * lam / (1 - b2**2)
  s = _switch_state(state)
  assert int(s.switch_count) == 2
  np.testing.assert_allclose(float(s.sgd_lr), expected_lr, rtol=1e-5)
  np.testing.assert_allclose(float(optim.current_learning_rate(state)), expected_lr, rtol=1e-5)
  g = _quadratic_grads(x, curvature)
  ours, state = update(g, state, x)
  _assert_trees_close(ours, _torch_sgd_reference(x, [g], [float(s.sgd_lr)])[0], rtol=1e-6, atol=1e-12)


def test_swats_switches_on_a_quadratic():
  x, curvature = _quadratic()
  # The paper's absolute epsilon (1e-9) is below float32 noise on γ at this scale; this one switches mid-run.
  tx = optim.make_optimizer(_config(switch="swats", swats_epsilon=3e-5, adam_lr=1e-2, sgd_lr_drop_epochs=()))

  @jax.jit
  def train(x):
    def step(carry, _):
      x, state = carry
      updates, state = tx.update(_quadratic_grads(x, curvature), state, x)
      return (optax.apply_updates(x, updates), state), optim.optimizer_phase(state)

    return jax.lax.scan(step, (x, tx.init(x)), length=300)

  (x_end, state), phases = train(x)
  s = _switch_state(state)
  assert int(optim.optimizer_phase(state)) == 1
  switch_count = int(s.switch_count)
  assert 2 <= switch_count < 300
  np.testing.assert_array_equal(np.asarray(phases), np.arange(1, 301) >= switch_count)
  lr = float(s.sgd_lr)
  assert np.isfinite(lr) and lr > 0
  assert float(optim.current_learning_rate(state)) == lr
  loss = lambda x: sum(float(jnp.sum(curvature[k] * x[k]**2)) for k in x)
  assert loss(x_end) < loss(x)


def test_default_config_is_the_recipe_in_steps():
  c = optim.in_steps(optim.recipe_config(), steps_per_epoch=10)
  assert (c.switch, c.adam_lr, c.sgd_lr, c.momentum, c.nesterov, c.weight_decay) == (
      "step", 1e-4, 1e-3, 0.9, True, 1e-4)
  assert c.switch_step == 600 and tuple(c.sgd_lr_boundaries) == (800, 1000)
  state = optim.make_optimizer(_config()).init({"w": jnp.zeros(2)})
  assert int(optim.optimizer_phase(state)) == 0
  assert float(optim.current_learning_rate(state)) == np.float32(1e-4)


@pytest.mark.parametrize("overrides, message", [
    (dict(switch="adam"), "step, swats, none"),
    (dict(adam_lr=-1e-4), "adam_lr"),
    (dict(sgd_lr=-1e-3), "sgd_lr"),
    (dict(switch_epoch=100, sgd_lr_drop_epochs=(300, 200)), "increasing"),
    (dict(switch_epoch=100, sgd_lr_drop_epochs=(50, 200)), "before"),
    (dict(switch_epoch=-1), "switch_epoch"),
    (dict(adam_decay_epochs=-3), "adam_decay_epochs"),
    (dict(switch_epoch=1, sgd_lr_drop_epochs=(1.2, 1.5)), "same step"),
    (dict(momentum=1.0), "momentum"),
    (dict(swats_epsilon=0.0), "swats_epsilon"),
])
def test_config_errors(overrides, message):
  with pytest.raises(ConfigError, match=message):
    optim.make_optimizer(_config(**overrides))


def test_missing_config_field_is_a_config_error():
  c = optim.recipe_config()
  del c["switch_epoch"]
  with pytest.raises(ConfigError, match="switch_epoch"):
    optim.in_steps(c, steps_per_epoch=1)
