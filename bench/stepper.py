"""One optimiser step of ``recovery_jax.recovery.optimizer.optimize``, as a standalone pure function.

``optimize`` scans its step over ``lax.scan``; the reference-shaped loop (variant a) needs the
same step called once per Python iteration, as the paper's PyTorch code does. This mirrors
``optimize``'s step (``checkpoint="final"``, no parameter projection): gradient (encoder modes:
projected rows; Jacobian sketch: projected objective gradient + unprojected drift gradient), the
optax chain (Adam -> clip to the budget), then the Jacobian correction steps. The smoke test checks
that a Python loop over this step reproduces ``optimize`` on the same problem.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from recovery_jax.recovery import objectives as obj_lib
from recovery_jax.recovery import optimizer as opt_lib
from recovery_jax.recovery import projections as proj_lib

Array = jax.Array


def check_supported(cfg: opt_lib.RecoveryConfig) -> None:
  if cfg.checkpoint != "final" or cfg.projects_params or cfg.lambda_delta != 0 or cfg.projection == "jacobian_exact":
    raise ValueError("bench.stepper supports checkpoint='final', no parameter projection, lambda_delta=0 and "
                     f"projections none/encoder/encoder_exact/jacobian; got {cfg}")


def init_state(delta0: Array, cfg: opt_lib.RecoveryConfig, hp: opt_lib.HParams):
  return opt_lib.recovery_tx(hp, cfg).init(delta0)


def step(f: Callable, delta: Array, opt_state, t: Array, key: Array, mon: opt_lib.Monitor,
         cfg: opt_lib.RecoveryConfig, hp: opt_lib.HParams, enc_proj=None):
  """(new delta, new opt state, objective at ``delta``) for step ``t``."""
  mode = cfg.projection
  shape = delta.shape
  if not cfg.is_jacobian:
    def loss_fn(d):
      ev = f(d)
      pen, _ = opt_lib.penalties(cfg, hp, ev.feats, mon)
      return -ev.objective + pen, ev
    (_, ev), g = jax.value_and_grad(loss_fn, has_aux=True)(delta)
    gp = (lambda x: proj_lib.apply_encoder(enc_proj, x)) if mode in ("encoder", "encoder_exact") else None
  else:
    def fc(d):
      ev = f(d)
      return (ev.objective, opt_lib.flat_features(ev.feats)), ev
    (_, c_flat), vjp, ev = jax.vjp(fc, delta, has_aux=True)
    masks_flat = opt_lib.flat_features(tuple(m.astype(jnp.float32) for m in mon.masks)) > 0
    pen_of_flat = lambda cf: opt_lib.penalties(cfg, hp, opt_lib.unflat_features(cf, ev.feats), mon)
    _, pen_ct = jax.value_and_grad(pen_of_flat, has_aux=True)(c_flat)
    probes = proj_lib.sketch_probes(jax.random.fold_in(key, t), c_flat, opt_lib.flat_features(mon.refs), masks_flat,
                                    cfg.jacobian_probes, cfg.jacobian_drift_probe)
    n_p, n_c = probes.shape[0], c_flat.shape[0]
    cts_obj = jnp.concatenate([jnp.array([-1.0, 0.0], jnp.float32), jnp.zeros((n_p,), jnp.float32)])
    cts_c = jnp.concatenate([jnp.zeros((1, n_c), jnp.float32), pen_ct[None], probes], axis=0)
    (grads,) = jax.vmap(lambda a, b: vjp((a, b)))(cts_obj, cts_c)
    g, g_pen, q = grads[0], grads[1], grads[2:].reshape(n_p, -1)
    basis = proj_lib.gram_schmidt(q, cfg.jacobian_tol)
    gp = lambda x: proj_lib.apply_basis(basis, x.reshape(-1)).reshape(shape) + g_pen
  tx = opt_lib.recovery_tx(hp, cfg, grad_proj=gp)
  updates, opt_state = tx.update(g, opt_state, delta)
  new = optax.apply_updates(delta, updates)
  if cfg.is_jacobian and cfg.correction_steps > 0:
    if cfg.correction_every != 1:
      raise ValueError("bench.stepper: correction_every must be 1")

    def act_loss(d):
      ev = f(d)
      return obj_lib.drift_penalty(cfg.drift_penalty, ev.feats, mon.refs, mon.masks, cfg.act_loss_eps)

    body = lambda _, d: opt_lib.clip(d - hp.correction_lr * jax.grad(act_loss)(d), hp.budget)
    new = jax.lax.fori_loop(0, cfg.correction_steps, body, new)
  return new, opt_state, ev.objective
