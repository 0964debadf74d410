"""Analytic FLOP counts of the recovery variants (dense matmuls and attention; 2 FLOPs per MAC).

XLA's ``cost_analysis`` counts a ``lax.scan``/``while`` body once, not once per trip, so it
undercounts the layer scans and the step scan by large factors; these counts are what the programs
execute densely instead.

Backward passes differentiate with respect to the delta only (parameters are constants): each dense
projection costs its forward FLOPs once more (dx = dy W^T, no dW), attention twice (dq and dk, dP
and dv). Elementwise work, norms and softmax are not counted; the SAE subset encodes/decodes of the
K_max selected features are (2 d K per token for each of encode, decode and the monitored encode).
"""

from __future__ import annotations

from bench.problems import Workload
from recovery_jax.models import sites as sites_lib
from recovery_jax.models.config import ModelConfig
from recovery_jax.recovery import engine


def dense_per_token_layer(cfg: ModelConfig) -> int:
  """Forward FLOPs of one layer's projections for one token."""
  d, h, k, e, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp
  qkv = 2 * d * (h * e + 2 * k * e)
  out = 2 * h * e * d
  n_mlp = 2 if cfg.family == "gpt2" else 3  # gated MLPs: gate, up, down
  return qkv + out + 2 * d * f * n_mlp


def attention(cfg: ModelConfig, n_q: int, n_k: int) -> int:
  """Scores and probability-weighted values for n_q queries over n_k key slots (dense, all heads)."""
  return 4 * cfg.n_heads * cfg.d_head * n_q * n_k


def unembed(cfg: ModelConfig, n: int, vocab: int | None = None) -> int:
  return 2 * cfg.d_model * (cfg.vocab_size if vocab is None else vocab) * n


def engine_vocab(wl: Workload) -> int:
  """Vocabulary columns the engine unembeds: only the two logits of a logit difference
  (``transformer.final_logits_at``), the whole vocabulary otherwise."""
  return 2 if wl.spec.objective.kind == "logit_diff" else wl.spec.model_cfg.vocab_size


def forward(cfg: ModelConfig, n_q: int, n_k: int, n_layers: int, n_unembed: int, vocab: int | None = None) -> int:
  return n_layers * (n_q * dense_per_token_layer(cfg) + attention(cfg, n_q, n_k)) + unembed(cfg, n_unembed, vocab)


def backward(cfg: ModelConfig, n_q: int, n_k: int, n_layers: int, n_unembed: int, vocab: int | None = None) -> int:
  return (n_layers * (n_q * dense_per_token_layer(cfg) + 2 * attention(cfg, n_q, n_k))
          + unembed(cfg, n_unembed, vocab))


# ----------------------------------------------------------------------------------------------
# what the counts read from a workload (its RecoverySpec, clamps and problems)


def suffix_len(wl: Workload) -> int:
  """Columns a step of the engine recomputes (all of them without prefix caching)."""
  return wl.seq_len if wl.spec.suffix_len is None else wl.spec.suffix_len


def n_readout(wl: Workload) -> int:
  return wl.problems.readout_cols.shape[-1]


def last_site_layer(wl: Workload) -> int:
  """Last layer holding a delta site or a monitored clamp: nothing after it feeds the drift terms."""
  sites = list(wl.spec.delta_sites) + [wl.clamps[i].site for i in engine.monitored(wl.clamps)]
  return max(sites_lib.parse_site(s, wl.spec.model_cfg.n_layers).layer for s in sites)


def clamp(wl: Workload, n_tok: int) -> int:
  """Subset encode + decode of every clamp and the monitored encode over n_tok tokens."""
  k = sum(c.params.feature_idx.shape[-1] for c in wl.clamps)
  return n_tok * 2 * wl.spec.model_cfg.d_model * k * 3


def n_backward(wl: Workload) -> int:
  """Backward passes per step: 1 (gradient), or the stacked VJPs of the Jacobian sketch
  (objective, drift penalty, drift probe, Gaussian probes)."""
  r = wl.spec.config
  if r.is_jacobian:
    return 2 + int(r.jacobian_drift_probe) + r.jacobian_probes
  return 1


