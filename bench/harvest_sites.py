"""Harvest throughput: every site in one truncated forward vs one harvest per site.

  python -m bench.harvest_sites                      # SmolLM2, the suite's 8 sites, 8192 tokens (~4 min CPU)
  python -m bench.harvest_sites --model=tiny-random --layers=0-1 --windows=8   # seconds

Both sides call ``recovery_jax.sae.harvest.harvest_to_stores`` on the same token windows with the
real weights (random token ids: the forward's cost does not depend on them), writing float16
stores to a temporary folder: once with all sites (one forward per batch, stopped after the deepest
site) and once per site (each forward stopped after its own site). Each program is compiled by a
first call on one batch before timing. Writes ``--out``.json/.md with the load average.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from recovery_jax.sae import harvest, pipeline

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "model name (load_model) or tiny-random")
_LAYERS = flags.DEFINE_string("layers", "3-6-9-12-15-18-21-24", "dash-separated layers: blocks.L.hook_resid_post")
_WINDOWS = flags.DEFINE_integer("windows", 64, "token windows harvested per side")
_SEQ = flags.DEFINE_integer("seq_len", 128, "tokens per window")
_BATCH = flags.DEFINE_integer("forward_batch", 32, "windows per forward")
_OUT = flags.DEFINE_string("out", "bench/results/harvest_sites", "output path without extension")


def _harvest(params, cfg, sites, windows, batch) -> float:
  """Seconds of one ``harvest_to_stores`` call (compiled beforehand on one batch)."""
  n_tokens = sum(w.size for w in windows)
  with tempfile.TemporaryDirectory() as d:
    harvest.harvest_to_stores(params, cfg, sites, windows[:batch], Path(d) / "warm", batch * windows[0].size,
                              forward_batch=batch, n_skip=0, progress=False)
    t0 = time.perf_counter()
    harvest.harvest_to_stores(params, cfg, sites, windows, Path(d) / "timed", n_tokens, forward_batch=batch, n_skip=0,
                              progress=False)
    return time.perf_counter() - t0


def main(argv):
  del argv
  try:
    layers = [int(x) for x in _LAYERS.value.split("-")]
  except ValueError:
    raise app.UsageError(f"--layers={_LAYERS.value!r}: expected dash-separated layer numbers, e.g. 3-6-9") from None
  if not 1 <= _BATCH.value <= _WINDOWS.value or _SEQ.value < 1:
    raise app.UsageError(f"need 1 <= --forward_batch ({_BATCH.value}) <= --windows ({_WINDOWS.value}) and "
                         f"--seq_len >= 1 ({_SEQ.value}): the first batch compiles each program")
  params, cfg, _ = pipeline.load_model_for(_MODEL.value)
  sites = tuple(f"blocks.{L}.hook_resid_post" for L in layers)
  rng = np.random.default_rng(0)
  windows = [rng.integers(1, cfg.vocab_size, _SEQ.value, dtype=np.int32) for _ in range(_WINDOWS.value)]
  tokens = _WINDOWS.value * _SEQ.value
  load_before = os.getloadavg()
  together = _harvest(params, cfg, sites, windows, _BATCH.value)
  alone = {s: _harvest(params, cfg, (s,), windows, _BATCH.value) for s in sites}
  alone_total = sum(alone.values())
  res = {"model": _MODEL.value, "sites": list(sites), "tokens": tokens, "together_s": together,
         "alone_s": alone, "alone_total_s": alone_total, "speedup": alone_total / together,
         "load_average_before": load_before, "load_average_after": os.getloadavg(), "cpu_count": os.cpu_count(),
         "date": time.strftime("%Y-%m-%d %H:%M")}
  out = Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(res, indent=1))
  md = ["# Harvest: all sites in one forward vs one harvest per site", "",
        f"{res['date']}, {res['model']}, {res['cpu_count']} CPUs, {tokens} tokens per side; load average (1, 5, 15 "
        f"min) {tuple(round(x, 2) for x in load_before)} before, {tuple(round(x, 2) for x in res['load_average_after'])} "
        "after (this benchmark's own threads included).", "",
        "| | seconds | tokens/s (per site) |", "| --- | --- | --- |",
        f"| {len(sites)} sites, one forward | {together:.1f} | {tokens / together:,.0f} |"]
  md += [f"| {s} alone | {t:.1f} | {tokens / t:,.0f} |" for s, t in alone.items()]
  md += [f"| {len(sites)} harvests, one per site | {alone_total:.1f} | |", "",
         f"One forward for all sites: **{res['speedup']:.2f}x** the per-site harvests.", ""]
  out.with_suffix(".md").write_text("\n".join(md))
  print("\n".join(md))


if __name__ == "__main__":
  app.run(main)
