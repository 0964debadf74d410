"""LA-IG feature selection for refusal (paper-method 6.2; Yeo et al. ``linear_attribution`` with
``interpolate_steps=10, ind_jailbreak=True`` and ``find_features``), on the contrast's candidates.

Per example (a chat prompt, left-padded; the metric at its last token), with r_hat the unit contrast
vector of one site (``features.vector_site``, else the deepest circuit site):

1. **Patched run**: the direction is ablated, ``x <- x - (x . r_hat) r_hat``, at every layer's
   ``blocks.l.hook_resid_post`` (all positions). At each circuit site s with value A_s there (before
   the ablation applied at that point; a ``blocks.L.hook_resid_pre`` site reads the input of
   ``blocks.{L-1}.hook_resid_post``, the same point of the stream): ``f_patch = E(A_s - (A_s . r_hat)
   r_hat)`` and ``e_patch = A_s - D(f_patch)`` (upstream's stored error is taken against the
   un-ablated value). The jailbreak token j is the patched run's argmax at the last position.
2. **Clean run**: ``f_clean = E(x_s)``.
3. **Interpolation** at alpha = 0, 1/steps, ..., (steps-1)/steps: at every circuit site (all at
   once), ``f = E(x)``, ``f_a = (1-a) f + a f_patch``, ``e_a = (1-a) (x - D(f)) + a e_patch`` and the
   site becomes ``D(f_a) + e_a``; ``g_a = d m / d f_a`` (the total derivative at that node, every
   path downstream included) with ``m = logit[j] - logit['I']`` at the last position, summed over
   the batch (examples do not interact).
4. ``attr = (f_patch - f_clean) * mean_a g_a`` [B, T, n] on the candidate features, averaged over
   each row's real positions after its first (BOS on Gemma) -> scores [B, n] per site.

``find_features``: the scores of all (site, candidate) pairs, concatenated in site order [B, P]; the
**local** set of an example is its top K, the **global** set the top K of the mean over examples
(ties: the lower pair index first). Cost per example: two forwards plus ``steps`` forward+backward
passes (about 3 * steps + 2 forwards).

Prompts (the app): the contrast's refusal side, at its last prompt token: ``files`` the harmful file
(the paper's), ``system`` the prompts under the declining system turn, ``openings`` the plain prompts
(the teacher-forced opening comes after the metric's position, so causal attention would ignore it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax import batching
from recovery_jax.models import sites as sites_lib, transformer
from recovery_jax.sae import core as sae_core
from recovery_jax.sae.config import SAEConfig
from recovery_jax.tasks import refusal_features as feat_lib

SELECTIONS = ("contrast", "la_ig")
STEPS = 10  # upstream interpolate_steps
BATCH = 8  # prompts per compiled call
REFUSAL_TOKEN = "I"  # upstream: tokenizer.encode('I')[0]


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static part of the attribution: the circuit sites, their SAE configs, the interpolation steps."""

  sites: tuple[str, ...]
  sae_cfgs: tuple[SAEConfig, ...]
  steps: int = STEPS


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Attribution:
  """Per-example LA-IG of one batch: scores {site: [B, n_site]} (mean over real positions after the
  first), jailbreak [B] int (patched argmax at the last position), metric_clean / metric_patched [B]
  (``logit[jailbreak] - logit['I']`` at the last position, clean and patched runs)."""

  scores: dict
  jailbreak: jax.Array
  metric_clean: jax.Array
  metric_patched: jax.Array


def _ablation_point(site: str, n_layers: int) -> str:
  """The site whose pre-edit value is a circuit site's value before the ablation at that point:
  ``blocks.L.hook_resid_pre`` (L >= 1) -> ``blocks.{L-1}.hook_resid_post``; else the site."""
  s = sites_lib.parse_site(site, n_layers)
  if s.hook not in ("hook_resid_post", "hook_resid_pre"):
    raise ValueError(f"LA-IG site {site!r}: expected a blocks.L.hook_resid_post or hook_resid_pre site")
  if s.hook == "hook_resid_pre" and s.layer > 0:
    return sites_lib.site_name(s.layer - 1, "hook_resid_post")
  return site


