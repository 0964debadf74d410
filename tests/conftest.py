"""Shared fixtures: tiny random models (``models.random_init.random_model``, fan-in init, NumPy RNG).

Builders for other shapes and SAEs: ``random_init.random_model``, ``random_init.random_tokens``,
``sae.testing.random_sae`` (standard / JumpReLU / TopK, optional non-zero ``b_dec``).
"""

import gc

import jax
import pytest

from recovery_jax import compilation_cache
from recovery_jax.models import random_init

compilation_cache.enable()  # a second session loads the programs the first compiled (RECOVERY_JAX_COMPILATION_CACHE)


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
  """Each test module ends by dropping JAX's compiled programs: the suite compiles hundreds in one
  process, and a full run (2026-11-27) died with SIGSEGV inside XLA's compiler late in the suite, in a
  test module that passes when run alone."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="session")
def tiny_llama():
  """(params, cfg): 2-layer llama, d_model 32, vocab 97, untied embeddings, seed 0."""
  return random_init.random_model("llama", n_layers=2)


@pytest.fixture(scope="session")
def tiny_gpt2():
  """(params, cfg): 2-layer gpt2, d_model 32, vocab 97, tied embeddings, biases, seed 2."""
  return random_init.random_model("gpt2", n_layers=2, seed=2)
