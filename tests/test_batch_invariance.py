"""Batch size, device count and resume change no number: each setting's tiny variant run at batch
size 1, at its default batch and on 8 fake CPU devices gives the same per-example rows (JSONL,
field by field to float tolerance), and a run killed after its first work unit resumes to the same
rows. Keys are ``fold_in(point_key, example_id)`` (``batching.example_keys``), never a function of a
position in a batch."""

import re

import jax
import numpy as np
import pytest

from recovery_jax import batching, intervene, report
from recovery_jax.intervene import ClampSpec
from recovery_jax.models.random_init import random_tokens
from recovery_jax.recovery import api, engine
from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import RecoveryConfig
from recovery_jax.sae.testing import random_sae
from tests import batch_invariance as bi
from tests.test_tpp_app import CLASSES as TPP_CLASSES, _data as _tpp_data


def _rerendered_equal(workdir, name, drop=None):
  """``report.render`` of a finished run rewrites ``name`` as the run wrote it (``drop``: a regex of
  what may differ, e.g. a wall time)."""
  before = (workdir / name).read_text()
  (workdir / name).unlink()
  report.render(str(workdir), plots=False)
  after = (workdir / name).read_text()
  if drop:
    before, after = re.sub(drop, "", before), re.sub(drop, "", after)
  assert after == before


def test_map_batched_pads_drops_and_passes_ids():
  x = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
  seen = []

  def fn(batch, ids):
    seen.append((batch.shape[0], ids.tolist()))
    return {"y": batch * 2, "id": ids}

  out = batching.map_batched(fn, x, 3)
  np.testing.assert_array_equal(out["y"], x * 2)
  np.testing.assert_array_equal(out["id"], np.arange(7))
  assert seen == [(3, [0, 1, 2]), (3, [3, 4, 5]), (3, [6, 6, 6])]
  assert batching.batch_size_for(5, 8) == 5 and batching.batch_size_for(5, 8, exact=True) == 8


def test_engine_keys_follow_example_ids_not_positions(tiny_gpt2):
  """jacobian (sketched, random) projection: a permuted stack with its ids permuted gives the
  permuted results exactly; with positions as ids it would not (checked, so the test can fail)."""
  params, cfg = tiny_gpt2
  site, n, t = "blocks.1.hook_resid_pre", 4, 8
  sae, scfg = random_sae(cfg.d_model, 40, seed=3, site=site)
  pbs = api.site_problems(random_tokens(5, n, t), np.ones((n, t), bool), 5, 7,
                          {"pos": np.array([3, 8, 21, 5]), "neg": np.array([40, 2, 17, 9])}, shared=False)
  rc = RecoveryConfig(steps=6, lr=0.1, budget=2.0, projection="jacobian", jacobian_probes=2)
  spec = engine.RecoverySpec(cfg, (site,), Objective("logit_diff"), rc, suffix_len=3)
  clamp = intervene.make_clamp(ClampSpec(site, scfg, mode="set", positive_only=True), sae, [1, 4, 6, 9, 12], -1.0)
  key, perm = jax.random.key(7), np.array([2, 0, 3, 1])
  run = lambda p, ids=None: np.asarray(engine.recover_examples(spec, params, (clamp,), p, rc.hparams(), key,
                                                               ids=ids).delta)
  ref = run(pbs)
  permuted = jax.tree.map(lambda a: a[perm], pbs)
  np.testing.assert_allclose(run(permuted, ids=perm), ref[perm], atol=1e-6)
  assert np.abs(run(permuted) - ref[perm]).max() > 1e-4  # keys by position differ


@pytest.mark.slow
def test_tpp_rows_do_not_depend_on_batch_devices_or_resume(tmp_path):
  data = _tpp_data(tmp_path / "topics.jsonl")
  common = ("--config.task.source=file", f"--config.task.data_file={data}",
            TPP_CLASSES, "--config.recovery.modes=('none', 'encoder')",
            "--config.recovery.variants=('last', 'all')", "--config.recovery.steps=8")
  runs = {"all": ("--config.task.recover_chunk=0",), "one": ("--config.task.recover_chunk=1",)}
  rows = {}
  for name, flags in runs.items():
    bi.run_app("configs/tpp.py:tiny", tmp_path / name, *common, *flags)
    rows[name] = bi.read_rows(tmp_path / name / "results.jsonl")
  bi.run_app("configs/tpp.py:tiny", tmp_path / "mesh8", *common, "--config.task.recover_chunk=5",
             "--config.mesh.data=8", devices=8)
  rows["mesh8"] = bi.read_rows(tmp_path / "mesh8" / "results.jsonl")
  assert sum(r["valid"] for r in rows["all"]) >= 5
  _rerendered_equal(tmp_path / "all", "summary.md")
  _rerendered_equal(tmp_path / "all", "tpp.md")
  for name in ("one", "mesh8"):
    bi.assert_same_rows(rows[name], rows["all"])
  # killed after the first work unit: the resumed run recomputes the rest and gives the same rows
  assert bi.drop_units(tmp_path / "one", keep=1) >= 1
  bi.run_app("configs/tpp.py:tiny", tmp_path / "one", *common, *runs["one"])
  bi.assert_same_rows(bi.read_rows(tmp_path / "one" / "results.jsonl"), rows["all"])


