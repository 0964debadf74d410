"""Harvesting residual activations at one or many hook sites from text, for SAE training and checks.

Pipeline: documents (``recovery_jax.data.corpus``) -> token windows [seq_len] (documents packed and
separated by EOS; BOS prepended to every window when the model wants it) -> one jit-compiled
truncated forward per batch [batch, seq_len] that captures every requested site and stops after the
deepest one (``stop_layer = max L + 1``, no unembedding) -> activations of the kept positions (not
BOS, EOS or pad tokens, not the first text position of a window) -> per site, rows with a massive
norm (above ``outlier_factor`` x that site's batch median: attention-sink-like tokens) dropped ->
optional shuffle buffer.

``harvest_to_stores`` writes a fixed number of tokens per site into ``<site>.npy`` memmaps
[N, d_in] (float16 or bfloat16) and is resumable (``state.json`` records the windows consumed, rows
per site and each site's exclusion rule); ``harvest_to_store`` is its one-site case;
``stream_activations`` yields shuffled batches without a store.

Size: the one-pass multi-site capture, the exclusion rules and the resumable on-disk stores are
one pipeline stage.
"""

from __future__ import annotations

import functools
import json
import os
import random
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from recovery_jax.data import corpus as corpus_lib
from recovery_jax.models import sites as sites_lib
from recovery_jax.models import transformer


def wants_bos(model_cfg, prepend_bos: bool | str = "auto") -> bool:
  """Whether to prepend BOS: ``"auto"`` = the model config declares a BOS token (Gemma needs it;
  SmolLM2's chat format starts with its BOS ``<|im_start|>``)."""
  if prepend_bos != "auto":
    return bool(prepend_bos)
  flag = getattr(model_cfg, "add_bos_token", None)
  if flag is not None:
    return bool(flag)
  return model_cfg.bos_token_id is not None


def excluded_ids(model_cfg) -> tuple[int, ...]:
  ids = {model_cfg.bos_token_id, model_cfg.pad_token_id, *model_cfg.eos_token_ids}
  return tuple(sorted(i for i in ids if i is not None))


def mixed_documents(sources: Mapping[str, float], *, split: str = "train", heldout_frac: float = 0.02,
                    seed: int = 0, max_chars: int = 4000) -> Iterator[str]:
  """Weighted mix of document streams. ``sources`` maps a path (file, folder or glob) to a weight;
  file order is shuffled per source with ``seed``; an exhausted source drops out."""
  rng = random.Random(seed)
  streams, weights = [], []
  for i, (path, w) in enumerate(sorted(sources.items())):
    files = corpus_lib.list_text_files(path)
    random.Random(seed * 1000 + i).shuffle(files)
    streams.append(corpus_lib.split_documents(corpus_lib.iter_documents(files, max_chars), split, heldout_frac))
    weights.append(float(w))
  while streams:
    j = rng.choices(range(len(streams)), weights=weights)[0]
    try:
      yield next(streams[j])
    except StopIteration:
      del streams[j], weights[j]


def token_windows(docs: Iterable[str], tokenizer, seq_len: int, *, bos_id: int | None, sep_id: int | None,
                  pad_id: int = 0, encode_batch: int = 64) -> Iterator[np.ndarray]:
  """Packs tokenized documents into windows [seq_len] int32: ``[BOS] + seq_len-1 tokens`` (or
  seq_len tokens without BOS), documents separated by ``sep_id``; the last window is padded."""
  body = seq_len - (1 if bos_id is not None else 0)
  buf: list[int] = []

  def emit(tokens):
    w = ([bos_id] if bos_id is not None else []) + tokens
    w = w + [pad_id] * (seq_len - len(w))
    return np.asarray(w, np.int32)

  def batches():
    chunk = []
    for d in docs:
      chunk.append(d)
      if len(chunk) == encode_batch:
        yield chunk
        chunk = []
    if chunk:
      yield chunk

  for chunk in batches():
    for enc in tokenizer.encode_batch(chunk, add_special_tokens=False):
      buf.extend(enc.ids)
      if sep_id is not None:
        buf.append(sep_id)
      while len(buf) >= body:
        yield emit(buf[:body])
        del buf[:body]
  if buf:
    yield emit(buf)


