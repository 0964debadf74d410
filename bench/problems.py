"""Benchmark workloads: models, random SAEs, and the IOI- and refusal-shaped recovery problems.

A workload is a static ``Workload`` (hashable: sites, clamps, column layout, recovery config) plus
``Data``, a pytree of arrays: per-example arrays with a leading axis N (tokens, targets, keys) and
arrays shared by every example (SAE params, clamp params). Every variant of the benchmark (the
reference-shaped loop, the batched engine, the PyTorch loop) reads the same ``Workload`` and ``Data``.

Column layout (token indices of one unpadded sequence of length T):

  IOI-shaped      delta at column T-1 (the readout), 1 site ``blocks.L.hook_resid_pre``, frozen
                  defended reference (clamp set -5 on active features, computed once), objective
                  logit[IO] - logit[S] at T-1, encoder-null gradient projection (paper-method 5).
  refusal-shaped  prompt of ``prompt_len`` tokens + 48 answer tokens; delta rows at the anchor
                  a-1 and the 48 answer positions (49 rows) at several ``blocks.L.hook_resid_post``
                  sites; live clamps (multiply by 3, all entries) at every site; teacher-forced answer
                  log-probability read at columns a-1 .. a+46; drift monitored at the 48 answer
                  positions; Jacobian-sketch projection (drift probe + 8 Gaussian probes) and the
                  relative-MSE drift penalty (paper-method 6.4, stage 2).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax import intervene
from recovery_jax.models import random_init
from recovery_jax.models import sites as sites_lib
from recovery_jax.models.config import ModelConfig
from recovery_jax.recovery import objectives as obj_lib
from recovery_jax.recovery.optimizer import RecoveryConfig
from recovery_jax.sae.config import SAEConfig

Array = jax.Array

MODELS = ("smollm2-135m", "gpt2-small-random", "tiny-llama", "tiny-gpt2")
KINDS = ("ioi", "refusal")
IOI_CLAMP_VALUE = -5.0  # reference code (paper Table 11 says 0; Q10)
REFUSAL_CLAMP_VALUE = 3.0
N_ANS = 48


@dataclasses.dataclass(frozen=True)
class Workload:
  """Static description of one recovery workload (a jit static argument)."""

  kind: str
  semantics: str  # frozen | live
  sites: tuple[str, ...]
  specs: tuple[intervene.ClampSpec, ...]
  seq_len: int
  delta_start: int  # first delta column
  n_rows: int  # delta rows per site (consecutive columns from delta_start)
  readout_start: int
  n_readout: int
  mon_start: int  # first monitored column (drift features)
  n_mon: int
  rcfg: RecoveryConfig
  objective: obj_lib.Objective
  k_max: int

  @property
  def start_layer(self) -> int:
    return min(sites_lib.parse_site(s).layer for s in self.sites)

  @property
  def n_sites(self) -> int:
    return len(self.sites)

  @property
  def suffix_len(self) -> int:
    """Columns a prefix-cached step recomputes: from the first delta/readout/monitored column to the last."""
    start = min(self.delta_start, self.readout_start, self.mon_start)
    end = max(self.delta_start + self.n_rows, self.readout_start + self.n_readout, self.mon_start + self.n_mon)
    return end - start

  @property
  def first_delta_layer(self) -> int:
    """First layer whose computation depends on the delta (after a resid_post site, the next one):
    where a prefix-cached step starts and where backward passes stop."""
    s0 = sites_lib.parse_site(self.sites[0])
    return s0.layer if s0.hook == "hook_resid_pre" else s0.layer + 1

  @property
  def last_site_layer(self) -> int:
    return max(sites_lib.parse_site(s).layer for s in self.sites)


class Data(NamedTuple):
  """Arrays of a workload: ``tokens`` [N, T], ``targets`` (dict of [N, ...]), ``key`` (base PRNG key)
  and ``keys`` [N, 2] (example i: ``fold_in(key, i)``, as ``engine.recover_examples`` derives them),
  ``saes`` (tuple of SAE params per site), ``clamps`` (tuple of ClampParams)."""

  tokens: Array
  targets: dict
  key: Array
  keys: Array
  saes: tuple
  clamps: tuple

  @property
  def n(self) -> int:
    return self.tokens.shape[0]

  def example(self, i: int) -> "Data":
    """Example i with a leading axis of 1."""
    take = lambda a: a[i:i + 1]
    return Data(take(self.tokens), jax.tree.map(take, self.targets), self.key, take(self.keys), self.saes,
                self.clamps)

  def head(self, n: int) -> "Data":
    take = lambda a: a[:n]
    return Data(take(self.tokens), jax.tree.map(take, self.targets), self.key, take(self.keys), self.saes,
                self.clamps)


# ----------------------------------------------------------------------------------------------
# models and SAEs


def load_bench_model(name: str, seed: int = 0):
  """(params, cfg, tokenizer or None) for a benchmark model name."""
  if name == "smollm2-135m":
    from recovery_jax.models.loading import load_model  # pylint: disable=import-outside-toplevel
    return load_model("smollm2-135m-instruct")
  key = jax.random.PRNGKey(seed)
  if name == "gpt2-small-random":
    cfg = random_init.gpt2_small_config()
  elif name == "tiny-llama":
    cfg = random_init.tiny_config("llama", vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_mlp=128)
  elif name == "tiny-gpt2":
    cfg = random_init.tiny_config("gpt2", vocab_size=256, d_model=64, n_layers=4, n_heads=4, d_mlp=128)
  else:
    raise ValueError(f"unknown benchmark model {name!r}: expected one of {MODELS}")
  return random_init.init_params(cfg, key), cfg, None


def random_sae(d_in: int, d_sae: int, key: Array) -> tuple[dict, SAEConfig]:
  """Random standard (ReLU) SAE in SAELens layout: W_dec rows of unit norm, W_enc = W_dec^T."""
  w_dec = jax.random.normal(key, (d_sae, d_in), jnp.float32)
  w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
  params = {"W_enc": w_dec.T, "b_enc": jnp.zeros((d_sae,), jnp.float32), "W_dec": w_dec,
            "b_dec": jnp.zeros((d_in,), jnp.float32)}
  return params, SAEConfig(architecture="standard", d_in=d_in, d_sae=d_sae)


def default_layers(cfg: ModelConfig, kind: str) -> tuple[int, ...]:
  """IOI: the site at a third of the depth (GPT-2 small: layer 4, as the paper). Refusal: three
  sites at 40%, 55% and 70% of the depth."""
  n = cfg.n_layers
  if kind == "ioi":
    return (max(1, n // 3),)
  return tuple(sorted({max(1, min(n - 1, int(round(f * n)))) for f in (0.4, 0.55, 0.7)}))


# ----------------------------------------------------------------------------------------------
# workloads


def example_keys(key: Array, n: int) -> Array:
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))


def _features(key: Array, d_sae: int, k: int) -> np.ndarray:
  return np.asarray(jax.random.choice(key, d_sae, (k,), replace=False), np.int32)


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
             layer: int | None = None, seed: int = 0) -> tuple[Workload, Data]:
  """IOI-shaped workload: one delta row at the last token, one frozen clamp site, encoder projection."""
  del params
  layer = default_layers(cfg, "ioi")[0] if layer is None else layer
  d_sae = d_sae or 16 * cfg.d_model
  k_feat, k_sae, k_ex = jax.random.split(jax.random.PRNGKey(seed + 1), 3)
  sae, scfg = random_sae(cfg.d_model, d_sae, k_sae)
  site = sites_lib.site_name(layer, "hook_resid_pre")
  spec = intervene.ClampSpec(site=site, sae_cfg=scfg, mode="set", positive_only=True)
  cp = intervene.make_clamp_params(_features(k_feat, d_sae, k_max), IOI_CLAMP_VALUE, k_max=k_max)
  toks, io, s = ioi_tokens(tokenizer, cfg.vocab_size, n, seed)
  t = toks.shape[1]
  rcfg = RecoveryConfig(steps=steps, lr=0.1, budget=20.0, projection="encoder", ridge=1e-4, checkpoint="final",
                        semantics="frozen")
  wl = Workload(kind="ioi", semantics="frozen", sites=(site,), specs=(spec,), seq_len=t, delta_start=t - 1, n_rows=1,
                readout_start=t - 1, n_readout=1, mon_start=t - 1, n_mon=1, rcfg=rcfg,
                objective=obj_lib.Objective("logit_diff"), k_max=k_max)
  data = Data(jnp.asarray(toks), {"pos": jnp.asarray(io), "neg": jnp.asarray(s)}, k_ex, example_keys(k_ex, n),
              (sae,), (cp,))
  return wl, data


def make_refusal(params, cfg: ModelConfig, tokenizer, *, n: int, k_max: int, steps: int, d_sae: int | None = None,
                 layers: tuple[int, ...] | None = None, prompt_len: int = 30, probes: int = 8,
                 correction_steps: int = 0, seed: int = 0) -> tuple[Workload, Data]:
  """Refusal-shaped workload (v4 stage 2): 49 delta rows at several live-clamped sites, Jacobian sketch.

  Tokens are random ids (cost does not depend on the text); the 'answer' is the last 48 tokens.
  """
  del params, tokenizer
  layers = default_layers(cfg, "refusal") if layers is None else tuple(layers)
  d_sae = d_sae or 16 * cfg.d_model
  keys = jax.random.split(jax.random.PRNGKey(seed + 2), 2 * len(layers) + 1)
  saes, specs, cps, sites = [], [], [], []
  for j, layer in enumerate(layers):
    sae, scfg = random_sae(cfg.d_model, d_sae, keys[2 * j])
    site = sites_lib.site_name(layer, "hook_resid_post")
    saes.append(sae)
    sites.append(site)
    specs.append(intervene.ClampSpec(site=site, sae_cfg=scfg, mode="multiply", positive_only=False))
    cps.append(intervene.make_clamp_params(_features(keys[2 * j + 1], d_sae, k_max), REFUSAL_CLAMP_VALUE,
                                           k_max=k_max))
  t = prompt_len + N_ANS
  a = prompt_len  # answer start; anchor = a - 1
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, cfg.vocab_size, (n, t), dtype=np.int32)
  rcfg = RecoveryConfig(steps=steps, lr=0.05, budget=40.0, projection="jacobian", jacobian_probes=probes,
                        jacobian_drift_probe=True, lambda_act=200.0, drift_penalty="relative_mse",
                        correction_steps=correction_steps, correction_lr=0.05, checkpoint="final", semantics="live")
  wl = Workload(kind="refusal", semantics="live", sites=tuple(sites), specs=tuple(specs), seq_len=t,
                delta_start=a - 1, n_rows=N_ANS + 1, readout_start=a - 1, n_readout=N_ANS, mon_start=a, n_mon=N_ANS,
                rcfg=rcfg, objective=obj_lib.Objective("teacher_forced", w_ans=5.0, n_ans=N_ANS), k_max=k_max)
  targets = {"next_tokens": jnp.asarray(toks[:, a:a + N_ANS]), "answer_len": jnp.full((n,), N_ANS, jnp.int32)}
  return wl, Data(jnp.asarray(toks), targets, keys[-1], example_keys(keys[-1], n), tuple(saes), tuple(cps))


def make_workload(kind: str, params, cfg, tokenizer, **kw) -> tuple[Workload, Data]:
  if kind == "ioi":
    return make_ioi(params, cfg, tokenizer, **kw)
  if kind == "refusal":
    return make_refusal(params, cfg, tokenizer, **kw)
  raise ValueError(f"unknown workload kind {kind!r}: expected one of {KINDS}")


# ----------------------------------------------------------------------------------------------
# pieces shared by the variants


def encoder_matrix(wl: Workload, data: Data) -> Array:
  """Masked selected encoder columns per site: [n_sites, d, K] (padded features are zero columns)."""
  from recovery_jax.sae import core as sae_core  # pylint: disable=import-outside-toplevel
  cols = [sae_core.encoder_columns(sae, spec.sae_cfg, cp.feature_idx) * cp.feature_mask[None].astype(jnp.float32)
          for spec, sae, cp in zip(wl.specs, data.saes, data.clamps)]
  return jnp.stack(cols)


def monitored_features(wl: Workload, data: Data, values: dict[str, Array]) -> tuple:
  """Selected SAE features of the captured site values at the monitored columns: [B, n_mon, K] per site.

  ``values`` maps site -> [B, n_mon, d] (already sliced to the monitored columns)."""
  from recovery_jax.sae import core as sae_core  # pylint: disable=import-outside-toplevel
  return tuple(sae_core.encode_subset(sae, spec.sae_cfg, values[spec.site], cp.feature_idx)
               for spec, sae, cp in zip(wl.specs, data.saes, data.clamps))


def monitor(wl: Workload, data: Data, refs: tuple):
  """Monitor (refs [B, M, K], masks, masked W_dec rows) for ``recovery.optimizer``."""
  from recovery_jax.recovery.optimizer import Monitor  # pylint: disable=import-outside-toplevel
  masks = tuple(jnp.broadcast_to(cp.feature_mask[None, None], r.shape) for cp, r in zip(data.clamps, refs))
  dec = tuple(sae["W_dec"][cp.feature_idx] * cp.feature_mask[:, None].astype(jnp.float32)
              for sae, cp in zip(data.saes, data.clamps))
  return Monitor(refs, masks, dec)


def row_scores(wl: Workload, logits: Array, targets: dict) -> Array:
  """Per-row objective [B] from readout logits [B, n_readout, V]."""
  return obj_lib.row_scores(wl.objective, logits, targets)