REFUSAL = ("--config.recovery.modes=('encoder',)", "--config.recovery.max_cases=3",
           "--config.recovery.attribution_modes=()", "--config.recovery.drop_modes=()",
           "--config.recovery.budget_mode=encoder", "--config.recovery.budgets=(2.0,)", "--config.recovery.ks=()",
           "--config.soft_suffix.variants=('corrected',)")


@pytest.mark.slow
def test_refusal_rows_do_not_depend_on_batch_devices_or_resume(tmp_path):
  runs = {"default": (), "one": ("--config.generation.batch_size=1", "--config.recovery.batch_size=1")}
  for name, flags in runs.items():
    bi.run_app("configs/refusal.py:tiny", tmp_path / name, *REFUSAL, *flags)
  bi.run_app("configs/refusal.py:tiny", tmp_path / "mesh8", *REFUSAL, "--config.mesh.data=8", devices=8)
  rows = {n: {f: bi.read_rows(tmp_path / n / f) for f in ("preflight.jsonl", "recovery.jsonl")}
          for n in ("default", "one", "mesh8")}
  assert sum(r["valid"] for r in rows["default"]["preflight.jsonl"]) >= 1
  assert len(rows["default"]["recovery.jsonl"]) >= 2
  _rerendered_equal(tmp_path / "default", "recovery.md", drop=r"; (\d+|nan) s\.")
  for name in ("one", "mesh8"):
    for f in ("preflight.jsonl", "recovery.jsonl"):
      bi.assert_same_rows(rows[name][f], rows["default"][f])
  assert bi.drop_units(tmp_path / "one", keep=1) >= 1
  bi.run_app("configs/refusal.py:tiny", tmp_path / "one", *REFUSAL, "--config.generation.batch_size=1",
             "--config.recovery.batch_size=1")
  bi.assert_same_rows(bi.read_rows(tmp_path / "one" / "recovery.jsonl"), rows["default"]["recovery.jsonl"])


@pytest.mark.slow
def test_unlearning_rows_do_not_depend_on_batch_devices_or_resume(tmp_path):
  files = ("results.jsonl", "soft_suffix.jsonl")
  runs = {"default": (), "one": ("--config.eval_batch_size=1", "--config.soft_suffix.batch_size=1",
                                 "--config.features.batch_size=1")}
  for name, flags in runs.items():
    bi.run_app("configs/unlearning.py:tiny", tmp_path / name, *flags)
  bi.run_app("configs/unlearning.py:tiny", tmp_path / "mesh8", devices=8)
  rows = {n: {f: bi.read_rows(tmp_path / n / f) for f in files} for n in ("default", "one", "mesh8")}
  assert sum(r["valid"] for r in rows["default"]["results.jsonl"]) >= 2
  _rerendered_equal(tmp_path / "default", "summary.md")
  for name in ("one", "mesh8"):
    for f in files:
      bi.assert_same_rows(rows[name][f], rows["default"][f])
  assert bi.drop_units(tmp_path / "one", keep=1) >= 1
  bi.run_app("configs/unlearning.py:tiny", tmp_path / "one", *runs["one"])
  for f in files:
    bi.assert_same_rows(bi.read_rows(tmp_path / "one" / f), rows["default"][f])


@pytest.mark.slow
def test_ioi_rows_do_not_depend_on_units_devices_or_a_kill(tmp_path):
  """One unit per grid point vs all in one unit vs 8 devices; the one-unit run is SIGKILLed after its
  first unit and resumed (it says so) to the same rows."""
  grid = ("--config.sweep.clamp_value=(-5.0, -2.0)", "--config.recovery.budget_scale=relative",
          "--config.sweep.budget=(0.1, 0.3)")
  bi.run_app("configs/ioi.py:tiny", tmp_path / "default", *grid)
  bi.run_app("configs/ioi.py:tiny", tmp_path / "mesh8", *grid, "--config.mesh.data=8", devices=8)
  bi.kill_after_units("configs/ioi.py:tiny", tmp_path / "one", *grid, "--config.unit_size=1")
  proc = bi.run_app("configs/ioi.py:tiny", tmp_path / "one", *grid, "--config.unit_size=1")
  assert "resuming" in proc.stdout
  rows = {n: bi.read_rows(tmp_path / n / "results.jsonl") for n in ("default", "one", "mesh8")}
  assert sum(r["valid"] for r in rows["default"]) >= 2
  _rerendered_equal(tmp_path / "default", "summary.md")
  for name in ("one", "mesh8"):
    bi.assert_same_rows(rows[name], rows["default"])
  # relative budgets: each problem's bound is rho ||h_def||, the deltas respect it, and the summary gives
  # the minimum rho per example (min_budget.from_rows; the table is re-rendered identically above)
  bounds = {r["budget_bound"] for r in rows["default"]}
  assert len(bounds) > 1 and all(r["budget_scale"] == "relative" for r in rows["default"])
  assert all(r["delta_norm"] <= r["budget_bound"] * (1 + 1e-4) for r in rows["default"])
  text = (tmp_path / "default" / "summary.md").read_text()
  assert "Budgets are relative" in text and "Minimum relative budget per valid example" in text
