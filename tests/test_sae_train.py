"""SAE trainer: harvesting (BOS, exclusions, shuffle), training per architecture, resume, the app."""

import importlib.util
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from recovery_jax.data import corpus as corpus_lib
from recovery_jax.sae import formats, harvest, metrics, pipeline, testing, train as train_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config_module():
  spec = importlib.util.spec_from_file_location("train_sae_config", ROOT / "configs" / "train_sae.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def tiny():
  params, cfg = testing.tiny_model(0)
  return params, cfg, testing.byte_tokenizer()


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
  d = tmp_path_factory.mktemp("corpus")
  for rel, text in corpus_lib.stdlib_docstrings(25):
    (d / (rel.replace("/", "__") + ".txt")).write_text(text)
  return d


@pytest.fixture(scope="module")
def store(tiny, docs, tmp_path_factory):
  params, cfg, tok = tiny
  windows = harvest.token_windows(corpus_lib.iter_documents(corpus_lib.list_text_files(str(docs))), tok, 64,
                                  bos_id=cfg.bos_token_id, sep_id=cfg.eos_token_ids[0], pad_id=cfg.pad_token_id)
  out = tmp_path_factory.mktemp("store")
  return np.asarray(harvest.harvest_to_store(params, cfg, "blocks.1.hook_resid_pre", windows, str(out), 8_000,
                                             forward_batch=16, exclude=harvest.excluded_ids(cfg), progress=False))


def test_token_windows_bos_separators_and_kept_positions(tiny):
  _, cfg, tok = tiny
  docs = ["abc", "defgh", "ij"]
  ws = list(harvest.token_windows(docs, tok, 6, bos_id=cfg.bos_token_id, sep_id=cfg.eos_token_ids[0],
                                  pad_id=cfg.pad_token_id))
  assert all(w[0] == testing.BOS for w in ws) and all(len(w) == 6 for w in ws)
  body = np.concatenate([w[1:] for w in ws])
  assert tok.decode([int(t) for t in body if t < 256]) == "abcdefghij"
  keep = harvest.keep_mask(np.stack(ws), harvest.excluded_ids(cfg))
  assert not keep[:, 0].any()
  assert not keep[np.stack(ws) == testing.EOS].any()
  assert keep.sum() == len("abcdefghij")
  # without BOS the first position is still dropped
  ws2 = list(harvest.token_windows(docs, tok, 6, bos_id=None, sep_id=None))
  assert ws2[0][0] == tok.encode("a").ids[0]
  assert not harvest.keep_mask(np.stack(ws2), ())[:, 0].any()
  assert harvest.wants_bos(cfg) and not harvest.wants_bos(cfg.replace(bos_token_id=None))
  # with BOS, the first text position is dropped as well (massive activations there in SmolLM2)
  assert harvest.n_skip_for(True) == 2 and harvest.n_skip_for(False) == 1
  keep2 = harvest.keep_mask(np.stack(ws), harvest.excluded_ids(cfg), n_skip=2)
  assert not keep2[:, :2].any() and keep2.sum() == keep.sum() - keep[:, 1].sum()


def test_drop_outliers():
  r = np.random.default_rng(0)
  acts = r.normal(size=(50, 8)).astype(np.float32)
  acts[7] *= 1000  # an attention-sink-like row
  kept = harvest.drop_outliers(acts, 10.0)
  assert len(kept) == 49 and np.abs(kept).max() < 100
  assert len(harvest.drop_outliers(acts, 0.0)) == 50


def test_shuffle_buffer_emits_every_row_once():
  sb = harvest.ShuffleBuffer(64, seed=0)
  rows = np.arange(300, dtype=np.float32)[:, None]
  out = [o for i in range(0, 300, 25) if (o := sb.add(rows[i:i + 25])) is not None]
  out.append(sb.drain())
  got = np.concatenate(out)[:, 0]
  assert sorted(got.tolist()) == list(range(300))
  assert not np.array_equal(got, np.arange(300))


def test_stream_activations_matches_store_rows(tiny, docs):
  params, cfg, tok = tiny
  mk = lambda: harvest.token_windows(corpus_lib.iter_documents(corpus_lib.list_text_files(str(docs))), tok, 64,
                                     bos_id=cfg.bos_token_id, sep_id=None)
  batches = harvest.stream_activations(params, cfg, "blocks.1.hook_resid_pre", (w for i, w in enumerate(mk()) if i < 24),
                                       out_batch=100, forward_batch=16, buffer_tokens=256, exclude=harvest.excluded_ids(cfg))
  got = np.concatenate(list(batches))
  assert got.shape[1] == cfg.d_model and len(got) == (24 * 63) // 100 * 100


def test_store_is_resumable_and_shrinkable(tiny, docs, tmp_path):
  params, cfg, tok = tiny
  mk = lambda: harvest.token_windows(corpus_lib.iter_documents(corpus_lib.list_text_files(str(docs))), tok, 64,
                                     bos_id=cfg.bos_token_id, sep_id=cfg.eos_token_ids[0], pad_id=cfg.pad_token_id)
  kw = dict(forward_batch=16, exclude=harvest.excluded_ids(cfg), progress=False, flush_every=1)
  full = np.asarray(harvest.harvest_to_store(params, cfg, "blocks.1.hook_resid_pre", mk(), str(tmp_path / "a"), 1000, **kw))
  # a run that stops early (here: its window stream ends) resumes where it stopped
  part = tmp_path / "b"
  windows = list(mk())
  with pytest.raises(ValueError, match="ran out"):
    harvest.harvest_to_store(params, cfg, "blocks.1.hook_resid_pre", iter(windows[:12]), str(part), 1000, **kw)
  state = json.loads((part / "state.json").read_text())
  assert 0 < state["rows"] < 1000 and state["windows"] == 12
  resumed = np.asarray(harvest.harvest_to_store(params, cfg, "blocks.1.hook_resid_pre", iter(windows), str(part), 1000, **kw))
  np.testing.assert_array_equal(resumed, full)
  assert harvest.harvest_to_store(params, cfg, "blocks.1.hook_resid_pre", iter(()), str(part), 500, **kw).shape[0] == 500


@pytest.mark.parametrize("arch,steps", [("topk", 50), ("standard", 50), ("jumprelu", 50)])
def test_training_raises_explained_variance(store, arch, steps):
  tc = train_lib.TrainConfig(architecture=arch, d_in=store.shape[1], d_sae=192, k=8, lr=5e-3, batch_size=256,
                             warmup_steps=5, total_steps=steps, dead_tokens=4_000, l1_coeff=0.5, l0_coeff=0.05)
  state, hist = train_lib.train(tc, store, seed=0, log_every=10, progress=False)
  evs = [h["explained_variance"] for h in hist]
  assert evs[-1] > evs[0] + 0.2, evs
  assert evs[-1] > 0.6, evs
  params = train_lib.export_params(state, tc)
  if tc.unit_norm_decoder:
    np.testing.assert_allclose(np.linalg.norm(np.asarray(state.params["W_dec"]), axis=-1), 1.0, atol=1e-5)
  m = metrics.evaluate(params, tc.sae_config(), metrics.batched(store[:2048]))
  assert m["explained_variance"] > 0.6 and m["l0"] > 0
  if arch == "topk":
    assert m["l0"] <= tc.k


def test_resume_reproduces_uninterrupted_run(store, tmp_path):
  tc = train_lib.TrainConfig(architecture="topk", d_in=store.shape[1], d_sae=64, k=4, lr=3e-3, batch_size=128,
                             warmup_steps=2, total_steps=12, dead_tokens=500)
  full, _ = train_lib.train(tc, store, seed=1, progress=False)
  ck = str(tmp_path / "ckpt")
  part, _ = train_lib.train(tc, store, seed=1, ckpt_dir=ck, ckpt_every=4, stop_after=7, progress=False)
  assert int(part.step) == 7
  resumed, _ = train_lib.train(tc, store, seed=1, ckpt_dir=ck, ckpt_every=4, progress=False)
  assert int(resumed.step) == 12
  for k in full.params:
    np.testing.assert_allclose(np.asarray(resumed.params[k]), np.asarray(full.params[k]), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(resumed.since_fired), np.asarray(full.since_fired))


def test_smoke_app_killed_then_resumed(tmp_path):
  cfg = _config_module().get_config("smoke")
  with cfg.unlocked():  # smaller than the smoke variant: keep the test fast
    cfg.train_tokens, cfg.heldout_tokens, cfg.total_steps, cfg.ckpt_every, cfg.log_every = 8_000, 1_500, 80, 20, 10
    cfg.stdlib_max_files = 25
    cfg.corpus = "stdlib=1"
  wd = str(tmp_path / "run")
  early = pipeline.run(cfg, wd, stop_after=30)
  assert early["stopped_at"] == 30
  result = pipeline.run(cfg, wd)  # picks up stores and the orbax checkpoint
  assert result["total_steps"] == cfg.total_steps
  ev = result["heldout"]["explained_variance"]
  hist = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  assert hist[-1]["explained_variance"] > hist[0]["explained_variance"] + 0.2
  assert ev > 0.6 and result["heldout"]["l0"] <= cfg.sae.k
  params, sae_cfg = formats.load_sae(result["export"])
  assert sae_cfg.hook_name == cfg.hook_name and sae_cfg.model_name == "tiny-random-llama" and sae_cfg.k == cfg.sae.k


def test_config_variants():
  mod = _config_module()
  c = mod.get_config("layer=5,k=48,arch=jumprelu,tokens=1000")
  assert c.hook_name == "blocks.5.hook_resid_pre" and c.sae.k == 48 and c.sae.architecture == "jumprelu"
  assert c.train_tokens == 1000
  with pytest.raises(ValueError, match="unknown argument"):
    mod.get_config("nope=1")


def test_corpus_parsers():
  assert corpus_lib.fortunes_to_text("one\n%\ntwo lines\nhere\n%\n") == ["one", "two lines\nhere"]
  line = "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived to have its own existence"
  assert corpus_lib.wordnet_glosses("  1 licence header\n" + line) == [
      "entity: that which is perceived to have its own existence"]
  assert "versionadded" not in corpus_lib.rest_to_text("Title\n=====\n\n.. versionadded:: 3.2\n\nBody text.\n")
  docs = ["alpha " * 10, "beta " * 10, "gamma " * 10, "delta " * 10] * 5
  held = list(corpus_lib.split_documents(docs, "heldout", 0.5))
  train = list(corpus_lib.split_documents(docs, "train", 0.5))
  assert len(held) + len(train) == len(docs) and not set(held) & set(train)


def _identity_sae(d):
  """A standard SAE with W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x, a perfect fit."""
  eye = np.eye(d, dtype=np.float32)
  params = {"W_enc": np.concatenate([eye, -eye], 1), "W_dec": np.concatenate([eye, -eye], 0),
            "b_enc": np.zeros(2 * d, np.float32), "b_dec": np.zeros(d, np.float32)}
  return params, formats.SAEConfig("standard", d, 2 * d, apply_b_dec_to_input=False,
                                   hook_name="blocks.1.hook_resid_pre", model_name="tiny-random-llama")


def test_quick_check_warns_on_a_bad_fit_and_passes_a_good_one(tiny, tmp_path):
  from recovery_jax.sae import validate
  params, cfg, tok = tiny
  good, good_cfg = _identity_sae(cfg.d_model)
  rep = validate.quick_check(good, good_cfg, params, cfg, tok)
  assert rep["ok"] and rep["explained_variance"] > 0.999 and rep["tokens"] > 300
  r = np.random.default_rng(0)
  bad = {"W_enc": r.normal(size=(cfg.d_model, 128)).astype(np.float32), "W_dec": r.normal(size=(128, cfg.d_model)).astype(np.float32),
         "b_enc": np.zeros(128, np.float32), "b_dec": np.zeros(cfg.d_model, np.float32)}
  bad_cfg = formats.SAEConfig("standard", cfg.d_model, 128, hook_name="blocks.1.hook_resid_pre", source="bad/sae")
  with pytest.warns(validate.SAEFitWarning, match=r"bad/sae at blocks.1.hook_resid_pre does not fit.*explained variance"):
    rep = validate.quick_check(bad, bad_cfg, params, cfg, tok)
  assert not rep["ok"]
  # load + compatibility + check in one call
  formats.save_saelens(good, good_cfg, tmp_path / "good")
  p2, c2, rep2 = validate.load_and_check(str(tmp_path / "good"), params, cfg, tok)
  assert rep2["ok"] and c2.source.endswith("good")


def test_jumprelu_freeze_holds_thresholds_then_releases_them(store):
  # jumprelu_init_l0 starts every latent at one threshold: frozen, they stay one value; released, they split
  kw = dict(architecture="jumprelu", d_in=store.shape[1], d_sae=64, lr=5e-3, batch_size=128, warmup_steps=1,
            dead_tokens=4_000, l0_coeff=0.05, jumprelu_init_l0=8.0, jumprelu_freeze_steps=5)
  held, _ = train_lib.train(train_lib.TrainConfig(total_steps=5, **kw), store, seed=0, progress=False)
  th = np.asarray(held.params["threshold"])
  assert th.min() == th.max() > 0, th
  moved, _ = train_lib.train(train_lib.TrainConfig(total_steps=8, **kw), store, seed=0, progress=False)
  assert np.ptp(np.asarray(moved.params["threshold"])) > 0
