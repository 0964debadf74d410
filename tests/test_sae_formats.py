"""SAE files: parity with SAELens both ways, Gemma Scope and sparsify layouts, bad files, compatibility."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from recovery_jax.models.config import ModelConfig
from recovery_jax.sae import core, formats
from recovery_jax.sae.config import SAEConfig

D_IN, D_SAE = 16, 48
ATOL = 1e-5


def _x(n=9, seed=3):
  return np.random.default_rng(seed).normal(size=(n, D_IN)).astype(np.float32)


def _model_cfg(d_model=D_IN, name="tiny-model"):
  return ModelConfig(family="llama", vocab_size=64, d_model=d_model, n_layers=4, n_heads=4, n_kv_heads=2,
                     d_head=4, d_mlp=32, name=name)


# --- SAELens parity ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sl():
  return pytest.importorskip("sae_lens")


def _randomize(sae, seed=0):
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, prm in sae.named_parameters():
      prm.copy_(torch.randn(prm.shape, generator=g) * (0.4 if prm.ndim == 2 else 0.2))
      if name == "threshold":
        prm.copy_(torch.rand(prm.shape, generator=g) * 0.4 + 0.05)
  return sae


def _sl_sae(sl, arch, **kw):
  from sae_lens import (GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE,
                        StandardSAEConfig, TopKSAE, TopKSAEConfig)
  meta = dict(hook_name="blocks.2.hook_resid_pre", model_name="tiny-model")
  common = dict(d_in=D_IN, d_sae=D_SAE, **kw)
  cls = {"standard": (StandardSAE, StandardSAEConfig), "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
         "topk": (TopKSAE, TopKSAEConfig), "gated": (GatedSAE, GatedSAEConfig)}[arch]
  cfg = cls[1](**common)
  for k, v in meta.items():
    cfg.metadata[k] = v
  return _randomize(cls[0](cfg))


def _sl_numbers(sae, x):
  import torch
  with torch.no_grad():
    xt = torch.tensor(x)
    z = sae.encode(xt)
    return z.numpy(), sae.decode(z).numpy()


def _ours(params, cfg, x):
  z = core.encode(params, cfg, jnp.asarray(x))
  return np.asarray(z), np.asarray(core.decode(params, cfg, z, jnp.asarray(x)))


CASES = [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("standard", {"normalize_activations": "constant_norm_rescale"}),
    ("standard", {"normalize_activations": "layer_norm"}),
    ("jumprelu", {"apply_b_dec_to_input": False}),
    ("jumprelu", {}),
    ("topk", {"k": 6}),
    ("topk", {"k": 6, "rescale_acts_by_decoder_norm": True}),
    ("gated", {}),
]


@pytest.mark.parametrize("arch,kw", CASES, ids=[f"{a}-{'-'.join(kw) or 'default'}" for a, kw in CASES])
def test_saelens_written_loads_in_recovery_jax(sl, tmp_path, arch, kw):
  sae = _sl_sae(sl, arch, **kw)
  sae.save_model(tmp_path)
  params, cfg = formats.load_sae(tmp_path)
  assert cfg.architecture == arch and cfg.hook_name == "blocks.2.hook_resid_pre" and cfg.model_name == "tiny-model"
  x = _x() * (20 if kw.get("normalize_activations") else 1)
  z_ref, y_ref = _sl_numbers(sae, x)
  z, y = _ours(params, cfg, x)
  assert (z_ref > 0).sum() > 0
  np.testing.assert_allclose(z, z_ref, atol=ATOL, rtol=1e-5)
  np.testing.assert_allclose(y, y_ref, atol=ATOL * (20 if kw.get("normalize_activations") else 1), rtol=1e-5)


@pytest.mark.parametrize("arch,kw", CASES, ids=[f"{a}-{'-'.join(kw) or 'default'}" for a, kw in CASES])
def test_recovery_jax_written_loads_in_saelens(sl, tmp_path, arch, kw):
  params, cfg = formats.load_sae(_write_sl(sl, tmp_path / "src", arch, kw))
  formats.save_saelens(params, cfg.replace(source=""), tmp_path / "out")
  sae = sl.SAE.load_from_disk(str(tmp_path / "out"))
  assert sae.cfg.architecture() == arch
  x = _x() * (20 if kw.get("normalize_activations") else 1)
  z_ref, y_ref = _sl_numbers(sae, x)
  z, y = _ours(params, cfg, x)
  np.testing.assert_allclose(z, z_ref, atol=ATOL, rtol=1e-5)
  np.testing.assert_allclose(y, y_ref, atol=ATOL * (20 if kw.get("normalize_activations") else 1), rtol=1e-5)


def _write_sl(sl, path, arch, kw):
  _sl_sae(sl, arch, **kw).save_model(path)
  return path


def test_batchtopk_both_directions(sl, tmp_path):
  import torch
  from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
  sae = _randomize(BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6)))
  sae.topk_threshold = torch.tensor(0.35, dtype=torch.double)
  sae.save_inference_model(tmp_path / "inference")  # SAELens writes batchtopk as jumprelu
  sae.save_model(tmp_path / "training")  # training checkpoint: architecture batchtopk + topk_threshold
  ref = sl.SAE.load_from_disk(str(tmp_path / "inference"))
  x = _x()
  z_ref, y_ref = _sl_numbers(ref, x)
  assert 0 < (z_ref > 0).sum()
  for folder in ("inference", "training"):
    params, cfg = formats.load_sae(tmp_path / folder)
    z, y = _ours(params, cfg, x)
    np.testing.assert_allclose(z, z_ref, atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(y, y_ref, atol=ATOL, rtol=1e-5)
  params, cfg = formats.load_sae(tmp_path / "training")
  assert cfg.architecture == "batchtopk" and cfg.rescale_acts_by_decoder_norm
  formats.save_saelens(params, cfg, tmp_path / "ours")
  back = sl.SAE.load_from_disk(str(tmp_path / "ours"))
  np.testing.assert_allclose(_sl_numbers(back, x)[0], z_ref, atol=ATOL, rtol=1e-5)


def test_expected_average_only_in_is_folded(sl, tmp_path):
  sae = _sl_sae(sl, "standard", normalize_activations="expected_average_only_in")
  sae.save_model(tmp_path)
  s = 2.5
  params, cfg = formats.load_sae(tmp_path, norm_scaling_factor=s)
  assert cfg.normalize_activations == "none"
  sae.fold_activation_norm_scaling_factor(s)
  x = _x()
  z_ref, y_ref = _sl_numbers(sae, x)
  z, y = _ours(params, cfg, x)
  np.testing.assert_allclose(z, z_ref, atol=ATOL, rtol=1e-5)
  np.testing.assert_allclose(y, y_ref, atol=ATOL, rtol=1e-5)
  with pytest.warns(UserWarning, match="norm_scaling_factor"):
    formats.load_sae(tmp_path)


def test_pre_6_0_config_like_gpt2_res_jb(sl, tmp_path):
  sae = _sl_sae(sl, "standard")
  sae.save_model(tmp_path)
  old = {"model_name": "gpt2-small", "hook_point": "blocks.2.hook_resid_pre", "hook_point_layer": 2,
         "hook_point_head_index": None, "d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float32", "device": "cpu",
         "normalize_activations": False, "context_size": 128, "lp_norm": 1, "activation_fn_str": "relu",
         "prepend_bos": True, "dataset_path": "Skylion007/openwebtext"}
  (tmp_path / "cfg.json").write_text(json.dumps(old))
  params, cfg = formats.load_sae(tmp_path)
  assert cfg.apply_b_dec_to_input and cfg.hook_name == "blocks.2.hook_resid_pre" and cfg.model_name == "gpt2-small"
  assert cfg.normalize_activations == "none" and cfg.prepend_bos
  old["dtype"] = "float32"
  (tmp_path / "cfg.json").write_text(json.dumps(old))
  ref = sl.SAE.load_from_disk(str(tmp_path))
  z_ref, y_ref = _sl_numbers(ref, _x())
  z, y = _ours(params, cfg, _x())
  np.testing.assert_allclose(z, z_ref, atol=ATOL, rtol=1e-5)
  np.testing.assert_allclose(y, y_ref, atol=ATOL, rtol=1e-5)
  # gpt2-small is the TransformerLens name of gpt2
  formats.check_compatible(cfg, _model_cfg(name="gpt2").replace(n_layers=12))


def test_pre_6_0_topk_activation_fn(tmp_path):
  p = _np_params("topk")
  save_file(p, str(tmp_path / "sae_weights.safetensors"))
  (tmp_path / "cfg.json").write_text(json.dumps({
      "d_in": D_IN, "d_sae": D_SAE, "hook_name": "blocks.1.hook_resid_post", "activation_fn": "topk",
      "activation_fn_kwargs": {"k": 7}}))
  _, cfg = formats.load_sae(tmp_path)
  assert cfg.architecture == "topk" and cfg.k == 7 and cfg.apply_b_dec_to_input


# --- Gemma Scope and sparsify --------------------------------------------------------------------


def _np_params(arch, seed=0):
  r = np.random.default_rng(seed)
  p = {"W_enc": r.normal(size=(D_IN, D_SAE)) * 0.4, "W_dec": r.normal(size=(D_SAE, D_IN)) * 0.4,
       "b_enc": r.normal(size=D_SAE) * 0.2, "b_dec": r.normal(size=D_IN) * 0.2}
  if arch == "jumprelu":
    p["threshold"] = r.uniform(0.05, 0.4, D_SAE)
  return {k: v.astype(np.float32) for k, v in p.items()}


def test_gemmascope_params_npz(tmp_path):
  p = _np_params("jumprelu")
  folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_20" / "width_16k" / "average_l0_71"
  folder.mkdir(parents=True)
  np.savez(folder / "params.npz", **p)
  params, cfg = formats.load_sae(folder)
  assert cfg.architecture == "jumprelu" and not cfg.apply_b_dec_to_input
  assert cfg.hook_name == "blocks.20.hook_resid_post" and cfg.model_name == "gemma-2-2b"
  assert params["threshold"].dtype == np.float32
  x = _x()
  pre = x @ p["W_enc"] + p["b_enc"]  # the tutorial's JumpReLUSAE_Base, no b_dec subtraction
  acts = (pre > p["threshold"]) * np.maximum(pre, 0)
  z, y = _ours(params, cfg, x)
  np.testing.assert_allclose(z, acts, atol=ATOL)
  np.testing.assert_allclose(y, acts @ p["W_dec"] + p["b_dec"], atol=ATOL)
  # written back in the same layout
  out = formats.save_gemmascope(params, cfg, tmp_path / "out")
  with np.load(out) as d:
    assert sorted(d.files) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
    np.testing.assert_array_equal(d["W_enc"], p["W_enc"])
  # a model with 26 layers and d_model D_IN named gemma-2-2b-it accepts it (pt SAE on it model: warns)
  mc = _model_cfg(name="gemma-2-2b-it").replace(n_layers=26)
  with pytest.warns(UserWarning, match="base/instruct"):
    formats.check_compatible(cfg, mc, "blocks.20.hook_resid_post")


def test_gemmascope_lowercase_keys_and_mlp_site(tmp_path):
  p = _np_params("jumprelu")
  folder = tmp_path / "gemma-scope-9b-pt-mlp" / "layer_3" / "width_16k" / "average_l0_10"
  folder.mkdir(parents=True)
  np.savez(folder / "params.npz", w_enc=p["W_enc"], w_dec=p["W_dec"], b_enc=p["b_enc"], b_dec=p["b_dec"],
           threshold=p["threshold"])
  _, cfg = formats.load_sae(folder / "params.npz")
  assert cfg.hook_name == "blocks.3.hook_mlp_out" and cfg.model_name == "gemma-2-9b"
  # a file whose path does not name its layer takes the site it is attached at
  plain = tmp_path / "plain"
  plain.mkdir()
  np.savez(plain / "params.npz", **p)
  with pytest.raises(formats.SAEFileError, match="cannot tell the layer"):
    formats.load_sae(plain)
  _, cfg2 = formats.load_sae(plain, model_cfg=_model_cfg(), hook_name="blocks.2.hook_resid_post")
  assert cfg2.hook_name == "blocks.2.hook_resid_post" and not cfg2.apply_b_dec_to_input


def _sparsify_reference(p, x, k):
  """sparsify's SparseCoder.encode/decode in numpy: x - b_dec -> relu(W x + b) -> top-k."""
  pre = np.maximum((x - p["b_dec"]) @ p["encoder.weight"].T + p["encoder.bias"], 0)
  ids = np.argsort(-pre, -1)[:, :k]
  vals = np.take_along_axis(pre, ids, -1)
  y = np.einsum("nk,nkd->nd", vals, p["W_dec"][ids]) + p["b_dec"]
  z = np.zeros_like(pre)
  np.put_along_axis(z, ids, vals, -1)
  return z, y


