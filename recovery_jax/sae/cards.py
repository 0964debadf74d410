"""Feature cards: what an SAE latent responds to and what it writes, from held-out text.

For (site, feature ids) a card holds the top-activating contexts (tokens with the feature's activation
on each, the peak token highlighted), the decoder direction's logit lens (top promoted / suppressed
output tokens through the final norm and unembedding) and the firing frequency over the tokens seen.

  cards = feature_cards(params, model_cfg, tokenizer, sae, sae_cfg, site, [12, 7], token_batches)
  paths = write_cards(cards, "runs/x/cards")        # cards.md + cards.html (self-contained)

``token_batches`` are token windows [B, T] int (e.g. ``heldout_windows(...)``); positions are kept as
the SAE trainer keeps them (no BOS/EOS/pad, not the first ``n_skip`` positions). The command

  python -m recovery_jax.sae.cards --model=smollm2-135m-instruct \
      --sae=assets/smollm2-135m-instruct-res12-topk --features=1,2,3 --out=runs/cards

writes cards for any SAE the loaders read.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax import outputs
from recovery_jax.models import transformer
from recovery_jax.sae import core, harvest
from recovery_jax.sae.config import SAEConfig


@dataclasses.dataclass(frozen=True)
class Context:
  """One window around a token where the feature fired: ``tokens`` (decoded strings), the feature's
  activation on each (``acts``), ``peak`` the index of the token the context was chosen for."""

  tokens: tuple[str, ...]
  acts: tuple[float, ...]
  peak: int

  @property
  def value(self) -> float:
    return self.acts[self.peak]


@dataclasses.dataclass(frozen=True)
class Card:
  site: str
  feature: int
  frequency: float  # fraction of the kept tokens where the activation is > 0
  n_tokens: int  # kept tokens seen
  max_act: float
  mean_active: float  # mean activation where active (0 when it never fired)
  contexts: tuple[Context, ...]
  promoted: tuple[tuple[str, float], ...]  # (token, logit) of the decoder direction, highest first
  suppressed: tuple[tuple[str, float], ...]  # lowest first
  sae: str = ""  # the SAE's source (file), for provenance


def logit_lens(params, model_cfg, sae, sae_cfg: SAEConfig, feature_ids: Sequence[int], n: int = 10):
  """Top-n promoted and suppressed vocabulary ids of each feature's decoder direction, read through
  ``final_logits`` (final norm + unembedding). Returns (top_ids, top_logits, bottom_ids,
  bottom_logits), each [K, n], numpy."""
  ids = jnp.asarray(np.asarray(feature_ids, np.int32))
  dirs = jnp.asarray(core.effective_decoder(sae, sae_cfg))[ids].astype(jnp.float32)  # [K, d]
  logits = transformer.final_logits(params, model_cfg, dirs)  # [K, V]
  top_v, top_i = jax.lax.top_k(logits, n)
  bot_v, bot_i = jax.lax.top_k(-logits, n)
  return tuple(np.asarray(a) for a in (top_i, top_v, bot_i, -bot_v))


@functools.lru_cache(maxsize=8)
def _encode_fn(sae_cfg: SAEConfig):
  return jax.jit(lambda sae, x, idx: core.encode_subset(sae, sae_cfg, x, idx))


class _Decoder:
  """Token id -> display string (cached ``tokenizer.decode([id])``)."""

  def __init__(self, tokenizer):
    self.tok, self.cache = tokenizer, {}

  def __call__(self, i: int) -> str:
    i = int(i)
    if i not in self.cache:
      self.cache[i] = self.tok.decode([i], skip_special_tokens=False) if self.tok is not None else f"<{i}>"
    return self.cache[i]


def feature_cards(params, model_cfg, tokenizer, sae, sae_cfg: SAEConfig, site: str, feature_ids: Sequence[int],
                  token_batches: Iterable[np.ndarray], *, n_contexts: int = 6, before: int = 12, after: int = 4,
                  n_logits: int = 8, exclude: Sequence[int] | None = None, n_skip: int | None = None) -> list[Card]:
  """Cards for ``feature_ids`` of the SAE at ``site`` (model and SAE already loaded).

  token_batches: iterable of token windows [B, T] int. Activations come from one truncated forward
  per batch (layers up to the site); positions with BOS/EOS/pad ids (``exclude``, default the
  model's) and the first ``n_skip`` positions of each window (default as the trainer: 2 with BOS,
  else 1) count neither for frequency nor for contexts. Each context spans ``before`` tokens before
  and ``after`` after its peak; the ``n_contexts`` strongest distinct peaks are kept.
  """
  feature_ids = [int(f) for f in feature_ids]
  if not feature_ids:
    raise ValueError("feature_cards: no feature ids")
  bad = [f for f in feature_ids if not 0 <= f < sae_cfg.d_sae]
  if bad:
    raise ValueError(f"feature_cards: feature ids {bad} are outside [0, d_sae={sae_cfg.d_sae}) of {sae_cfg.source or 'the SAE'}")
  exclude = harvest.excluded_ids(model_cfg) if exclude is None else tuple(exclude)
  if n_skip is None:
    n_skip = harvest.n_skip_for(harvest.wants_bos(model_cfg, sae_cfg.prepend_bos if sae_cfg.prepend_bos is not None
                                                  else "auto"))
  site_fn = harvest.make_sites_fn(model_cfg, (site,))
  enc = _encode_fn(sae_cfg)
  idx = jnp.asarray(feature_ids, jnp.int32)
  k = len(feature_ids)
  fired = np.zeros(k, np.int64)
  act_sum = np.zeros(k, np.float64)
  max_act = np.zeros(k, np.float64)
  n_tokens = 0
  best: list[list[tuple[float, np.ndarray, np.ndarray, int]]] = [[] for _ in range(k)]
  for toks in token_batches:
    toks = np.asarray(toks, np.int32)
    if toks.ndim != 2:
      raise ValueError(f"feature_cards: token batches must be [B, T], got shape {toks.shape}")
    x = site_fn(params, jnp.asarray(toks))[site]
    z = np.asarray(enc(sae, x, idx), np.float32)  # [B, T, K]
    keep = harvest.keep_mask(toks, exclude, n_skip)
    z = np.where(keep[..., None], z, 0.0)
    n_tokens += int(keep.sum())
    fired += (z > 0).sum((0, 1))
    act_sum += z.sum((0, 1))
    max_act = np.maximum(max_act, z.max((0, 1)))
    flat = z.reshape(-1, k)
    m = min(n_contexts, flat.shape[0])
    for j in range(k):
      cand = np.argpartition(-flat[:, j], m - 1)[:m]
      for c in cand:
        v = float(flat[c, j])
        if v <= 0:
          continue
        b, t = divmod(int(c), toks.shape[1])
        lo, hi = max(0, t - before), min(toks.shape[1], t + after + 1)
        best[j].append((v, toks[b, lo:hi].copy(), z[b, lo:hi, j].copy(), t - lo))
      best[j] = sorted(best[j], key=lambda e: -e[0])[:n_contexts]
  if n_tokens == 0:
    raise ValueError("feature_cards: no kept tokens in token_batches")
  dec = _Decoder(tokenizer)
  top_i, top_v, bot_i, bot_v = logit_lens(params, model_cfg, sae, sae_cfg, feature_ids, n_logits)
  cards = []
  for j, f in enumerate(feature_ids):
    ctx = tuple(Context(tuple(dec(t) for t in tk), tuple(float(a) for a in ac), peak) for _, tk, ac, peak in best[j])
    cards.append(Card(
        site=site, feature=f, frequency=float(fired[j] / n_tokens), n_tokens=n_tokens, max_act=float(max_act[j]),
        mean_active=float(act_sum[j] / fired[j]) if fired[j] else 0.0, contexts=ctx,
        promoted=tuple((dec(i), float(v)) for i, v in zip(top_i[j], top_v[j])),
        suppressed=tuple((dec(i), float(v)) for i, v in zip(bot_i[j], bot_v[j])), sae=sae_cfg.source))
  return cards


# --- writing ---------------------------------------------------------------------------------------


def _show(tok: str) -> str:
  """A token as visible text: newlines and tabs as escapes."""
  return tok.replace("\n", "\\n").replace("\t", "\\t")


def _md(text: str) -> str:
  """Markdown-safe inline text (table cells, code spans avoided)."""
  out = _show(text)
  for ch in "\\`*_[]<>|#":
    out = out.replace(ch, "\\" + ch)
  return out


def to_markdown(cards: Sequence[Card]) -> str:
  lines = ["# Feature cards", ""]
  for c in cards:
    lines += [f"## {c.site} feature {c.feature}", "",
              f"Fires on {c.frequency:.3%} of {c.n_tokens:,} held-out tokens; max activation {c.max_act:.3g}, "
              f"mean when active {c.mean_active:.3g}." + (f" SAE: {_md(c.sae)}." if c.sae else ""), "",
              "Promotes: " + ", ".join(f"{_md(t)} ({v:+.2f})" for t, v in c.promoted), "",
              "Suppresses: " + ", ".join(f"{_md(t)} ({v:+.2f})" for t, v in c.suppressed), ""]
    if c.contexts:
      bold = lambda ctx: "".join(f"**{_md(t)}**" if i == ctx.peak else _md(t) for i, t in enumerate(ctx.tokens))
      lines.append(outputs.format_table(["activation", "context (peak token in bold)"],
                                        [[f"{ctx.value:.3g}", bold(ctx)] for ctx in c.contexts]))
    else:
      lines.append("Never fired on these tokens.")
    lines.append("")
  return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;color:#222}
.card{border:1px solid #ccc;border-radius:6px;padding:0.6em 1em;margin:1em 0}
.ctx{font-family:monospace;white-space:pre-wrap;margin:0.3em 0}.v{color:#666;display:inline-block;width:5em}
.tok{border-radius:2px}.peak{outline:1px solid #c40}.lens span{font-family:monospace;margin-right:0.8em}"""


