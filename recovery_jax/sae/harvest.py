"""Harvesting residual activations at a hook site from text, for SAE training and checks.

Pipeline: documents (``recovery_jax.data.corpus``) -> token windows [seq_len] (documents packed and
separated by EOS; BOS prepended to every window when the model wants it) -> jit-compiled truncated
forward (``stop_layer = L+1``) on [batch, seq_len] -> activations of the kept positions (not BOS,
EOS or pad tokens, not the first text position of a window) -> rows with a massive norm (above
``outlier_factor`` x the batch median: attention-sink-like tokens) dropped -> optional shuffle buffer.

``harvest_to_store`` writes a fixed number of tokens into a float16 ``.npy`` memmap [N, d_in] and is
resumable (``state.json`` records the windows consumed); ``stream_activations`` yields shuffled
batches without a store.
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


@functools.lru_cache(maxsize=16)
def make_site_fn(model_cfg, hook_name: str) -> Callable:
  """jit-compiled ``fn(params, tokens [B, T]) -> activations [B, T, d]`` running only the layers up
  to the site (``stop_layer = L+1``); one per (config, site), shared by callers."""
  site = sites_lib.parse_site(hook_name, model_cfg.n_layers)
  stop = (site.layer + 1) if site.layer is not None else 1

  @jax.jit
  def fn(params, tokens):
    out = transformer.forward(params, model_cfg, tokens, capture=(hook_name,), stop_layer=stop,
                              compute_logits=False)
    return out.captures[hook_name]
  return fn


def iter_activation_batches(model_params, model_cfg, hook_name: str, windows: Iterable[np.ndarray], *,
                            batch_size: int = 32, exclude: Sequence[int] = (), site_fn: Callable | None = None,
                            dtype=np.float32, n_skip: int = 1, outlier_factor: float = 0.0
                            ) -> Iterator[tuple[np.ndarray, int]]:
  """Yields (kept activations [n, d] of one forward batch, windows consumed so far); positions by
  ``keep_mask(.., exclude, n_skip)``, then rows above ``outlier_factor`` x median norm dropped."""
  fn = site_fn or make_site_fn(model_cfg, hook_name)
  batch: list[np.ndarray] = []
  consumed = 0

  def run(batch):
    toks = np.stack(batch)
    n = len(batch)
    if n < batch_size:  # pad to a fixed shape: one compiled program
      toks = np.concatenate([toks, np.zeros((batch_size - n, toks.shape[1]), np.int32)])
    acts = np.asarray(fn(model_params, jnp.asarray(toks)))[:n]
    return drop_outliers(acts[keep_mask(toks[:n], exclude, n_skip)], outlier_factor).astype(dtype)

  for w in windows:
    batch.append(w)
    consumed += 1
    if len(batch) == batch_size:
      yield run(batch), consumed
      batch = []
  if batch:
    yield run(batch), consumed


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


def harvest_to_store(model_params, model_cfg, hook_name: str, windows: Iterable[np.ndarray], out_dir: str,
                     n_tokens: int, *, forward_batch: int = 32, exclude: Sequence[int] = (),
                     n_skip: int = 1, outlier_factor: float = 0.0, progress: bool = True,
                     flush_every: int = 16) -> np.ndarray:
  """Writes ``n_tokens`` activations to ``out_dir/acts.npy`` (float16 memmap [n_tokens, d]).

  Resumable: ``out_dir/state.json`` holds rows written and windows consumed; a restarted call skips
  the windows already used (the window stream must be deterministic) and may ask for fewer tokens
  than the store was started with (not more). Returns the memmap (read mode) [n_tokens, d].
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  state_path, acts_path = out / "state.json", out / "acts.npy"
  state = json.loads(state_path.read_text()) if state_path.exists() else {"rows": 0, "windows": 0, "done": False}
  capacity = state.get("n_tokens", n_tokens)
  if n_tokens > capacity and state["rows"] > 0:
    raise ValueError(f"{state_path}: store was started for n_tokens={capacity}, cannot grow to {n_tokens}")
  if state["rows"] >= n_tokens:  # done, or asked for fewer tokens than already written
    return np.load(acts_path, mmap_mode="r")[:n_tokens]
  d = model_cfg.d_model
  mode = "r+" if acts_path.exists() and state["rows"] > 0 else "w+"
  if mode == "w+":
    capacity = n_tokens
  store = np.lib.format.open_memmap(acts_path, mode=mode, dtype=np.float16, shape=(capacity, d))
  rows, skip = state["rows"], state["windows"]

  def remaining():
    for i, w in enumerate(windows):
      if i >= skip:
        yield w

  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=n_tokens, initial=rows, unit="tok", desc=f"harvest {hook_name}", mininterval=5)
  t0, r0 = time.time(), rows
  nb = 0
  for acts, consumed in iter_activation_batches(model_params, model_cfg, hook_name, remaining(),
                                                batch_size=forward_batch, exclude=exclude, n_skip=n_skip,
                                                outlier_factor=outlier_factor):
    take = min(len(acts), n_tokens - rows)
    store[rows:rows + take] = acts[:take].astype(np.float16)
    rows += take
    nb += 1
    if bar is not None:
      bar.update(take)
    if rows >= n_tokens or nb % flush_every == 0:
      store.flush()
      state = {"rows": rows, "windows": skip + consumed, "done": rows >= n_tokens, "n_tokens": capacity,
               "hook_name": hook_name}
      state_path.write_text(json.dumps(state))
    if rows >= n_tokens:
      break
  if bar is not None:
    bar.close()
  store.flush()
  if rows < n_tokens:
    raise ValueError(f"harvest_to_store: the corpus ran out after {rows} of {n_tokens} tokens")
  state_path.write_text(json.dumps({"rows": rows, "windows": state["windows"], "done": rows >= capacity,
                                    "n_tokens": capacity, "hook_name": hook_name}))
  dt = time.time() - t0
  logging.info("harvested %d tokens at %s in %.0fs (%.0f tok/s)", rows - r0, hook_name, dt, (rows - r0) / max(dt, 1e-9))
  del store
  return np.load(acts_path, mmap_mode="r")[:n_tokens]
