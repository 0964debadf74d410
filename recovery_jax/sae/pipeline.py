"""End-to-end SAE training run (what ``python -m recovery_jax.main --config=configs/train_sae.py`` runs), resumable.

Workdir layout:
  config.json                 the config snapshot
  acts/train, acts/heldout    activation stores, one <site>.npy per site (float16/bf16 memmaps +
                              state.json; resumable)
  ckpt/                       orbax checkpoints of the TrainState
  metrics.jsonl               training metrics every ``log_every`` steps
  export/<name>/              each SAE in SAELens format (cfg.json + sae_weights.safetensors), and
                              checksums.sha256 (``verify_export_checksum``)
  eval.json                   held-out explained variance, MSE, L0, dead fraction of each export
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from recovery_jax import errors, outputs
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


def hook_names(cfg) -> tuple[str, ...]:
  """The sites of a run: ``cfg.hook_names`` (several SAEs, one pass) or ``(cfg.hook_name,)``."""
  names = tuple(cfg.get("hook_names") or ()) or (cfg.hook_name,)
  if len(set(names)) != len(names):
    raise ValueError(f"config field 'hook_names' repeats a site: {names}")
  return names


def export_name(cfg, hook: str) -> str:
  """Folder name of the SAE at ``hook``: ``cfg.export.names`` (one per site, in ``hook_names`` order)
  when given, else ``cfg.export.name`` (one site only)."""
  names, sites = tuple(cfg.export.get("names") or ()), hook_names(cfg)
  if names:
    if len(names) != len(sites):
      raise ValueError(f"config field 'export.names' has {len(names)} entries for {len(sites)} sites")
    return names[sites.index(hook)]
  if len(hook_names(cfg)) == 1:
    return cfg.export.name
  raise ValueError(f"config field 'export.names' has no entry for site {hook!r} (sites: {hook_names(cfg)})")


def site_axis(cfg) -> str:
  """``cfg.site_axis``: "vmap", "map", or "auto" (``lax.map`` on CPU, where it measured faster in
  ``bench/sae_training.py``; ``vmap`` on accelerators)."""
  mode = cfg.get("site_axis", "auto")
  if mode == "auto":
    return "map" if jax.default_backend() == "cpu" else "vmap"
  return mode


def run(cfg, workdir: str, *, stop_after: int | None = None) -> dict[str, Any]:
  """Harvest -> train -> export -> evaluate; every stage resumes from what the workdir holds.

  All sites (``hook_names``) are harvested in one truncated forward per batch and their SAEs
  trained in one vmapped program. ``stop_after`` ends training after that many steps of this call
  (no export): for resume tests. Returns the held-out evaluation (one site: ``heldout``, ``export``,
  ...; several: the same per site under ``sites``), or the training history when stopped early.
  """
  wd = Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  (wd / "config.json").write_text(json.dumps(_to_dict(cfg), indent=1, sort_keys=True, default=str))
  t_start = time.time()
  sites = hook_names(cfg)
  model_params, model_cfg, tokenizer = load_model_for(cfg.model, cfg.seed)
  d_in = model_cfg.d_model
  paths = corpus_paths(cfg, str(wd))
  exclude = harvest.excluded_ids(model_cfg)
  bos = harvest.wants_bos(model_cfg, cfg.prepend_bos)
  n_skip = harvest.n_skip_for(bos)
  stores, harvest_s = {}, {}
  for split, n in (("heldout", cfg.heldout_tokens), ("train", cfg.train_tokens)):
    t0 = time.time()
    stores[split] = harvest.harvest_to_stores(
        model_params, model_cfg, sites, _windows(cfg, model_cfg, tokenizer, paths, split), str(wd / "acts" / split), n,
        forward_batch=cfg.forward_batch, exclude=exclude, n_skip=n_skip, outlier_factor=cfg.outlier_factor,
        dtype=cfg.get("store_dtype", "float16"), progress=cfg.progress)
    harvest_s[split] = time.time() - t0
    logging.info("%s stores ready: %d tokens x %d sites (%.0fs)", split, n, len(sites), harvest_s[split])
  del model_params

  train_stores = [np.asarray(stores["train"][h]) for h in sites]  # into memory: random batches
  total = cfg.total_steps or int(cfg.epochs * len(train_stores[0]) // cfg.sae.batch_size)
  tc = train_config(cfg, d_in, total)
  coeffs = tuple(cfg.get("site_sparsity_coeffs") or ()) or None
  if coeffs is not None and len(coeffs) != len(sites):
    raise ValueError(f"config field 'site_sparsity_coeffs' has {len(coeffs)} entries for {len(sites)} sites")

  def log_fn(step, m):
    with open(wd / "metrics.jsonl", "a") as f:
      f.write(json.dumps(m) + "\n")

  t0 = time.time()
  one = len(sites) == 1  # one site: metrics as floats, as before
  state, history = train_lib.train(tc, train_stores[0] if one else train_stores, seed=cfg.seed, seeds=[cfg.seed] * len(sites),
                                   sparsity_coeffs=coeffs, ckpt_dir=str((wd / "ckpt").absolute()),
                                   ckpt_every=cfg.ckpt_every, log_every=cfg.log_every, stop_after=stop_after,
                                   progress=cfg.progress, log_fn=log_fn, site_axis=site_axis(cfg))
  train_s = time.time() - t0
  if one:
    state = train_lib.stack_states([state])
  if int(state.step[0]) < tc.total_steps:
    return {"stopped_at": int(state.step[0]), "history": history}

  per_site = {}
  for i, hook in enumerate(sites):
    st = train_lib.site_state(state, i)
    params = train_lib.export_params(st, tc)
    sae_cfg = tc.sae_config(hook_name=hook, model_name=model_cfg.name, prepend_bos=bos, context_size=cfg.seq_len)
    export_dir = wd / "export" / export_name(cfg, hook)
    heldout = np.asarray(stores["heldout"][hook])
    coeff0 = float(coeffs[i]) if coeffs else tc.sparsity_coeff()
    train_eval = metrics.evaluate(params, sae_cfg, metrics.batched(train_stores[i][:len(heldout)]))
    meta = {"training": {"tokens_seen": int(tc.total_steps * tc.batch_size), "train_store_tokens": int(len(train_stores[i])),
                         "steps": tc.total_steps, "seed": cfg.seed, "input_scale_folded": float(st.input_scale),
                         "sparsity_coeff": coeff0,
                         "sparsity_coeff_final": coeff0 * float(np.exp(st.log_coeff_scale)),
                         "l0_target": tc.l0_target,
                         "sites_trained_together": list(sites)}}
    formats.save_saelens(params, sae_cfg, export_dir, dtype=cfg.export.dtype, metadata=meta)
    write_export_checksum(export_dir)
    verify_export_checksum(export_dir)
    loaded, loaded_cfg = formats.load_sae(export_dir)  # evaluate what was written (dtype round trip included)
    ev = metrics.evaluate(loaded, loaded_cfg, metrics.batched(heldout))
    per_site[hook] = {"heldout": ev, "train_subset": train_eval, "export": str(export_dir)}
    logging.info("%s held-out: %s", hook, metrics.format_metrics(ev))
  common = {"train_seconds": train_s, "harvest_seconds": harvest_s, "total_seconds": time.time() - t_start,
            "total_steps": tc.total_steps, "batch_size": tc.batch_size, "model": cfg.model}
  if len(sites) == 1:
    result = {**per_site[sites[0]], **common, "hook_name": sites[0]}
  else:
    result = {"sites": per_site, **common, "hook_names": list(sites)}
  (wd / "eval.json").write_text(json.dumps(result, indent=1))
  return result


def evaluate_export(export_dir: str, workdir: str) -> dict[str, float]:
  """Re-evaluates an exported SAE on the workdir's held-out store of its site."""
  verify_export_checksum(export_dir)
  params, cfg = formats.load_sae(export_dir)
  heldout = harvest.open_store(Path(workdir) / "acts" / "heldout")
  if cfg.hook_name not in heldout:
    raise ValueError(f"{export_dir}: field 'hook_name' = {cfg.hook_name!r} has no held-out store in {workdir} "
                     f"(sites: {sorted(heldout)})")
  return metrics.evaluate(params, cfg, metrics.batched(np.asarray(heldout[cfg.hook_name])))


