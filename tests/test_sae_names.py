"""SAEs named as SAELens names them (``release:id``): resolved under a local root in the layouts
``sae.registry.candidates`` documents, the shipped SAEs under release-style names, and a clear error
(where it looked, the nearest names) for a name that is not there."""

import types

import numpy as np
import pytest

from recovery_jax import errors
from recovery_jax.experiments import setup
from recovery_jax.sae import formats, registry, testing as sae_testing

GEMMA_RELEASE, GEMMA_ID = "gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical"
# the tiny stand-in model the SAEs are attached to (check_compatible reads these fields)
MODEL = types.SimpleNamespace(name="gemma-2-2b", family="gemma2", n_layers=26, d_model=16, n_heads=2, d_head=8)
needs_saelens_directory = pytest.mark.skipif(registry.saelens_release(GEMMA_RELEASE) is None,
                                             reason="sae_lens' pretrained_saes.yaml is not installed")


def _tiny(architecture="jumprelu", site="blocks.12.hook_resid_post", seed=3):
  return sae_testing.random_sae(16, 32, architecture=architecture, seed=seed, site=site, model_name="gemma-2-2b")


@pytest.fixture
def root(tmp_path, monkeypatch):
  monkeypatch.setenv(registry.SAE_ROOT_ENV, str(tmp_path / "saes"))
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no_hf_cache"))
  return tmp_path / "saes"


def test_names_are_never_paths():
  assert registry.parse_name(f"{GEMMA_RELEASE}:{GEMMA_ID}") == registry.SAEName(GEMMA_RELEASE, GEMMA_ID)
  assert str(registry.parse_name("gpt2-small-res-jb:blocks.4.hook_resid_pre/")) == "gpt2-small-res-jb:blocks.4.hook_resid_pre"
  for path in ("/data/saes/x:y", "./a:b", "runs/sae", "shipped", "random", "C:/saes/x", "~/a:b", "a:", ":b"):
    assert registry.parse_name(path) is None, path


def test_gemma_scope_release_loads_from_a_local_root(root):
  params, cfg = _tiny()
  formats.save_gemmascope(params, cfg, root / GEMMA_RELEASE / GEMMA_ID)
  found = registry.find(f"{GEMMA_RELEASE}:{GEMMA_ID}")
  assert found.path == root / GEMMA_RELEASE / GEMMA_ID
  loaded, lcfg = formats.load_sae(f"{GEMMA_RELEASE}:{GEMMA_ID}", model_cfg=MODEL)
  assert lcfg.architecture == "jumprelu" and lcfg.hook_name == "blocks.12.hook_resid_post"  # from the path
  for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
    np.testing.assert_allclose(loaded[k], params[k], rtol=1e-6, err_msg=k)
  # the apps' `sae` field: the same SAE through experiments.setup
  sparams, scfg = setup.load_sae(f"{GEMMA_RELEASE}:{GEMMA_ID}", MODEL, "blocks.12.hook_resid_post")
  np.testing.assert_allclose(np.asarray(sparams["W_dec"]), params["W_dec"], rtol=1e-6)
  assert registry.local_names() == [f"{GEMMA_RELEASE}:{GEMMA_ID}"]


@needs_saelens_directory
def test_a_copy_of_the_release_repo_is_found_through_the_saelens_directory(root):
  path = registry.saelens_release(GEMMA_RELEASE)["saes"][GEMMA_ID]["path"]
  assert path == "layer_12/width_16k/average_l0_82"
  params, cfg = _tiny(seed=5)
  formats.save_gemmascope(params, cfg, root / "google" / "gemma-scope-2b-pt-res" / path)  # hf download --local-dir
  found = registry.find(f"{GEMMA_RELEASE}:{GEMMA_ID}")
  assert (found.path, found.repo_id, found.repo_path) == (root / "google/gemma-scope-2b-pt-res" / path,
                                                         "google/gemma-scope-2b-pt-res", path)
  loaded, _ = formats.load_sae(f"{GEMMA_RELEASE}:{GEMMA_ID}")
  np.testing.assert_allclose(loaded["W_enc"], params["W_enc"], rtol=1e-6)