def to_html(cards: Sequence[Card], title: str = "Feature cards") -> str:
  """A self-contained page (inline CSS, no scripts); every text is HTML-escaped; token backgrounds
  scale with the activation relative to the card's maximum; hovering shows the value."""
  e = lambda s: html.escape(s, quote=True)
  parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style></head>",
           f"<body><h1>{e(title)}</h1>"]
  for c in cards:
    parts.append(f"<div class='card' id='{e(c.site)}-{c.feature}'><h2>{e(c.site)} feature {c.feature}</h2>")
    parts.append(f"<p>Fires on {c.frequency:.3%} of {c.n_tokens:,} held-out tokens; max activation {c.max_act:.3g}, "
                 f"mean when active {c.mean_active:.3g}.{(' SAE: ' + e(c.sae)) if c.sae else ''}</p>")
    for label, pairs in (("Promotes", c.promoted), ("Suppresses", c.suppressed)):
      parts.append(f"<p class='lens'><b>{label}:</b> " +
                   "".join(f"<span>{e(_show(t))} ({v:+.2f})</span>" for t, v in pairs) + "</p>")
    scale = c.max_act or 1.0
    for ctx in c.contexts:
      toks = []
      for i, (t, a) in enumerate(zip(ctx.tokens, ctx.acts)):
        alpha = min(max(a / scale, 0.0), 1.0)
        cls = "tok peak" if i == ctx.peak else "tok"
        toks.append(f"<span class='{cls}' style='background:rgba(255,140,0,{alpha:.2f})' title='{a:.3g}'>"
                    f"{e(_show(t))}</span>")
      parts.append(f"<div class='ctx'><span class='v'>{ctx.value:.3g}</span>{''.join(toks)}</div>")
    if not c.contexts:
      parts.append("<p>Never fired on these tokens.</p>")
    parts.append("</div>")
  parts.append("</body></html>")
  return "\n".join(parts)


