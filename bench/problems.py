"""Benchmark workloads, stated in the engine's own terms: a ``RecoverySpec``, the ``Clamp``s and one
``Problem`` per example.

A ``Workload`` holds what the engine would be given (spec, clamps, problems stacked over N
examples of one row each, i.e. every example its own delta) plus the base PRNG key (example i uses
``fold_in(key, i)``, as ``engine.recover_examples`` derives them). Every variant of the benchmark
(the reference-shaped loop, the batched engine, the PyTorch loop, the FLOP counts) reads its sites,
semantics, columns, objective and recovery config from the spec and the problems.

Column layout (token indices of one unpadded sequence of length T):

  IOI-shaped      delta at column T-1 (the readout), 1 site ``blocks.L.hook_resid_pre``, frozen
                  semantics (clamp set -5 on active features), objective logit[IO] - logit[S] at T-1,
                  encoder-null gradient projection (paper-method 5).
  refusal-shaped  prompt of ``prompt_len`` tokens + 48 answer tokens; delta rows at the anchor
                  a-1 and the 48 answer positions (49 rows) at several ``blocks.L.hook_resid_post``
                  sites; live clamps (multiply by 3, all entries) at every site; teacher-forced answer
                  log-probability read at columns a-1 .. a+46; drift monitored at the 48 answer
                  positions; Jacobian-sketch projection (drift probe + 8 Gaussian probes) and the
                  relative-MSE drift penalty (paper-method 6.4, stage 2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax import intervene
from recovery_jax.intervene import Clamp
from recovery_jax.models import random_init
from recovery_jax.models import sites as sites_lib
from recovery_jax.models.config import ModelConfig
from recovery_jax.recovery import api, engine
from recovery_jax.recovery.engine import Problem, RecoverySpec
from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import RecoveryConfig
from recovery_jax.sae.testing import random_sae

Array = jax.Array

MODELS = ("smollm2-135m", "gpt2-small-random", "tiny-llama", "tiny-gpt2")
KINDS = ("ioi", "refusal")
IOI_CLAMP_VALUE = -5.0  # reference code (paper Table 11 says 0; Q10)
REFUSAL_CLAMP_VALUE = 3.0
N_ANS = 48


@dataclasses.dataclass(frozen=True)
class Workload:
  """One benchmark workload: what ``engine.recover_examples(spec, params, clamps, problems, hp, key)``
  takes, with a report label.

  kind: ``ioi`` | ``refusal``. spec: the engine's RecoverySpec (``suffix_len`` from the problems).
  clamps: the defence. problems: Problem arrays with leading axes [N, 1] (N examples of one row).
  key: base PRNG key.
  """

  kind: str
  spec: RecoverySpec
  clamps: tuple[Clamp, ...]
  problems: Problem
  key: Array

  @property
  def n(self) -> int:
    return self.problems.tokens.shape[0]

  @property
  def seq_len(self) -> int:
    return self.problems.tokens.shape[-1]

  @property
  def k_max(self) -> int:
    return max(c.params.feature_idx.shape[-1] for c in self.clamps)

  def example(self, i: int) -> Problem:
    """The problem of example i (one row, leading axis B = 1)."""
    return jax.tree.map(lambda a: a[i], self.problems)

  def example_key(self, i: int) -> Array:
    return jax.random.fold_in(self.key, i)

  def head(self, n: int) -> "Workload":
    return dataclasses.replace(self, problems=jax.tree.map(lambda a: a[:n], self.problems))


def _workload(kind: str, cfg: ModelConfig, clamps: tuple[Clamp, ...], problems: Problem, key: Array, *,
              semantics: str, objective: Objective, config: RecoveryConfig) -> Workload:
  spec = RecoverySpec(model_cfg=cfg, delta_sites=tuple(dict.fromkeys(c.site for c in clamps)), objective=objective,
                      config=config, suffix_len=engine.suffix_len_for(problems), semantics=semantics)
  engine.check_problems(spec, clamps, problems)
  return Workload(kind, spec, clamps, problems, key)


# ----------------------------------------------------------------------------------------------
# models and SAEs


def load_bench_model(name: str, seed: int = 0, dtype: str = "float32"):
  """(params, cfg, tokenizer or None) for a benchmark model name; ``dtype`` ("float32" or "bfloat16")
  is both the parameters' and the activations' dtype (``ModelConfig.dtype``)."""
  if name == "smollm2-135m":
    from recovery_jax.models.loading import load_model  # pylint: disable=import-outside-toplevel
    params, cfg, tok = load_model("smollm2-135m-instruct", dtype=jnp.dtype(dtype))
    return params, dataclasses.replace(cfg, dtype=dtype), tok
  key = jax.random.PRNGKey(seed)
  if name == "gpt2-small-random":
    cfg = random_init.gpt2_small_config()
  elif name == "tiny-llama":
    cfg = random_init.tiny_config("llama", vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_mlp=128)
  elif name == "tiny-gpt2":
    cfg = random_init.tiny_config("gpt2", vocab_size=256, d_model=64, n_layers=4, n_heads=4, d_mlp=128)
  else:
    raise ValueError(f"unknown benchmark model {name!r}: expected one of {MODELS}")
  cfg = dataclasses.replace(cfg, dtype=dtype)
  return random_init.init_params(cfg, key, jnp.dtype(dtype)), cfg, None


def bench_sae(d_in: int, d_sae: int, seed: int):
  """Random standard (ReLU) SAE in SAELens layout (the package's builder): unit-norm W_dec rows,
  W_enc = W_dec^T, zero biases. A recovery's cost does not depend on SAE quality."""
  return random_sae(d_in, d_sae, seed=seed, enc_noise=0.0, b_enc=0.0)


def default_layers(cfg: ModelConfig, kind: str) -> tuple[int, ...]:
  """IOI: the site at a third of the depth (GPT-2 small: layer 4, as the paper). Refusal: three
  sites at 40%, 55% and 70% of the depth."""
  n = cfg.n_layers
  if kind == "ioi":
    return (max(1, n // 3),)
  return tuple(sorted({max(1, min(n - 1, int(round(f * n)))) for f in (0.4, 0.55, 0.7)}))


def _features(key: Array, d_sae: int, k: int) -> np.ndarray:
  return np.asarray(jax.random.choice(key, d_sae, (k,), replace=False), np.int32)


# ----------------------------------------------------------------------------------------------
# workloads


def ioi_tokens(tokenizer, vocab: int, n: int, seed: int, seq_len: int = 15):
  """IOI prompts (the reference's single BABA template) with the tokenizer, else random ids of the
  same shape. Returns (tokens [n, T], io [n], s [n])."""
  if tokenizer is not None:
    from recovery_jax.tasks.ioi import make_ioi_batch  # pylint: disable=import-outside-toplevel
    b = make_ioi_batch(tokenizer, n, seed=seed, prompt_type="BABA", nb_templates=1)
    if not b.attention_mask.all():
      raise ValueError("IOI benchmark prompts must share one length (no padding)")
    return b.tokens, b.io_ids, b.s_ids
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, vocab, (n, seq_len), dtype=np.int32)
  io, s = rng.integers(0, vocab, (2, n), dtype=np.int32)
  return toks, io, s


def make_ioi(params, cfg: ModelConfig, tokenizer, *, n: int, k_max: int, steps: int, d_sae: int | None = None,
             layer: int | None = None, seed: int = 0) -> Workload:
  """IOI-shaped workload: one delta row at the last token, one frozen clamp site, encoder projection."""
  del params
  layer = default_layers(cfg, "ioi")[0] if layer is None else layer
  d_sae = d_sae or 16 * cfg.d_model
  k_feat, k_ex = jax.random.split(jax.random.PRNGKey(seed + 1))
  sae, scfg = bench_sae(cfg.d_model, d_sae, seed + 1)
  site = sites_lib.site_name(layer, "hook_resid_pre")
  clamp = intervene.make_clamp(intervene.ClampSpec(site=site, sae_cfg=scfg, mode="set", positive_only=True), sae,
                               _features(k_feat, d_sae, k_max), IOI_CLAMP_VALUE, k_max=k_max)
  toks, io, s = ioi_tokens(tokenizer, cfg.vocab_size, n, seed)
  t = toks.shape[1]
  pbs = api.site_problems(toks, None, t - 1, t - 1, {"pos": io, "neg": s}, shared=False)
  rcfg = RecoveryConfig(steps=steps, lr=0.1, budget=20.0, projection="encoder", ridge=1e-4, checkpoint="final")
  return _workload("ioi", cfg, (clamp,), pbs, k_ex, semantics="frozen", objective=Objective("logit_diff"),
                   config=rcfg)


def make_refusal(params, cfg: ModelConfig, tokenizer, *, n: int, k_max: int, steps: int, d_sae: int | None = None,
                 layers: tuple[int, ...] | None = None, prompt_len: int = 30, probes: int = 8,
                 correction_steps: int = 0, seed: int = 0) -> Workload:
  """Refusal-shaped workload (v4 stage 2): 49 delta rows at several live-clamped sites, Jacobian sketch.

  Tokens are random ids (cost does not depend on the text); the 'answer' is the last 48 tokens.
  """
  del params, tokenizer
  layers = default_layers(cfg, "refusal") if layers is None else tuple(layers)
  d_sae = d_sae or 16 * cfg.d_model
  keys = jax.random.split(jax.random.PRNGKey(seed + 2), len(layers) + 1)
  clamps = []
  for j, layer in enumerate(layers):
    sae, scfg = bench_sae(cfg.d_model, d_sae, seed + 2 + j)
    cs = intervene.ClampSpec(site=sites_lib.site_name(layer, "hook_resid_post"), sae_cfg=scfg, mode="multiply",
                             positive_only=False)
    clamps.append(intervene.make_clamp(cs, sae, _features(keys[j], d_sae, k_max), REFUSAL_CLAMP_VALUE, k_max=k_max))
  a = prompt_len  # answer start; anchor = a - 1
  toks = np.random.default_rng(seed).integers(0, cfg.vocab_size, (n, a + N_ANS), dtype=np.int32)
  targets = {"next_tokens": toks[:, a:a + N_ANS], "answer_len": np.full((n,), N_ANS, np.int32)}
  pbs = api.site_problems(toks, None, a - 1, a - 1, targets, shared=False)
  cols = lambda start, length: jnp.broadcast_to(jnp.arange(start, start + length, dtype=jnp.int32), (n, 1, length))
  pbs = pbs._replace(delta_cols=cols(a - 1, N_ANS + 1), delta_valid=jnp.ones((n, 1, N_ANS + 1), bool),
                     readout_cols=cols(a - 1, N_ANS), monitor_cols=cols(a, N_ANS),
                     monitor_valid=jnp.ones((n, 1, N_ANS), bool))
  rcfg = RecoveryConfig(steps=steps, lr=0.05, budget=40.0, projection="jacobian", jacobian_probes=probes,
                        jacobian_drift_probe=True, lambda_act=200.0, drift_penalty="relative_mse",
                        correction_steps=correction_steps, correction_lr=0.05, checkpoint="final")
  return _workload("refusal", cfg, tuple(clamps), pbs, keys[-1], semantics="live",
                   objective=Objective("teacher_forced", w_ans=5.0, n_ans=N_ANS), config=rcfg)


def make_workload(kind: str, params, cfg, tokenizer, **kw) -> Workload:
  if kind == "ioi":
    return make_ioi(params, cfg, tokenizer, **kw)
  if kind == "refusal":
    return make_refusal(params, cfg, tokenizer, **kw)
  raise ValueError(f"unknown workload kind {kind!r}: expected one of {KINDS}")
