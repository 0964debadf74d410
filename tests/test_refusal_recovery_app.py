"""The refusal app's recovery stage: intervals against hand-computed values, the summaries' treatment of
diverged cases, strength choice and jobs, and the app end to end on the tiny variant (recovery,
generation with the recovered delta, attribution, error term dropped, budget sweep, tables, summary rows,
no text by default) with a resumed rerun that recomputes no work unit."""

import json
import os
import re
import shutil
import subprocess
import sys

import ml_collections
import pytest

from recovery_jax.experiments import refusal as app
from recovery_jax.tasks import refusal_stats as stats

pytestmark = pytest.mark.slow  # app runs in subprocesses: not in make test-fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))


def test_wilson_against_hand_computed():
  # z = 1.959963984540054; 23/24: center (p + z^2/48) / (1 + z^2/24) = 0.895094, half 0.097512
  r = stats.rate([True] * 23 + [False])
  assert r["k"] == 23 and r["n"] == 24 and r["rate"] == pytest.approx(23 / 24)
  assert r["wilson"] == pytest.approx([0.797582, 0.992607], abs=1e-5)  # paper: [79.8, 99.3]
  assert stats.rate([True] * 12 + [False] * 12)["wilson"] == pytest.approx([0.314274, 0.685726], abs=1e-5)
  assert stats.rate([False] * 5)["wilson"] == pytest.approx([0.0, 0.434482], abs=1e-5)
  assert stats.rate([])["rate"] is None and stats.rate([])["n"] == 0


def test_bootstrap_against_hand_computed():
  # all equal: every resample mean is 1
  assert stats.rate([True] * 3)["bootstrap"] == [1.0, 1.0]
  # [0, 1]: resample means are 0 (p 1/4), 0.5, 1 (p 1/4): sorted[49] = 0, sorted[1949] = 1
  assert stats.rate([True, False])["bootstrap"] == [0.0, 1.0]
  # one of four: P(mean = 0) = 0.316, P(mean >= 0.75) = 0.051, P(mean = 1) = 0.004 -> [0, 0.75]
  assert stats.rate([True, False, False, False])["bootstrap"] == [0.0, 0.75]
  m = stats.mean_ci([1.0, float("nan"), 3.0])  # non-finite values are dropped
  assert m["mean"] == 2.0 and m["n"] == 2 and 1.0 <= m["lo"] <= m["hi"] <= 3.0


def test_rate_counts_missing_as_failures():
  r = stats.rate([True, True], n=4)  # two diverged cases in the denominator
  assert r["k"] == 2 and r["n"] == 4 and r["rate"] == 0.5
  assert r["bootstrap"] == stats.rate([True, True, False, False])["bootstrap"]
  with pytest.raises(ValueError, match="smaller"):
    stats.rate([True, True], n=1)


def _case(diverged, nonrefusal, drift):
  out = {"diverged": diverged, "drift_rel": drift, "floor_rel": drift / 2, "reactivation": 0.0}
  for k, v in (("nonrefusal", nonrefusal), ("nonrefusal_eff", nonrefusal), ("cooperative", nonrefusal), ("base_like", False), ("strict", False),
               ("rel_delta_norm", 0.1), ("delta_norm", 40.0)):
    out[f"faithful_{k}"] = v
  return out


def test_diverged_cases_not_counted():
  # a diverged case whose (void) labels say recovered: it stays in the denominator, never recovered, no drift
  s = stats.summarize_group([_case(False, True, 0.1), _case(False, False, 0.3), _case(True, True, 99.0)],
                            "faithful")
  assert s["valid"] == 3 and s["diverged"] == 1 and s["recovered"]["k"] == 1 and s["recovered"]["n"] == 3
  assert s["recovered_eff"]["k"] == 1 and s["recovered_eff"]["n"] == 3
  assert s["drift_rel"]["mean"] == pytest.approx(0.2)


def _config(**recovery):
  import refusal as cfg_mod  # configs/refusal.py
  c = cfg_mod.get_config("tiny")
  for k, v in recovery.items():
    c.recovery[k] = v
  return c


