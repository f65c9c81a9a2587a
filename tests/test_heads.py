"""Tests of flaxtag.models.heads: hand-computed values and properties."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtag.errors import ConfigError
from flaxtag.hierarchy import Hierarchy
from flaxtag.models import heads

# 3 coarse tags over 6 fine tags, fine order interleaved to catch indexing by group order.
HIER = Hierarchy.from_mapping({"a": ["f0", "f3"], "b": ["f1", "f4", "f5"], "c": ["f2"]},
                              fine_tags=("f0", "f1", "f2", "f3", "f4", "f5"))
D, F, C, B = 5, 6, 3, 4

RESATT_VARIANTS = [
    dict(),  # the default: direct base, masked softmax, input-independent
    dict(resatt_masked=False),
    dict(resatt_attention="sigmoid", resatt_masked=False),
    dict(resatt_attention="sigmoid"),
    dict(resatt_input_dependent=True, resatt_masked=False),
    dict(resatt_input_dependent=True, resatt_attention="sigmoid"),
    dict(resatt_base="gmp", resatt_masked=False),
    dict(resatt_base="gmp", resatt_input_dependent=True),
]
# Every head, and every ResAtt variant, as (name, options).
ALL_HEADS = [(name, heads.HeadOptions()) for name in heads.HEAD_NAMES] + [
    (heads.RESATT, heads.HeadOptions(resatt_dim=8, **kw)) for kw in RESATT_VARIANTS]
ALL_HEAD_IDS = list(heads.HEAD_NAMES) + ["resatt-" + "-".join(f"{k}={v}" for k, v in kw.items())
                                         for kw in RESATT_VARIANTS]


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _np_bce(logits, targets):
  p = _sigmoid(np.asarray(logits, np.float64))
  return np.mean(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)))


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(B, D)).astype(np.float32)
  fine_targets = (rng.random((B, F)) < 0.4).astype(np.float32)
  return h, fine_targets, HIER.coarse_targets(fine_targets)


def _init(name, options=heads.HeadOptions(), hierarchy=HIER, seed=0):
  return heads.init_params(jax.random.key(seed), name, D, F, hierarchy, options)


@pytest.mark.slow
def test_param_names_and_shapes():
  p = _init(heads.FLAT, hierarchy=None)
  assert jax.tree.map(jnp.shape, p) == {"fine": {"kernel": (D, F), "bias": (F,)}}
  for name in (heads.MULTITASK, heads.MULTITASK_HLOSS, heads.TOP_DOWN):
    assert jax.tree.map(jnp.shape, _init(name))["coarse"] == {"kernel": (D, C), "bias": (C,)}
  assert set(_init(heads.GMP)) == {"fine"}
  p = _init(heads.RESATT, heads.HeadOptions(resatt_dim=8, resatt_input_dependent=True))
  assert jax.tree.map(jnp.shape, p["resatt"]) == {
      "queries": (C, 8), "keys": (F, 8), "lambda": (),
      "query_shift": {"kernel": (D, 8), "bias": (8,)}, "key_shift": {"kernel": (D, 8), "bias": (8,)}}
  assert float(p["resatt"]["lambda"]) == 1.0
  assert set(_init(heads.RESATT, heads.HeadOptions(resatt_base="gmp"))) == {"fine", "resatt"}
  np.testing.assert_array_equal(p["fine"]["bias"], 0)
  assert float(jnp.std(p["fine"]["kernel"])) > 0


def test_flat_and_multitask_equal_numpy_dense():
  h, _, _ = _inputs()
  p = _init(heads.MULTITASK)
  # Biases start at zero: give them values, so that a layer that dropped its bias would fail.
  rng = np.random.default_rng(1)
  for layer in ("fine", "coarse"):
    p[layer]["bias"] = jnp.asarray(rng.normal(size=p[layer]["bias"].shape), jnp.float32)
  out = heads.apply(heads.MULTITASK, p, h, HIER, heads.HeadOptions())
  np.testing.assert_allclose(out.fine_logits, h @ np.asarray(p["fine"]["kernel"]) + np.asarray(p["fine"]["bias"]),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.coarse_logits, h @ np.asarray(p["coarse"]["kernel"]) + np.asarray(p["coarse"]["bias"]),
                             rtol=1e-5, atol=1e-6)
  flat = heads.apply(heads.FLAT, {"fine": p["fine"]}, h, None)
  assert flat.coarse_logits is None and flat.attention is None
  np.testing.assert_array_equal(flat.fine_logits, out.fine_logits)


def test_gmp_equals_group_max_hand_example():
  z = np.array([[1.0, -2.0, 0.5, 3.0, 4.0, -1.0],
                [-5.0, 2.0, -0.5, -6.0, -3.0, 1.0]], np.float32)
  # a = max(f0, f3), b = max(f1, f4, f5), c = f2.
  expected = [[3.0, 4.0, 0.5], [-5.0, 2.0, -0.5]]
  p = {"fine": {"kernel": jnp.eye(F, dtype=jnp.float32), "bias": jnp.zeros(F)}}
  out = heads.apply(heads.GMP, p, z, HIER)
  np.testing.assert_array_equal(out.coarse_logits, expected)
  np.testing.assert_array_equal(heads.derive_coarse_logits(z, HIER), expected)
  # The attention output is the one-hot map of the picked child.
  np.testing.assert_array_equal(np.argmax(out.attention, -1), [[3, 4, 2], [0, 1, 2]])
  np.testing.assert_array_equal(out.attention.sum(-1), 1)


def test_masked_one_hot_resatt_equals_gmp():
  """Masked softmax ResAtt, direct base zeroed, λ = 1, map one-hot on each group's max child: z_c = GMP(z_f)."""
  options = heads.HeadOptions(resatt_masked=True, resatt_dim=C)
  p = _init(heads.RESATT, options)
  winners = [3, 1, 2]  # The child that is the max of groups a, b, c.
  p["fine"]["bias"] = p["fine"]["bias"].at[jnp.array(winners)].set(30.0)
  p["coarse"] = jax.tree.map(jnp.zeros_like, p["coarse"])
  # Score 1e4/√d for (j, winner of j); masking hides every other group's winner, so softmax is exactly one-hot.
  p["resatt"]["queries"] = 100.0 * jnp.eye(C)
  p["resatt"]["keys"] = jnp.zeros((F, C)).at[jnp.array(winners), jnp.arange(C)].set(100.0)
  h, _, _ = _inputs()
  out = heads.apply(heads.RESATT, p, h, HIER, options)
  expected_map = np.zeros((C, F))
  expected_map[np.arange(C), winners] = 1
  np.testing.assert_array_equal(out.attention[0], expected_map)
  np.testing.assert_array_equal(out.coarse_logits, heads.apply(heads.GMP, p, h, HIER).coarse_logits)


