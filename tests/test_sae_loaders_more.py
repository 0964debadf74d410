"""Llama Scope and dictionary_learning folders, written in their exact on-disk layouts, against the
formulas of their own code on the raw tensors; bad files name the file and the field."""

import json

import numpy as np
import pytest

from recovery_jax.sae import core, formats
from recovery_jax.sae.formats import SAEFileError

torch = pytest.importorskip("torch")

D, F = 16, 40
ATOL = 2e-4


def _x(n=11, seed=0, scale=3.0):
  return (np.random.default_rng(seed).normal(size=(n, D)) * scale + 1.0).astype(np.float32)


def _check(params, cfg, x, f_ref, xhat_ref):
  z = np.asarray(core.encode(params, cfg, x))
  np.testing.assert_allclose(z, f_ref, rtol=1e-4, atol=ATOL)
  assert (z > 0).sum() == (f_ref > 0).sum() > 0  # non-trivial: some latents fire, not all
  assert (z > 0).sum() < z.size
  np.testing.assert_allclose(np.asarray(core.decode(params, cfg, z, x)), xhat_ref, rtol=1e-4, atol=ATOL)


# --- Llama Scope ---------------------------------------------------------------------------------


def _llamascope(tmp_path, name="Llama3_1-8B-Base-L8R-8x", *, act_fn="jumprelu", norm=("dataset-wise", 7.5, 7.5),
                include_norm=True, pre_bias=False, log_threshold=False, dtype=torch.bfloat16, **hp_over):
  """A folder as the Llama Scope release lays it out: hyperparams.json + checkpoints/final.safetensors."""
  from safetensors.torch import save_file
  g = torch.Generator().manual_seed(0)
  folder = tmp_path / name
  (folder / "checkpoints").mkdir(parents=True)
  t = {"encoder.weight": torch.randn(F, D, generator=g) * 0.5, "encoder.bias": torch.randn(F, generator=g) * 0.3,
       "decoder.weight": torch.randn(D, F, generator=g) * 0.4, "decoder.bias": torch.randn(D, generator=g) * 0.5}
  if log_threshold:
    t["log_jumprelu_threshold"] = torch.log(torch.rand(F, generator=g) * 0.8 + 0.2)
  t = {k: v.to(dtype) for k, v in t.items()}
  save_file(t, str(folder / "checkpoints" / "final.safetensors"))
  hp = {"d_model": D, "d_sae": F, "use_decoder_bias": True, "apply_decoder_bias_to_pre_encoder": pre_bias,
        "act_fn": act_fn, "jump_relu_threshold": 0.6, "top_k": 5, "norm_activation": norm[0],
        "dataset_average_activation_norm": {"in": norm[1], "out": norm[2]},
        "hook_point_in": "blocks.8.hook_resid_post", "hook_point_out": "blocks.8.hook_resid_post",
        "sparsity_include_decoder_norm": include_norm, "init_encoder_with_decoder_transpose": True,
        "decoder_exactly_fixed_norm": False, "model_name": "meta-llama/Llama-3.1-8B", **hp_over}
  (folder / "hyperparams.json").write_text(json.dumps(hp))
  return folder, {k: v.float().numpy() for k, v in t.items()}, hp


def _lm_saes_reference(t, hp, x):
  """Language-Model-SAEs encode/decode on the raw tensors (dataset-wise / token-wise / inference)."""
  d = hp["d_model"]
  if hp["norm_activation"] == "dataset-wise":
    s_in = np.sqrt(d) / hp["dataset_average_activation_norm"]["in"]
    s_out = np.sqrt(d) / hp["dataset_average_activation_norm"]["out"]
  elif hp["norm_activation"] == "token-wise":
    s_in = s_out = np.sqrt(d) / np.linalg.norm(x, axis=-1, keepdims=True)
  else:
    s_in = s_out = 1.0
  xn = x * s_in
  if hp["apply_decoder_bias_to_pre_encoder"]:
    xn = xn - t["decoder.bias"]
  pre = xn @ t["encoder.weight"].T + t["encoder.bias"]
  score = pre * np.linalg.norm(t["decoder.weight"], axis=0) if hp["sparsity_include_decoder_norm"] else pre
  if hp["act_fn"] == "jumprelu":
    th = np.exp(t["log_jumprelu_threshold"]) if "log_jumprelu_threshold" in t else hp["jump_relu_threshold"]
    mask = score > th
  elif hp["act_fn"] == "relu":
    mask = score > 0
  else:
    sc = np.maximum(score, 0)
    kth = np.sort(sc, -1)[:, -hp["top_k"]][:, None]
    mask = sc >= kth
  f = pre * mask
  return f, (f @ t["decoder.weight"].T + t["decoder.bias"]) / s_out