def test_choose_strength_and_jobs():
  c = _config()
  rows = [{"value": 4.0, "valid": True, "r_eff_rule": "negative_or_degenerate_opening"}] * 3 + \
         [{"value": 8.0, "valid": True, "r_eff_rule": "substring_refusal"}]
  assert app.choose_strength(c, rows) == 8.0  # real refusals first
  c.recovery.strength = 4.0
  assert app.choose_strength(c, rows) == 4.0
  c.recovery.strength = 5.0
  with pytest.raises(Exception, match="recovery.strength"):
    app.choose_strength(c, rows)
  jobs = app.recovery_jobs(_config())
  names = [app._job_name(j) for j in jobs]  # pylint: disable=protected-access
  # budget 40 equals the main run's budgets: read from the main jacobian run, not recomputed
  assert names == ["main:none", "main:encoder", "main:jacobian", "error term dropped:jacobian", "budget:jacobian@2",
                   "soft suffix:faithful", "soft suffix:corrected", "K:jacobian@K=2"]
  assert [j["attribution"] for j in jobs] == [False, False, True, False, False, False, False, False]
  c = _config()
  c.recovery.ks = (3, 6)  # K = features.k (6) is the main jacobian run: read from it, not recomputed
  assert [app._job_name(j) for j in app.recovery_jobs(c)][-1:] == ["K:jacobian@K=3"]  # pylint: disable=protected-access
  c.features.list = "1:2,2:3"
  with pytest.raises(Exception, match="recovery.ks"):
    app.validate(c)
  c = _config()
  c.recovery.ks = (9,)  # 4 candidates x 2 sites = 8 ranked pairs
  with pytest.raises(Exception, match="recovery.ks' has 9"):
    app.validate(c)
  c = _config()
  c.recovery.budget_scale = "percent"
  with pytest.raises(Exception, match="recovery.budget_scale'='percent'"):
    app.validate(c)