def keep_mask(tokens: np.ndarray, exclude: Sequence[int], n_skip: int = 1) -> np.ndarray:
  """[batch, seq] bool: positions whose activations are kept: not the first ``n_skip`` positions
  of a window, not the ``exclude`` ids (BOS, EOS, pad)."""
  keep = ~np.isin(tokens, np.asarray(exclude, np.int32)) if len(exclude) else np.ones(tokens.shape, bool)
  keep[:, :n_skip] = False
  return keep


def n_skip_for(bos: bool) -> int:
  """Leading positions dropped: BOS (when prepended) and the first text position, which in SmolLM2
  often carries a massive, attention-sink-like activation (norm ~1e4 vs ~1.4e2)."""
  return 2 if bos else 1


def drop_outliers(acts: np.ndarray, factor: float) -> np.ndarray:
  """Rows whose norm exceeds ``factor`` x the median row norm of this batch are dropped (0: keep all)."""
  if not factor or not len(acts):
    return acts
  n = np.linalg.norm(acts.astype(np.float32), axis=-1)
  return acts[n <= factor * np.median(n)]


def stop_layer_for(model_cfg, hook_names: Sequence[str]) -> int:
  """Layers to run so that every site in ``hook_names`` is computed: deepest layer + 1 (0 when all
  sites precede the first block, e.g. ``hook_embed``)."""
  stop = 0
  for name in hook_names:
    site = sites_lib.parse_site(name, model_cfg.n_layers)
    if site.layer is not None:
      stop = max(stop, site.layer + 1)
  return stop


@functools.lru_cache(maxsize=16)
def make_sites_fn(model_cfg, hook_names: tuple[str, ...]) -> Callable:
  """jit-compiled ``fn(params, tokens [B, T]) -> {site: activations [B, T, d]}`` capturing every site
  in one forward that stops after the deepest one (``stop_layer``; no unembedding). One per
  (config, sites), shared by callers."""
  if not hook_names or len(set(hook_names)) != len(hook_names):
    raise ValueError(f"make_sites_fn: need distinct site names, got {hook_names!r}")
  stop = stop_layer_for(model_cfg, hook_names)

  @jax.jit
  def fn(params, tokens):
    out = transformer.forward(params, model_cfg, tokens, capture=hook_names, stop_layer=stop,
                              compute_logits=False)
    return {n: out.captures[n] for n in hook_names}
  return fn


def make_site_fn(model_cfg, hook_name: str) -> Callable:
  """``fn(params, tokens [B, T]) -> activations [B, T, d]`` at one site (the one-site case of
  ``make_sites_fn``: only the layers up to the site run)."""
  fn = make_sites_fn(model_cfg, (hook_name,))
  return lambda params, tokens: fn(params, tokens)[hook_name]