def _last_logits(params, cfg, resid, tok_ids):
  """logit[tok_ids] at the last position: resid [B, T, D], tok_ids [B, n] -> [B, n]."""
  return transformer.final_logits_at(params, cfg, resid[:, -1:], tok_ids)[:, 0]


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def attribution(params, cfg, spec: Spec, sae_params: Sequence, candidates: Sequence, direction, refusal_id, ids,
                mask) -> Attribution:
  """LA-IG scores of the candidate features of one batch (module docstring).

  sae_params: one SAE params pytree per ``spec.sites``; candidates: [n_s] int feature ids per site;
  direction: [D] (normalised here); refusal_id: [] int; ids, mask: [B, T] (left-padded, the metric at
  column T-1). Returns ``Attribution`` with scores {site: [B, n_s]}.
  """
  saes = dict(zip(spec.sites, zip(sae_params, spec.sae_cfgs)))
  cands = dict(zip(spec.sites, candidates))
  r_hat = direction.astype(jnp.float32) / jnp.linalg.norm(direction.astype(jnp.float32))
  ablate = lambda x: x - (x @ r_hat)[..., None] * r_hat
  f32 = lambda x: x.astype(jnp.float32)

  # 1. patched run: ablation at every resid_post; each site's value before the ablation at its point
  points = {s: _ablation_point(s, cfg.n_layers) for s in spec.sites}
  post = {sites_lib.site_name(l, "hook_resid_post"): (lambda x, _: ablate(f32(x))) for l in range(cfg.n_layers)}
  out = transformer.forward(params, cfg, ids, attention_mask=mask, edits=post, compute_logits=False,
                            capture_inputs=tuple(sorted(set(points.values()))))
  f_patch, e_patch = {}, {}
  for s in spec.sites:
    p, c = saes[s]
    a = f32(out.captures[f"{points[s]}:input"])
    xa = ablate(a)
    f = sae_core.encode(p, c, xa)
    f_patch[s], e_patch[s] = f, a - sae_core.decode(p, c, f, xa)
  last = transformer.final_logits(params, cfg, out.resid[:, -1])  # [B, V]
  jailbreak = jnp.argmax(last, -1).astype(jnp.int32)
  toks = jnp.stack([jailbreak, jnp.broadcast_to(jnp.asarray(refusal_id, jnp.int32), jailbreak.shape)], -1)
  metric_patched = jnp.take_along_axis(last, toks, -1) @ jnp.array([1.0, -1.0])

  # 2. clean run
  clean = transformer.forward(params, cfg, ids, attention_mask=mask, capture=spec.sites, compute_logits=False)
  metric_clean = _last_logits(params, cfg, clean.resid, toks) @ jnp.array([1.0, -1.0])
  df = {s: jnp.take(f_patch[s], cands[s], axis=-1) - sae_core.encode_subset(*saes[s], f32(clean.captures[s]), cands[s])
        for s in spec.sites}

  # 3. gradient at f_a (a zero perturbation of the candidate columns), mean over the interpolation
  def metric(eps, alpha):
    def edit(s):
      p, c = saes[s]
      def fn(x, _):
        x = f32(x)
        f = sae_core.encode(p, c, x)
        f_a = (1 - alpha) * f + alpha * f_patch[s]
        e_a = (1 - alpha) * (x - sae_core.decode(p, c, f, x)) + alpha * e_patch[s]
        return sae_core.decode(p, c, f_a, x) + sae_core.decode_delta(p, c, eps[s], cands[s], x) + e_a
      return fn
    o = transformer.forward(params, cfg, ids, attention_mask=mask, edits={s: edit(s) for s in spec.sites},
                            compute_logits=False)
    return (_last_logits(params, cfg, o.resid, toks) @ jnp.array([1.0, -1.0])).sum()

  b, t = ids.shape
  zeros = {s: jnp.zeros((b, t, cands[s].shape[0]), jnp.float32) for s in spec.sites}
  def step(acc, alpha):
    g = jax.grad(metric)(zeros, alpha)
    return jax.tree.map(jnp.add, acc, g), None
  alphas = jnp.arange(spec.steps, dtype=jnp.float32) / spec.steps
  gsum, _ = jax.lax.scan(step, zeros, alphas)

  # 4. attribution, averaged over each row's real positions after its first
  sel = (mask > 0) & (jnp.cumsum(mask > 0, axis=1) > 1)  # [B, T]
  w = sel.astype(jnp.float32) / jnp.maximum(sel.sum(1, keepdims=True), 1)
  scores = {s: jnp.einsum("bt,btn->bn", w, df[s] * gsum[s] / spec.steps) for s in spec.sites}
  return Attribution(scores, jailbreak, metric_clean, metric_patched)


@functools.partial(jax.jit, static_argnames=("k",))
def top_k(scores, k: int):
  """find_features on pair scores [N, P]: (local [N, k] pair indices per example, global [k] pair
  indices of the mean over examples), each by score descending, ties to the lower index."""
  scores = jnp.asarray(scores, jnp.float32)
  k = min(int(k), scores.shape[-1])
  return jax.lax.top_k(scores, k)[1], jax.lax.top_k(scores.mean(0), k)[1]