def _app(workdir, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  cmd = [sys.executable, "-m", "recovery_jax.main", "--config=configs/refusal.py:tiny", f"--workdir={workdir}",
         "--config.recovery.modes=('jacobian',)", "--config.recovery.max_cases=2",
         "--config.soft_suffix.variants=('corrected',)", *flags]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  if proc.returncode != 0:
    raise AssertionError(f"app failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  wd = tmp_path_factory.mktemp("refusal") / "run"
  return wd, _app(wd)


def test_app_recovery_end_to_end(run_dir):
  wd, proc = run_dir
  for name in ("recovery.json", "recovery.jsonl", "recovery.md", "summary.md", "summary.jsonl",
               "recovery_vs_budget.png", "recovery_vs_k.png", "recovery_vs_drift.png"):
    assert (wd / name).exists(), name
  rec = json.load(open(wd / "recovery.json"))
  assert [app._job_name(j) for j in rec["jobs"]] == ["main:jacobian", "error term dropped:jacobian",  # pylint: disable=protected-access
                                                     "budget:jacobian@2", "soft suffix:corrected", "K:jacobian@K=2"]
  rows = [json.loads(l) for l in open(wd / "recovery.jsonl")]
  main = [r for r in rows if r["run"] == "main"]
  assert len(main) == 2 and all(r["mode"] == "jacobian" for r in main)
  assert not any("text" in k for r in rows for k in r)  # save_text is off
  for r in main:
    assert isinstance(r["faithful_nonrefusal"], bool) and isinstance(r["honest_base_like"], bool)
    assert isinstance(r["honest_nonrefusal_eff"], bool) and "attr_residual_nonrefusal_eff" in r
    assert r["faithful_delta_norm"] <= r["honest_delta_norm"] + 1e-6  # honest adds stage 2's delta
    assert 1 <= r["faithful_tokens"] <= 8 and "attr_residual_nonrefusal" in r and "attr_clamped_energy" in r
  summ = [json.loads(l) for l in open(wd / "summary.jsonl")]
  assert {(s["run"], s["variant"]) for s in summ} >= {("main", "faithful"), ("main", "honest")}
  s = next(x for x in summ if x["run"] == "main" and x["variant"] == "faithful")
  assert s["n_valid"] == 2 and s["n_recovered"] == sum(r["faithful_nonrefusal"] for r in main)
  assert len(s["ci"]) == 2 and s["ci"][0] <= (s["rate"] or 0) <= s["ci"][1]
  assert len(rec["attribution"]) == len(app.ATTR_COMPONENTS)
  soft = [r for r in rows if r["run"] == "soft suffix"]
  assert len(soft) == 2 and all(0 <= r["soft_delta_norm"] <= 40.0 + 1e-3 for r in soft)
  assert ("soft suffix (OABD)", "corrected") in {(s["run"], s["variant"]) for s in summ}
  assert sorted({b["budget"] for b in rec["budget"]}) == [2.0, 40.0]
  k_rows = [r for r in rows if r["run"] == "K"]  # top-2 features: its own preflight, its own valid cases
  assert all(r["k"] == 2 and r["mode"] == "jacobian" for r in k_rows) and len(k_rows) == 2
  # the main run is the K = features.k (6) point, its preflight the run's own
  assert [(k["k"], k["variant"]) for k in rec["k"]] == [(2, "faithful"), (6, "faithful"), (2, "honest"), (6, "honest")]
  assert rec["k"][1]["preflight_valid"] == rec["n_valid"]
  assert rec["k"][0]["recovered"]["n"] == len(k_rows) and isinstance(rec["k"][0]["preflight_valid"], int)
  md = (wd / "summary.md").read_text()
  assert "Refusal steering preflight" in md and "Recovery-path attribution" in md and "Budget sweep" in md
  assert "Feature-set size sweep" in md
  assert "| main" in proc.stdout


def test_app_resume_recomputes_nothing(run_dir):
  wd, _ = run_dir
  before = (wd / "recovery.jsonl").read_text()
  proc = _app(wd)
  assert "resuming: 5 of 5 work units already finished" in proc.stdout
  assert "finished:" not in proc.stdout  # no "work unit i/3 finished: ..." line
  assert (wd / "recovery.jsonl").read_text() == before


def test_render_finished_reads_the_run_strength(run_dir, tmp_path):
  """The partial render of finished units names the strength and valid count the run recovered at
  (``choose_strength`` of the run's config), not the first preflight row's."""
  wd, _ = run_dir
  head = lambda md: re.search(r"defence .*? prompts", md).group(0)
  assert head(app.render_finished(str(wd))) == head((wd / "recovery.md").read_text())
  cp = tmp_path / "copy"  # the same run with recovery.strength naming a strength other than the first row's
  shutil.copytree(wd, cp)
  cfg = json.loads((cp / "config.json").read_text())
  pre = [json.loads(l) for l in (cp / "preflight.jsonl").read_text().splitlines() if l.strip()]
  other = next(float(v) for v in cfg["defence"]["strengths"] if float(v) != pre[0]["value"])
  cfg["recovery"]["strength"] = other
  (cp / "config.json").write_text(json.dumps(cfg))
  n = sum(r["valid"] for r in pre if r["value"] == other)
  assert f"v = {other:g} (error term keep); {n} strict-valid" in head(app.render_finished(str(cp)))


def test_diverging_recovery_flagged_and_not_counted():
  """A recovery whose optimisation diverges (lr = inf: a non-finite delta) is flagged in every row,
  never counted as recovered, and its drifts are left out of the means."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from recovery_jax.experiments import setup as setup_lib  # pylint: disable=import-outside-toplevel
  from recovery_jax.tasks import refusal as task  # pylint: disable=import-outside-toplevel
  from recovery_jax.tasks import refusal_recovery as rec_lib  # pylint: disable=import-outside-toplevel
  c = _config(modes=("none",), variants=("faithful",), n_ans=2)
  c.recovery.stage1.lr, c.recovery.stage1.steps, c.recovery.stage2.steps = float("inf"), 1, 1
  params, mcfg, tok = setup_lib.load_model(c.model, seed=0)
  sites = tuple(c.sites)
  saes = {s: setup_lib.load_sae("random", mcfg, s) for s in sites}
  feats = {sites[0]: [1, 2], sites[1]: [3]}
  prompts = [task.format_prompt("chatml", t) for t in ("Name a fruit.", "Plan a picnic.")]
  ctx = app.RecoveryContext(config=c, params=params, mcfg=mcfg, tok=tok, sites=sites, saes=saes, feats=feats,
                            value=4.0, prompts=prompts, base_texts=["Apples are good.", "Bring a blanket."],
                            base_ids=[[30, 31, 32], [40, 41]], valid=np.asarray([True, True]), stop_ids=(2,),
                            pad_id=0, discouraged=rec_lib.discouraged_ids(tok))
  job = {"run": "main", "mode": "none", "error_term": "keep", "budget": None, "attribution": False}
  res = app.compute_job(ctx, job)
  assert res["diverged"].tolist() == [1, 1]
  rows = app.case_rows(ctx, 0, job, res, ["a", "b"])
  assert all(r["diverged"] for r in rows)
  s = stats.summarize_group(rows, "faithful")
  assert s["valid"] == 2 and s["diverged"] == 2 and s["recovered"]["k"] == 0 and s["drift_rel"]["mean"] is None


def test_curve_tiles_equal_per_rho_runs_and_bisect_the_first_recovering_interval(monkeypatch):
  """A budget-curve unit (every case at every rho in one call) equals one recovery per rho, each row's
  relative delta norm is within its rho, and each case's minimum rho is the grid's first recovering rho
  refined by bisection: checked by replaying the bisection's midpoints one recovery at a time."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from recovery_jax.experiments import setup as setup_lib  # pylint: disable=import-outside-toplevel
  from recovery_jax.experiments.refusal import curve as curve_lib  # pylint: disable=import-outside-toplevel
  from recovery_jax.experiments.refusal import jobs as jobs_lib  # pylint: disable=import-outside-toplevel
  from recovery_jax.tasks import refusal as task  # pylint: disable=import-outside-toplevel
  from recovery_jax.tasks import refusal_recovery as rec_lib  # pylint: disable=import-outside-toplevel
  c = _config(modes=("none",), variants=("faithful",), n_ans=2)
  c.recovery.stage1.steps, c.recovery.stage2.steps = 3, 2
  c.recovery.stage1.lr = c.recovery.stage2.lr = 1.0  # large steps: the budget binds at the small rho
  c.recovery.curve.rhos, c.recovery.curve.bisect_steps = (0.5, 0.02), 2  # unsorted on purpose
  params, mcfg, tok = setup_lib.load_model(c.model, seed=0)
  sites = tuple(c.sites)
  saes = {s: setup_lib.load_sae("random", mcfg, s) for s in sites}
  prompts = [task.format_prompt("chatml", t) for t in ("Name a fruit.", "Plan a picnic.")]
  ctx = app.RecoveryContext(config=c, params=params, mcfg=mcfg, tok=tok, sites=sites, saes=saes,
                            feats={sites[0]: [1, 2], sites[1]: [3]}, value=4.0, prompts=prompts,
                            base_texts=["Apples are good.", "Bring a blanket."], base_ids=[[30, 31, 32], [40, 41]],
                            valid=np.asarray([True, True]), stop_ids=(2,), pad_id=0,
                            discouraged=rec_lib.discouraged_ids(tok))
  job = {"run": "curve", "mode": "none", "error_term": "keep", "budget": None, "attribution": False,
         "threat": "upstream"}
  real = jobs_lib._recover_cases  # pylint: disable=protected-access

  def labelled(*args, **kw):  # a random model's texts never refuse: "recovered" = the delta used > 0.3 of the state
    out = real(*args, **kw)
    return dict(out, faithful_nonrefusal=(out["faithful_rel_delta_norm"] > 0.3).astype(np.int8))

  monkeypatch.setattr(curve_lib, "_recover_cases", labelled)
  res = curve_lib.compute_curve(ctx, job)
  grid, idx, key = np.asarray([0.02, 0.5]), np.asarray([0, 1]), "faithful_nonrefusal"
  assert res["rho"].tolist() == [0.02, 0.02, 0.5, 0.5] and res["case"].tolist() == [0, 1, 0, 1]
  defence = ctx.defence_for(job)
  v4 = jobs_lib.v4_config(c, "none", budget_scale="relative")
  one = lambda i, rho: labelled(ctx, job, defence, v4, i, np.full(len(i), rho))
  for g, rho in enumerate(grid):
    alone = one(idx, rho)
    for k in ("faithful_delta_norm", "faithful_rel_delta_norm", "drift_rel", "objective1", "objective2", key):
      np.testing.assert_allclose(res[k][2 * g:2 * g + 2], alone[k], rtol=1e-5, atol=1e-6, err_msg=f"{k} at rho={rho}")
    assert np.all(alone["faithful_rel_delta_norm"] <= rho * (1 + 1e-4))
  assert res["faithful_rel_delta_norm"][0] == pytest.approx(0.02, rel=1e-3)  # the small budget binds
  rec = (res[key].astype(bool) & ~res["diverged"].astype(bool)).reshape(2, 2)
  seen = set()
  for n in range(2):  # the bisection replayed one case and one midpoint at a time
    first = np.flatnonzero(rec[:, n])
    if not len(first):
      assert np.isinf(res["min_rho"][n])
      continue
    lo, hi = (0.0 if first[0] == 0 else grid[first[0] - 1]), grid[first[0]]
    for _ in range(2):
      mid = (lo + hi) / 2
      part = one(idx[n:n + 1], mid)
      good = bool(part[key][0]) and not part["diverged"][0]
      seen.add(good)
      lo, hi = (lo, mid) if good else (mid, hi)
    assert res["min_rho"][n] == pytest.approx(hi) and res["min_lo"][n] == pytest.approx(lo)
  assert seen == {True, False}, "the bisection took one branch only: unchecked"