def test_sparsify_layout(tmp_path):
  r = np.random.default_rng(5)
  p = {"encoder.weight": r.normal(size=(D_SAE, D_IN)).astype(np.float32) * 0.4,  # nn.Linear [out, in]
       "encoder.bias": r.normal(size=D_SAE).astype(np.float32) * 0.2,
       "W_dec": r.normal(size=(D_SAE, D_IN)).astype(np.float32) * 0.4,  # [num_latents, d_in]
       "b_dec": r.normal(size=D_IN).astype(np.float32) * 0.2}
  folder = tmp_path / "layers.3"
  folder.mkdir()
  save_file(p, str(folder / "sae.safetensors"))
  (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 3, "normalize_decoder": True,
                                               "num_latents": D_SAE, "k": 5, "multi_topk": False,
                                               "skip_connection": False, "transcode": False, "d_in": D_IN}))
  (tmp_path / "config.json").write_text(json.dumps({"model": "tiny-model"}))
  params, cfg = formats.load_sae(folder)
  assert cfg.architecture == "topk" and cfg.k == 5 and cfg.hook_name == "blocks.3.hook_resid_post"
  assert cfg.model_name == "tiny-model"
  np.testing.assert_array_equal(params["W_enc"], p["encoder.weight"].T)
  x = _x()
  z_ref, y_ref = _sparsify_reference(p, x, 5)
  z, y = _ours(params, cfg, x)
  np.testing.assert_allclose(z, z_ref, atol=ATOL)
  np.testing.assert_allclose(y, y_ref, atol=ATOL)
  # a transposed W_dec (as SAELens' loader assumes) is recognised by its shape
  p2 = dict(p, W_dec=np.ascontiguousarray(p["W_dec"].T))
  save_file(p2, str(folder / "sae.safetensors"))
  params2, _ = formats.load_sae(folder)
  np.testing.assert_array_equal(params2["W_dec"], p["W_dec"])
  # round trip through save_sparsify
  out = formats.save_sparsify(params, cfg, tmp_path / "out" / "layers.3")
  t = load_file(str(out / "sae.safetensors"))
  assert t["encoder.weight"].shape == (D_SAE, D_IN) and t["W_dec"].shape == (D_SAE, D_IN)
  params3, cfg3 = formats.load_sae(out)
  np.testing.assert_allclose(_ours(params3, cfg3, x)[1], y_ref, atol=ATOL)