def _step(wl: Workload, n_q: int, n_k: int, n_unembed: int, dense_vjps: bool = True, vocab: int | None = None) -> int:
  """One step: forward of layers [first delta layer, L) over n_q columns, the backward(s), the
  corrections (forward + backward of the layers up to the last site; nothing after it is live).

  dense_vjps: the Jacobian sketch's stacked VJPs (``vmap`` of one VJP over [objective, penalty,
  probes] cotangents) each run the whole backward, although only the objective row reaches the
  layers after the last site and the unembedding (an uncut evaluator: variant (a)). Without it
  (PyTorch ``autograd.grad`` per cotangent; the engine's ``SplitEval``) only the objective gradient
  runs the whole backward; the others stop at the last monitored site."""
  cfg, first = wl.spec.model_cfg, wl.spec.start_layer
  layers = cfg.n_layers - first
  upto = last_site_layer(wl) + 1 - first
  fwd = forward(cfg, n_q, n_k, layers, n_unembed, vocab) + clamp(wl, n_q)
  bwd = backward(cfg, n_q, n_k, layers, n_unembed, vocab) + clamp(wl, n_q)
  n_b = n_backward(wl)
  if dense_vjps or n_b == 1:
    bwds = n_b * bwd
  else:
    bwds = bwd + (n_b - 1) * (backward(cfg, n_q, n_k, upto, 0) + clamp(wl, n_q))
  corr = wl.spec.config.correction_steps * (forward(cfg, n_q, n_k, upto, 0) + backward(cfg, n_q, n_k, upto, 0))
  return fwd + bwds + corr


def reference_step(wl: Workload, dense_vjps: bool = True) -> int:
  """Variant (a) (and (c) with ``dense_vjps=False``), one example: full forward (all layers and T
  columns, full logits at every column); backward(s) through the layers from the first site over
  all columns."""
  t = wl.seq_len
  below = forward(wl.spec.model_cfg, t, t, wl.spec.start_layer, 0)  # under the first delta layer: forward only
  return _step(wl, t, t, t, dense_vjps) + (1 + wl.spec.config.correction_steps) * below


def engine_step(wl: Workload) -> int:
  """Variant (b), one example: the suffix columns from the first delta site over the cached prefix
  (T + suffix key slots: the engine pads the sequence by the suffix length), readout logits only;
  the Jacobian sketch's probe VJPs stop at the last monitored site (``optimizer.SplitEval``)."""
  s = suffix_len(wl)
  return _step(wl, s, wl.seq_len + s, n_readout(wl), dense_vjps=False, vocab=engine_vocab(wl))


def engine_prepare(wl: Workload) -> int:
  """Variant (b), one example: the base and the defended forwards over T + suffix columns."""
  tp = wl.seq_len + suffix_len(wl)
  return 2 * forward(wl.spec.model_cfg, tp, tp, wl.spec.model_cfg.n_layers, n_readout(wl),
                     engine_vocab(wl)) + clamp(wl, tp)


def reference_recovery(wl: Workload, steps: int, dense_vjps: bool = True) -> int:
  """Variant (a) / (c), one example: the drift-reference forward, the steps, the final forward."""
  t, cfg = wl.seq_len, wl.spec.model_cfg
  full = forward(cfg, t, t, cfg.n_layers, t)
  return 2 * full + steps * reference_step(wl, dense_vjps)


def engine_recovery(wl: Workload, steps: int) -> int:
  """Variant (b), one example: prepare, the steps, the final suffix forward."""
  s, cfg = suffix_len(wl), wl.spec.model_cfg
  fin = forward(cfg, s, wl.seq_len + s, cfg.n_layers - wl.spec.start_layer, n_readout(wl), engine_vocab(wl))
  return engine_prepare(wl) + steps * engine_step(wl) + fin


def matmul(n: int) -> int:
  return 2 * n ** 3
