"""The persistent compilation cache: where it lives, how it is turned off, and that a compiled program
lands in it."""

import os

import jax
import jax.numpy as jnp

from recovery_jax import compilation_cache as cc


def test_cache_dir_from_the_environment(tmp_path):
  assert cc.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == os.path.join(str(tmp_path), "recovery_jax", "jax")
  assert cc.cache_dir({cc.ENV: str(tmp_path / "c")}) == str(tmp_path / "c")
  for off in ("off", "0", "false", "", "None"):
    assert cc.cache_dir({cc.ENV: off}) is None


def test_a_compiled_program_is_written_to_the_cache(tmp_path):
  from jax._src import compilation_cache as jax_cc  # pylint: disable=import-outside-toplevel
  before = jax.config.jax_compilation_cache_dir
  jax_cc.reset_cache()  # JAX opens its cache once per process: reopen it at the new folder
  try:
    assert cc.enable(str(tmp_path), min_compile_time_s=0.0) == str(tmp_path)
    jax.jit(lambda x: jnp.sin(x) * 3.25 + jnp.cos(x) ** 2)(jnp.arange(7.0)).block_until_ready()
    assert os.listdir(tmp_path), "no cache entry written"
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
    jax_cc.reset_cache()
