"""The TPP absl app end to end on a tiny random model with a SAEBench-format file; summaries against
the rows; bad data files and configs end with a clear message."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from recovery_jax import metrics
from recovery_jax.experiments import tpp as tpp_app

pytestmark = pytest.mark.slow  # app subprocesses (make test, not make test-fast)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = {"garden": "rose tulip soil seed water leaf bloom petal root sun",
         "kitchen": "bread butter oven flour sugar salt pan spoon bake dough",
         "harbor": "boat ship sail anchor wave tide dock rope mast harbor"}
CLASSES = "--config.task.classes=('garden', 'kitchen', 'harbor')"


def _data(path):
  rng = random.Random(0)
  rows = [{"text": " ".join(rng.choice(ws.split()) for _ in range(24)) + ".", "label": lab}
          for lab, ws in WORDS.items() for _ in range(40)]
  rng.shuffle(rows)
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return str(path)


def _app(workdir, *flags, check=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  cmd = [sys.executable, "-m", "recovery_jax.main", "--config=configs/tpp.py:tiny", f"--workdir={workdir}", *flags]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  if check and proc.returncode != 0:
    raise AssertionError(f"app failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


def test_app_end_to_end_on_a_saebench_format_file(tmp_path):
  wd = tmp_path / "run"
  data = _data(tmp_path / "topics.jsonl")
  proc = _app(wd, "--config.task.source=file", f"--config.task.data_file={data}", CLASSES,
              "--config.recovery.variants=('last', 'all')")
  for name in ("results.jsonl", "summary.md", "tpp.md", "tpp.json", "tpp_metric.json"):
    assert (wd / name).exists(), name
  info = json.loads((wd / "tpp.json").read_text())
  assert info["classes"] == ["garden", "kitchen", "harbor"] and min(info["probe_acc_test"]) > 0.7
  assert [r["n"] for r in info["tpp"]] == [2, 10, 50]
  rows = [json.loads(l) for l in open(wd / "results.jsonl")]
  assert len(rows) == 2 * 2 * 3 * 8  # modes x scopes x positives of 3 targets
  assert sum(r["valid"] for r in rows) >= 10
  assert all(r["delta_norm"] <= 20.0 + 1e-3 for r in rows)
  # the summaries against the rows, recomputed here
  for p in info["points"]:
    rs = [r for r in rows if r["mode"] == p["mode"] and r["variant"] == p["variant"]]
    per_target = []
    for cls in WORDS:
      v = [r for r in rs if r["target"] == cls and r["valid"]]
      t = p["targets"][f"topics/{cls}"]
      assert t["n_valid"] == len(v) and t["n_recovered"] == sum(r["recovered"] for r in v)
      if v:
        per_target.append(np.mean([r["recovered"] for r in v]))
        assert t["zero_react"] == pytest.approx(np.mean([r["recovered"] and r["n_reactivated"] == 0 for r in v]))
    v = [r for r in rs if r["valid"]]
    assert p["all"]["unweighted"]["recovery"] == pytest.approx(np.mean(per_target))
    assert p["all"]["weighted"]["recovery"] == pytest.approx(np.mean([r["recovered"] for r in v]))
    assert p["datasets"]["topics"]["n_valid"] == len(v)
  # the graded rows: clip((rec - def) / -def, 0, 1), computed here per valid row; 1 whenever recovered
  for r in rows:
    if r["valid"]:
      u = (r["recovered_score"] - r["defended"]) / -r["defended"]
      assert r["graded_recovery"] == pytest.approx(min(1.0, max(0.0, u)), abs=1e-6)
      assert r["graded_recovery"] == 1.0 or not r["recovered"]
  for p in info["points"]:
    v = [r for r in rows if r["mode"] == p["mode"] and r["variant"] == p["variant"] and r["valid"]]
    assert p["all"]["weighted"]["graded"] == pytest.approx(np.mean([r["graded_recovery"] for r in v]))
    assert p["all"]["weighted"]["budget_needed_median"] == pytest.approx(np.median([r["budget_needed"] for r in v]))
  # the scope's budget: the last token needs n_pooled times what all tokens need; no delta beats the bound
  key = lambda r: (r["mode"], r["example"])
  last = {key(r): r for r in rows if r["variant"] == "last"}
  for r in rows:
    if r["variant"] == "all" and r["valid"] and r["budget_needed"] > 0:
      assert last[key(r)]["budget_needed"] / r["budget_needed"] == pytest.approx(r["n_pooled"], rel=1e-5)
    if r["valid"]:
      gain = r["recovered_score"] - r["defended"]
      assert gain * r["budget_needed"] <= r["delta_norm"] * -r["defended"] * (1 + 1e-4) + 1e-5
  for st in info["sign_tests"]:
    assert st["recovery"]["n"] <= 3
    assert st["recovery"]["p"] == pytest.approx(metrics.sign_test_p(st["recovery"]["k"], st["recovery"]["n"]))
  text = (wd / "tpp.md").read_text()
  assert "arXiv 2605.18229" in text and "all examples (weighted)" in text and "sign test" in text
  assert "graded" in text and "82 % / 75 %" in text
  assert "TPP metric" in proc.stdout


def test_tpp_summary_weighted_differs_from_unweighted():
  """Two targets with 1/1 and 1/3 recovered: unweighted 2/3, weighted 2/4; the sign test counts
  targets where encoder is lower."""
  def row(mode, target, rec, react=0.0):
    return {"grid_id": 0, "variant": "last", "mode": mode, "dataset": "d", "target": target, "valid": True,
            "recovered": rec, "reactivated_fraction_within_eligible": react, "act_drift_l2": 1.0,
            "decode_drift_l2": 1.0, "zero_reactivation": rec and react == 0, "n_features": 5, "budget": 20.0}
  rows = [row("none", "a", True, 0.1), row("none", "b", True), row("none", "b", True), row("none", "b", True),
          row("encoder", "a", True), row("encoder", "b", True), row("encoder", "b", False),
          row("encoder", "b", False)]
  s = tpp_app.tpp_summary(rows)
  enc = [p for p in s["points"] if p["mode"] == "encoder"][0]
  assert enc["all"]["unweighted"]["recovery"] == pytest.approx(2 / 3)
  assert enc["all"]["weighted"]["recovery"] == pytest.approx(2 / 4)
  (st,) = s["sign_tests"]
  assert (st["recovery"]["k"], st["recovery"]["n"]) == (1, 2)
  assert (st["reactivation"]["k"], st["zero_react"]["k"]) == (1, 1)
  assert st["recovery"]["p"] == pytest.approx(0.75)


@pytest.mark.parametrize("flags, message", [
    (["--config.task.source=file", "--config.task.data_file=BAD", CLASSES], "line 3: field 'text' = ''"),
    (["--config.task.targets=('nowhere',)"], "task.targets"),
    (["--config.task.source=sideways"], "task.source"),
])
def test_bad_data_and_config_end_with_a_clear_message(tmp_path, flags, message):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "a", "label": "garden"}\n{"text": "b", "label": "kitchen"}\n{"text": "", "label": "harbor"}\n')
  flags = [f.replace("BAD", str(bad)) for f in flags]
  proc = _app(tmp_path / "w", *flags, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error:" in proc.stderr and message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_topk12_preset_on_real_smollm2_and_corpus(tmp_path):
  """The real path, shortened: SmolLM2-135M-Instruct + the shipped TopK SAE, corpus classes (needs
  .cache/corpus), probes that separate the topics, the TPP table and some valid flips."""
  if not os.path.isdir(os.path.join(ROOT, ".cache/corpus/wordnet")):
    pytest.skip("offline corpus not built (python -m recovery_jax.data.corpus --out .cache/corpus)")
  wd = tmp_path / "real"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  cmd = [sys.executable, "-m", "recovery_jax.main", "--config=configs/tpp.py:topk12,n_train=24,n_test=6,steps=5",
         f"--workdir={wd}", "--config.recovery.modes=('none',)", "--config.sweep.n_features=(100,)",
         "--config.task.tpp_ns=(10, 100)", "--config.plots=False"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = json.loads((wd / "tpp.json").read_text())
  assert min(info["probe_acc_test"]) > 0.7
  assert info["tpp"][1]["total"] > 0.05  # ablating 100 latents hurts the class's own probe
  summary = [json.loads(l) for l in open(wd / "summary.jsonl")]
  assert summary[0]["n_valid"] >= 5


def test_default_preset_uses_the_suite_at_layer_6():
  """The default's "shipped" SAE is the suite's JumpReLU at blocks.6.hook_resid_post (after 7 of 30
  blocks, as the paper's Gemma 2 2B layer 5 is after 6 of 26); topk12 stays a named TopK variant."""
  import importlib.util
  from recovery_jax.sae import registry
  spec = importlib.util.spec_from_file_location("tpp_cfg", os.path.join(ROOT, "configs", "tpp.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  d, k = mod.get_config("default"), mod.get_config("topk12")
  assert d.site == "blocks.6.hook_resid_post" and d.sae == "shipped"
  assert abs((6 + 1) / 30 - (5 + 1) / 26) < 0.01
  folder = registry.resolve(d.model, d.site)
  assert folder.name == "smollm2-135m-instruct-res6-post-jumprelu"
  assert {s.architecture for s in registry.shipped() if s.path == folder} == {"jumprelu"}
  assert registry.resolve(k.model, k.site).name == "smollm2-135m-instruct-res12-topk"
  assert d.recovery.modes == ("none", "encoder", "encoder_exact")
