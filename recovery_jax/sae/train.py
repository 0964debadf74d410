"""SAE training as pure functions: init, losses per architecture, a jit-compiled optax step, and a
resumable loop over activation stores (orbax checkpoints).

N SAEs (one per site) train in one compiled program: the state is a pytree whose leaves carry a
leading site axis [N, ...] (params, one optax state per SAE, dead-latent counters, input scales),
and the step is the per-SAE update ``jax.vmap``-ed over that axis, each SAE fed its own site's batch
[N, B, d_in]. Training one SAE is the N = 1 case (``train(tc, store)`` returns its unstacked state).

Architectures and decoder handling:

* ``topk``: per-token top-k then ReLU, AuxK loss on dead latents (OpenAI / sparsify: the top
  ``aux_k`` pre-activations of dead latents reconstruct the residual error), unit-norm decoder rows:
  the W_dec gradient's component along each row is projected out before the optimiser and the rows
  are renormalised after every step.
* ``jumprelu`` (Gemma Scope recipe): threshold in float32 (clipped at 0) trained through a
  rectangle-kernel straight-through estimator of width ``jumprelu_bandwidth``, L0 penalty whose
  coefficient warms up linearly over ``sparsity_warmup_steps``, unit-norm decoder rows as for topk.
* ``standard`` (ReLU): L1 penalty on ``z * ||W_dec row||`` (scale-free; no renormalisation).

Init: W_dec rows random, W_enc = W_dec^T; ``encoder_init_scale="lsq"`` then scales the encoder so the
initial reconstruction has its least-squares size (``lsq_encoder_scale``; the JumpReLU suite needs it).

Training runs on inputs scaled by a constant ``input_scale`` per site (sqrt(d_in) / mean ||x|| of
that site, SAELens' ``expected_average_only_in``); ``export_params`` folds it into the weights, so the exported SAE
takes raw activations and has ``normalize_activations='none'``.

Shapes: x [B, d_in]; params use SAELens names (W_enc [d_in, d_sae], W_dec [d_sae, d_in], ...).

Size: the stacked N-SAE state, the three architectures' losses and the one vmapped update are
kept together so that a single SAE is visibly the N = 1 case of the same program.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from recovery_jax.sae import core as sae_core
from recovery_jax.sae.config import SAEConfig

Array = jax.Array
TRAINABLE = ("standard", "topk", "jumprelu")
_LOG100 = float(np.log(100.0))  # the L0 controller moves the coefficient within 1/100..100x
ENCODER_INIT_SCALES = ("none", "lsq")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Static training hyper-parameters (hashable: part of the jit cache key)."""

  architecture: str = "topk"
  d_in: int = 576
  d_sae: int = 4608
  k: int = 32  # topk
  lr: float = 1e-3
  warmup_steps: int = 100
  decay_frac: float = 0.2  # linear decay to 0 over the last fraction of steps
  total_steps: int = 1000
  batch_size: int = 4096
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  grad_clip: float = 1.0
  aux_k: int | None = None  # topk AuxK: default d_in // 2
  aux_coeff: float = 1.0 / 32
  dead_tokens: int = 1_000_000  # a latent that did not fire for this many tokens is dead
  l1_coeff: float = 5.0  # standard
  l0_coeff: float = 1e-3  # jumprelu
  sparsity_warmup_steps: int = 0  # the L1 / L0 coefficient rises linearly from 0 over these steps
  jumprelu_bandwidth: float = 0.05
  jumprelu_init_threshold: float = 0.1
  jumprelu_init_l0: float = 0.0  # > 0: one initial threshold for all latents, set so the init sample's mean L0 is this
  jumprelu_freeze_steps: int = 0  # thresholds get no gradient for the first N steps (decoder warm-up)
  dec_init_norm: float = 0.1  # standard: decoder row norm at init
  encoder_init_scale: str = "none"  # "lsq": scale the tied encoder so the init reconstruction is least-squares sized
  threshold_lr_scale: float = 1.0  # jumprelu: the thresholds' learning rate is lr x this (Adam moves each <= ~lr a step)
  l0_target: float = 0.0  # jumprelu, > 0: after the sparsity warmup the L0 coefficient follows the batch L0 to this
  l0_target_rate: float = 0.005  # per step: log coeff += rate * log(L0 / target) (clipped to 1/100..100x); small,
  # because the thresholds follow the coefficient with a lag of ~100 steps and a fast integral overshoots

  def __post_init__(self):
    if self.architecture not in TRAINABLE:
      raise ValueError(f"TrainConfig.architecture={self.architecture!r}: the trainer supports {TRAINABLE}")
    if self.architecture == "topk" and not 0 < self.k <= self.d_sae:
      raise ValueError(f"TrainConfig.k={self.k}: need 0 < k <= d_sae={self.d_sae}")
    if self.l0_target and self.architecture != "jumprelu":
      raise ValueError(f"TrainConfig.l0_target={self.l0_target}: the L0 controller steers the JumpReLU L0 "
                       f"coefficient; architecture={self.architecture!r} (use 0)")
    if self.l0_target < 0 or self.l0_target_rate <= 0 or self.threshold_lr_scale <= 0:
      raise ValueError(f"TrainConfig: need l0_target >= 0, l0_target_rate > 0, threshold_lr_scale > 0; got "
                       f"{self.l0_target}, {self.l0_target_rate}, {self.threshold_lr_scale}")
    if self.encoder_init_scale not in ENCODER_INIT_SCALES:
      raise ValueError(f"TrainConfig.encoder_init_scale={self.encoder_init_scale!r}: expected one of "
                       f"{ENCODER_INIT_SCALES}")

  @property
  def unit_norm_decoder(self) -> bool:
    return self.architecture in ("topk", "jumprelu")

  def sae_config(self, **kw) -> SAEConfig:
    return SAEConfig(architecture=self.architecture, d_in=self.d_in, d_sae=self.d_sae,
                     k=self.k if self.architecture == "topk" else None, apply_b_dec_to_input=True, **kw)


  def sparsity_coeff(self) -> float:
    """The coefficient of the architecture's sparsity term (topk: AuxK; standard: L1; jumprelu: L0)."""
    return {"topk": self.aux_coeff, "standard": self.l1_coeff, "jumprelu": self.l0_coeff}[self.architecture]


