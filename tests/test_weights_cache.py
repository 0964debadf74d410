"""The converted-weights cache: a cached load equals the conversion it replaces, bit for bit; a damaged
entry, a changed source file and ``RECOVERY_JAX_WEIGHTS_CACHE=off`` convert again."""

import os

import jax
import numpy as np
import pytest

from recovery_jax.models import loading, random_init, weights_cache


@pytest.fixture(scope="module")
def converted():
  """What a conversion returns: numpy params of a gemma3-shaped tiny model (nested dicts, every leaf
  kind), its config (tuples, None and float fields) and the SmolLM2 tokenizer."""
  tok = loading.smollm2_tokenizer()
  cfg = random_init.tiny_config("gemma3", vocab_size=tok.get_vocab_size(), eos_token_ids=(1, 2))
  params = jax.tree.map(np.asarray, random_init.init_params(cfg, jax.random.key(0)))
  return params, cfg, tok


@pytest.fixture
def source(tmp_path):
  path = tmp_path / "model.gguf"
  path.write_bytes(b"weights")
  return str(path)


def _counting(result):
  calls = []
  def convert(path):
    calls.append(path)
    return result
  return convert, calls


def _assert_same(a, b):
  (pa, ca, ta), (pb, cb, tb) = a, b
  assert ca == cb
  la, lb = jax.tree_util.tree_leaves_with_path(pa), jax.tree_util.tree_leaves_with_path(pb)
  assert [k for k, _ in la] == [k for k, _ in lb]
  for (k, x), (_, y) in zip(la, lb):
    assert x.dtype == y.dtype and np.array_equal(x, y), k
  assert ta.to_str() == tb.to_str()


def test_second_load_reads_what_the_first_converted(tmp_path, source, converted):
  convert, calls = _counting(converted)
  first = weights_cache.cached(tmp_path / "cache", source, convert)
  second = weights_cache.cached(tmp_path / "cache", source, convert)
  assert len(calls) == 1
  _assert_same(second, converted)
  _assert_same(first, converted)
  assert [p.name for p in (tmp_path / "cache" / "converted").iterdir()] == [weights_cache.entry_dir(
      tmp_path / "cache", source).name]  # no partial folder left behind


@pytest.mark.parametrize("damage", ["weight", "config", "tokenizer"])
def test_a_damaged_entry_is_converted_again(tmp_path, source, converted, damage):
  convert, calls = _counting(converted)
  weights_cache.cached(tmp_path, source, convert)
  folder = weights_cache.entry_dir(tmp_path, source)
  target = {"weight": folder / "3.npy", "config": folder / "config.json", "tokenizer": folder / "tokenizer.json"}
  target[damage].write_bytes(target[damage].read_bytes()[:20])
  _assert_same(weights_cache.cached(tmp_path, source, convert), converted)
  assert len(calls) == 2
  _assert_same(weights_cache.read(folder), converted)  # and stored whole again


def test_a_changed_source_file_gets_a_new_entry(tmp_path, source, converted):
  before = weights_cache.entry_dir(tmp_path, source)
  st = os.stat(source)
  os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  assert weights_cache.entry_dir(tmp_path, source) != before


def test_off_converts_every_time(tmp_path, source, converted, monkeypatch):
  monkeypatch.setenv(weights_cache.ENV, "off")
  convert, calls = _counting(converted)
  weights_cache.cached(tmp_path, source, convert)
  weights_cache.cached(tmp_path, source, convert)
  assert len(calls) == 2 and not (tmp_path / "converted").exists()