EXPORT_CHECKSUMS = "checksums.sha256"  # ``sha256sum -c`` format: "<hex>  <file name>" a line


def _sha256_file(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def write_export_checksum(folder: str | os.PathLike) -> Path:
  """Writes ``EXPORT_CHECKSUMS`` into an export folder: the sha256 of each file there (atomically)."""
  folder = Path(folder)
  names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != EXPORT_CHECKSUMS and ".tmp" not in p.name)
  path = folder / EXPORT_CHECKSUMS
  outputs.atomic_write(str(path), "".join(f"{_sha256_file(folder / n)}  {n}\n" for n in names))
  return path


def verify_export_checksum(folder: str | os.PathLike) -> bool:
  """Checks an export folder against its ``EXPORT_CHECKSUMS``: True when every listed file matches,
  False when there is no checksum file (an export from elsewhere); a UserError naming the file that
  is missing or differs otherwise. Call it before loading an export (``formats.load_sae``)."""
  folder = Path(folder)
  path = folder / EXPORT_CHECKSUMS
  if folder.is_file() or not path.exists():
    return False
  with open(path) as f:
    lines = [l.rstrip("\n") for l in f if l.strip()]
  for i, line in enumerate(lines):
    digest, sep, name = line.partition("  ")
    if not sep or len(digest) != 64 or not name:
      raise errors.UserError(f"{path}: line {i + 1} is {line[:80]!r}: expected '<sha256 hex>  <file name>'")
    target = folder / name.lstrip("*")
    if not target.is_file():
      raise errors.UserError(f"{target}: missing (listed in {path}); export the SAE again")
    if _sha256_file(target) != digest.lower():
      raise errors.UserError(f"{target}: its sha256 differs from the one in {path} (the file changed or is "
                             "corrupt); export the SAE again")
  return True