class TrainState(NamedTuple):
  """State of one SAE (shapes below), or of N stacked SAEs (a leading [N] axis on every leaf)."""

  params: dict
  opt_state: Any
  step: Array  # [] int32
  since_fired: Array  # [d_sae] int32 tokens since each latent last fired (capped)
  input_scale: Array  # [] float32
  log_coeff_scale: Array  # [] float32: log of the L0 controller's factor on the sparsity coefficient (0 when off)


# --- init ----------------------------------------------------------------------------------------


def init_params(key: Array, tc: TrainConfig, b_dec: np.ndarray | None = None) -> dict:
  """W_dec rows random (unit norm; ``dec_init_norm`` for standard), W_enc = W_dec^T, b_enc = 0,
  b_dec = ``b_dec`` (e.g. the mean of the scaled activations) or 0."""
  w = jax.random.normal(key, (tc.d_sae, tc.d_in), jnp.float32)
  w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
  if not tc.unit_norm_decoder:
    w = w * tc.dec_init_norm
  p = {"W_dec": w, "W_enc": w.T, "b_enc": jnp.zeros((tc.d_sae,), jnp.float32),
       "b_dec": jnp.zeros((tc.d_in,), jnp.float32) if b_dec is None else jnp.asarray(b_dec, jnp.float32)}
  if tc.architecture == "jumprelu":
    p["threshold"] = jnp.full((tc.d_sae,), tc.jumprelu_init_threshold, jnp.float32)
  return p


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  """clip -> (project W_dec gradients orthogonal to the rows) -> Adam with warmup / linear decay."""
  decay_start = int(tc.total_steps * (1 - tc.decay_frac))
  sched = optax.join_schedules(
      [optax.linear_schedule(0.0, tc.lr, max(tc.warmup_steps, 1)),
       optax.constant_schedule(tc.lr),
       optax.linear_schedule(tc.lr, 0.0, max(tc.total_steps - decay_start, 1))],
      [max(tc.warmup_steps, 1), max(decay_start, tc.warmup_steps + 1)])
  parts = [optax.clip_by_global_norm(tc.grad_clip)] if tc.grad_clip else []
  if tc.unit_norm_decoder:
    parts.append(project_decoder_grads())
  parts.append(optax.adam(sched, b1=tc.adam_b1, b2=tc.adam_b2))
  if tc.threshold_lr_scale != 1.0:
    parts.append(scale_leaf("threshold", tc.threshold_lr_scale))
  return optax.chain(*parts)


