"""SAEBench's TPP pipeline in JAX: mean pooling, one-vs-rest linear probes, latent effects, top-N
latents and the TPP metric (paper-method 3.2).

* Pooling: the residual at the SAE site, mean over the tokens of ``pool_mask`` (BOS/pad/EOS out).
* Probes: one linear probe per class on balanced one-vs-rest sets (all positives of the class, as
  many negatives drawn from the other classes), BCE-with-logits + ``l1 * sum|w|``, AdamW (torch's
  defaults: betas 0.9/0.999, eps 1e-8, weight decay 0.01) with lr 1e-3, 20 epochs, batch 16;
  trained for every class at once (``jax.vmap`` over classes, ``lax.scan`` over batches). Batch
  order comes from the host (``batch_order``) so that a reference can replay it.
* Latent effects: ``clamp_min(mean_pos(zbar) - mean_neg(zbar), 0) * (W_dec @ w_probe)`` with zbar
  the per-input mean SAE activation over pooled tokens; the top-N positive effects per class.
* TPP metric: ablate class i's top-N latents (zero at every position, error kept); intended =
  clean - ablated accuracy of probe i, unintended = the same averaged over the other probes; the
  metric is intended - unintended, averaged over classes, per N.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recovery_jax import batching, intervene
from recovery_jax.sae import core as sae_core

Array = jax.Array
TPP_NS = (2, 5, 10, 20, 50, 100, 500)


class ProbeSet(NamedTuple):
  """One-vs-rest probes: w [C, d], b [C]."""

  w: Array
  b: Array


def mean_pool(h: Array, mask: Array) -> Array:
  """h [n, T, ...] mean over the tokens of mask [n, T] -> [n, ...] (0 where nothing is pooled)."""
  m = mask.astype(jnp.float32)
  m = m.reshape(m.shape + (1,) * (h.ndim - 2))
  return (h.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def ovr_sets(labels: np.ndarray, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Balanced one-vs-rest sets: (idx [C, 2m], y [C, 2m]) with m = the smallest class size; class c's
  set holds m of its examples (y = 1) and m examples of the other classes (y = 0), seeded."""
  labels = np.asarray(labels)
  counts = np.bincount(labels, minlength=n_classes)
  if (counts == 0).any():
    raise ValueError(f"ovr_sets: class {int(np.flatnonzero(counts == 0)[0])} has no examples")
  m = int(counts.min())
  rng = np.random.default_rng(seed)
  idx, y = [], []
  for c in range(n_classes):
    pos = rng.permutation(np.flatnonzero(labels == c))[:m]
    neg = rng.permutation(np.flatnonzero(labels != c))[:m]
    idx.append(np.concatenate([pos, neg]))
    y.append(np.concatenate([np.ones(m), np.zeros(len(neg))]))
  return np.stack(idx).astype(np.int32), np.stack(y).astype(np.float32)


