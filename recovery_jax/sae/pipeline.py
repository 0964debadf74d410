"""End-to-end SAE training run (what ``python -m recovery_jax.train_sae`` does), resumable.

Workdir layout:
  config.json                 the config snapshot
  acts/train, acts/heldout    activation stores (float16 memmaps + state.json; resumable)
  ckpt/                       orbax checkpoints of the TrainState
  metrics.jsonl               training metrics every ``log_every`` steps
  export/<name>/              the SAE in SAELens format (cfg.json + sae_weights.safetensors)
  eval.json                   held-out explained variance, MSE, L0, dead fraction of the export
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from recovery_jax.data import corpus as corpus_lib
from recovery_jax.sae import formats, harvest, metrics, train as train_lib


def _to_dict(cfg) -> dict:
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def load_model_for(name: str, seed: int = 0):
  """(params, cfg, tokenizer); ``tiny-random`` is the random test model with a byte tokenizer."""
  if name == "tiny-random":
    from recovery_jax.sae import testing
    p, c = testing.tiny_model(seed)
    return p, c, testing.byte_tokenizer()
  from recovery_jax.models.loading import load_model
  return load_model(name)


def corpus_paths(cfg, workdir: str) -> dict[str, float]:
  """Resolves ``cfg.corpus`` ("source=weight,...") to folders, building missing offline sources
  (``stdlib`` needs no download and is always built; others when ``cfg.build_corpus``)."""
  root = cfg.corpus_root or os.path.join(workdir, "corpus")
  out = {}
  for item in filter(None, cfg.corpus.split(",")):
    name, _, w = item.partition("=")
    path = name if os.path.isabs(name) or os.path.exists(name) else os.path.join(root, name)
    if not os.path.exists(path) and name in corpus_lib.ALL_SOURCES and (cfg.build_corpus or name == "stdlib"):
      logging.info("building corpus source %s into %s", name, root)
      corpus_lib.build_corpus(root, [name], cache_dir=os.path.join(os.path.dirname(os.path.abspath(root)), "corpus_src"),
                              max_stdlib_files=cfg.stdlib_max_files or None)
    out[path] = float(w or 1.0)
  return out


def _windows(cfg, model_cfg, tokenizer, paths: dict[str, float], split: str):
  bos = model_cfg.bos_token_id if harvest.wants_bos(model_cfg, cfg.prepend_bos) else None
  sep = model_cfg.eos_token_ids[0] if model_cfg.eos_token_ids else None
  pad = model_cfg.pad_token_id if model_cfg.pad_token_id is not None else (sep or 0)
  docs = harvest.mixed_documents(paths, split=split, heldout_frac=cfg.heldout_frac, seed=cfg.seed)
  return harvest.token_windows(docs, tokenizer, cfg.seq_len, bos_id=bos, sep_id=sep, pad_id=pad)


def train_config(cfg, d_in: int, total_steps: int) -> train_lib.TrainConfig:
  s = _to_dict(cfg.sae)
  return train_lib.TrainConfig(d_in=d_in, total_steps=total_steps, **s)


def run(cfg, workdir: str, *, stop_after: int | None = None) -> dict[str, Any]:
  """Harvest -> train -> export -> evaluate; every stage resumes from what the workdir holds.

  ``stop_after`` ends training after that many steps of this call (no export): for resume tests.
  Returns the held-out evaluation of the exported SAE (or the training history when stopped early).
  """
  wd = Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  (wd / "config.json").write_text(json.dumps(_to_dict(cfg), indent=1, sort_keys=True, default=str))
  t_start = time.time()
  model_params, model_cfg, tokenizer = load_model_for(cfg.model, cfg.seed)
  d_in = model_cfg.d_model
  paths = corpus_paths(cfg, str(wd))
  exclude = harvest.excluded_ids(model_cfg)
  site_fn = harvest.make_site_fn(model_cfg, cfg.hook_name)

  n_skip = harvest.n_skip_for(harvest.wants_bos(model_cfg, cfg.prepend_bos))
  stores = {}
  for split, n in (("heldout", cfg.heldout_tokens), ("train", cfg.train_tokens)):
    t0 = time.time()
    stores[split] = harvest.harvest_to_store(
        model_params, model_cfg, cfg.hook_name, _windows(cfg, model_cfg, tokenizer, paths, split),
        str(wd / "acts" / split), n, forward_batch=cfg.forward_batch, exclude=exclude, n_skip=n_skip,
        outlier_factor=cfg.outlier_factor, progress=cfg.progress)
    logging.info("%s store ready: %d tokens (%.0fs)", split, n, time.time() - t0)
  del model_params

  train_store = np.asarray(stores["train"])  # into memory: random batches
  total = cfg.total_steps or int(cfg.epochs * len(train_store) // cfg.sae.batch_size)
  tc = train_config(cfg, d_in, total)

  def log_fn(step, m):
    with open(wd / "metrics.jsonl", "a") as f:
      f.write(json.dumps(m) + "\n")

  t0 = time.time()
  state, history = train_lib.train(tc, train_store, seed=cfg.seed, ckpt_dir=str((wd / "ckpt").absolute()),
                                   ckpt_every=cfg.ckpt_every, log_every=cfg.log_every, stop_after=stop_after,
                                   progress=cfg.progress, log_fn=log_fn)
  train_s = time.time() - t0
  if int(state.step) < tc.total_steps:
    return {"stopped_at": int(state.step), "history": history}

  params = train_lib.export_params(state, tc)
  sae_cfg = tc.sae_config(hook_name=cfg.hook_name, model_name=model_cfg.name, prepend_bos=harvest.wants_bos(
      model_cfg, cfg.prepend_bos), context_size=cfg.seq_len)
  export_dir = wd / "export" / cfg.export.name
  heldout = np.asarray(stores["heldout"])
  train_eval = metrics.evaluate(params, sae_cfg, metrics.batched(train_store[:len(heldout)]))
  meta = {"training": {"tokens_seen": int(tc.total_steps * tc.batch_size), "train_store_tokens": int(len(train_store)),
                       "steps": tc.total_steps, "seed": cfg.seed, "input_scale_folded": float(state.input_scale)}}
  formats.save_saelens(params, sae_cfg, export_dir, dtype=cfg.export.dtype, metadata=meta)
  # evaluate what was written (dtype round trip included)
  loaded, loaded_cfg = formats.load_sae(export_dir)
  ev = metrics.evaluate(loaded, loaded_cfg, metrics.batched(heldout))
  result = {"heldout": ev, "train_subset": train_eval, "export": str(export_dir), "train_seconds": train_s,
            "total_seconds": time.time() - t_start, "total_steps": tc.total_steps,
            "batch_size": tc.batch_size, "hook_name": cfg.hook_name, "model": cfg.model}
  (wd / "eval.json").write_text(json.dumps(result, indent=1))
  logging.info("held-out: %s", metrics.format_metrics(ev))
  return result


def evaluate_export(export_dir: str, workdir: str) -> dict[str, float]:
  """Re-evaluates an exported SAE on the workdir's held-out store."""
  params, cfg = formats.load_sae(export_dir)
  heldout = np.load(Path(workdir) / "acts" / "heldout" / "acts.npy", mmap_mode="r")
  return metrics.evaluate(params, cfg, metrics.batched(np.asarray(heldout)))
