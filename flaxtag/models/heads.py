"""Hierarchical multi-label heads (SPEC §5) as pure functions.

A head maps the clip embedding h (B, D) and its own parameters (a nested dict of arrays) to fine logits (B, F) and
coarse logits (B, C). Whatever the head, a "logit" is the logit of that head's probability, so every level is
trained with BCE-with-logits and probabilities are always sigmoid(logits).

Heads (`HEADS`, the registry at the end of this module: adding a head is adding an entry there):
  flat             fine only; coarse by the max rule after training (`derive_coarse_logits`). Needs no hierarchy.
  multitask        independent coarse classifier z_c = h W_c + b_c.
  multitask_hloss  multitask + λ_h·mean(max(0, P_f − P_c[parent])²).
  top_down         P_f[i] = P_c[parent(i)]·sigmoid(z_f[i]) (a soft decision tree).
  gmp              z_c[j] = max over children i of z_f[i] (grouped max pooling).
  resatt           z_c = base + λ·(A · z_f): a learned coarse × fine attention map A with entries in [0, 1], added
                   to a base, the direct coarse classifier or GMP.

Parameter names: `fine` and `coarse` are {'kernel': (D, n), 'bias': (n,)} dense layers (as flax.linen.Dense);
ResAtt's own parameters live under `resatt`: `queries` (C, d), `keys` (F, d), `lambda` (), and, when input-dependent,
`query_shift` and `key_shift`, dense layers (D → d).

All functions are jit-able with `name`, `hierarchy` and `options` static (all three are hashable).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from flaxtag.errors import ConfigError
from flaxtag.hierarchy import Hierarchy

FLAT = "flat"
MULTITASK = "multitask"
MULTITASK_HLOSS = "multitask_hloss"
TOP_DOWN = "top_down"
GMP = "gmp"
RESATT = "resatt"

RESATT_BASES = ("direct", "gmp")
RESATT_ATTENTIONS = ("softmax", "sigmoid")

Params = dict[str, Any]


class HeadOutputs(NamedTuple):
  """What every head returns (a pytree; None fields are empty subtrees).

  fine_logits: (B, F).
  coarse_logits: (B, C), or None for `flat` (see `derive_coarse_logits`).
  attention: the coarse × fine map that links the levels, for plots: (1, C, F) when it does not depend on the input,
    (B, C, F) when it does (ResAtt input-dependent, GMP's one-hot argmax map), None for the other heads.
  """
  fine_logits: jax.Array
  coarse_logits: jax.Array | None = None
  attention: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class HeadOptions:
  """Head hyper-parameters.

  coarse_weight: w_c, the weight of the coarse BCE in the loss of every head that has coarse logits (the SPEC writes
    it for GMP and ResAtt only; with the default 1 all heads are as the SPEC's table says).
  hierarchy_loss_weight: λ_h of `multitask_hloss`.
  resatt_base: 'direct' (z_c = h W_c + b_c + λ·A z_f) or 'gmp' (z_c = GMP(z_f) + λ·A z_f).
  resatt_attention: 'softmax' (over fine tags, each row sums to 1) or 'sigmoid' (element-wise) of Q Kᵀ/√d.
  resatt_input_dependent: shift the queries and the keys by linear projections of h, making A per example. A key
    shift shared by all fine tags changes nothing in a softmax row, so with 'softmax' only the query shift matters.
  resatt_masked: restrict A to each coarse tag's own children (masked softmax, or sigmoid times M).
  resatt_dim: d, the width of queries and keys.
  resatt_lambda_init: initial value of the learned residual scale λ.

  The ResAtt defaults (direct base, masked softmax, input-independent) are the form the heads study chose
  (RESULTS.md).
  """
  coarse_weight: float = 1.0
  hierarchy_loss_weight: float = 1.0
  resatt_base: str = "direct"
  resatt_attention: str = "softmax"
  resatt_input_dependent: bool = False
  resatt_masked: bool = True
  resatt_dim: int = 64
  resatt_lambda_init: float = 1.0

  def __post_init__(self):
    for key in ("coarse_weight", "hierarchy_loss_weight", "resatt_lambda_init"):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"head option {key!r} must be a finite number, got {value!r}")
      object.__setattr__(self, key, float(value))
    for key in ("coarse_weight", "hierarchy_loss_weight"):
      if getattr(self, key) < 0:
        raise ConfigError(f"head option {key!r} must be >= 0, got {getattr(self, key)!r}")
    for key, valid in (("resatt_base", RESATT_BASES), ("resatt_attention", RESATT_ATTENTIONS)):
      if getattr(self, key) not in valid:
        raise ConfigError(f"head option {key!r} must be one of {list(valid)}, got {getattr(self, key)!r}")
    for key in ("resatt_input_dependent", "resatt_masked"):
      if not isinstance(getattr(self, key), bool):
        raise ConfigError(f"head option {key!r} must be true or false, got {getattr(self, key)!r}")
    dim = self.resatt_dim
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
      raise ConfigError(f"head option 'resatt_dim' must be a positive integer, got {dim!r}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | None) -> HeadOptions:
    """Options from a config mapping; unknown keys and impossible values raise ConfigError."""
    d = dict(d or {})
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(k for k in d if k not in valid)
    if unknown:
      raise ConfigError(f"unknown head option(s) {unknown}; valid options are {valid}")
    return cls(**d)


def needs_hierarchy(name: str) -> bool:
  """Whether head `name` computes coarse logits of its own, and so needs a coarse→fine hierarchy to be built."""
  if name not in HEADS:
    raise ConfigError(f"unknown head {name!r}; valid heads are {list(HEADS)}")
  return HEADS[name].coarse_logits


def _check(name: str, hierarchy: Hierarchy | None) -> Head:
  """The registry entry of head `name`, after checking that the head exists and has the hierarchy it needs."""
  if needs_hierarchy(name) and hierarchy is None:
    raise ConfigError(
        f"head {name!r} needs a coarse→fine tag hierarchy; give a hierarchy file, or use the {FLAT!r} head")
  return HEADS[name]


def _dense_init(rng, in_dim: int, out_dim: int) -> Params:
  return {"kernel": jax.nn.initializers.lecun_normal()(rng, (in_dim, out_dim), jnp.float32),
          "bias": jnp.zeros((out_dim,), jnp.float32)}


def _dense(params: Params, x: jax.Array) -> jax.Array:
  return x @ params["kernel"] + params["bias"]


class _InitKeys(NamedTuple):
  fine: jax.Array
  coarse: jax.Array
  queries: jax.Array
  keys: jax.Array
  query_shift: jax.Array
  key_shift: jax.Array


def _split(rng: jax.Array) -> _InitKeys:
  """The key of each parameter group. One split for every head, so that a group starts the same in all heads."""
  return _InitKeys(*jax.random.split(rng, len(_InitKeys._fields)))


def _init_fine(rng, embed_dim: int, num_fine: int, hierarchy: Hierarchy | None, options: HeadOptions) -> Params:
  del hierarchy, options  # unused
  return {"fine": _dense_init(_split(rng).fine, embed_dim, num_fine)}


def _init_fine_and_coarse(rng, embed_dim: int, num_fine: int, hierarchy: Hierarchy, options: HeadOptions) -> Params:
  return {**_init_fine(rng, embed_dim, num_fine, hierarchy, options),
          "coarse": _dense_init(_split(rng).coarse, embed_dim, hierarchy.num_coarse)}


def _init_resatt(rng, embed_dim: int, num_fine: int, hierarchy: Hierarchy, options: HeadOptions) -> Params:
  base_init = _init_fine_and_coarse if options.resatt_base == "direct" else _init_fine
  params = base_init(rng, embed_dim, num_fine, hierarchy, options)
  keys, d = _split(rng), options.resatt_dim
  # Unit-variance queries and keys give Q Kᵀ/√d of unit variance: a soft, not yet decided, initial map.
  normal = jax.nn.initializers.normal(stddev=1.0)
  resatt = {"queries": normal(keys.queries, (hierarchy.num_coarse, d), jnp.float32),
            "keys": normal(keys.keys, (num_fine, d), jnp.float32),
            "lambda": jnp.asarray(options.resatt_lambda_init, jnp.float32)}
  if options.resatt_input_dependent:
    resatt["query_shift"] = _dense_init(keys.query_shift, embed_dim, d)
    resatt["key_shift"] = _dense_init(keys.key_shift, embed_dim, d)
  return {**params, "resatt": resatt}


def init_params(rng: jax.Array, name: str, embed_dim: int, num_fine: int, hierarchy: Hierarchy | None,
                options: HeadOptions = HeadOptions()) -> Params:
  """Initial parameters of head `name`; `rng` is the only traced input (usable as a Flax `self.param` init)."""
  head = _check(name, hierarchy)
  if hierarchy is not None and hierarchy.num_fine != num_fine:
    raise ConfigError(f"the hierarchy has {hierarchy.num_fine} fine tags but the dataset has {num_fine}")
  return head.init(rng, embed_dim, num_fine, hierarchy, options)


def grouped_max(fine_logits: jax.Array, hierarchy: Hierarchy) -> jax.Array:
  """z_c[j] = max over the children i of j of z_f[i]: (..., F) → (..., C)."""
  member = jnp.asarray(hierarchy.mask, bool)
  # Every group has a child, so -inf never wins; where() passes no gradient to the masked entries.
  return jnp.max(jnp.where(member, fine_logits[..., None, :], -jnp.inf), axis=-1)


def derive_coarse_logits(fine_logits: jax.Array, hierarchy: Hierarchy) -> jax.Array:
  """Coarse logits of a flat model by the max rule: P_c[j] = max of its children's P_f (sigmoid is monotonic)."""
  return grouped_max(jnp.asarray(fine_logits), hierarchy)


def coarse_outputs(outputs: HeadOutputs, hierarchy: Hierarchy | None) -> jax.Array | None:
  """The coarse logits a model answers with: its head's own, or for a flat head with a hierarchy the max rule
  over each family's fine logits (SPEC §5); None for a model without a hierarchy. Evaluation and tagging both
  use this."""
  if outputs.coarse_logits is not None or hierarchy is None:
    return outputs.coarse_logits
  return derive_coarse_logits(outputs.fine_logits, hierarchy)


def _top_down_fine_logits(coarse_logits: jax.Array, fine_logits: jax.Array, hierarchy: Hierarchy) -> jax.Array:
  """logit(σ(a)·σ(b)) with a = z_c[parent], b = z_f, without leaving log space.

  log P = log σ(a) + log σ(b) = a + b − softplus(a) − softplus(b), and
  log(1 − P) = log((1 + eᵃ + eᵇ)/((1 + eᵃ)(1 + eᵇ))) = logsumexp(0, a, b) − softplus(a) − softplus(b),
  so logit P = log P − log(1 − P) = a + b − logsumexp(0, a, b): no 1 − P that rounds to 0 when both saturate,
  and finite gradients (a softmax) everywhere.
  """
  a = coarse_logits[..., jnp.asarray(hierarchy.parent)]
  b = fine_logits
  lse = jax.nn.logsumexp(jnp.stack([jnp.zeros_like(b), a, b], axis=-1), axis=-1)
  # b − lse ≤ 0 in exact arithmetic, but rounding may put it an ulp above 0; the clamp keeps P_f ≤ P_c in floats.
  return a + jnp.minimum(b - lse, 0.0)


def _resatt_attention(params: Params, embedding: jax.Array, hierarchy: Hierarchy, options: HeadOptions) -> jax.Array:
  """The attention map A, (1, C, F) or, input-dependent, (B, C, F), entries in [0, 1]."""
  queries = params["queries"][None]  # (1, C, d)
  keys = params["keys"][None]  # (1, F, d)
  if options.resatt_input_dependent:
    queries = queries + _dense(params["query_shift"], embedding)[:, None, :]
    keys = keys + _dense(params["key_shift"], embedding)[:, None, :]
  scores = jnp.einsum("bcd,bfd->bcf", queries, keys) / math.sqrt(options.resatt_dim)
  member = jnp.asarray(hierarchy.mask, bool)
  if options.resatt_attention == "softmax":
    # Every coarse tag has a child, so a masked row never is all -inf.
    return jax.nn.softmax(jnp.where(member, scores, -jnp.inf) if options.resatt_masked else scores, axis=-1)
  attention = jax.nn.sigmoid(scores)
  return attention * jnp.asarray(hierarchy.mask, attention.dtype) if options.resatt_masked else attention


def _apply_flat(params: Params, embedding: jax.Array, hierarchy: Hierarchy | None,
                options: HeadOptions) -> HeadOutputs:
  del hierarchy, options  # unused
  return HeadOutputs(_dense(params["fine"], embedding))


def _apply_multitask(params: Params, embedding: jax.Array, hierarchy: Hierarchy,
                     options: HeadOptions) -> HeadOutputs:
  del hierarchy, options  # unused
  return HeadOutputs(_dense(params["fine"], embedding), _dense(params["coarse"], embedding))


def _apply_top_down(params: Params, embedding: jax.Array, hierarchy: Hierarchy,
                    options: HeadOptions) -> HeadOutputs:
  del options  # unused
  coarse = _dense(params["coarse"], embedding)
  return HeadOutputs(_top_down_fine_logits(coarse, _dense(params["fine"], embedding), hierarchy), coarse)


def _apply_gmp(params: Params, embedding: jax.Array, hierarchy: Hierarchy, options: HeadOptions) -> HeadOutputs:
  del options  # unused
  fine = _dense(params["fine"], embedding)
  picked = jnp.where(jnp.asarray(hierarchy.mask, bool), fine[:, None, :], -jnp.inf)
  one_hot = jax.nn.one_hot(jnp.argmax(picked, axis=-1), hierarchy.num_fine, dtype=fine.dtype)
  return HeadOutputs(fine, grouped_max(fine, hierarchy), jax.lax.stop_gradient(one_hot))


def _apply_resatt(params: Params, embedding: jax.Array, hierarchy: Hierarchy, options: HeadOptions) -> HeadOutputs:
  fine = _dense(params["fine"], embedding)
  resatt = params["resatt"]
  attention = _resatt_attention(resatt, embedding, hierarchy, options)
  base = _dense(params["coarse"], embedding) if options.resatt_base == "direct" else grouped_max(fine, hierarchy)
  coarse = base + resatt["lambda"] * jnp.einsum("bcf,bf->bc", attention, fine)
  return HeadOutputs(fine, coarse, attention)


def apply(name: str, params: Params, embedding: jax.Array, hierarchy: Hierarchy | None,
          options: HeadOptions = HeadOptions()) -> HeadOutputs:
  """Fine and coarse logits of head `name` for embeddings (B, D)."""
  return _check(name, hierarchy).apply(params, embedding, hierarchy, options)


def _mean(per_entry: jax.Array) -> jax.Array:
  """Mean over tags (last axis), then over examples."""
  return jnp.mean(jnp.mean(per_entry, axis=-1))


def _bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """BCE with logits, softplus(z) − y·z: stable for any z."""
  return _mean(jax.nn.softplus(logits) - targets * logits)


def _fine_loss(outputs: HeadOutputs, fine_targets: jax.Array, coarse_targets: jax.Array | None,
               hierarchy: Hierarchy | None, options: HeadOptions) -> tuple[jax.Array, dict[str, jax.Array]]:
  del coarse_targets, hierarchy, options  # unused
  parts = {"fine_bce": _bce(outputs.fine_logits, fine_targets)}
  return parts["fine_bce"], parts


def _two_level_loss(outputs: HeadOutputs, fine_targets: jax.Array, coarse_targets: jax.Array,
                    hierarchy: Hierarchy, options: HeadOptions) -> tuple[jax.Array, dict[str, jax.Array]]:
  total, parts = _fine_loss(outputs, fine_targets, coarse_targets, hierarchy, options)
  parts["coarse_bce"] = _bce(outputs.coarse_logits, coarse_targets)
  return total + options.coarse_weight * parts["coarse_bce"], parts


def _hierarchy_penalty_loss(outputs: HeadOutputs, fine_targets: jax.Array, coarse_targets: jax.Array,
                            hierarchy: Hierarchy, options: HeadOptions) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The two BCEs plus λ_h·mean(max(0, P_f − P_c[parent])²)."""
  total, parts = _two_level_loss(outputs, fine_targets, coarse_targets, hierarchy, options)
  fine_probs = jax.nn.sigmoid(outputs.fine_logits)
  parent_probs = jax.nn.sigmoid(outputs.coarse_logits)[..., jnp.asarray(hierarchy.parent)]
  parts["hierarchy"] = _mean(jnp.square(jax.nn.relu(fine_probs - parent_probs)))
  return total + options.hierarchy_loss_weight * parts["hierarchy"], parts


def loss(name: str, outputs: HeadOutputs, fine_targets: jax.Array, coarse_targets: jax.Array | None,
         hierarchy: Hierarchy | None, options: HeadOptions = HeadOptions()) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Training loss of head `name` and its unweighted parts.

  Args:
    outputs: what `apply` returned.
    fine_targets: (B, F) in [0, 1].
    coarse_targets: (B, C), or None to derive them from the fine targets (a coarse tag is present iff a child is).
      Ignored by `flat`.

  Returns:
    (total, parts) with parts `fine_bce`, and, where the head has them, `coarse_bce` and `hierarchy`.
  """
  head = _check(name, hierarchy)
  fine_targets = jnp.asarray(fine_targets, outputs.fine_logits.dtype)
  if head.coarse_logits:
    if coarse_targets is None:
      coarse_targets = grouped_max(fine_targets, hierarchy)
    coarse_targets = jnp.asarray(coarse_targets, outputs.coarse_logits.dtype)
  return head.loss(outputs, fine_targets, coarse_targets, hierarchy, options)


class Head(NamedTuple):
  """A head, as the functions `init_params`, `apply` and `loss` call for it.

  init(rng, embed_dim, num_fine, hierarchy, options) → parameters.
  apply(params, embedding, hierarchy, options) → HeadOutputs.
  loss(outputs, fine_targets, coarse_targets, hierarchy, options) → (total, parts); the targets
    come in the logits' dtype, the coarse ones already derived where the head has coarse logits.
  coarse_logits: whether the head computes coarse logits of its own, trained by a coarse BCE; such a head needs a
    hierarchy. Without: coarse outputs by the max rule after training (`derive_coarse_logits`).
  learned_map: whether `HeadOutputs.attention` is a learned coarse × fine map, which `flaxtag.explain` plots (GMP's
    one-hot argmax map only restates the hierarchy).
  """
  init: Callable[..., Params]
  apply: Callable[..., HeadOutputs]
  loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  coarse_logits: bool
  learned_map: bool = False


# Every head by name; adding a head is adding an entry.
HEADS: dict[str, Head] = {
    FLAT: Head(_init_fine, _apply_flat, _fine_loss, coarse_logits=False),
    MULTITASK: Head(_init_fine_and_coarse, _apply_multitask, _two_level_loss, coarse_logits=True),
    MULTITASK_HLOSS: Head(_init_fine_and_coarse, _apply_multitask, _hierarchy_penalty_loss, coarse_logits=True),
    TOP_DOWN: Head(_init_fine_and_coarse, _apply_top_down, _two_level_loss, coarse_logits=True),
    GMP: Head(_init_fine, _apply_gmp, _two_level_loss, coarse_logits=True),
    RESATT: Head(_init_resatt, _apply_resatt, _two_level_loss, coarse_logits=True, learned_map=True),
}
HEAD_NAMES = tuple(HEADS)