@pytest.mark.parametrize("kw", [
    dict(),  # the release: jumprelu, dataset-wise norms, decoder norm in the sparsity, bf16 weights
    dict(log_threshold=True, pre_bias=True, include_norm=False, dtype=torch.float32),
    dict(norm=("token-wise", 0, 0), act_fn="relu"),
    dict(norm=("inference", 0, 0), log_threshold=True),
])
def test_llamascope_matches_its_formula(tmp_path, kw):
  folder, t, hp = _llamascope(tmp_path, **kw)
  assert formats.detect_format(folder) == "llamascope"
  assert formats.detect_format(folder / "checkpoints" / "final.safetensors") == "llamascope"
  params, cfg = formats.load_sae(folder)
  assert cfg.hook_name == "blocks.8.hook_resid_post" and cfg.model_name == "meta-llama/Llama-3.1-8B"
  x = _x()
  f, xhat = _lm_saes_reference(t, hp, x)
  _check(params, cfg, x, f, xhat)
  if cfg.architecture == "jumprelu":
    assert params["threshold"].dtype == np.float32


def test_llamascope_topk_reconstructs_and_scales_features_by_decoder_norm(tmp_path):
  folder, t, hp = _llamascope(tmp_path, act_fn="topk", dtype=torch.float32)
  params, cfg = formats.load_sae(folder)
  assert cfg.architecture == "topk" and cfg.k == 5
  x = _x()
  f, xhat = _lm_saes_reference(t, hp, x)
  z = np.asarray(core.encode(params, cfg, x))
  np.testing.assert_allclose(z, f * np.linalg.norm(t["decoder.weight"], axis=0), rtol=1e-4, atol=ATOL)
  np.testing.assert_allclose(np.asarray(core.forward(params, cfg, x)), xhat, rtol=1e-4, atol=ATOL)


def test_llamascope_bad_files(tmp_path):
  folder, _, _ = _llamascope(tmp_path / "a", hook_point_out="blocks.8.hook_mlp_out")
  with pytest.raises(SAEFileError, match=r"hyperparams.json: field 'hook_point_out'.*transcoder"):
    formats.load_sae(folder)
  folder, _, _ = _llamascope(tmp_path / "b", norm_activation="batch-wise")
  with pytest.raises(SAEFileError, match=r"hyperparams.json: field 'norm_activation' = 'batch-wise'"):
    formats.load_sae(folder)
  folder, _, _ = _llamascope(tmp_path / "c", d_sae=41)
  with pytest.raises(SAEFileError, match=r"final.safetensors: tensor 'encoder.weight' has shape \(40, 16\), expected \(41, 16\)"):
    formats.load_sae(folder)
  folder, _, _ = _llamascope(tmp_path / "d", dataset_average_activation_norm={})
  with pytest.raises(SAEFileError, match=r"hyperparams.json: field 'dataset_average_activation_norm' has no 'in'"):
    formats.load_sae(folder)
  folder, _, _ = _llamascope(tmp_path / "e")
  from safetensors.torch import load_file, save_file
  w = folder / "checkpoints" / "final.safetensors"
  t = load_file(str(w))
  del t["decoder.bias"]
  save_file(t, str(w))
  with pytest.raises(SAEFileError, match=r"final.safetensors: missing tensor 'decoder.bias'"):
    formats.load_sae(folder)