def iter_site_batches(model_params, model_cfg, hook_names: Sequence[str], windows: Iterable[np.ndarray], *,
                      batch_size: int = 32, exclude: Sequence[int] = (), dtype=np.float32, n_skip: int = 1,
                      outlier_factor: float = 0.0, dropped: dict[str, int] | None = None
                      ) -> Iterator[tuple[dict[str, np.ndarray], int]]:
  """Yields ({site: kept activations [n_site, d]} of one forward batch, windows consumed so far).

  Positions are kept by ``keep_mask(.., exclude, n_skip)`` (the same for every site); then, per
  site, rows above ``outlier_factor`` x that site's median norm in this batch are dropped, so
  ``n_site`` may differ between sites. ``dropped`` (optional) accumulates the outlier rows dropped
  per site.
  """
  hook_names = tuple(hook_names)
  fn = make_sites_fn(model_cfg, hook_names)
  batch: list[np.ndarray] = []
  consumed = 0

  def run(batch):
    toks = np.stack(batch)
    n = len(batch)
    if n < batch_size:  # pad to a fixed shape: one compiled program
      toks = np.concatenate([toks, np.zeros((batch_size - n, toks.shape[1]), np.int32)])
    out = jax.device_get(fn(model_params, jnp.asarray(toks)))
    keep = keep_mask(toks[:n], exclude, n_skip)
    res = {}
    for name in hook_names:
      kept = np.asarray(out[name])[:n][keep]
      res[name] = drop_outliers(kept, outlier_factor).astype(dtype)
      if dropped is not None:
        dropped[name] = dropped.get(name, 0) + len(kept) - len(res[name])
    return res

  for w in windows:
    batch.append(w)
    consumed += 1
    if len(batch) == batch_size:
      yield run(batch), consumed
      batch = []
  if batch:
    yield run(batch), consumed


def iter_activation_batches(model_params, model_cfg, hook_name: str, windows: Iterable[np.ndarray], *,
                            batch_size: int = 32, exclude: Sequence[int] = (), site_fn: Callable | None = None,
                            dtype=np.float32, n_skip: int = 1, outlier_factor: float = 0.0
                            ) -> Iterator[tuple[np.ndarray, int]]:
  """One site of ``iter_site_batches``: yields (kept activations [n, d], windows consumed so far).
  ``site_fn`` is accepted for compatibility and unused (the compiled function is cached per site)."""
  del site_fn
  for acts, consumed in iter_site_batches(model_params, model_cfg, (hook_name,), windows, batch_size=batch_size,
                                          exclude=exclude, dtype=dtype, n_skip=n_skip, outlier_factor=outlier_factor):
    yield acts[hook_name], consumed


class ShuffleBuffer:
  """Mixes rows across forward batches: holds up to ``capacity`` rows; once full, each ``add``
  returns a random half of the buffer (as SAELens' activation store mixes its buffer)."""

  def __init__(self, capacity: int, seed: int = 0):
    self.capacity = capacity
    self.rng = np.random.default_rng(seed)
    self.parts: list[np.ndarray] = []
    self.n = 0

  def add(self, rows: np.ndarray) -> np.ndarray | None:
    self.parts.append(rows)
    self.n += len(rows)
    if self.n < self.capacity:
      return None
    buf = np.concatenate(self.parts)
    buf = buf[self.rng.permutation(len(buf))]
    half = len(buf) // 2
    self.parts, self.n = [buf[half:]], len(buf) - half
    return buf[:half]

  def drain(self) -> np.ndarray | None:
    if not self.n:
      return None
    buf = np.concatenate(self.parts)
    self.parts, self.n = [], 0
    return buf[self.rng.permutation(len(buf))]


def stream_activations(model_params, model_cfg, hook_name: str, windows: Iterable[np.ndarray], *,
                       out_batch: int, forward_batch: int = 32, buffer_tokens: int = 65536, seed: int = 0,
                       exclude: Sequence[int] = (), n_skip: int = 1, outlier_factor: float = 0.0
                       ) -> Iterator[np.ndarray]:
  """Shuffled activation batches [out_batch, d] straight from the model (no store)."""
  sb = ShuffleBuffer(buffer_tokens, seed)
  pending = np.zeros((0, model_cfg.d_model), np.float32)
  for acts, _ in iter_activation_batches(model_params, model_cfg, hook_name, windows, batch_size=forward_batch,
                                         exclude=exclude, n_skip=n_skip, outlier_factor=outlier_factor):
    out = sb.add(acts)
    if out is None:
      continue
    pending = np.concatenate([pending, out])
    while len(pending) >= out_batch:
      yield pending[:out_batch]
      pending = pending[out_batch:]
  rest = sb.drain()
  if rest is not None:
    pending = np.concatenate([pending, rest])
  while len(pending) >= out_batch:
    yield pending[:out_batch]
    pending = pending[out_batch:]