def batch_order(n_classes: int, m: int, epochs: int, batch_size: int, seed: int = 0) -> np.ndarray:
  """[C, epochs * n_batches, batch_size] int: a fresh permutation of 0..m-1 per class and epoch,
  cut into batches; the last batch is padded with -1 (ignored)."""
  nb = -(-m // batch_size)
  rng = np.random.default_rng(seed)
  out = np.full((n_classes, epochs, nb * batch_size), -1, np.int32)
  for c in range(n_classes):
    for e in range(epochs):
      out[c, e, :m] = rng.permutation(m)
  return out.reshape(n_classes, epochs * nb, batch_size)


def init_probes(n_classes: int, d: int, seed: int = 0) -> ProbeSet:
  """torch ``nn.Linear(d, 1)`` initialisation: U(-1/sqrt(d), 1/sqrt(d)) for weight and bias."""
  rng = np.random.default_rng(seed)
  k = 1.0 / np.sqrt(d)
  return ProbeSet(jnp.asarray(rng.uniform(-k, k, (n_classes, d)), jnp.float32),
                  jnp.asarray(rng.uniform(-k, k, (n_classes,)), jnp.float32))


def probe_loss(w: Array, b: Array, x: Array, y: Array, valid: Array, l1: float) -> Array:
  """Mean BCE-with-logits over the valid rows of a batch + l1 * sum|w| (x [B, d], y/valid [B])."""
  logits = x @ w + b
  bce = optax.sigmoid_binary_cross_entropy(logits, y)
  v = valid.astype(jnp.float32)
  return (bce * v).sum() / jnp.maximum(v.sum(), 1.0) + l1 * jnp.abs(w).sum()


@functools.partial(jax.jit, static_argnames=("l1", "lr", "weight_decay"))
def train_probes(x: Array, idx: Array, y: Array, order: Array, init: ProbeSet, *, l1: float = 1e-3, lr: float = 1e-3,
                 weight_decay: float = 0.01) -> ProbeSet:
  """One probe per class at once. x [n, d] pooled inputs; idx / y [C, M] each class's set;
  order [C, steps, B] batch positions into the set (-1: padding); init ProbeSet -> ProbeSet."""
  opt = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
  grad = jax.grad(probe_loss, argnums=(0, 1))

  def one(idx_c, y_c, order_c, w, b):
    def step(carry, pos):
      w, b, st = carry
      valid = pos >= 0
      p = jnp.where(valid, pos, 0)
      g = grad(w, b, x[idx_c[p]], y_c[p], valid, l1)
      up, st = opt.update(g, st, (w, b))
      w, b = optax.apply_updates((w, b), up)
      return (w, b, st), None

    (w, b, _), _ = jax.lax.scan(step, (w, b, opt.init((w, b))), order_c)
    return w, b

  w, b = jax.vmap(one)(idx, y, order, init.w, init.b)
  return ProbeSet(w, b)


def fit_probes(x: np.ndarray, labels: np.ndarray, n_classes: int, *, l1: float = 1e-3, lr: float = 1e-3,
               epochs: int = 20, batch_size: int = 16, seed: int = 0) -> ProbeSet:
  """SAEBench's probes on pooled train inputs x [n, d] with labels [n]."""
  idx, y = ovr_sets(labels, n_classes, seed)
  order = batch_order(n_classes, idx.shape[1], epochs, batch_size, seed + 1)
  return train_probes(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(y), jnp.asarray(order),
                      init_probes(n_classes, x.shape[1], seed + 2), l1=l1, lr=lr)


def accuracies(x: np.ndarray, idx: np.ndarray, y: np.ndarray, probes: ProbeSet) -> np.ndarray:
  """[C]: probe c's accuracy on its set (idx / y [C, M]) of pooled inputs x [n, d] (logit > 0 = 1)."""
  xs = np.asarray(x)[np.asarray(idx)]  # [C, M, d]
  logits = np.einsum("cmd,cd->cm", xs, np.asarray(probes.w)) + np.asarray(probes.b)[:, None]
  return ((logits > 0) == (np.asarray(y) > 0.5)).mean(-1)


# ----------------------------------------------------------------------------------------------
# latent effects


@functools.partial(jax.jit, static_argnames=("cfg",))
def _pooled_latents(sae, cfg, h, mask):
  return mean_pool(sae_core.encode(sae, cfg, h.astype(jnp.float32)), mask)


def pooled_latents(sae, cfg, h: np.ndarray, mask: np.ndarray, batch_size: int = 32) -> np.ndarray:
  """zbar [n, d_sae]: the per-input mean SAE activation over pooled tokens (h [n, T, d])."""
  return batching.map_batched(lambda b, _: _pooled_latents(sae, cfg, *b), (h, mask), batch_size)


def latent_effects(zbar: np.ndarray, idx: np.ndarray, y: np.ndarray, probes: ProbeSet, w_dec: np.ndarray) -> np.ndarray:
  """[C, d_sae]: ``clamp_min(mean_pos(zbar) - mean_neg(zbar), 0) * (W_dec @ w_c)`` per class over its
  one-vs-rest set (idx / y [C, M]); w_dec [d_sae, d] (effective decoder rows)."""
  z = np.asarray(zbar, np.float64)[np.asarray(idx)]  # [C, M, F]
  pos = np.asarray(y) > 0.5
  mp = (z * pos[..., None]).sum(1) / np.maximum(pos.sum(1), 1)[:, None]
  mn = (z * ~pos[..., None]).sum(1) / np.maximum((~pos).sum(1), 1)[:, None]
  dot = np.asarray(probes.w, np.float64) @ np.asarray(w_dec, np.float64).T  # [C, F]
  return np.maximum(mp - mn, 0.0) * dot


def top_latents(effects: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(idx [C, n] int32, mask [C, n] bool): the n largest effects per class; only positive effects
  are kept (mask False for the rest, e.g. when fewer than n are positive)."""
  order = np.argsort(-effects, axis=-1, kind="stable")[:, :n]
  vals = np.take_along_axis(effects, order, -1)
  return order.astype(np.int32), vals > 0


def class_clamps(spec: intervene.ClampSpec, sae, effects: np.ndarray, n: int, k_max: int) -> intervene.Clamp:
  """The zero-ablation clamps of every class's top-n latents, stacked over classes (ClampParams [C, k_max])."""
  idx, mask = top_latents(effects, n)
  return intervene.stack_clamps([intervene.make_clamp(spec, sae, idx[c], 0.0, k_max=k_max, feature_mask=mask[c])
                                 for c in range(effects.shape[0])])


@functools.partial(jax.jit, static_argnames=("cfg",))
def _ablated_pooled(sae, cfg, idx, keep, h, mask):
  """idx / keep [S, K] latent sets; h [b, T, d] -> [S, b, d]. One full SAE encode serves every set
  (TopK needs the full encode anyway): x' = x + decode_delta(-z_S where z_S > 0)."""
  x = h.astype(jnp.float32)
  z = sae_core.encode(sae, cfg, x)  # [b, T, F]

  def one(i, k):
    zs = jnp.take(z, i, axis=-1)
    dz = jnp.where(k & (zs > 0), -zs, 0.0)
    return mean_pool(x + sae_core.decode_delta(sae, cfg, dz, i, x).astype(jnp.float32), mask)

  return jax.lax.map(lambda a: one(*a), (idx, keep))


def ablated_pooled(clamps: intervene.Clamp, h: np.ndarray, mask: np.ndarray, batch_size: int = 32) -> np.ndarray:
  """[C, n, d]: pooled residual with each stacked zero-ablation clamp (ClampParams [C, K]) applied at
  every position, error kept (h [n, T, d])."""
  if clamps.spec.mode != "zero" or clamps.spec.error_term != "keep":
    raise ValueError("ablated_pooled: TPP ablation is a zero clamp with the error term kept")
  idx, keep = clamps.params.feature_idx, clamps.params.feature_mask
  fn = lambda b, _: jnp.moveaxis(_ablated_pooled(clamps.sae, clamps.sae_cfg, idx, keep, *b), 1, 0)  # [b, C, d]
  return np.moveaxis(batching.map_batched(fn, (h, mask), batch_size), 0, 1)


class TPPRow(NamedTuple):
  """TPP at one N: per ablated class i, intended [C] and unintended [C]; total = mean(intended - unintended)."""

  n: int
  intended: np.ndarray
  unintended: np.ndarray
  total: float


def tpp_metric(n: int, acc_clean: np.ndarray, acc_ablated: np.ndarray) -> TPPRow:
  """acc_clean [C] (probe j, clean); acc_ablated [C_i, C_j] (probe j with class i's latents ablated)."""
  drop = np.asarray(acc_clean)[None, :] - np.asarray(acc_ablated)  # [i, j]
  c = drop.shape[0]
  intended = np.diag(drop).copy()
  unintended = (drop.sum(1) - intended) / max(c - 1, 1)
  return TPPRow(n, intended, unintended, float(np.mean(intended - unintended)))


def tpp_table(spec: intervene.ClampSpec, sae, effects: np.ndarray, probes: ProbeSet, h_test: np.ndarray,
              mask_test: np.ndarray, idx_test: np.ndarray, y_test: np.ndarray, ns: Sequence[int] = TPP_NS,
              batch_size: int = 32) -> tuple[np.ndarray, list[TPPRow]]:
  """(clean accuracies [C], one TPPRow per N) on the test sets; h_test [n, T, d] indexed by idx_test."""
  pooled = np.asarray(mean_pool(jnp.asarray(h_test), jnp.asarray(mask_test)))
  acc_clean = accuracies(pooled, idx_test, y_test, probes)
  sets = [tp_set for n in ns for tp_set in zip(*top_latents(effects, n))]  # (idx, keep) per (N, class)
  k = max(ns)
  pad = lambda a, v: np.concatenate([a, np.full(k - len(a), v, a.dtype)])
  clamps = intervene.Clamp(spec, sae, intervene.ClampParams(
      jnp.asarray(np.stack([pad(i, 0) for i, _ in sets])), jnp.asarray(np.stack([pad(m, False) for _, m in sets])),
      jnp.zeros((len(sets),), jnp.float32)))
  abl = ablated_pooled(clamps, h_test, mask_test, batch_size)  # [len(ns) * C, n_ex, d]
  c = effects.shape[0]
  rows = []
  for j, n in enumerate(ns):
    acc = np.stack([accuracies(abl[j * c + i], idx_test, y_test, probes) for i in range(c)])
    rows.append(tpp_metric(n, acc_clean, acc))
  return acc_clean, rows