def scale_leaf(name: str, factor: float) -> optax.GradientTransformation:
  """Multiplies the update of top-level leaf ``name`` by ``factor`` (a per-leaf learning rate)."""

  def update(updates, state, params=None):
    del params
    return ({**updates, name: updates[name] * factor} if name in updates else updates), state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def project_decoder_grads() -> optax.GradientTransformation:
  """Removes from the W_dec gradient its component along each (unit) decoder row."""

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("project_decoder_grads needs params")
    w, g = params["W_dec"], updates["W_dec"]
    updates = dict(updates)
    updates["W_dec"] = g - jnp.sum(g * w, axis=-1, keepdims=True) * w
    return updates, state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def renormalize_decoder(params: dict) -> dict:
  p = dict(params)
  p["W_dec"] = p["W_dec"] / jnp.maximum(jnp.linalg.norm(p["W_dec"], axis=-1, keepdims=True), 1e-8)
  return p


# --- JumpReLU straight-through estimators ----------------------------------------------------------


def _rect(u):
  return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu_ste(pre, threshold, bandwidth):
  """pre * 1[pre > threshold]; d/dthreshold through a rectangle kernel of width ``bandwidth``."""
  return jnp.where(pre > threshold, pre, 0.0)


def _jr_fwd(pre, threshold, bandwidth):
  return jumprelu_ste(pre, threshold, bandwidth), (pre, threshold)


def _jr_bwd(bandwidth, res, g):
  pre, th = res
  d_pre = jnp.where(pre > th, g, 0.0)
  d_th = -(th / bandwidth) * _rect((pre - th) / bandwidth) * g
  return d_pre, d_th.reshape(-1, th.shape[-1]).sum(0)