# --- bad files -----------------------------------------------------------------------------------


def _saelens_folder(tmp_path, arch="standard", cfg_extra=None, drop=None, reshape=None):
  p = _np_params("jumprelu" if arch == "jumprelu" else "standard")
  if drop:
    del p[drop]
  if reshape:
    p[reshape] = p[reshape][:-1]
  save_file(p, str(tmp_path / "sae_weights.safetensors"))
  c = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "apply_b_dec_to_input": True,
       "normalize_activations": "none", "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.1.hook_resid_pre",
                                                     "model_name": "tiny-model"}}
  c.update(cfg_extra or {})
  (tmp_path / "cfg.json").write_text(json.dumps(c))
  return tmp_path


def test_bad_file_missing_tensor(tmp_path):
  folder = _saelens_folder(tmp_path, "jumprelu", drop="threshold")
  with pytest.raises(formats.SAEFileError, match=r"sae_weights\.safetensors.*missing tensor 'threshold'"):
    formats.load_sae(folder)


def test_bad_file_wrong_shape(tmp_path):
  folder = _saelens_folder(tmp_path, reshape="W_enc")
  with pytest.raises(formats.SAEFileError, match=r"sae_weights\.safetensors.*'W_enc' has shape \(15, 48\), expected \(16, 48\)"):
    formats.load_sae(folder)