STORE_DTYPES = ("float16", "bfloat16")


def _site_file(hook_name: str) -> str:
  return f"{hook_name}.npy"


def _exclusion_rule(exclude: Sequence[int], n_skip: int, outlier_factor: float) -> dict:
  return {"exclude_ids": [int(i) for i in exclude], "n_skip": int(n_skip), "outlier_factor": float(outlier_factor),
          "outlier_rule": "rows whose norm exceeds outlier_factor x the median row norm of their forward batch "
                          "at this site are dropped (0: none)"}


def _as_stored(acts: np.ndarray, dtype: str) -> np.ndarray:
  if dtype == "bfloat16":
    import ml_dtypes
    return acts.astype(ml_dtypes.bfloat16).view(np.uint16)
  return acts.astype(np.float16)


def _from_stored(arr: np.ndarray, dtype: str) -> np.ndarray:
  if dtype == "bfloat16":
    import ml_dtypes
    return arr.view(ml_dtypes.bfloat16)
  return arr


def open_store(out_dir: str | os.PathLike, n_tokens: int | None = None) -> dict[str, np.ndarray]:
  """{site: read-only memmap [rows, d]} of a store written by ``harvest_to_stores`` (float16, or
  bfloat16 through ``ml_dtypes``), the first ``n_tokens`` rows when given."""
  out = Path(out_dir)
  state_path = out / "state.json"
  if not state_path.exists():
    raise FileNotFoundError(f"{state_path}: no activation store here")
  state = json.loads(state_path.read_text())
  dtype = state.get("dtype", "float16")
  res = {}
  for name, info in state["sites"].items():
    arr = _from_stored(np.load(out / info["file"], mmap_mode="r"), dtype)
    res[name] = arr[:n_tokens if n_tokens is not None else info["rows"]]
  return res