jumprelu_ste.defvjp(_jr_fwd, _jr_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def step_ste(pre, threshold, bandwidth):
  """1[pre > threshold]; d/dthreshold through a rectangle kernel (no gradient to pre)."""
  return (pre > threshold).astype(pre.dtype)


def _st_fwd(pre, threshold, bandwidth):
  return step_ste(pre, threshold, bandwidth), (pre, threshold)


def _st_bwd(bandwidth, res, g):
  pre, th = res
  d_th = -(1.0 / bandwidth) * _rect((pre - th) / bandwidth) * g
  return jnp.zeros_like(pre), d_th.reshape(-1, th.shape[-1]).sum(0)


step_ste.defvjp(_st_fwd, _st_bwd)


# --- losses --------------------------------------------------------------------------------------


def loss_fn(params: dict, tc: TrainConfig, x: Array, dead: Array, coeff: Array | float | None = None
            ) -> tuple[Array, dict]:
  """Total loss and aux outputs for a batch x [B, d_in] (already scaled); ``dead`` [d_sae] bool;
  ``coeff`` [] the sparsity coefficient (default ``tc.sparsity_coeff()``)."""
  coeff = tc.sparsity_coeff() if coeff is None else coeff
  xin = x - params["b_dec"]
  pre = xin @ params["W_enc"] + params["b_enc"]
  aux = jnp.zeros((), jnp.float32)
  if tc.architecture == "topk":
    # dense form (a gather of k decoder rows per token is far slower on CPU): keep pre >= k-th value
    kth = jax.lax.top_k(jax.lax.stop_gradient(pre), tc.k)[0].min(-1, keepdims=True)  # (a slice [..., -1:] makes XLA:CPU sort)
    z = jnp.where(pre >= kth, jax.nn.relu(pre), 0.0)
    x_hat = z @ params["W_dec"] + params["b_dec"]
    fired = jnp.any(z > 0, 0)
    l0 = jnp.sum(z > 0, -1).mean()
    # AuxK: the top aux_k dead latents reconstruct the (stopped) residual; only run with dead latents
    k_aux = min(tc.aux_k or tc.d_in // 2, tc.d_sae)
    n_dead = dead.sum()
    e = jax.lax.stop_gradient(x - x_hat)

    def aux_loss(params, pre):
      aux_pre = jnp.where(dead, pre, -jnp.inf)
      a_kth = jax.lax.top_k(jax.lax.stop_gradient(aux_pre), k_aux)[0].min(-1, keepdims=True)
      a_z = jnp.where((aux_pre >= a_kth) & dead, pre, 0.0)
      e_hat = a_z @ params["W_dec"]
      scale = jnp.minimum(n_dead / k_aux, 1.0)
      return scale * jnp.sum(jnp.square(e_hat - e), -1).mean()

    aux = jax.lax.cond(n_dead > 0, aux_loss, lambda *_: jnp.zeros((), jnp.float32), params, pre)
    sparsity = coeff * aux
  elif tc.architecture == "standard":
    z = jax.nn.relu(pre)
    x_hat = z @ params["W_dec"] + params["b_dec"]
    fired = jnp.any(z > 0, 0)
    l0 = jnp.sum(z > 0, -1).mean()
    sparsity = coeff * jnp.sum(z * jnp.linalg.norm(params["W_dec"], axis=-1), -1).mean()
  else:  # jumprelu
    th = params["threshold"].astype(jnp.float32)
    z = jumprelu_ste(pre, th, tc.jumprelu_bandwidth)
    x_hat = z @ params["W_dec"] + params["b_dec"]
    fired = jnp.any(z > 0, 0)
    l0_per = step_ste(pre, th, tc.jumprelu_bandwidth).sum(-1)
    l0 = jax.lax.stop_gradient(l0_per.mean())
    sparsity = coeff * l0_per.mean()
  sq = jnp.sum(jnp.square(x_hat - x), -1)
  mse = sq.mean()
  ev = 1.0 - sq.sum() / jnp.sum(jnp.square(x - x.mean(0)))
  return mse + sparsity, {"mse": mse, "explained_variance": ev, "l0": l0, "aux": aux, "fired": fired}


def site_update(tc: TrainConfig, optimizer: optax.GradientTransformation, state: TrainState, x: Array,
                coeff: Array) -> tuple[TrainState, dict]:
  """One optimiser step of one SAE: state (unstacked), x [B, d_in] raw activations, coeff [] sparsity
  coefficient before warmup. Pure; ``make_train_step`` jits and vmaps it."""
  x = x.astype(jnp.float32) * state.input_scale
  dead = state.since_fired >= tc.dead_tokens
  if tc.l0_target > 0:  # the controller's factor (log_coeff_scale stays 0 without a target)
    coeff = coeff * jnp.exp(state.log_coeff_scale)
  if tc.sparsity_warmup_steps and tc.architecture != "topk":
    coeff = coeff * jnp.minimum(1.0, (state.step + 1) / tc.sparsity_warmup_steps)
  (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, tc, x, dead, coeff)
  log_scale = state.log_coeff_scale
  if tc.l0_target > 0:  # integral controller on the batch L0 (jumprelu only: __post_init__)
    moved = log_scale + tc.l0_target_rate * jnp.log(jnp.maximum(out["l0"], 1e-3) / tc.l0_target)
    log_scale = jnp.where(state.step + 1 >= tc.sparsity_warmup_steps, jnp.clip(moved, -_LOG100, _LOG100), log_scale)
  if tc.jumprelu_freeze_steps and "threshold" in grads:  # zero gradient: Adam's moments stay 0, no move
    grads = {**grads, "threshold": jnp.where(state.step < tc.jumprelu_freeze_steps, 0.0, grads["threshold"])}
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if tc.unit_norm_decoder:
    params = renormalize_decoder(params)
  if "threshold" in params:
    params["threshold"] = jnp.maximum(params["threshold"], 0.0)
  since = jnp.where(out["fired"], 0, jnp.minimum(state.since_fired + x.shape[0], 2 ** 30))
  metrics = {"loss": loss, "mse": out["mse"], "explained_variance": out["explained_variance"],
             "l0": out["l0"], "aux": out["aux"], "dead_fraction": dead.mean(), "sparsity_coeff": coeff}
  return TrainState(params, opt_state, state.step + 1, since, state.input_scale, log_scale), metrics


SITE_AXIS_MODES = ("vmap", "map")


def make_train_step(tc: TrainConfig, optimizer: optax.GradientTransformation, n_sites: int = 1,
                    site_axis: str = "vmap") -> Callable:
  """jit-compiled ``step(state, x [N, B, d_in], coeffs [N]) -> (state, metrics {name: [N]})`` over
  N stacked SAEs: ``site_update`` vmapped over the site axis (``site_axis="map"``: ``lax.map``, the
  sites one after another inside the same program, which a small CPU may run faster). N = 1 calls it
  on the squeezed state: the same update, and a ``lax.cond`` stays a branch (vmap makes it a select)."""
  if site_axis not in SITE_AXIS_MODES:
    raise ValueError(f"make_train_step: site_axis={site_axis!r}, expected one of {SITE_AXIS_MODES}")
  update = functools.partial(site_update, tc, optimizer)
  if site_axis == "map" and n_sites > 1:
    stacked = lambda state, x, coeffs: jax.lax.map(lambda a: update(*a), (state, x, coeffs))
  elif n_sites == 1:
    def stacked(state, x, coeffs):
      sq = lambda t: jax.tree.map(lambda a: a[0], t)
      st, m = update(sq(state), x[0], coeffs[0])
      return jax.tree.map(lambda a: a[None], (st, m))
  else:
    stacked = jax.vmap(update)
  return jax.jit(stacked, donate_argnums=0)


def init_state(key: Array, tc: TrainConfig, sample: np.ndarray, optimizer: optax.GradientTransformation) -> TrainState:
  """State of one SAE from a sample of raw activations [n, d_in]: input scale and b_dec (mean) from it."""
  sample = np.asarray(sample, np.float32)
  scale = float(np.sqrt(tc.d_in) / np.mean(np.linalg.norm(sample, axis=-1)))
  params = init_params(key, tc, b_dec=(sample * scale).mean(0))
  if tc.architecture == "jumprelu" and tc.jumprelu_init_l0 > 0:
    params["threshold"] = jnp.full((tc.d_sae,), initial_threshold(params, sample * scale, tc.jumprelu_init_l0),
                                   jnp.float32)
  if tc.encoder_init_scale == "lsq":
    c = lsq_encoder_scale(params, tc, sample * scale)
    params = {**params, **{k: params[k] * c for k in ("W_enc", "b_enc", "threshold") if k in params}}
  return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32),
                    jnp.zeros((tc.d_sae,), jnp.int32), jnp.asarray(scale, jnp.float32), jnp.zeros((), jnp.float32))