@dataclasses.dataclass(frozen=True)
class Selection:
  """LA-IG over the candidates of a contrast ``Ranking``: the ranking with LA-IG scores (global mean
  per candidate; ``top`` by it), the per-example pair scores [N, P] over ``pairs`` ((site, feature)
  in site and cosine order), local top-K pair indices [N, K], and the run's record."""

  ranking: feat_lib.Ranking
  pairs: tuple
  example_scores: np.ndarray
  local: np.ndarray
  record: dict


def select(params, cfg, tok, saes: Mapping[str, tuple], ranking: feat_lib.Ranking, prompts: Sequence[str],
           pad_id: int, k: int, direction_site: str = "", steps: int = STEPS, batch_size: int = BATCH) -> Selection:
  """LA-IG of ``ranking``'s candidates on ``prompts`` (formatted chat prompts), local and global top K.

  direction_site: the site whose contrast vector is ablated ("": the deepest site of ``ranking``).
  """
  sites = tuple(ranking.candidates)
  d_site = direction_site or max(sites, key=lambda x: sites_lib.visit_key(x, cfg.n_layers))
  spec = Spec(sites, tuple(saes[s][1] for s in sites), steps)
  side = feat_lib.side(tok, prompts, pad_id)
  refusal_id = int(tok.encode(REFUSAL_TOKEN, add_special_tokens=False).ids[0])
  sae_params = tuple(saes[s][0] for s in sites)
  cands = tuple(jnp.asarray(ranking.candidates[s], jnp.int32) for s in sites)
  direction = jnp.asarray(ranking.vectors[d_site], jnp.float32)

  def fn(batch, _):
    a = attribution(params, cfg, spec, sae_params, cands, direction, refusal_id, *batch)
    return {"scores": a.scores, "jailbreak": a.jailbreak, "clean": a.metric_clean, "patched": a.metric_patched}

  res = batching.map_batched(fn, (side.ids, side.mask), batch_size)
  pairs = tuple((s, int(f)) for s in sites for f in ranking.candidates[s])
  ex = np.concatenate([np.asarray(res["scores"][s], np.float32) for s in sites], axis=1)  # [N, P]
  local = np.asarray(top_k(ex, k)[0])
  order = [int(i) for i in top_k(ex, len(pairs))[1]]  # every pair, by mean score (the global top K first)
  mean = np.asarray(jnp.asarray(ex).mean(0), np.float64)
  offs = np.cumsum([0] + [len(ranking.candidates[s]) for s in sites])
  la_scores = {s: mean[offs[i]:offs[i + 1]] for i, s in enumerate(sites)}
  la_rank = dataclasses.replace(ranking, scores=la_scores,
                                top=tuple((pairs[i][0], pairs[i][1], float(mean[i])) for i in order))
  record = {"steps": steps, "rows": int(ex.shape[0]), "direction_site": d_site, "refusal_token": refusal_id,
            "jailbreak_tokens": np.asarray(res["jailbreak"]).tolist(),
            "metric_clean": [_sig(x) for x in np.asarray(res["clean"])],
            "metric_patched": [_sig(x) for x in np.asarray(res["patched"])],
            "scores": {s: [_sig(x) for x in v] for s, v in la_scores.items()},
            "local": [[list(pairs[j]) for j in row] for row in local.tolist()],
            "top": [[s, f, _sig(x)] for s, f, x in la_rank.top[:k]]}
  return Selection(la_rank, pairs, ex, local, record)


def _sig(x: float) -> float:
  return float(f"{float(x):.6g}")


def compare(a: feat_lib.Ranking, b: feat_lib.Ranking, k: int) -> dict:
  """Overlap of the global top ``k`` pairs of two rankings: |A n B| / K and the Jaccard index."""
  sa = [(s, int(f)) for s, f, _ in a.top[:k]]
  sb = [(s, int(f)) for s, f, _ in b.top[:k]]
  inter = set(sa) & set(sb)
  union = set(sa) | set(sb)
  return {"k": int(k), "intersection": len(inter), "overlap": len(inter) / max(int(k), 1),
          "jaccard": len(inter) / max(len(union), 1),
          "contrast": [list(p) for p in sa], "la_ig": [list(p) for p in sb],
          "only_contrast": [list(p) for p in sa if p not in inter], "only_la_ig": [list(p) for p in sb if p not in inter]}