def write_cards(cards: Sequence[Card], out_dir: str | os.PathLike, *, name: str = "cards") -> dict[str, Path]:
  """Writes ``<name>.md``, ``<name>.html`` and ``<name>.json`` (the cards as data); returns their paths."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = {"markdown": out / f"{name}.md", "html": out / f"{name}.html", "json": out / f"{name}.json"}
  paths["markdown"].write_text(to_markdown(cards), encoding="utf-8")
  paths["html"].write_text(to_html(cards), encoding="utf-8")
  paths["json"].write_text(json.dumps([dataclasses.asdict(c) for c in cards], indent=1), encoding="utf-8")
  return paths


# --- held-out text -----------------------------------------------------------------------------------


def heldout_windows(model_cfg, tokenizer, *, corpus_root: str = ".cache/corpus", n_windows: int = 256,
                    seq_len: int = 64, batch: int = 32, heldout_frac: float = 0.02, prepend_bos: bool | str = "auto",
                    seed: int = 0) -> list[np.ndarray]:
  """Batches [batch, seq_len] of held-out windows: the held-out split (by content hash, as the SAE
  trainer splits) of the offline corpus under ``corpus_root`` (every source folder found there), or
  of CPython stdlib docstrings when that folder does not exist (no download)."""
  from recovery_jax.data import corpus as corpus_lib
  root = Path(corpus_root)
  sources = {str(p): 1.0 for p in sorted(root.iterdir()) if p.is_dir()} if root.is_dir() else {}
  if sources:
    docs = harvest.mixed_documents(sources, split="heldout", heldout_frac=heldout_frac, seed=seed)
  else:
    docs = (d for _, text in corpus_lib.stdlib_docstrings() for d in corpus_lib.iter_documents_from_text(text)
            if corpus_lib.is_heldout(d, max(heldout_frac, 0.1)))
  bos = model_cfg.bos_token_id if harvest.wants_bos(model_cfg, prepend_bos) else None
  sep = model_cfg.eos_token_ids[0] if model_cfg.eos_token_ids else None
  pad = model_cfg.pad_token_id if model_cfg.pad_token_id is not None else (sep or 0)
  windows = []
  for w in harvest.token_windows(docs, tokenizer, seq_len, bos_id=bos, sep_id=sep, pad_id=pad):
    windows.append(w)
    if len(windows) >= n_windows:
      break
  if not windows:
    raise ValueError(f"heldout_windows: no held-out text found (corpus_root={corpus_root!r})")
  return [np.stack(windows[i:i + batch]) for i in range(0, len(windows), batch)]


def main(argv):
  del argv
  from absl import flags
  from recovery_jax.models.loading import load_model
  from recovery_jax.sae import formats
  F = flags.FLAGS
  params, model_cfg, tokenizer = load_model(F.model)
  sae, sae_cfg = formats.load_sae(F.sae, model_cfg=model_cfg, hook_name=F.site or None)
  site = F.site or sae_cfg.hook_name
  features = [int(x) for x in F.features.split(",") if x.strip()]
  batches = heldout_windows(model_cfg, tokenizer, corpus_root=F.corpus_root, n_windows=F.n_windows, seq_len=F.seq_len)
  cards = feature_cards(params, model_cfg, tokenizer, sae, sae_cfg, site, features, batches,
                        n_contexts=F.n_contexts)
  for kind, path in write_cards(cards, F.out).items():
    print(f"{kind}: {path}")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("model", "smollm2-135m-instruct", "model name or path (load_model)")
  flags.DEFINE_string("sae", None, "SAE file or folder (any format the loaders read)")
  flags.DEFINE_string("site", "", "hook site (default: the SAE's hook_name)")
  flags.DEFINE_string("features", None, "comma-separated feature ids")
  flags.DEFINE_string("out", None, "output folder (cards.md, cards.html, cards.json)")
  flags.DEFINE_string("corpus_root", ".cache/corpus", "offline corpus folder (held-out split); stdlib when absent")
  flags.DEFINE_integer("n_windows", 256, "held-out windows to scan")
  flags.DEFINE_integer("seq_len", 64, "tokens per window")
  flags.DEFINE_integer("n_contexts", 6, "contexts per card")
  flags.mark_flags_as_required(["sae", "features", "out"])
  app.run(main)