# --- dictionary_learning -------------------------------------------------------------------------


def _linear(d_out, d_in, g, bias=True):
  lin = torch.nn.Linear(d_in, d_out, bias=bias)
  with torch.no_grad():
    lin.weight.copy_(torch.randn(d_out, d_in, generator=g) * 0.4)
    if bias:
      lin.bias.copy_(torch.randn(d_out, generator=g) * 0.3)
  return lin


def _dictlearn(tmp_path, dict_class, /, **trainer_over):
  """ae.pt (torch.save of the class's state_dict keys) + config.json ({trainer, buffer}) as
  dictionary_learning's training writes them."""
  g = torch.Generator().manual_seed(1)
  enc, dec = _linear(F, D, g), _linear(D, F, g, bias=dict_class == "AutoEncoderNew")
  vec = lambda n, s=0.3: torch.randn(n, generator=g) * s
  if dict_class == "AutoEncoder":
    sd = {"bias": vec(D), "encoder.weight": enc.weight, "encoder.bias": enc.bias, "decoder.weight": dec.weight}
  elif dict_class == "AutoEncoderNew":
    sd = {"encoder.weight": enc.weight, "encoder.bias": enc.bias, "decoder.weight": dec.weight, "decoder.bias": dec.bias}
  elif dict_class == "GatedAutoEncoder":
    sd = {"decoder_bias": vec(D), "encoder.weight": enc.weight, "r_mag": vec(F), "gate_bias": vec(F),
          "mag_bias": vec(F), "decoder.weight": dec.weight}
  elif dict_class == "JumpReluAutoEncoder":
    sd = {"W_enc": enc.weight.T.contiguous(), "b_enc": enc.bias, "W_dec": dec.weight.T.contiguous(), "b_dec": vec(D),
          "threshold": torch.rand(F, generator=g) * 0.5 + 0.1}
  elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
    sd = {"k": torch.tensor(5, dtype=torch.int), "threshold": torch.tensor(0.4), "decoder.weight": dec.weight,
          "encoder.weight": enc.weight, "encoder.bias": enc.bias, "b_dec": vec(D)}
  else:
    raise ValueError(dict_class)
  sd = {k: v.detach().clone() for k, v in sd.items()}
  folder = tmp_path / f"trainer_{dict_class}"
  folder.mkdir(parents=True)
  torch.save(sd, folder / "ae.pt")
  trainer = {"trainer_class": dict_class.replace("AutoEncoder", "") + "Trainer", "dict_class": dict_class,
             "activation_dim": D, "dict_size": F, "lr": 3e-4, "steps": 1000, "seed": 0, "device": "cpu",
             "layer": 3, "lm_name": "EleutherAI/pythia-70m-deduped", "wandb_name": dict_class,
             "submodule_name": "resid_post_layer_3", "k": 5}
  trainer.update(trainer_over)
  buffer = {"d_submodule": D, "io": "out", "n_ctxs": 3000, "ctx_len": 128, "refresh_batch_size": 32,
            "out_batch_size": 4096, "device": "cpu"}
  (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": buffer}))
  return folder, {k: v.float().numpy() for k, v in sd.items()}


def _dictlearn_reference(cls, t, x):
  """dictionary_learning's encode / decode (dictionary.py, trainers/top_k.py) on the raw tensors."""
  relu = lambda a: np.maximum(a, 0)
  if cls == "AutoEncoder":
    f = relu((x - t["bias"]) @ t["encoder.weight"].T + t["encoder.bias"])
    return f, f @ t["decoder.weight"].T + t["bias"]
  if cls == "AutoEncoderNew":
    f = relu(x @ t["encoder.weight"].T + t["encoder.bias"])
    return f, f @ t["decoder.weight"].T + t["decoder.bias"]
  if cls == "GatedAutoEncoder":
    x_enc = (x - t["decoder_bias"]) @ t["encoder.weight"].T
    n = np.linalg.norm(t["decoder.weight"], axis=0)
    f = (x_enc + t["gate_bias"] > 0) * relu(np.exp(t["r_mag"]) * x_enc + t["mag_bias"]) * n
    return f, (f / n) @ t["decoder.weight"].T + t["decoder_bias"]
  if cls == "JumpReluAutoEncoder":
    pre = x @ t["W_enc"] + t["b_enc"]
    n = np.linalg.norm(t["W_dec"], axis=1)
    f = relu(pre * (pre > t["threshold"])) * n
    return f, (f / n) @ t["W_dec"] + t["b_dec"]
  post = relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
  if cls == "AutoEncoderTopK":
    kth = np.sort(post, -1)[:, -int(t["k"])][:, None]
    f = post * (post >= kth)
  else:  # BatchTopKSAE at inference: the global threshold
    f = post * (post > t["threshold"])
  return f, f @ t["decoder.weight"].T + t["b_dec"]


@pytest.mark.parametrize("cls", ["AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "JumpReluAutoEncoder",
                                 "AutoEncoderTopK", "BatchTopKSAE"])
def test_dictionary_learning_matches_its_formula(tmp_path, cls):
  folder, t = _dictlearn(tmp_path, cls)
  assert formats.detect_format(folder) == "dictionary_learning"
  params, cfg = formats.load_sae(folder)
  assert cfg.hook_name == "blocks.3.hook_resid_post" and cfg.model_name == "pythia-70m-deduped"
  assert cfg.context_size == 128
  x = _x(scale=1.0)
  f, xhat = _dictlearn_reference(cls, t, x)
  _check(params, cfg, x, f, xhat)
  np.testing.assert_allclose(np.asarray(core.forward(params, cfg, x)), xhat, rtol=1e-4, atol=ATOL)


def test_dictionary_learning_bad_files(tmp_path):
  folder, _ = _dictlearn(tmp_path / "a", "AutoEncoder", dict_class="CrossCoder")
  with pytest.raises(SAEFileError, match=r"config.json: field 'trainer.dict_class' = 'CrossCoder'"):
    formats.load_sae(folder)
  folder, _ = _dictlearn(tmp_path / "b", "AutoEncoder", dict_size=41)
  with pytest.raises(SAEFileError, match=r"ae.pt: tensor 'encoder.weight' has shape \(40, 16\), expected \(41, 16\)"):
    formats.load_sae(folder)
  folder, _ = _dictlearn(tmp_path / "c", "BatchTopKSAE")
  sd = torch.load(folder / "ae.pt")
  sd["threshold"] = torch.tensor(-1.0)
  torch.save(sd, folder / "ae.pt")
  with pytest.raises(SAEFileError, match=r"ae.pt: tensor 'threshold' = -1.0 < 0"):
    formats.load_sae(folder)
  folder, _ = _dictlearn(tmp_path / "d", "JumpReluAutoEncoder")
  sd = torch.load(folder / "ae.pt")
  del sd["threshold"]
  torch.save(sd, folder / "ae.pt")
  with pytest.raises(SAEFileError, match=r"ae.pt: missing tensor 'threshold' for a JumpReluAutoEncoder"):
    formats.load_sae(folder)
  folder, _ = _dictlearn(tmp_path / "e", "AutoEncoder")
  (folder / "config.json").write_text(json.dumps({"buffer": {}}))
  with pytest.raises(SAEFileError, match=r"config.json: field 'trainer' is missing"):
    formats.load_sae(folder)
  (folder / "ae.pt").write_bytes(b"not a torch file")
  (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder", "activation_dim": D,
                                                              "dict_size": F, "layer": 3}}))
  with pytest.raises(SAEFileError, match=r"ae.pt: cannot read the torch state dict"):
    formats.load_sae(folder)


def test_submodule_name_picks_the_hook(tmp_path):
  folder, _ = _dictlearn(tmp_path, "AutoEncoder", submodule_name="mlp_out_layer_3")
  assert formats.load_sae(folder)[1].hook_name == "blocks.3.hook_mlp_out"
