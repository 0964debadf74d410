"""The IOI absl app end to end on a tiny random model: outputs, attribution, cards, divergence, the
bottleneck defence, report re-rendering, bad configs (sharding and a killed run: test_batch_invariance)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow  # app subprocesses (make test, not make test-fast)


def _env(devices: int = 1, cache: str | None = None) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  if cache:
    env["JAX_COMPILATION_CACHE_DIR"] = cache
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env


def _app(workdir, config="configs/ioi.py:tiny", *flags, devices=1, cache=None, check=True, timeout=900, cwd=ROOT):
  cmd = [sys.executable, "-m", "recovery_jax.main", f"--config={config}", f"--workdir={workdir}", *flags]
  proc = subprocess.run(cmd, cwd=cwd, env=_env(devices, cache), capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"app failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def test_app_runs_and_writes_outputs(tmp_path, cache_dir):
  wd = tmp_path / "run"
  proc = _app(wd, "configs/ioi.py:tiny", "--config.plots=True", "--config.recovery.variants=('per_prompt',)",
              "--config.cards=2", cache=cache_dir)
  for name in ("config.json", "results.jsonl", "summary.md", "summary.jsonl", "recovery_vs_drift.png",
               "objective_curves.png"):
    assert (wd / name).exists(), name
  summary = [json.loads(l) for l in open(wd / "summary.jsonl")]
  assert {s["mode"] for s in summary} == {"none", "encoder"}
  assert all(s["n_valid"] > 0 for s in summary)
  per_prompt = [s for s in summary if s["variant"] == "per_prompt"]
  assert len(per_prompt) == 2 and all("attribution" in s for s in per_prompt)
  for s in per_prompt:  # replaying the full delta recovers exactly what the recovery did
    assert s["attribution"]["full"]["recovered"] == s["n_recovered"]
    assert abs(s["attribution"]["full"]["energy"] - 1.0) < 1e-5
  assert "Recovery-path attribution" in (wd / "summary.md").read_text()
  rows = [json.loads(l) for l in open(wd / "results.jsonl")]
  assert len(rows) == 2 * 16
  assert all(r["delta_norm"] <= 20.0 + 1e-3 for r in rows)
  assert "| none" in proc.stdout and "| encoder" in proc.stdout
  # feature cards of the top clamped features, written and linked from the summary
  cards = json.loads((wd / "cards" / "cards.json").read_text())
  assert len(cards) == 2 and all(c["site"] == "blocks.2.hook_resid_pre" and c["n_tokens"] > 0 for c in cards)
  assert "[cards/cards.md](cards/cards.md)" in (wd / "summary.md").read_text()
  assert (wd / "cards" / "cards.html").read_text().lstrip().lower().startswith("<!doctype html")
  _check_watch_and_reproduce(wd, proc.stdout)


def _check_watch_and_reproduce(wd, stdout):
  """TensorBoard events (read back by TensorBoard's reader), manifest.json and the per-phase profile
  of a finished run (recovery_jax.telemetry / manifest / profile)."""
  from tests.test_telemetry import read_events  # pylint: disable=import-outside-toplevel
  units = read_events(wd / "tensorboard" / "units")  # two work units: (none, encoder) x per_prompt
  assert {t: len(v) for t, v in units.items() if t in ("unit/recovered_fraction", "unit/n_rows")} == {
      "unit/recovered_fraction": 2, "unit/n_rows": 2}
  assert [v for _, v in units["unit/n_rows"]] == [16.0, 16.0]
  curves = sorted(p.name for p in (wd / "tensorboard").iterdir() if p.name != "units")
  assert curves == ["p0000 none (per_prompt)", "p0001 encoder (per_prompt)"]
  for c in curves:
    ev = read_events(wd / "tensorboard" / c)
    assert sorted(ev) == ["curve/delta_norm", "curve/drift_l2", "curve/objective"]
    assert all(len(v) == 20 for v in ev.values())  # recovery.steps of the tiny config
  m = json.loads((wd / "manifest.json").read_text())
  assert [(f["kind"], f["value"]) for f in m["files"]] == [("model", "tiny-random-llama"), ("sae", "random")]
  assert m["seeds"]["seed"] == 0 and m["config"]["experiment"] == "ioi" and m["versions"]["jax"]
  prof = json.loads((wd / "profile.json").read_text())
  assert {"load", "compile", "preflight", "recovery", "evaluation", "report"} <= set(prof["phases"])
  assert sum(p["fraction"] for p in prof["phases"].values()) == pytest.approx(1.0, abs=0.01)
  assert prof["compilations"]["programs"] > 0
  summary = (wd / "summary.md").read_text()
  last = [c.strip() for c in summary.rstrip().splitlines()[-1].strip("|").split("|")]  # the table ends summary.md
  other = prof["phases"]["other"]
  assert summary.count("## Where the time went") == 1
  assert last == ["other", f"{other['seconds']:.1f}", f"{100 * other['fraction']:.1f}%"]
  assert "## Where the time went" in stdout and "| compile" in stdout


def test_diverging_optimisation_is_flagged_not_reported(tmp_path, cache_dir):
  """lr=1e38 overflows the update norm: every example is flagged 'diverged', none counts as
  recovered, and the run says so (before: 'not recovered, delta norm 0' with no word)."""
  wd = tmp_path / "div"
  proc = _app(wd, "configs/ioi.py:tiny", "--config.recovery.lr=1e38", "--config.recovery.steps=3",
              "--config.recovery.modes=('none',)", "--config.tensorboard=False", cache=cache_dir)
  rows = [json.loads(l) for l in open(wd / "results.jsonl")]
  assert rows and all(r["diverged"] and not r["recovered"] for r in rows)
  summary = [json.loads(l) for l in open(wd / "summary.jsonl")]
  assert summary[0]["n_diverged"] == len(rows) and summary[0]["n_recovered"] == 0
  assert "diverged" in proc.stdout and "diverged" in (wd / "summary.md").read_text()
  assert not (wd / "tensorboard").exists() and (wd / "manifest.json").exists()  # config field tensorboard=False


def test_bottleneck_defence_upstream_delta_and_report_rerender(tmp_path, cache_dir):
  """error_term=drop with delta on the residual entering the clamp runs end to end, and the report
  command re-renders the same summary from the finished workdir without recomputing."""
  wd = tmp_path / "drop"
  _app(wd, "configs/ioi.py:tiny", "--config.clamp.error_term=drop", "--config.delta_sites=('blocks.1.hook_resid_post',)",
       "--config.recovery.steps=5", "--config.recovery.variants=('per_prompt',)", "--config.plots=False",
       cache=cache_dir)
  text = (wd / "summary.md").read_text()
  assert "error term drop" in text and "delta at blocks.1.hook_resid_post" in text
  summary = [json.loads(l) for l in open(wd / "summary.jsonl")]
  assert "attribution" in summary[0]  # the upstream delta decomposes with the clamp's SAE
  (wd / "summary.md").unlink()
  proc = subprocess.run([sys.executable, "-m", "recovery_jax.report", f"--workdir={wd}", "--no_plots"], cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (wd / "summary.md").read_text() == text
  bad = subprocess.run([sys.executable, "-m", "recovery_jax.report", f"--workdir={tmp_path / 'nothing'}"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "not a finished run" in bad.stderr


@pytest.mark.parametrize("flags, message", [
    (["--config.site=blocks.9.hook_resid_pre"], "site"),
    (["--config.site=blocks.1.hook_nonsense"], "site"),
    (["--config.sweep.n_features=(100000,)"], "d_sae"),
    (["--config.model=/nonexistent/model.gguf"], "model"),
    (["--config.sae=/nonexistent/sae"], "sae"),
    (["--config.recovery.modes=('sideways',)"], "recovery.modes"),
    (["--config.clamp.error_term=sometimes"], "clamp.error_term"),
    (["--config.recovery.budget_scale=percent"], "recovery.budget_scale"),
    (["--config.delta_sites=('blocks.7.hook_resid_post',)"], "delta_sites"),
    (["--config.sweep.clamp_value=(1.0,)", "--config.clamp.mode=multiply"], "no valid flips"),
])
def test_bad_config_values_end_with_a_clear_message(tmp_path, flags, message, cache_dir):
  proc = _app(tmp_path / "bad", "configs/ioi.py:tiny", *flags, check=False, cache=cache_dir)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error:" in proc.stderr and message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_default_config_on_real_smollm2_with_shipped_sae(tmp_path, cache_dir):
  """The full IOI run (docs/settings/ioi.md), shortened: real SmolLM2-135M-Instruct + the shipped SAE, started from
  another working directory (the config and the shipped SAE resolve from anywhere)."""
  wd = tmp_path / "default"
  _app(wd, os.path.join(ROOT, "configs/ioi.py:n_prompts=32,steps=4"),
       "--config.recovery.variants=('shared',)", "--config.recovery.modes=('none', 'encoder')",
       "--config.plots=False", "--config.cards=0", cache=cache_dir, cwd=tmp_path)
  summary = [json.loads(l) for l in open(wd / "summary.jsonl")]
  assert {s["mode"] for s in summary} == {"none", "encoder"}
  assert all(s["n_valid"] >= 5 for s in summary), summary