@pytest.mark.parametrize("kw", RESATT_VARIANTS)
def test_resatt_attention_in_unit_interval(kw):
  options = heads.HeadOptions(resatt_dim=8, **kw)
  h, _, _ = _inputs()
  out = heads.apply(heads.RESATT, _init(heads.RESATT, options), 3 * h, HIER, options)
  a = np.asarray(out.attention)
  assert a.shape == ((B if options.resatt_input_dependent else 1), C, F)
  assert (a >= 0).all() and (a <= 1).all()
  if options.resatt_masked:
    np.testing.assert_array_equal(a * (1 - HIER.mask), 0)
  if options.resatt_attention == "softmax":
    np.testing.assert_allclose(a.sum(-1), 1, rtol=1e-5)
  if options.resatt_input_dependent:
    assert not np.allclose(a[0], a[1])


def test_resatt_formula():
  options = heads.HeadOptions(resatt_dim=8, resatt_lambda_init=0.5)
  h, _, _ = _inputs()
  p = _init(heads.RESATT, options)
  out = heads.apply(heads.RESATT, p, h, HIER, options)
  base = h @ np.asarray(p["coarse"]["kernel"])
  attended = np.asarray(out.fine_logits) @ np.asarray(out.attention[0]).T
  np.testing.assert_allclose(out.coarse_logits, base + 0.5 * attended, rtol=1e-5, atol=1e-5)


