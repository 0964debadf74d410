"""The unlearning app end to end on a tiny random model (in process): rows, the post-hoc evaluator
against the engine, argmax validity / success, the retain check, the budget diagnostic, the
soft-suffix rows; bad question files fail before any model is loaded."""

import os

import pytest

from recovery_jax import errors
from recovery_jax.experiments import unlearning

pytestmark = pytest.mark.slow  # app runs in subprocesses: not in make test-fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg="tiny"):
  import importlib.util
  spec = importlib.util.spec_from_file_location("unlearning_cfg", os.path.join(ROOT, "configs", "unlearning.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("unlearning"))
  out = unlearning.run(_config(), wd)
  return wd, out


def test_app_writes_outputs_and_sections(tiny_run):
  wd, out = tiny_run
  for name in ("config.json", "results.jsonl", "summary.md", "summary.jsonl", "unlearning.json", "soft_suffix.jsonl"):
    assert os.path.exists(os.path.join(wd, name)), name
  text = open(os.path.join(wd, "summary.md")).read()
  for section in ("Post-hoc evaluator", "Retain check", "Budget / trajectory diagnostic", "Soft-suffix baseline"):
    assert section in text
  assert {s["mode"] for s in out["summary"]} == {"none", "encoder"}


def test_rows_use_argmax_and_match_the_engine(tiny_run):
  _, out = tiny_run
  rows = out["rows"]
  n_valid = next(iter(out["preflight"].values()))["valid"]
  for mode in ("none", "encoder"):
    rs = [r for r in rows if r["mode"] == mode]
    assert sum(r["valid"] for r in rs) == min(n_valid, 6)
  for r in rows:
    assert r["valid"] == (r["pred_base"] == r["gold"] and r["pred_defended"] != r["gold"])
    assert r["recovered"] == (r["pred_recovered"] == r["gold"])
    # the independent replay sees what the engine saw: the objective and the clamped features at the readout
    assert r["margin_recovered"] == pytest.approx(r["objective_recovered"], abs=1e-4)
    assert r["posthoc_drift_abs"] == pytest.approx(r["act_drift_l2"], abs=1e-4)
    assert r["posthoc_violation_abs"] <= r["posthoc_drift_abs"] + 1e-9
    assert (r["posthoc_drift_rel"] is None) == (not r["posthoc_ref_norm"] > 0)
    assert r["delta_norm"] <= 20.0 + 1e-3
    assert r["order"] == "0123" and r["perm_id"] == 0  # the tiny run's cloze has one order


def test_retain_budget_and_soft_suffix(tiny_run):
  _, out = tiny_run
  (rc,) = out["retain_check"]
  assert rc["retain_n"] == 40 and 0 <= rc["retain_defended_acc"] <= 1
  bd = out["budget_diagnostic"]
  (enc,) = bd["modes"].values()
  assert [e["budget"] for e in enc] == [0.0, 5.0, 20.0]
  assert enc[0]["recovered"] == 0 and enc[0]["drift_abs_mean"] == 0 and enc[0]["delta_norm_mean"] == 0
  assert all(len(e["drift_per_step_flip0"]) == 10 for e in enc)
  assert all(e["delta_norm_mean"] <= e["budget"] + 1e-3 for e in enc)
  ss = {s["variant"]: s for s in out["soft_suffix"]}
  assert set(ss) == {"faithful", "corrected"} and all(s["n"] == 2 for s in ss.values())
  assert all(s["suffix_norm_mean"] <= 20.0 + 1e-3 for s in ss.values())


def test_bad_question_file_names_file_and_row(tmp_path):
  bad = tmp_path / "q.jsonl"
  bad.write_text('{"question": "Q", "choices": ["a", "b", "c", "d"], "answer": 1}\n{"question": "Q", "answer": 1}\n')
  c = _config("tiny")
  c.task.questions_file = str(bad)
  with pytest.raises(errors.UserError, match=r"q.jsonl, row 2: missing field 'choices'"):
    unlearning.run(c, str(tmp_path / "wd"))
  c = _config("tiny")
  c.task.format = "letters"
  with pytest.raises(errors.UserError, match="task.format"):
    unlearning.run(c, str(tmp_path / "wd2"))
  for fmt, orders, match in (("cloze", "both", "cloze_listed"), ("mc", "reversed", "expected one of")):
    c = _config("tiny")
    c.task.format, c.task.orders = fmt, orders
    with pytest.raises(errors.UserError, match=rf"'task.orders'='{orders}'.*{match}"):
      unlearning.run(c, str(tmp_path / f"wd_{orders}"))


def test_config_variants():
  d, p, t = _config("default"), _config("paper,questions=/w/wmdp.jsonl"), _config("tiny")
  assert d.site == "blocks.3.hook_resid_post" and d.sae == "shipped" and d.task.format == "cloze"
  assert (d.recovery.steps, d.recovery.lr, d.sweep.budget, d.recovery.objective) == (150, 0.08, (20.0,),
                                                                                      "choice_margin")
  assert p.task.format == "mc" and len(p.features.feature_ids) == 50 and p.task.questions_file == "/w/wmdp.jsonl"
  assert _config("topk12").site == "blocks.12.hook_resid_pre"
  assert t.model == "tiny-random-llama"
  with pytest.raises(ValueError, match="unknown variant"):
    _config("nope")


def test_default_preset_uses_the_suite_at_the_early_layer():
  """The default's "shipped" SAE is the suite's JumpReLU at blocks.3.hook_resid_post (the paper's
  early layer); topk12 stays a named TopK variant."""
  from recovery_jax.sae import registry
  d, k = _config("default"), _config("topk12")
  folder = registry.resolve(d.model, d.site)
  assert folder.name == "smollm2-135m-instruct-res3-post-jumprelu"
  assert {s.architecture for s in registry.shipped() if s.path == folder} == {"jumprelu"}
  assert registry.resolve(k.model, k.site).name == "smollm2-135m-instruct-res12-topk"