def harvest_to_stores(model_params, model_cfg, hook_names: Sequence[str], windows: Iterable[np.ndarray],
                      out_dir: str | os.PathLike, n_tokens: int, *, forward_batch: int = 32,
                      exclude: Sequence[int] = (), n_skip: int = 1, outlier_factor: float = 0.0,
                      dtype: str = "float16", progress: bool = True, flush_every: int = 16) -> dict[str, np.ndarray]:
  """Writes ``n_tokens`` activations of every site, from one truncated forward per batch, to
  ``out_dir/<site>.npy`` (``dtype`` memmaps [n_tokens, d]; bfloat16 is stored as its uint16 bits).

  ``out_dir/state.json`` records the windows consumed, the rows written per site and the exclusion
  rule per site (ids, leading positions, outlier factor). A restarted call skips the windows already
  used (the window stream must be deterministic), continues every site where it stopped, and may ask
  for fewer tokens than the store was started with (not more, nor other sites or rules).
  Returns {site: read-only array [n_tokens, d]}.
  """
  hook_names = tuple(hook_names)
  if dtype not in STORE_DTYPES:
    raise ValueError(f"harvest_to_stores: dtype={dtype!r}, expected one of {STORE_DTYPES}")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  state_path = out / "state.json"
  rule = _exclusion_rule(exclude, n_skip, outlier_factor)
  fresh = {"windows": 0, "rows": 0, "n_tokens": n_tokens, "dtype": dtype, "done": False,
           "sites": {h: {"rows": 0, "dropped_outliers": 0, "file": _site_file(h), "exclusion": rule} for h in hook_names}}
  state = json.loads(state_path.read_text()) if state_path.exists() else fresh
  if "sites" not in state:
    raise ValueError(f"{state_path}: not a multi-site store state (field 'sites' missing); use a new out_dir")
  started = any(s["rows"] > 0 for s in state["sites"].values())
  if not started:
    state = fresh
  else:
    if sorted(state["sites"]) != sorted(hook_names):
      raise ValueError(f"{state_path}: field 'sites' = {sorted(state['sites'])} but this call asks for {sorted(hook_names)}")
    for h in hook_names:
      if state["sites"][h]["exclusion"] != rule:
        raise ValueError(f"{state_path}: field 'sites.{h}.exclusion' = {state['sites'][h]['exclusion']} differs from "
                         f"this call's {rule}")
    if state["dtype"] != dtype:
      raise ValueError(f"{state_path}: field 'dtype' = {state['dtype']!r} but this call asks for {dtype!r}")
    if n_tokens > state["n_tokens"]:
      raise ValueError(f"{state_path}: store was started for n_tokens={state['n_tokens']}, cannot grow to {n_tokens}")
  if min(s["rows"] for s in state["sites"].values()) >= n_tokens:  # done, or fewer tokens than written
    return open_store(out, n_tokens)
  capacity = state["n_tokens"]
  d = model_cfg.d_model
  disk_dtype = np.uint16 if dtype == "bfloat16" else np.float16
  stores = {h: np.lib.format.open_memmap(out / _site_file(h), mode="r+" if started else "w+", dtype=disk_dtype,
                                         shape=(capacity, d)) for h in hook_names}
  rows = {h: state["sites"][h]["rows"] for h in hook_names}
  dropped = {h: state["sites"][h]["dropped_outliers"] for h in hook_names}
  skip = state["windows"]

  def remaining():
    for i, w in enumerate(windows):
      if i >= skip:
        yield w

  def save(consumed):
    for st in stores.values():
      st.flush()
    state.update(windows=skip + consumed, rows=min(rows.values()), done=min(rows.values()) >= capacity)
    for h in hook_names:
      state["sites"][h].update(rows=rows[h], dropped_outliers=dropped[h])
    state_path.write_text(json.dumps(state, indent=1))

  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=n_tokens, initial=min(rows.values()), unit="tok", desc=f"harvest {len(hook_names)} site(s)",
               mininterval=5)
  t0, r0 = time.time(), min(rows.values())
  consumed, nb = 0, 0
  for acts, consumed in iter_site_batches(model_params, model_cfg, hook_names, remaining(), batch_size=forward_batch,
                                          exclude=exclude, n_skip=n_skip, outlier_factor=outlier_factor, dtype=np.float32,
                                          dropped=dropped):
    before = min(rows.values())
    for h in hook_names:
      a = acts[h]
      take = min(len(a), n_tokens - rows[h])
      if take > 0:
        stores[h][rows[h]:rows[h] + take] = _as_stored(a[:take], dtype)
        rows[h] += take
    nb += 1
    if bar is not None:
      bar.update(min(rows.values()) - before)
    full = min(rows.values()) >= n_tokens
    if full or nb % flush_every == 0:
      save(consumed)
    if full:
      break
  if bar is not None:
    bar.close()
  save(consumed)
  if min(rows.values()) < n_tokens:
    short = {h: r for h, r in rows.items() if r < n_tokens}
    raise ValueError(f"harvest_to_stores: the corpus ran out before {n_tokens} tokens at {short}")
  dt = time.time() - t0
  logging.info("harvested %d tokens at %d site(s) in %.0fs (%.0f tok/s)", min(rows.values()) - r0, len(hook_names), dt,
               (min(rows.values()) - r0) / max(dt, 1e-9))
  del stores
  return open_store(out, n_tokens)


def harvest_to_store(model_params, model_cfg, hook_name: str, windows: Iterable[np.ndarray], out_dir: str,
                     n_tokens: int, **kw) -> np.ndarray:
  """One site of ``harvest_to_stores``: returns the read-only array [n_tokens, d]."""
  return harvest_to_stores(model_params, model_cfg, (hook_name,), windows, out_dir, n_tokens, **kw)[hook_name]
