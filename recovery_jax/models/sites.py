"""TransformerLens hook-site names and their parsing.

Sites are plain strings, exactly as TransformerLens and SAELens name them:
``hook_embed``, ``blocks.{L}.hook_resid_pre``, ``blocks.{L}.hook_attn_out``,
``blocks.{L}.hook_resid_mid``, ``blocks.{L}.hook_mlp_out``, ``blocks.{L}.hook_resid_post``,
``ln_final.hook_normalized``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

BLOCK_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
GLOBAL_HOOKS = ("hook_embed", "hook_pos_embed", "ln_final.hook_normalized")

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_attn_out|hook_resid_mid|hook_mlp_out|hook_resid_post)$")


class Site(NamedTuple):
  """A parsed hook site: ``layer`` is None for global sites."""

  layer: int | None
  hook: str


def parse_site(name: str, n_layers: int | None = None) -> Site:
  """Parses a TransformerLens hook name; raises ValueError naming the site when it is unknown."""
  if name in GLOBAL_HOOKS:
    return Site(None, name)
  m = _BLOCK_RE.match(name)
  if m is None:
    raise ValueError(
        f"unknown hook site {name!r}: expected one of {GLOBAL_HOOKS} or 'blocks.L.<hook>' with <hook> in {BLOCK_HOOKS}")
  layer = int(m.group(1))
  if n_layers is not None and not 0 <= layer < n_layers:
    raise ValueError(f"hook site {name!r}: layer {layer} is out of range for a model with {n_layers} layers")
  return Site(layer, m.group(2))


def site_name(layer: int, hook: str) -> str:
  return f"blocks.{layer}.{hook}"


def resid_site_index(name: str, n_layers: int) -> int:
  """Position of a residual site on the stream, in units of half-layers.

  ``blocks.L.hook_resid_pre`` -> 2L, ``blocks.L.hook_resid_mid`` -> 2L+1,
  ``blocks.L.hook_resid_post`` -> 2L+2 (== resid_pre of L+1). Used to order sites along the stream.
  """
  s = parse_site(name, n_layers)
  if s.hook == "hook_resid_pre":
    return 2 * s.layer
  if s.hook in ("hook_resid_mid", "hook_attn_out"):
    return 2 * s.layer + 1
  if s.hook in ("hook_resid_post", "hook_mlp_out"):
    return 2 * s.layer + 2
  if s.hook in ("hook_embed", "hook_pos_embed"):
    return 0
  raise ValueError(f"site {name!r} is not on the residual stream")


_HOOK_RANK = {"hook_resid_pre": 0, "hook_attn_out": 1, "hook_resid_mid": 2, "hook_mlp_out": 3,
              "hook_resid_post": 4}


def visit_key(site: str, n_layers: int) -> tuple[int, int]:
  """Order in which ``transformer.forward`` visits hook sites (sortable)."""
  s = parse_site(site, n_layers)
  if s.layer is None:
    return {"hook_embed": (-1, 0), "hook_pos_embed": (-1, 1)}.get(s.hook, (n_layers, 0))
  return (s.layer, _HOOK_RANK[s.hook])


def same_residual(a: str, b: str, n_layers: int | None = None) -> bool:
  """Whether two sites name the same residual-stream tensor (``blocks.L.hook_resid_post`` is the
  input of ``blocks.{L+1}.hook_resid_pre``; a clamp at one and a delta at the other act on one
  vector, the edit of the earlier-visited site first)."""
  if a == b:
    return True
  resid = ("hook_resid_pre", "hook_resid_post")
  sa, sb = parse_site(a, n_layers), parse_site(b, n_layers)
  if sa.hook not in resid or sb.hook not in resid:
    return False
  return resid_site_index(a, n_layers) == resid_site_index(b, n_layers)
