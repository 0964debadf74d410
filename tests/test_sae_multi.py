"""Several sites at once: one truncated forward harvests them all, and N SAEs trained in one vmapped
program equal N separate runs."""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

from recovery_jax.data import corpus as corpus_lib
from recovery_jax.sae import formats, harvest, pipeline, testing, train as train_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SITES = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post")


@pytest.fixture(scope="module")
def tiny():
  params, cfg = testing.tiny_model(0)
  return params, cfg, testing.byte_tokenizer()


@pytest.fixture(scope="module")
def windows(tiny, tmp_path_factory):
  _, cfg, tok = tiny
  d = tmp_path_factory.mktemp("corpus")
  for rel, text in corpus_lib.stdlib_docstrings(25):
    (d / (rel.replace("/", "__") + ".txt")).write_text(text)
  docs = corpus_lib.iter_documents(corpus_lib.list_text_files(str(d)))
  return list(harvest.token_windows(docs, tok, 64, bos_id=cfg.bos_token_id, sep_id=cfg.eos_token_ids[0],
                                    pad_id=cfg.pad_token_id))


KW = dict(forward_batch=16, n_skip=2, outlier_factor=3.0, progress=False, flush_every=1)


@pytest.fixture(scope="module")
def stores(tiny, windows, tmp_path_factory):
  params, cfg, _ = tiny
  out = tmp_path_factory.mktemp("multi")
  got = harvest.harvest_to_stores(params, cfg, SITES, iter(windows), str(out), 3000,
                                  exclude=harvest.excluded_ids(cfg), **KW)
  return {k: np.asarray(v) for k, v in got.items()}, out


def test_sites_fn_stops_after_the_deepest_site(tiny):
  params, cfg, _ = tiny
  assert harvest.stop_layer_for(cfg, ("blocks.0.hook_resid_post", "hook_embed")) == 1
  assert harvest.stop_layer_for(cfg, SITES) == 2
  toks = np.full((2, 8), 65, np.int32)

  def n_dots(sites):
    jaxpr = str(jax.make_jaxpr(harvest.make_sites_fn(cfg, sites))(params, toks))
    return jaxpr.count("dot_general")

  # no unembedding (a [.., vocab] product) and no layer after the deepest site
  assert n_dots(("blocks.0.hook_resid_post",)) < n_dots(("blocks.1.hook_resid_post",))
  no_head = {k: v for k, v in params.items() if k != "ln_final"}
  out = harvest.make_sites_fn(cfg, SITES)(no_head, toks)
  assert set(out) == set(SITES) and out[SITES[0]].shape == (2, 8, cfg.d_model)


def test_one_pass_equals_one_site_at_a_time(tiny, windows, stores, tmp_path):
  params, cfg, _ = tiny
  multi, out = stores
  for i, site in enumerate(SITES[::2]):
    single = harvest.harvest_to_store(params, cfg, site, iter(windows), str(tmp_path / str(i)), 3000,
                                      exclude=harvest.excluded_ids(cfg), **KW)
    np.testing.assert_array_equal(np.asarray(single), multi[site])
  # blocks.0.hook_resid_post is blocks.1.hook_resid_pre: the same rows
  np.testing.assert_array_equal(multi[SITES[0]], multi[SITES[1]])
  state = json.loads((out / "state.json").read_text())
  for site in SITES:
    info = state["sites"][site]
    assert info["rows"] == 3000 and info["exclusion"]["n_skip"] == 2 and info["exclusion"]["outlier_factor"] == 3.0
    assert info["exclusion"]["exclude_ids"] == sorted(harvest.excluded_ids(cfg))
  assert state["dtype"] == "float16" and multi[SITES[0]].dtype == np.float16


