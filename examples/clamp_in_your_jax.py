"""(c) The clamp transform and projected recovery inside your own JAX code: no app, only the primitives.

  python examples/clamp_in_your_jax.py --model path/to/model --sae path/to/saelens_sae \
      --prompt "The capital of France is" --answer " Paris" --features 1,2,3 --value -5

Written out by hand: ``intervene.clamp`` turns ``transformer.forward`` into a defended forward with the same
signature; your own edit adds a delta at the last token after the clamp; the objective is the answer's
log-probability; each step projects the gradient away from the clamped features' encoder directions
(``projections.ridge_projector`` / ``apply_encoder``), takes an Adam step and clips delta to the budget
(``optimizer.clip``), all in one ``jax.lax.scan``. The engine (``recovery.api.recover_site``) then runs the same
recovery (projection ``encoder``, no drift penalty) and the two objectives are printed side by side: they agree.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import recovery_jax as rj
from recovery_jax import intervene
from recovery_jax.models import transformer
from recovery_jax.recovery import api as site_api
from recovery_jax.recovery import optimizer, projections
from recovery_jax.recovery.objectives import Objective


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True)
  p.add_argument("--sae", required=True)
  p.add_argument("--site", default="")
  p.add_argument("--prompt", default="The capital of France is")
  p.add_argument("--answer", default=" Paris", help="one token: its log-probability is the behaviour")
  p.add_argument("--features", default="", help="comma list of feature ids (default: the k most active)")
  p.add_argument("--k", type=int, default=8)
  p.add_argument("--value", type=float, default=-5.0, help="set value of the clamped features")
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--budget", type=float, default=5.0)
  return p.parse_args(argv)


def main(argv=None):
  a = parse(argv)
  model = rj.load_model(a.model)
  sae = rj.load_sae(a.sae, model, site=a.site or None)
  params, cfg, site = model.params, model.cfg, sae.site
  tokens = jnp.asarray([rj.encode_prompts(model, [a.prompt])[0]], jnp.int32)  # [1, T]
  answer = model.tokenizer.encode(a.answer, add_special_tokens=False).ids[0]
  last = tokens.shape[1] - 1

  # the defence: a clamp (static spec + SAE + feature ids), then the forward transform
  spec = intervene.ClampSpec(site=site, sae_cfg=sae.cfg, mode="set", positive_only=True)
  if a.features:
    ids = [int(x) for x in a.features.split(",")]
  else:  # the k features most active at the last token
    x = transformer.forward(params, cfg, tokens, capture=(site,)).captures[site][0, last]
    from recovery_jax.sae import core as sae_core
    ids = np.argsort(-np.asarray(sae_core.encode(sae.params, sae.cfg, x)))[:a.k].tolist()
  clamp = intervene.make_clamp(spec, sae.params, ids, a.value)
  defended = intervene.clamp(transformer.forward, clamp)

  def logprob(delta, forward=defended):  # delta [d] added at the last token, after the clamp (clamp -> your edit)
    edit = lambda x, positions: x.at[:, last].add(delta.astype(x.dtype))
    logits = forward(params, cfg, tokens, edits={site: edit}).logits[0, last]
    return jax.nn.log_softmax(logits.astype(jnp.float32))[answer]

  # projected recovery by hand: gradient projected off the clamped encoder directions, Adam, clip to budget
  proj = projections.ridge_projector(clamp.encoder_columns()[None], 1e-4)  # one site: [1, d, K]
  tx = optax.adam(a.lr)

  def step(carry, _):
    delta, opt = carry
    g = jax.grad(lambda d: -logprob(d))(delta)
    g = projections.apply_encoder(proj, g[None, None])[0, 0]
    upd, opt = tx.update(g, opt, delta)
    delta = optimizer.clip(optax.apply_updates(delta, upd), jnp.asarray(a.budget, jnp.float32))
    return (delta, opt), None

  delta0 = jnp.zeros((cfg.d_model,), jnp.float32)
  (delta, _), _ = jax.jit(lambda d: jax.lax.scan(step, (d, tx.init(d)), None, length=a.steps))(delta0)
  mine = {"before": float(logprob(delta0, transformer.forward)), "defended": float(logprob(delta0)),
          "recovered": float(logprob(delta)), "delta_norm": float(jnp.linalg.norm(delta))}

  # the same recovery through the engine: the answer's log-probability is the teacher-forced objective of a
  # one-token answer (readout at the last prompt token)
  out = site_api.recover_site(
      params, cfg, sae.params, sae.cfg, site=site, tokens=tokens, delta_pos=last, readout_pos=last,
      objective=Objective("teacher_forced", w_ans=1.0, n_ans=1),
      targets={"next_tokens": jnp.asarray([[answer]]), "answer_len": jnp.asarray([1])},
      feature_idx=ids, clamp_value=a.value,
      config=rj.RecoveryConfig(steps=a.steps, lr=a.lr, budget=a.budget, projection="encoder"))
  engine = {"before": float(out.rows_base[0]), "defended": float(out.rows_defended[0]),
            "recovered": float(out.rows[0]), "delta_norm": float(jnp.linalg.norm(out.delta))}
  print(f"answer {a.answer!r} log-probability at {site}, {len(ids)} features set to {a.value}:")
  for k in mine:
    print(f"  {k:10s} by hand {mine[k]:9.4f}   engine {engine[k]:9.4f}")
  return mine, engine


if __name__ == "__main__":
  main(sys.argv[1:])
