"""The ``paper`` IOI variant (GPT-2 + a pre-6.0 SAELens residual SAE, TL weight processing) on files in
the real formats: a random-weight GPT-2 saved by transformers and an SAE folder in the jbloom layout."""

import json
import os

import numpy as np
import pytest

from tests.test_ioi_app import _app

pytestmark = pytest.mark.slow  # app runs in subprocesses: not in make test-fast

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def paper_files(tmp_path_factory):
  from recovery_jax.models import loading
  from safetensors.numpy import save_file
  root = tmp_path_factory.mktemp("paper")
  tok = loading.smollm2_tokenizer()  # any byte-level BPE works; names must be single tokens
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=64, n_layer=6, n_head=4, n_positions=64)
  model_dir = root / "gpt2"
  transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(model_dir)
  tok.save(str(model_dir / "tokenizer.json"))
  sae_dir = root / "res-jb-L4"
  sae_dir.mkdir()
  rng = np.random.default_rng(0)
  d, n = 64, 256
  w_dec = rng.normal(size=(n, d)).astype(np.float32)
  w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
  save_file({"W_enc": w_dec.T.copy(), "b_enc": rng.normal(0, 0.01, n).astype(np.float32), "W_dec": w_dec,
             "b_dec": rng.normal(0, 0.01, d).astype(np.float32)}, str(sae_dir / "sae_weights.safetensors"))
  # the pre-6.0 cfg.json keys of the public GPT-2 residual SAEs
  json.dump({"model_name": "gpt2-small", "hook_point": "blocks.4.hook_resid_pre", "hook_point_layer": 4,
             "d_in": d, "d_sae": n, "dtype": "float32", "activation_fn_str": "relu", "context_size": 128,
             "normalize_activations": False, "sae_lens_version": "2.1.3", "prepend_bos": True},
            open(sae_dir / "cfg.json", "w"))
  return str(model_dir), str(sae_dir)


def test_paper_variant_runs_on_real_formats(tmp_path, paper_files):
  model_dir, sae_dir = paper_files
  wd = tmp_path / "paper"
  proc = _app(wd, f"configs/ioi.py:paper,model_path={model_dir},sae_path={sae_dir},n_prompts=16,steps=10",
              "--config.sweep.n_features=(16,)", "--config.sae_override_checks=True", "--config.plots=False")
  summary = [json.loads(l) for l in open(wd / "summary.jsonl")]
  assert {s["mode"] for s in summary} == {"none", "encoder"}
  assert {s["variant"] for s in summary} == {"shared"}
  assert "blocks.4.hook_resid_pre" in proc.stdout
  config = json.load(open(wd / "config.json"))
  assert config["model_processing"] == "transformer_lens" and config["clamp"]["mode"] == "set"


def test_paper_variant_without_weights_says_what_is_missing(tmp_path):
  proc = _app(tmp_path / "nope", "configs/ioi.py:paper", check=False)
  assert proc.returncode == 2
  assert "model_path" in proc.stderr and "Traceback" not in proc.stderr