def initial_threshold(params: dict, x: np.ndarray, l0: float) -> float:
  """The threshold at which the initial encoder gives mean L0 = ``l0`` on scaled activations x [n, d_in]
  (the (n*l0)-th largest positive pre-activation; Language-Model-SAEs initialises JumpReLU this way):
  starting near the target sparsity spares the threshold a long climb at a small learning rate."""
  pre = np.maximum((x - np.asarray(params["b_dec"])) @ np.asarray(params["W_enc"]) + np.asarray(params["b_enc"]), 0.0)
  flat = pre.ravel()
  r = min(max(int(round(len(x) * l0)), 1), flat.size)
  return float(np.partition(flat, flat.size - r)[flat.size - r])


def lsq_encoder_scale(params: dict, tc: TrainConfig, x: np.ndarray) -> float:
  """c = <x - b_dec, x_hat0> / ||x_hat0||^2 over scaled inputs x [n, d_in], x_hat0 = z(x) @ W_dec: the
  least-squares size of the initial reconstruction. Multiplying W_enc, b_enc and the thresholds by c
  scales every code by c and keeps which latents fire (all three encoders are positively
  homogeneous). Why: with W_enc = W_dec^T the init codes overshoot (c ~ 0.2 at SmolLM2 layer 3,
  0.5 at layer 12, JumpReLU at L0 64), so the first steps push every active pre-activation down
  through its threshold, where it gets no gradient again: L0 collapses to ~20 before the L0
  penalty matters (assets/README.md). Returns 1.0 when nothing fires or c <= 0."""
  z = np.asarray(sae_core.encode(params, tc.sae_config(), jnp.asarray(x, jnp.float32)))  # the inference encoder
  x_hat = z @ np.asarray(params["W_dec"], np.float32)
  e = np.asarray(x, np.float32) - np.asarray(params["b_dec"], np.float32)
  den, num = float(np.sum(x_hat * x_hat)), float(np.sum(e * x_hat))
  return num / den if den > 0 and num > 0 else 1.0