def test_top_down_hand_example():
  zc = np.array([[2.0, -1.0, 0.0]], np.float32)
  zf = np.array([[0.5, 1.0, -2.0, 3.0, 0.0, -0.5]], np.float32)
  p = {"fine": {"kernel": jnp.eye(F), "bias": jnp.zeros(F)},
       "coarse": {"kernel": jnp.zeros((F, C)), "bias": jnp.asarray(zc[0])}}
  out = heads.apply(heads.TOP_DOWN, p, zf, HIER)
  expected = _sigmoid(zc[0, HIER.parent]) * _sigmoid(zf[0])
  np.testing.assert_allclose(_sigmoid(np.asarray(out.fine_logits[0], np.float64)), expected, rtol=1e-5)
  np.testing.assert_array_equal(out.coarse_logits, zc)


def test_top_down_never_exceeds_parent():
  rng = np.random.default_rng(1)
  n = 2000
  extremes = np.array([-1e4, -100, -30, -1, 0, 1, 30, 100, 1e4], np.float32)
  zc = np.concatenate([rng.normal(scale=5, size=(n, C)), rng.choice(extremes, size=(n, C))]).astype(np.float32)
  zf = np.concatenate([rng.normal(scale=5, size=(n, F)), rng.choice(extremes, size=(n, F))]).astype(np.float32)
  # Per-example coarse logits cannot be set through parameters, so test the top-down link on (z_c, z_f) directly.
  fine_logits = heads._top_down_fine_logits(jnp.asarray(zc), jnp.asarray(zf), HIER)
  assert np.isfinite(np.asarray(fine_logits)).all()
  assert (np.asarray(fine_logits) <= zc[:, HIER.parent]).all()
  fine_p = np.asarray(jax.nn.sigmoid(fine_logits))
  coarse_p = np.asarray(jax.nn.sigmoid(jnp.asarray(zc)))
  assert (fine_p <= coarse_p[:, HIER.parent]).all()
  # And through `apply` with saturated embeddings.
  out = heads.apply(heads.TOP_DOWN, _init(heads.TOP_DOWN), 1e4 * _inputs()[0], HIER)
  assert (np.asarray(jax.nn.sigmoid(out.fine_logits))
          <= np.asarray(jax.nn.sigmoid(out.coarse_logits))[:, HIER.parent]).all()


def test_losses_equal_numpy_bce():
  h, yf, yc = _inputs()
  for name in heads.HEAD_NAMES:
    hier = None if name == heads.FLAT else HIER
    options = heads.HeadOptions(coarse_weight=0.7)
    out = heads.apply(name, _init(name, hierarchy=hier), h, hier, options)
    total, parts = heads.loss(name, out, yf, yc, hier, options)
    assert float(parts["fine_bce"]) == pytest.approx(_np_bce(out.fine_logits, yf), rel=1e-5)
    expected = _np_bce(out.fine_logits, yf)
    if name != heads.FLAT:
      assert float(parts["coarse_bce"]) == pytest.approx(_np_bce(out.coarse_logits, yc), rel=1e-5)
      expected += 0.7 * _np_bce(out.coarse_logits, yc)
      # Coarse targets derived from the fine ones when not given.
      assert float(heads.loss(name, out, yf, None, hier, options)[0]) == pytest.approx(float(total), rel=1e-6)
    if name == heads.MULTITASK_HLOSS:
      excess = _sigmoid(np.asarray(out.fine_logits)) - _sigmoid(np.asarray(out.coarse_logits))[:, HIER.parent]
      assert float(parts["hierarchy"]) == pytest.approx(np.mean(np.maximum(excess, 0) ** 2), rel=1e-4, abs=1e-7)
      expected += float(parts["hierarchy"])
    assert float(total) == pytest.approx(expected, rel=1e-5)


def test_hierarchy_loss_hand_value():
  yf = np.zeros((1, F), np.float32)
  yc = np.zeros((1, C), np.float32)
  # P_c = (0.5, 0.25, 0.75); P_f chosen so f0 exceeds a by 0.3, f4 exceeds b by 0.5, the rest are below.
  zc = np.log(np.array([[0.5, 0.25, 0.75]]) / (1 - np.array([[0.5, 0.25, 0.75]])))
  pf = np.array([[0.8, 0.1, 0.7, 0.2, 0.75, 0.25]])
  out = heads.HeadOutputs(jnp.asarray(np.log(pf / (1 - pf)), jnp.float32), jnp.asarray(zc, jnp.float32))
  options = heads.HeadOptions(hierarchy_loss_weight=2.0)
  total, parts = heads.loss(heads.MULTITASK_HLOSS, out, yf, yc, HIER, options)
  assert float(parts["hierarchy"]) == pytest.approx((0.3 ** 2 + 0.5 ** 2) / 6, rel=1e-5)
  assert float(total) == pytest.approx(float(parts["fine_bce"] + parts["coarse_bce"]) + 2 * (0.34 / 6), rel=1e-5)


