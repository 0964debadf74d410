"""Refusal features: a refusal contrast direction per site, candidate SAE features by decoder cosine,
a ranking, and the global top-K (site, feature) pairs (paper-method 6.2, with a benign contrast).

The paper's steering vector is the mean last-token ``resid_post`` of refused (harmful) minus complied
(harmless) prompts; candidates are the top-n features per layer by cosine(W_dec row, vector) and the
global set is the top 20 (layer, feature) pairs by LA-IG attribution. This module keeps the procedure
and lets the two sides of the contrast be chosen (``CONTRASTS``):

  openings  (default; benign) the same chat prompts followed by a teacher-forced refusal opening
            ("I'm sorry, but I can't help with that.") vs a compliance opening ("Sure, here is a clear
            answer to your question."); the mean residual over the opening's token positions.
  system    (benign) the same instructions under a declining vs a helpful system prompt; the last
            prompt token (the paper's position).
  files     the paper's: a user's harmful vs harmless instruction files; the last prompt token.

Ranking (``features.selection="contrast"``, a simpler stand-in for LA-IG): ``score_i = (mean z_i(refuse) -
mean z_i(comply)) * (W_dec[i] . v_hat)``, the part of the contrast's projection on v_hat that feature i's
activation difference carries through the SAE decoder (a linear, first-order attribution of the contrast
to the feature). Candidates are ranked by score over all sites together and the top K form the global set.
The paper's LA-IG ranking of the same candidates (``features.selection="la_ig"``) is ``refusal_la_ig``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax import batching
from recovery_jax.models import transformer
from recovery_jax.sae import core as sae_core

CONTRASTS = ("openings", "system", "files")
REFUSAL_OPENING = "I'm sorry, but I can't help with that."
COMPLIANCE_OPENING = "Sure, here is a clear answer to your question."
DECLINING_SYSTEM = ("You are an assistant that politely declines every request. Always answer with a short "
                    "apology and say that you cannot help with it.")
HELPFUL_SYSTEM = "You are a helpful assistant. Always answer the request clearly and completely."


@dataclasses.dataclass(frozen=True)
class Side:
  """Token rows of one side of the contrast: ids [B, T] (left-padded), mask [B, T], select [B, T] (the
  positions averaged per row)."""

  ids: np.ndarray
  mask: np.ndarray
  select: np.ndarray


def side(tok, texts: Sequence[str], pad_id: int, n_select: Sequence[int] | int = 1) -> Side:
  """Left-padded rows of ``texts`` (no special tokens added), selecting each row's last ``n_select`` tokens."""
  rows = [tok.encode(t, add_special_tokens=False).ids for t in texts]
  n_sel = [n_select] * len(rows) if isinstance(n_select, int) else list(n_select)
  t = max(len(r) for r in rows)
  ids = np.full((len(rows), t), pad_id, np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  sel = np.zeros((len(rows), t), bool)
  for i, r in enumerate(rows):
    ids[i, t - len(r):] = r
    mask[i, t - len(r):] = 1
    sel[i, t - n_sel[i]:] = True
  return Side(ids, mask, sel)


def opening_side(tok, prompts: Sequence[str], opening: str, pad_id: int) -> Side:
  """Prompts followed by a teacher-forced ``opening``; selects the opening's tokens (counted as the
  tokens beyond the prompt's own, so a merge at the boundary is not double counted)."""
  n = [len(tok.encode(p + opening, add_special_tokens=False).ids) - len(tok.encode(p, add_special_tokens=False).ids)
       for p in prompts]
  return side(tok, [p + opening for p in prompts], pad_id, [max(1, k) for k in n])


def site_means(params, cfg, s: Side, sites: Sequence[str], saes: Mapping[str, tuple], batch_size: int = 16
               ) -> tuple[dict, dict]:
  """Mean residual [d] and mean SAE activations [d_sae] per site over the selected positions (mean over
  a row's selected positions, then over rows)."""
  sites = tuple(sites)

  @jax.jit
  def per_row(params, ids, mask, sel):  # ({site: [b, d]}, {site: [b, d_sae]}): each row's mean over positions
    out = transformer.forward(params, cfg, ids, attention_mask=mask, capture=sites, compute_logits=False)
    w = sel.astype(jnp.float32) / jnp.maximum(sel.sum(1, keepdims=True), 1)  # [b, T]
    res, act = {}, {}
    for site in sites:
      x = out.captures[site].astype(jnp.float32)
      res[site] = jnp.einsum("bt,btd->bd", w, x)
      sae, scfg = saes[site]
      act[site] = jnp.einsum("bt,btf->bf", w, sae_core.encode(sae, scfg, x))
    return res, act

  res, act = batching.map_batched(lambda b, _: per_row(params, *b), (s.ids, s.mask, s.select), batch_size)
  mean = lambda d: {k: np.asarray(v, np.float64).mean(0).astype(np.float32) for k, v in d.items()}
  return mean(res), mean(act)


@dataclasses.dataclass(frozen=True)
class Ranking:
  """Per site: candidate ids [n], their decoder cosines and scores; and the global top-K pairs."""

  vectors: dict  # site -> [d] contrast vector (refuse - comply)
  candidates: dict  # site -> [n] int feature ids (by cosine, descending)
  cosines: dict  # site -> [n]
  scores: dict  # site -> [n]
  top: tuple  # ((site, feature, score), ...) global, by score descending

  def features(self, k: int) -> dict:
    """site -> feature ids of the global top ``k`` pairs (sites in forward order as in ``vectors``)."""
    out = {s: [] for s in self.vectors}
    for s, f, _ in self.top[:k]:
      out[s].append(int(f))
    return {s: v for s, v in out.items() if v}


def rank(saes: Mapping[str, tuple], refuse: tuple[dict, dict], comply: tuple[dict, dict], n_candidates: int = 10,
         vector_site: str = "") -> Ranking:
  """Candidates by cosine(W_dec row, v) per site and their contrast scores (module docstring).

  refuse / comply: ``site_means`` of the two sides. ``vector_site`` uses that site's vector at every
  site (the paper uses layer 15's); "" uses each site's own vector.
  """
  vectors = {s: np.asarray(refuse[0][s] - comply[0][s], np.float64) for s in refuse[0]}
  cands, coss, scores, pool = {}, {}, {}, []
  for site in vectors:
    v = vectors[vector_site] if vector_site else vectors[site]
    v_hat = v / (np.linalg.norm(v) + 1e-12)
    sae, scfg = saes[site]
    w = np.asarray(sae_core.effective_decoder(sae, scfg), np.float64)
    cos = (w @ v_hat) / (np.linalg.norm(w, axis=1) + 1e-12)
    ids = np.argsort(-cos, kind="stable")[:n_candidates]
    dz = np.asarray(refuse[1][site] - comply[1][site], np.float64)[ids]
    sc = dz * (w[ids] @ v_hat)
    cands[site], coss[site], scores[site] = ids.astype(np.int32), cos[ids], sc
    pool += [(site, int(f), float(x)) for f, x in zip(ids, sc)]
  order = sorted(range(len(pool)), key=lambda i: (-pool[i][2], i))
  return Ranking(vectors, cands, coss, scores, tuple(pool[i] for i in order))


def parse_feature_list(text: str, sites: Sequence[str]) -> dict:
  """A user feature list ``"L:f,L:f,..."`` (layer:feature) -> site -> ids over ``sites``
  (``blocks.L.hook_resid_post``); errors name the entry."""
  by_layer = {int(s.split(".")[1]): s for s in sites}
  out = {s: [] for s in sites}
  for item in [t.strip() for t in text.split(",") if t.strip()]:
    try:
      layer, f = (int(x) for x in item.split(":"))
    except ValueError as e:
      raise ValueError(f"feature list entry {item!r}: expected layer:feature (two integers)") from e
    if layer not in by_layer:
      raise ValueError(f"feature list entry {item!r}: layer {layer} is not a circuit layer {sorted(by_layer)}")
    if f < 0:
      raise ValueError(f"feature list entry {item!r}: feature {f} is negative; expected a feature index >= 0")
    out[by_layer[layer]].append(f)
  if not any(out.values()):
    raise ValueError(f"feature list {text!r} has no entries; expected layer:feature,... (e.g. "
                     f"{sorted(by_layer)[0] if by_layer else 0}:123)")
  return {s: v for s, v in out.items() if v}