def test_multi_store_resumes_and_checks_its_rule(tiny, windows, stores, tmp_path):
  params, cfg, _ = tiny
  multi, _ = stores
  kw = dict(exclude=harvest.excluded_ids(cfg), **KW)
  part = tmp_path / "part"
  with pytest.raises(ValueError, match="ran out"):
    harvest.harvest_to_stores(params, cfg, SITES, iter(windows[:20]), str(part), 3000, **kw)
  state = json.loads((part / "state.json").read_text())
  assert state["windows"] == 20 and 0 < state["rows"] < 3000
  resumed = harvest.harvest_to_stores(params, cfg, SITES, iter(windows), str(part), 3000, **kw)
  for site in SITES:
    np.testing.assert_array_equal(np.asarray(resumed[site]), multi[site])
  with pytest.raises(ValueError, match=r"state.json: field 'sites.blocks.0.hook_resid_post.exclusion'"):
    harvest.harvest_to_stores(params, cfg, SITES, iter(windows), str(part), 3000, **{**kw, "outlier_factor": 5.0})
  with pytest.raises(ValueError, match="field 'sites'"):
    harvest.harvest_to_stores(params, cfg, SITES[:2], iter(windows), str(part), 3000, **kw)


def test_bfloat16_store(tiny, windows, stores, tmp_path):
  import ml_dtypes
  params, cfg, _ = tiny
  multi, _ = stores
  got = harvest.harvest_to_stores(params, cfg, SITES[:1], iter(windows), str(tmp_path / "bf"), 500,
                                  exclude=harvest.excluded_ids(cfg), dtype="bfloat16", **KW)
  a = got[SITES[0]]
  assert a.dtype == ml_dtypes.bfloat16 and a.shape == (500, cfg.d_model)
  np.testing.assert_allclose(np.asarray(a, np.float32), multi[SITES[0]][:500].astype(np.float32), rtol=1e-2, atol=1e-2)
  assert harvest.open_store(tmp_path / "bf")[SITES[0]].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("arch,site_axis,enc_scale", [("jumprelu", "vmap", "none"), ("topk", "vmap", "none"),
                                                      ("standard", "vmap", "none"), ("jumprelu", "map", "none"),
                                                      ("jumprelu", "vmap", "lsq")])
def test_vmapped_training_equals_separate_runs(stores, arch, site_axis, enc_scale):
  multi, _ = stores
  data = [multi[SITES[0]], multi[SITES[2]]]
  tc = train_lib.TrainConfig(architecture=arch, d_in=data[0].shape[1], d_sae=96, k=6, lr=5e-3, batch_size=128,
                             warmup_steps=3, total_steps=14, dead_tokens=600, sparsity_warmup_steps=4,
                             jumprelu_init_l0=12.0, encoder_init_scale=enc_scale,
                             l0_target=10.0 if enc_scale == "lsq" else 0.0, threshold_lr_scale=4.0 if enc_scale == "lsq" else 1.0)
  seeds, coeffs = [3, 8], [0.02, 0.2]
  stacked, hist = train_lib.train(tc, data, seeds=seeds, sparsity_coeffs=coeffs, log_every=7, progress=False,
                                  site_axis=site_axis)
  assert stacked.params["W_enc"].shape == (2, tc.d_in, tc.d_sae) and len(hist[-1]["explained_variance"]) == 2
  for i in range(2):
    alone, h1 = train_lib.train(tc, data[i], seed=seeds[i], sparsity_coeffs=[coeffs[i]], log_every=7, progress=False)
    mine = train_lib.site_state(stacked, i)
    for k in alone.params:
      np.testing.assert_allclose(np.asarray(mine.params[k]), np.asarray(alone.params[k]), rtol=2e-4, atol=2e-5,
                                 err_msg=f"{arch} site {i} {k}")
    np.testing.assert_allclose(float(mine.input_scale), float(alone.input_scale), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(mine.since_fired), np.asarray(alone.since_fired))
    np.testing.assert_allclose(hist[-1]["l0"][i], h1[-1]["l0"], rtol=1e-4)