def stack_states(states: Sequence[TrainState]) -> TrainState:
  """N single-SAE states -> one state with a leading [N] axis on every leaf."""
  return jax.tree.map(lambda *a: jnp.stack(a), *states)


def site_state(state: TrainState, i: int) -> TrainState:
  """SAE ``i`` of a stacked state (leaves without the site axis)."""
  return jax.tree.map(lambda a: a[i], state)


def export_params(state_or_params, tc: TrainConfig, input_scale: float | None = None) -> dict:
  """Params for raw activations (input scale folded in: W_enc*s, W_dec/s, b_dec/s), numpy float32.
  Takes one SAE's state (``site_state`` of a stacked one) or its params and ``input_scale``."""
  if isinstance(state_or_params, TrainState):
    params, s = state_or_params.params, float(state_or_params.input_scale)
  else:
    params, s = state_or_params, float(input_scale)
  p = {k: np.asarray(v, np.float32) for k, v in params.items()}
  if p["W_enc"].ndim != 2:
    raise ValueError(f"export_params: W_enc has shape {p['W_enc'].shape}; pass one SAE (site_state(state, i))")
  p["W_enc"], p["W_dec"], p["b_dec"] = p["W_enc"] * s, p["W_dec"] / s, p["b_dec"] / s
  return p


# --- data order over a store -----------------------------------------------------------------------