@pytest.mark.parametrize("name, options", ALL_HEADS, ids=ALL_HEAD_IDS)
@pytest.mark.slow
def test_grad_finite_at_saturated_logits_and_jit(name, options):
  hier = None if name == heads.FLAT else HIER
  h, yf, yc = _inputs(3)
  params = heads.init_params(jax.random.key(1), name, D, F, hier, options)

  @jax.jit
  def objective(params, h, yf, scale):
    out = heads.apply(name, params, scale * h, hier, options)
    return heads.loss(name, out, yf, None if hier is None else yc, hier, options)[0]

  for scale in (1.0, 1e2, 1e4):
    value, grads = jax.value_and_grad(objective)(params, h, yf, scale)
    assert np.isfinite(float(value)), (name, scale)
    for leaf in jax.tree.leaves(grads):
      assert np.isfinite(np.asarray(leaf)).all(), (name, scale)
  # name, hierarchy and options are hashable, so they can be static arguments of jit.
  out = jax.jit(heads.apply, static_argnums=(0, 3, 4))(name, params, h, hier, options)
  assert out.fine_logits.shape == (B, F)


def test_works_as_flax_param():
  options = heads.HeadOptions(resatt_dim=8)

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      p = self.param("head", lambda rng: heads.init_params(rng, heads.RESATT, D, F, HIER, options))
      return heads.apply(heads.RESATT, p, nn.Dense(D)(x), HIER, options)

  x = jnp.ones((B, 7))
  variables = Model().init(jax.random.key(0), x)
  assert variables["params"]["head"]["fine"]["kernel"].shape == (D, F)
  out = jax.jit(Model().apply)(variables, x)
  assert out.coarse_logits.shape == (B, C) and out.attention.shape == (1, C, F)


def test_errors():
  with pytest.raises(ConfigError, match="unknown head 'soft'.*'flat'.*'resatt'"):
    heads.init_params(jax.random.key(0), "soft", D, F, HIER)
  with pytest.raises(ConfigError, match="unknown head"):
    heads.apply("soft", {}, jnp.zeros((B, D)), HIER)
  with pytest.raises(ConfigError, match="unknown head"):
    heads.loss("soft", heads.HeadOutputs(jnp.zeros((B, F))), jnp.zeros((B, F)), None, HIER)
  with pytest.raises(ConfigError, match="unknown head"):
    heads.needs_hierarchy("soft")
  assert not heads.needs_hierarchy(heads.FLAT)
  for name in set(heads.HEAD_NAMES) - {heads.FLAT}:
    assert heads.needs_hierarchy(name)
    with pytest.raises(ConfigError, match="hierarchy file"):
      heads.init_params(jax.random.key(0), name, D, F, None)
  with pytest.raises(ConfigError, match="6 fine tags but the dataset has 7"):
    heads.init_params(jax.random.key(0), heads.GMP, D, 7, HIER)


def test_options_from_dict():
  assert heads.HeadOptions.from_dict(None) == heads.HeadOptions()
  o = heads.HeadOptions.from_dict({"resatt_attention": "sigmoid", "resatt_dim": 16, "coarse_weight": 2})
  assert (o.resatt_attention, o.resatt_dim, o.coarse_weight) == ("sigmoid", 16, 2.0)
  hash(o)
  with pytest.raises(ConfigError, match=r"unknown head option\(s\) \['resatt_heads'\].*resatt_dim"):
    heads.HeadOptions.from_dict({"resatt_heads": 2})
  for key, value, match in [("resatt_base", "max", r"\['direct', 'gmp'\]"),
                            ("resatt_attention", "relu", r"\['softmax', 'sigmoid'\]"),
                            ("resatt_dim", 0, "positive integer"),
                            ("resatt_dim", 8.0, "positive integer"),
                            ("coarse_weight", -1, ">= 0"),
                            ("hierarchy_loss_weight", "x", "finite number"),
                            ("resatt_masked", "yes", "true or false")]:
    with pytest.raises(ConfigError, match=f"'{key}'.*{match}"):
      heads.HeadOptions.from_dict({key: value})
