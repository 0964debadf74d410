"""The refusal app end to end on a tiny random model (CI seconds): outputs, labels, no text by default,
bad prompt files and configs."""

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # app runs in subprocesses: not in make test-fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _app(workdir, *flags, check=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  cmd = [sys.executable, "-m", "recovery_jax.main", "--config=configs/refusal.py:tiny", f"--workdir={workdir}",
         "--config.recovery.enabled=False", *flags]  # the recovery stage: test_refusal_recovery_app.py
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"app failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


def test_app_end_to_end(tmp_path):
  wd = tmp_path / "run"
  proc = _app(wd)
  for name in ("config.json", "features.json", "preflight.jsonl", "preflight.md"):
    assert (wd / name).exists(), name
  rows = [json.loads(l) for l in open(wd / "preflight.jsonl")]
  assert len(rows) == 2 * 6 and {r["value"] for r in rows} == {4.0, 8.0}
  assert not any("text" in k for r in rows for k in r)  # save_text is off by default
  for r in rows:
    assert r["valid"] == (not r["base_refusal"] and not r["base_safety_cue"] and r["defended_r_eff"])
    assert (r["r_eff_rule"] != "") == r["defended_r_eff"]
    assert 1 <= r["base_tokens"] <= 8 and 1 <= r["defended_tokens"] <= 8
  feats = json.load(open(wd / "features.json"))
  assert sum(len(v) for v in feats["features"].values()) == 6 and len(feats["top"]) == 6
  assert re.search(r"^\| 4 +\| 6 +\|", proc.stdout, re.M) and "valid: substring" in (wd / "preflight.md").read_text()


def test_bad_prompt_file_and_config(tmp_path):
  bad = tmp_path / "mine.jsonl"
  bad.write_text('{"goal": "Plan a picnic"}\n{"goal": 3}\n')
  proc = _app(tmp_path / "a", f"--config.task.prompts_file={bad}", check=False)
  assert proc.returncode == 2
  assert f"{bad}, line 2: field 'goal' is 3" in proc.stderr
  proc = _app(tmp_path / "b", "--config.defence.kind=ablate", check=False)
  assert proc.returncode == 2 and "defence.kind" in proc.stderr