def test_bad_file_unknown_architecture(tmp_path):
  folder = _saelens_folder(tmp_path, "matryoshka_wizard")
  with pytest.raises(formats.SAEFileError, match=r"cfg\.json.*'architecture'.*'matryoshka_wizard'"):
    formats.load_sae(folder)


def test_bad_file_not_an_sae_folder(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(formats.SAEFileError, match=r"no SAE file found"):
    formats.load_sae(tmp_path)


def test_bad_gemmascope_missing_threshold(tmp_path):
  p = _np_params("jumprelu")
  del p["threshold"]
  f = tmp_path / "layer_2" / "params.npz"
  f.parent.mkdir()
  np.savez(f, **p)
  with pytest.raises(formats.SAEFileError, match=r"params\.npz.*missing tensor 'threshold'"):
    formats.load_sae(f)


def test_d_in_not_matching_the_model(tmp_path):
  folder = _saelens_folder(tmp_path)
  with pytest.raises(formats.SAECompatibilityError, match=rf"{tmp_path}.*'d_in' = 16.*width 32"):
    formats.load_sae(folder, model_cfg=_model_cfg(d_model=32))
  with pytest.raises(formats.SAECompatibilityError, match="'d_in'"):  # not even with override
    formats.load_sae(folder, model_cfg=_model_cfg(d_model=32), override=True)


def test_hook_and_model_name_mismatch_and_override(tmp_path):
  folder = _saelens_folder(tmp_path)
  params, cfg = formats.load_sae(folder, model_cfg=_model_cfg(), hook_name="blocks.1.hook_resid_pre")
  assert cfg.hook_name == "blocks.1.hook_resid_pre"
  with pytest.raises(formats.SAECompatibilityError, match=rf"{tmp_path}.*'hook_name' = 'blocks.1.hook_resid_pre'.*'blocks.3.hook_resid_post'"):
    formats.load_sae(folder, model_cfg=_model_cfg(), hook_name="blocks.3.hook_resid_post")
  with pytest.raises(formats.SAECompatibilityError, match=r"'model_name' = 'tiny-model' but the model is 'other-model'"):
    formats.load_sae(folder, model_cfg=_model_cfg(name="other-model"))
  with pytest.warns(UserWarning, match="override=True"):
    _, cfg2 = formats.load_sae(folder, model_cfg=_model_cfg(name="other-model"), hook_name="blocks.3.hook_resid_post",
                               override=True)
  assert cfg2.hook_name == "blocks.3.hook_resid_post"
  bad_site = SAEConfig("standard", D_IN, D_SAE, hook_name="blocks.9.hook_resid_pre", source="x/cfg.json")
  with pytest.raises(formats.SAECompatibilityError, match=r"x/cfg\.json.*out of range"):
    formats.check_compatible(bad_site, _model_cfg())


def test_float16_save_keeps_threshold_float32(tmp_path):
  params, cfg = formats.load_sae(_saelens_folder(tmp_path / "a", "jumprelu") if (tmp_path / "a").mkdir() is None else None)
  formats.save_saelens(params, cfg, tmp_path / "b", dtype="float16")
  t = load_file(str(tmp_path / "b" / "sae_weights.safetensors"))
  assert t["W_enc"].dtype == np.float16 and t["threshold"].dtype == np.float32
  p16, c16 = formats.load_sae(tmp_path / "b", dtype=None)
  assert p16["W_dec"].dtype == np.float16 and c16.dtype == "float16"


# --- named access to shipped SAEs ----------------------------------------------------------------


def test_named_access_resolves_shipped_folders(tmp_path, monkeypatch):
  from recovery_jax.sae import registry
  x = _x()
  for layer, arch in ((9, "jumprelu"), (3, "jumprelu"), (12, "standard")):
    cfg = SAEConfig(arch, D_IN, D_SAE, apply_b_dec_to_input=False, hook_name=f"blocks.{layer}.hook_resid_post",
                    model_name="tiny-model")
    r = np.random.default_rng(layer)
    p = {"W_enc": r.normal(size=(D_IN, D_SAE)).astype(np.float32), "W_dec": r.normal(size=(D_SAE, D_IN)).astype(np.float32),
         "b_enc": np.zeros(D_SAE, np.float32), "b_dec": np.zeros(D_IN, np.float32), "threshold": np.full(D_SAE, 0.5, np.float32)}
    formats.save_saelens(p, cfg, tmp_path / f"tiny-model-res{layer}-post-{arch}")
  (tmp_path / "notes").mkdir()  # not an SAE: ignored
  monkeypatch.setenv(registry.ASSETS_ENV, str(tmp_path))
  assert [s.hook_name for s in registry.shipped()] == [f"blocks.{L}.hook_resid_post" for L in (3, 9, 12)]
  params, cfg = formats.load_sae("tiny-model", site="blocks.9.hook_resid_post", model_cfg=_model_cfg().replace(n_layers=16))
  assert cfg.source.endswith("tiny-model-res9-post-jumprelu") and cfg.hook_name == "blocks.9.hook_resid_post"
  ref, _ = formats.load_sae(tmp_path / "tiny-model-res9-post-jumprelu")
  np.testing.assert_array_equal(params["W_enc"], ref["W_enc"])
  with pytest.raises(ValueError, match=r"no SAE is shipped for model 'tiny-model' at site 'blocks.4.hook_resid_post'; "
                     r"shipped sites: blocks.3.hook_resid_post \(jumprelu\), blocks.9.hook_resid_post \(jumprelu\), "
                     r"blocks.12.hook_resid_post \(standard\)"):
    formats.load_sae("tiny-model", site="blocks.4.hook_resid_post")
  with pytest.raises(ValueError, match=r"no SAE is shipped for model 'gpt2'.*shipped models: \['tiny-model'\]"):
    formats.load_sae("gpt2", site="blocks.4.hook_resid_post")


def test_the_repository_assets_are_registered():
  from recovery_jax.sae import registry
  got = {(s.model_name, s.hook_name) for s in registry.shipped()}
  assert ("smollm2-135m-instruct", "blocks.12.hook_resid_pre") in got
  assert registry.resolve("smollm2-135m-instruct", "blocks.12.hook_resid_pre").name == "smollm2-135m-instruct-res12-topk"