def batch_indices(n_rows: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Rows of step ``step``: epoch e = step // (n_rows // batch_size) uses permutation(seed, e)."""
  spe = n_rows // batch_size
  if spe == 0:
    raise ValueError(f"the store has {n_rows} rows, fewer than one batch of {batch_size}")
  epoch, i = divmod(step, spe)
  perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
  return np.sort(perm[i * batch_size:(i + 1) * batch_size])


@functools.lru_cache(maxsize=8)
def _optimizer_and_step(tc: TrainConfig, n_sites: int = 1, site_axis: str = "vmap"):
  """One optimizer and compiled step per (TrainConfig, N, mode) (a resumed call in the same process reuses it)."""
  optimizer = make_optimizer(tc)
  return optimizer, make_train_step(tc, optimizer, n_sites, site_axis)


# --- loop with orbax -------------------------------------------------------------------------------


def _manager(ckpt_dir: str, max_to_keep: int = 2):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def restore_or_init(ckpt_dir: str, template: TrainState) -> TrainState:
  """Latest checkpoint under ``ckpt_dir`` restored into the structure of ``template``, else it."""
  import orbax.checkpoint as ocp
  mngr = _manager(ckpt_dir)
  last = mngr.latest_step()
  if last is None:
    mngr.close()
    return template
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  state = mngr.restore(last, args=ocp.args.StandardRestore(abstract))
  mngr.close()
  logging.info("resumed from %s step %d", ckpt_dir, int(np.max(np.asarray(state.step))))
  return TrainState(*state) if not isinstance(state, TrainState) else state


def train(tc: TrainConfig, stores, *, seed: int = 0, seeds: Sequence[int] | None = None,
          sparsity_coeffs: Sequence[float] | None = None, ckpt_dir: str | None = None, ckpt_every: int = 200,
          log_every: int = 50, stop_after: int | None = None, progress: bool = True,
          log_fn: Callable[[int, dict], None] | None = None, site_axis: str = "vmap") -> tuple[TrainState, list[dict]]:
  """Trains N SAEs in one compiled program for ``tc.total_steps``.

  ``stores``: one array of raw activations [rows, d_in] (array or memmap; one SAE, the state and
  metrics come back without the site axis), or a sequence of N such arrays, one per site (a
  stacked state and metrics as lists of N floats). SAE i uses ``seeds[i]`` (default ``seed + i``)
  for its init key and data order, exactly as a one-store call with ``seed=seeds[i]`` does, so N
  separate runs and one N-site run give the same SAEs. ``sparsity_coeffs`` [N] overrides
  ``tc.sparsity_coeff()`` per SAE. ``site_axis``: "vmap" (default) or "map" (see ``make_train_step``).

  With ``ckpt_dir`` the state is checkpointed every ``ckpt_every`` steps (and at the end) and a
  restarted call resumes from the latest checkpoint, reproducing the same data order.
  ``stop_after`` ends the call after that many steps of this call (tests of resume).
  Returns the final state and the logged metrics (one dict per ``log_every`` steps).
  """
  import orbax.checkpoint as ocp
  single = isinstance(stores, np.ndarray) or hasattr(stores, "shape")
  stores = [stores] if single else list(stores)
  n = len(stores)
  if not n:
    raise ValueError("train: no stores")
  seeds = [seed + i for i in range(n)] if seeds is None else [int(x) for x in seeds]
  coeffs = [tc.sparsity_coeff()] * n if sparsity_coeffs is None else [float(c) for c in sparsity_coeffs]
  if len(seeds) != n or len(coeffs) != n:
    raise ValueError(f"train: {n} stores but {len(seeds)} seeds and {len(coeffs)} sparsity_coeffs")
  for i, st in enumerate(stores):
    if st.ndim != 2 or st.shape[1] != tc.d_in:
      raise ValueError(f"train: store {i} has shape {st.shape}, expected [rows, d_in={tc.d_in}]")
  optimizer, step_fn = _optimizer_and_step(tc, n, site_axis)
  states = []
  for st, sd in zip(stores, seeds):
    sample = np.asarray(st[batch_indices(len(st), min(tc.batch_size, len(st)), 0, sd + 1)], np.float32)
    states.append(init_state(jax.random.PRNGKey(sd), tc, sample, optimizer))
  state = stack_states(states)
  mngr = None
  if ckpt_dir:
    state = restore_or_init(ckpt_dir, state)
    mngr = _manager(ckpt_dir)
  start = int(state.step[0])
  end = tc.total_steps if stop_after is None else min(tc.total_steps, start + stop_after)
  coeffs_arr = jnp.asarray(coeffs, jnp.float32)
  history: list[dict] = []
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=tc.total_steps, initial=start, unit="step", desc=f"train {n} x {tc.architecture}", mininterval=5)
  t0 = time.time()
  acc: list[dict] = []
  for s in range(start, end):
    x = np.stack([np.asarray(st[batch_indices(len(st), tc.batch_size, s, sd)]) for st, sd in zip(stores, seeds)])
    state, m = step_fn(state, jnp.asarray(x), coeffs_arr)
    acc.append(m)
    if bar is not None:
      bar.update(1)
    done = s + 1
    if done % log_every == 0 or done == end:
      got = jax.device_get(acc)
      mm: dict[str, Any] = {k: np.mean([a[k] for a in got], axis=0).astype(float).tolist() for k in got[0]}
      if single:
        mm = {k: v[0] for k, v in mm.items()}
      mm["step"] = done
      mm["tokens_per_s"] = n * len(acc) * tc.batch_size / max(time.time() - t0, 1e-9)
      history.append(mm)
      acc, t0 = [], time.time()
      logging.info("step %d: %s", done, ", ".join(f"{k}={v}" for k, v in mm.items() if k != "step"))
      if log_fn is not None:
        log_fn(done, mm)
      if bar is not None:
        ev, l0, dead = (np.mean(mm[k]) for k in ("explained_variance", "l0", "dead_fraction"))
        bar.set_postfix(ev=f"{ev:.3f}", l0=f"{l0:.1f}", dead=f"{dead:.3f}")
    if mngr is not None and (done % ckpt_every == 0 or done == end):
      mngr.save(done, args=ocp.args.StandardSave(state))
  if bar is not None:
    bar.close()
  if mngr is not None:
    mngr.wait_until_finished()
    mngr.close()
  return (site_state(state, 0) if single else state), history