@needs_saelens_directory
def test_saelens_release_gets_the_directory_norm_scaling_factor(root):
  release, sae_id = "gpt2-small-mlp-tm", "blocks.0.hook_mlp_out"
  s = registry.saelens_release(release)["saes"][sae_id]["norm_scaling_factor"]
  params, cfg = _tiny("standard", "blocks.0.hook_mlp_out")
  formats.save_saelens(params, cfg.replace(normalize_activations="expected_average_only_in"), root / release / sae_id)
  loaded, lcfg = formats.load_sae(f"{release}:{sae_id}")
  assert lcfg.normalize_activations == "none"  # folded, as SAELens' from_pretrained applies it
  np.testing.assert_allclose(loaded["W_enc"], params["W_enc"] * s, rtol=1e-5)
  np.testing.assert_allclose(loaded["b_dec"], params["b_dec"] / s, rtol=1e-5, atol=1e-7)


def test_a_missing_name_says_where_it_looked_and_the_nearest(root):
  params, cfg = _tiny()
  formats.save_gemmascope(params, cfg, root / GEMMA_RELEASE / GEMMA_ID)
  typo = f"{GEMMA_RELEASE}:layer_12/width_16k/canonicl"
  with pytest.raises(registry.SAENotFound) as e:
    registry.find(typo)
  msg = str(e.value)
  assert str(root / GEMMA_RELEASE / "layer_12/width_16k/canonicl") in msg, msg  # where it looked
  assert f"did you mean '{GEMMA_RELEASE}:{GEMMA_ID}'" in msg, msg
  assert "recovery-jax-smollm2-135m-instruct: blocks.3.hook_resid_post" in msg, msg  # the shipped list
  with pytest.raises(errors.UserError, match=r"config field 'sae': SAE 'nope-release:x' not found.*looked in"):
    setup.load_sae("nope-release:x", MODEL, "blocks.12.hook_resid_post")


def test_no_root_set_is_named_in_the_error(monkeypatch, tmp_path):
  monkeypatch.delenv(registry.SAE_ROOT_ENV, raising=False)
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
  with pytest.raises(registry.SAENotFound, match=rf"\${registry.SAE_ROOT_ENV} is not set"):
    registry.find("my-release:layer_3")


def test_shipped_saes_have_release_style_names():
  names = registry.shipped_names()
  assert len(names) == len(registry.shipped()) >= 9
  topk = names["recovery-jax-smollm2-135m-instruct:blocks.12.hook_resid_pre"]
  assert topk.architecture == "topk" and topk.path.name == "smollm2-135m-instruct-res12-topk"
  for name, s in names.items():
    assert registry.find(name).path == s.path == registry.resolve(s.model_name, s.hook_name, architecture=s.architecture)
  with pytest.raises(registry.SAENotFound, match="did you mean 'recovery-jax-smollm2-135m-instruct:blocks.12.hook_resid_pre'"):
    registry.find("recovery-jax-smollm2-135m-instruct:blocks.12.hook_resid_pr")


def test_duplicate_shipped_sites_get_the_architecture_in_the_id(tmp_path):
  for arch in ("topk", "jumprelu"):
    params, cfg = sae_testing.random_sae(8, 16, architecture=arch, site="blocks.1.hook_resid_pre", model_name="m")
    formats.save_saelens(params, cfg, tmp_path / f"m-res1-{arch}")
  names = registry.shipped_names(tmp_path)
  assert sorted(names) == ["recovery-jax-m:blocks.1.hook_resid_pre/jumprelu", "recovery-jax-m:blocks.1.hook_resid_pre/topk"]
  assert registry.find("recovery-jax-m:blocks.1.hook_resid_pre/topk", assets=tmp_path).path == tmp_path / "m-res1-topk"