def test_jumprelu_init_threshold_hits_the_target_l0(stores):
  multi, _ = stores
  x = multi[SITES[2]]
  tc = train_lib.TrainConfig(architecture="jumprelu", d_in=x.shape[1], d_sae=256, batch_size=512, total_steps=1,
                             jumprelu_init_l0=10.0)
  st = train_lib.init_state(jax.random.PRNGKey(0), tc, x[:512], train_lib.make_optimizer(tc))
  xs = x[:512].astype(np.float32) * float(st.input_scale)
  pre = (xs - np.asarray(st.params["b_dec"])) @ np.asarray(st.params["W_enc"]) + np.asarray(st.params["b_enc"])
  l0 = (pre > np.asarray(st.params["threshold"])).sum(-1).mean()
  assert abs(l0 - 10.0) < 0.1 and st.params["threshold"].dtype == np.float32


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "standard"])
def test_lsq_encoder_scale_sizes_the_init_reconstruction(stores, arch):
  multi, _ = stores
  x = multi[SITES[2]][:512].astype(np.float32)
  kw = dict(architecture=arch, d_in=x.shape[1], d_sae=256, k=8, batch_size=512, total_steps=1, jumprelu_init_l0=10.0)
  states = {}
  for mode in ("none", "lsq"):
    tc = train_lib.TrainConfig(encoder_init_scale=mode, **kw)
    states[mode] = train_lib.init_state(jax.random.PRNGKey(0), tc, x, train_lib.make_optimizer(tc))

  def recon(st):  # written out per architecture, independently of the trainer's helper
    p = {k: np.asarray(v, np.float64) for k, v in st.params.items()}
    xs = x * float(st.input_scale)
    pre = (xs - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    if arch == "jumprelu":
      z = pre * (pre > p["threshold"])
    elif arch == "topk":
      top = np.argsort(-pre, axis=-1)[:, :8]
      z = np.zeros_like(pre)
      np.put_along_axis(z, top, np.maximum(np.take_along_axis(pre, top, -1), 0), -1)
    else:
      z = np.maximum(pre, 0)
    return xs - p["b_dec"], z @ p["W_dec"], z

  e, xh0, z0 = recon(states["none"])
  e1, xh1, z1 = recon(states["lsq"])
  c = float((e * xh0).sum() / (xh0 * xh0).sum())
  assert 0 < c < 1 if arch != "standard" else c > 1  # unit-norm tied rows overshoot; 0.1-norm rows fall short
  np.testing.assert_array_equal(z1 > 0, z0 > 0)  # the same latents fire
  np.testing.assert_allclose(xh1, c * xh0, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose((e1 * xh1).sum() / (xh1 * xh1).sum(), 1.0, rtol=1e-4)
  assert ((e1 - xh1) ** 2).sum() < ((e - xh0) ** 2).sum()
  np.testing.assert_array_equal(np.asarray(states["lsq"].params["W_dec"]), np.asarray(states["none"].params["W_dec"]))


def test_l0_controller_moves_the_coefficient_towards_the_target(stores):
  """A start far too weak for L0 = 6 is raised (L0 ends far below the uncontrolled run's), one far too
  strong is lowered; without a target the coefficient never moves."""
  import dataclasses
  x = stores[0][SITES[2]]
  tc = train_lib.TrainConfig(architecture="jumprelu", d_in=x.shape[1], d_sae=128, lr=3e-3, batch_size=256,
                             warmup_steps=5, total_steps=240, decay_frac=0.0, dead_tokens=10_000,
                             sparsity_warmup_steps=10, jumprelu_init_l0=24.0, encoder_init_scale="lsq",
                             threshold_lr_scale=5.0, l0_target=6.0, l0_target_rate=0.02)
  end = {}
  for target in (6.0, 0.0):
    for c0 in (1e-3, 3.0):
      st, hist = train_lib.train(dataclasses.replace(tc, l0_target=target), x, seed=1, sparsity_coeffs=[c0],
                                 log_every=40, progress=False)
      end[target, c0] = (hist[-1]["l0"], hist[-1]["sparsity_coeff"], float(st.log_coeff_scale))
  assert end[6.0, 1e-3][0] < 0.5 * end[0.0, 1e-3][0] and end[6.0, 1e-3][1] > 10 * 1e-3, end
  assert end[6.0, 3.0][1] < 3.0 and end[6.0, 3.0][2] < 0, end
  assert end[0.0, 1e-3][2] == 0.0 == end[0.0, 3.0][2] and end[0.0, 3.0][1] == pytest.approx(3.0)


def test_threshold_lr_scale_multiplies_only_the_threshold_step(stores):
  import dataclasses
  x = stores[0][SITES[2]][:256]
  tc = train_lib.TrainConfig(architecture="jumprelu", d_in=x.shape[1], d_sae=64, batch_size=256, warmup_steps=1,
                             total_steps=4, jumprelu_init_l0=8.0, l0_coeff=0.1)
  moved = {}
  for scale in (1.0, 3.0):
    t = dataclasses.replace(tc, threshold_lr_scale=scale)
    opt = train_lib.make_optimizer(t)
    st = train_lib.init_state(jax.random.PRNGKey(0), t, x, opt)
    st, _ = train_lib.site_update(t, opt, st, x, 0.1)  # step 0: the warmup's learning rate is 0
    new, _ = train_lib.site_update(t, opt, st, x, 0.1)
    moved[scale] = {k: np.asarray(new.params[k]) - np.asarray(st.params[k]) for k in st.params}
  assert np.abs(moved[1.0]["threshold"]).max() > 0
  np.testing.assert_allclose(moved[3.0]["threshold"], 3.0 * moved[1.0]["threshold"], rtol=1e-4, atol=1e-7)
  for k in ("W_enc", "b_enc", "b_dec"):
    np.testing.assert_allclose(moved[3.0][k], moved[1.0][k], rtol=1e-5, atol=1e-7)


def test_encoder_init_scale_and_controller_fields_are_checked():
  with pytest.raises(ValueError, match="encoder_init_scale='lstsq'"):
    train_lib.TrainConfig(encoder_init_scale="lstsq")
  with pytest.raises(ValueError, match="l0_target=32.*architecture='topk'"):
    train_lib.TrainConfig(architecture="topk", l0_target=32.0)
  with pytest.raises(ValueError, match="threshold_lr_scale > 0"):
    train_lib.TrainConfig(architecture="jumprelu", threshold_lr_scale=0.0)


def _suite_config(arg):
  spec = importlib.util.spec_from_file_location("train_sae_suite", ROOT / "configs" / "train_sae_suite.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_suite_config():
  c = _suite_config(None)
  assert c.hook_names == tuple(f"blocks.{L}.hook_resid_post" for L in (3, 6, 9, 12, 15, 18, 21, 24))
  assert c.sae.architecture == "jumprelu" and c.sae.d_sae == 4608 and c.export.dtype == "float16"
  assert pipeline.export_name(c, "blocks.9.hook_resid_post") == "smollm2-135m-instruct-res9-post-jumprelu"
  p = _suite_config("pilot")
  assert p.hook_names == ("blocks.3.hook_resid_post", "blocks.12.hook_resid_post") and p.train_tokens < c.train_tokens
  with pytest.raises(ValueError, match="unknown"):
    _suite_config("nope=1")


def test_suite_smoke_run_exports_one_sae_per_site(tmp_path):
  c = _suite_config("smoke")
  result = pipeline.run(c, str(tmp_path / "run"))
  assert sorted(result["sites"]) == sorted(c.hook_names)
  for site, r in result["sites"].items():
    params, cfg = formats.load_sae(r["export"])
    assert cfg.architecture == "jumprelu" and cfg.hook_name == site and params["threshold"].dtype == np.float32
    assert r["heldout"]["explained_variance"] > 0.6 and 0 < r["heldout"]["l0"] < c.sae.d_sae / 3, (site, r["heldout"])
    assert pipeline.evaluate_export(r["export"], str(tmp_path / "run"))["tokens"] == c.heldout_tokens
