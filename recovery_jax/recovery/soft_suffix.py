"""OABD-style soft-suffix baseline for multiple choice (paper-method 9.1), on the transformer forward.

Layout per flip: [prompt (left-padded, T columns)] + [L soft suffix embeddings]; the readout is the
last suffix column (``cs - 1``). The suffix starts as the embedding of ``init_text`` (" !")
repeated plus N(0, noise^2), lives at ``hook_embed`` (the model's scaled token-embedding space;
positions are added after it for GPT-2), and is optimised with Adam; after each step
``||suffix - init||_F`` is clipped to ``budget`` per flip.

Variants (paper-method Q16):
  faithful   the reference's threat model: the clamp acts on the prompt columns only (the reference
             overwrites them with the frozen prompt-only defended residual, which equals clamping
             them: they do not depend on the suffix); suffix and readout columns stay unclamped. The
             reference's monitor term is detached (no gradient, and Adam ignores the rescaling), so
             the loss is the behaviour term alone.
  corrected  the clamp is active on every column (the defence really is on), and the monitor term
             is differentiable: ``(1 - w_b) * max over suffix columns and clamped features of the
             pre-clamp activations / its initial value``, beside ``w_b * behaviour``.
Behaviour: ``choice_ce`` (4-way cross-entropy of gold at the readout) or ``choice_margin``.
Success: argmax over the four choice tokens at the readout. The post-hoc quantities follow 4.4 on
this layout: z = E_S(residual at the readout after the clamp site's edit); z0 with the initial
suffix, zrec with the optimised one (for ``faithful`` the readout is unclamped, as in the reference).
Flips are optimised together as independent rows (row losses are summed; Adam and the clip are
per element / per row), in chunks of ``batch_size``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recovery_jax import batching, outputs
from recovery_jax.intervene import Clamp
from recovery_jax.models import transformer
from recovery_jax.recovery import objectives as obj_lib

VARIANTS = ("faithful", "corrected")


@dataclasses.dataclass(frozen=True)
class SuffixConfig:
  variant: str = "faithful"
  suffix_len: int = 16
  steps: int = 300
  lr: float = 5e-4
  budget: float = 20.0
  noise: float = 0.01
  init_text: str = " !"
  objective: str = "choice_ce"
  behavior_weight: float = 0.9  # corrected only (faithful: behaviour alone)
  batch_size: int = 8

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"SuffixConfig.variant={self.variant!r}: expected one of {VARIANTS}")
    if self.objective not in ("choice_ce", "choice_margin"):
      raise ValueError(f"SuffixConfig.objective={self.objective!r}: expected choice_ce or choice_margin")


def forward(params, mcfg, clamp: Clamp, variant: str, prompt_emb, prompt_mask, suffix, choices):
  """prompt_emb [B, T, d] (hook_embed values), prompt_mask [B, T], suffix [B, L, d], choices [B, 4] ->
  (choice logits at the last suffix column [B, 4], features after the clamp-site edit [B, T+L, K],
  pre-clamp features [B, T+L, K])."""
  b, t, _ = prompt_emb.shape
  x = jnp.concatenate([prompt_emb, suffix.astype(prompt_emb.dtype)], axis=1)
  mask = jnp.concatenate([prompt_mask.astype(bool), jnp.ones(suffix.shape[:2], bool)], axis=1)
  positions = transformer.default_positions(mask, b, x.shape[1])
  if mcfg.family == "gpt2":
    x = x + params["pos_embed"]["W_pos"][positions].astype(x.dtype)

  def edit(h, pos):
    hc = clamp(h, pos)
    if variant == "faithful":
      return jnp.where((jnp.arange(h.shape[1]) < t)[None, :, None], hc, h)
    return hc

  out = transformer.forward(params, mcfg, resid=x, positions=positions, attention_mask=mask,
                            edits={clamp.site: edit}, capture=(clamp.site,), capture_inputs=(clamp.site,),
                            compute_logits=False)
  cl = transformer.final_logits_at(params, mcfg, out.resid[:, -1:], choices)[:, 0]
  feats = clamp.features(out.captures[clamp.site]) * clamp.mask
  pre = clamp.features(out.captures[f"{clamp.site}:input"]) * clamp.mask
  return cl, feats, pre


def _behaviour(kind, cl, gold):
  logits = cl[:, None]  # [B, R=1, 4]
  local = jnp.broadcast_to(jnp.arange(4), cl.shape)
  if kind == "choice_ce":
    return obj_lib.choice_ce(logits, local, gold)
  return obj_lib.choice_margin(logits, local, gold)


def _optimise(params, mcfg, clamp, cfg: SuffixConfig, prompt_emb, prompt_mask, init, noise, choices, gold):
  """Adam over the suffixes of B flips; returns (final suffix [B, L, d], objective history [steps, B])."""
  t = prompt_emb.shape[1]
  s0 = init + noise

  def loss_fn(s, mon0):
    cl, _, pre = forward(params, mcfg, clamp, cfg.variant, prompt_emb, prompt_mask, s, choices)
    beh = _behaviour(cfg.objective, cl, gold)  # [B], maximised
    if cfg.variant == "faithful":
      per_row = -beh
    else:
      mon = jnp.max(pre[:, t:], axis=(1, 2))  # [B] max over suffix columns and clamped features
      per_row = -cfg.behavior_weight * beh + (1 - cfg.behavior_weight) * mon / mon0
    return per_row.sum(), (beh, jnp.max(pre[:, t:], axis=(1, 2)))

  _, (_, mon0) = loss_fn(s0, jnp.ones(s0.shape[0]))
  mon0 = jax.lax.stop_gradient(jnp.maximum(mon0, 1e-6))
  tx = optax.adam(cfg.lr)

  def step(carry, _):
    s, opt = carry
    (_, (beh, _)), g = jax.value_and_grad(loss_fn, has_aux=True)(s, mon0)
    up, opt = tx.update(g, opt, s)
    s = optax.apply_updates(s, up)
    dev = s - init
    norm = jnp.sqrt(jnp.sum(jnp.square(dev), axis=(1, 2), keepdims=True))
    s = jnp.where(norm > cfg.budget, init + dev * cfg.budget / (norm + 1e-8), s)
    return (s, opt), beh

  (s, _), hist = jax.lax.scan(step, (s0, tx.init(s0)), None, length=cfg.steps)
  return s, s0, hist


_PROGRAMS = {}


def _program(mcfg, cfg: SuffixConfig, spec):
  key = (mcfg, cfg, spec)
  if key not in _PROGRAMS:
    def fn(params, clamp, prompt_emb, prompt_mask, init, noise, choices, gold):
      s, s0, hist = _optimise(params, mcfg, clamp, cfg, prompt_emb, prompt_mask, init, noise, choices, gold)
      cl0, f0, _ = forward(params, mcfg, clamp, cfg.variant, prompt_emb, prompt_mask, s0, choices)
      cl1, f1, _ = forward(params, mcfg, clamp, cfg.variant, prompt_emb, prompt_mask, s, choices)
      return cl0, f0[:, -1], cl1, f1[:, -1], jnp.sqrt(jnp.sum(jnp.square(s - init), axis=(1, 2))), hist
    _PROGRAMS[key] = jax.jit(fn)
  return _PROGRAMS[key]


def run(params, mcfg, tokenizer, clamp: Clamp, batch, cfg: SuffixConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Optimises a soft suffix for every row of ``batch`` (a ``tasks.unlearning.ChoiceBatch``) under
  ``clamp``. Returns per-row arrays: success_init / success (argmax at the readout with the initial /
  final suffix), drift_abs, violation_abs, ref_norm (post-hoc at the readout), suffix_norm
  (||suffix - init||), objective_final."""
  ids = tokenizer.encode(cfg.init_text, add_special_tokens=False).ids
  if len(ids) != 1:
    raise ValueError(f"SuffixConfig.init_text={cfg.init_text!r} is {len(ids)} tokens; expected one")
  d = mcfg.d_model
  tok_emb = transformer.embed(params, mcfg, jnp.asarray([[ids[0]]], jnp.int32))[0, 0]  # [d]
  init_all = jnp.broadcast_to(tok_emb, (cfg.batch_size, cfg.suffix_len, d)).astype(jnp.float32)
  prog = _program(mcfg, cfg, clamp.spec)
  normal = jax.vmap(lambda k: jax.random.normal(k, (cfg.suffix_len, d), jnp.float32))

  def one_batch(rows, ids):  # row i's noise from fold_in(key, i), whatever the batch
    tokens, mask, choices, gold = (jnp.asarray(a) for a in rows)
    emb = transformer.embed(params, mcfg, tokens).astype(jnp.float32)
    noise = cfg.noise * normal(batching.example_keys(jax.random.PRNGKey(seed), ids))
    cl0, z0, cl1, z1, norm, hist = prog(params, clamp, emb, mask, init_all, noise, choices, gold)
    return cl0, z0, cl1, z1, norm, hist.T  # hist [steps, B] -> [B, steps]

  cl0, z0, cl1, z1, norm, hist = batching.map_batched(
      one_batch, (batch.tokens, batch.attention_mask, batch.choices, batch.gold), cfg.batch_size, exact=True)
  hist = hist.T
  gold = np.asarray(batch.gold)
  diff = z1.astype(np.float64) - z0.astype(np.float64)
  return {"success_init": np.argmax(cl0, -1) == gold, "success": np.argmax(cl1, -1) == gold,
          "drift_abs": np.linalg.norm(diff, axis=-1), "violation_abs": np.linalg.norm(np.maximum(diff, 0), axis=-1),
          "ref_norm": np.linalg.norm(z0, axis=-1), "suffix_norm": norm, "objective_final": hist[-1]}


def summarize(rows: list[dict]) -> list[dict]:
  from recovery_jax import metrics  # pylint: disable=import-outside-toplevel
  out = []
  for v in dict.fromkeys(r["variant"] for r in rows):
    rs = [r for r in rows if r["variant"] == v]
    k, n = sum(bool(r["success"]) for r in rs), len(rs)
    lo, hi = metrics.wilson_interval(k, n) if n else (float("nan"), float("nan"))
    d = np.asarray([r["drift_abs"] for r in rs])
    out.append({"variant": v, "n": n, "recovered": k, "ci": [lo, hi],
                "recovered_init": sum(bool(r["success_init"]) for r in rs),
                "drift_abs_mean": float(d.mean()) if n else None, "n_drift_nonzero": int((d > 1e-6).sum()),
                "violation_abs_mean": float(np.mean([r["violation_abs"] for r in rs])) if n else None,
                "suffix_norm_mean": float(np.mean([r["suffix_norm"] for r in rs])) if n else None})
  return out


def render(summary: list[dict]) -> str:
  f = lambda x: "-" if x is None else f"{x:.4g}"
  return outputs.format_table(
      ["variant", "recovered", "rate [95% CI]", "init suffix recovered", "drift mean", "drift>0", "violation mean",
       "||suffix-init|| mean"],
      [[s["variant"], f"{s['recovered']}/{s['n']}",
        f"{s['recovered'] / s['n']:.2f} [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}]" if s["n"] else "-",
        f"{s['recovered_init']}/{s['n']}", f(s["drift_abs_mean"]), s["n_drift_nonzero"], f(s["violation_abs_mean"]),
        f(s["suffix_norm_mean"])] for s in summary])
