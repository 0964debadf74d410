"""The main job (configs/demo.py, experiments/demo.py): every setting in one run, one combined report,
resume of finished settings, a failing setting reported without stopping the others."""

import json
import os
import random
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # app runs in subprocesses: not in make test-fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = {"garden": "rose tulip soil seed water leaf bloom petal root sun",
         "kitchen": "bread butter oven flour sugar salt pan spoon bake dough",
         "harbor": "boat ship sail anchor wave tide dock rope mast harbor"}


def _tpp_file_overrides(path) -> str:
  """TPP on a SAEBench-format file (CI has no offline corpus): the demo's tpp overrides flag."""
  rng = random.Random(0)
  rows = [{"text": " ".join(rng.choice(ws.split()) for _ in range(24)) + ".", "label": lab}
          for lab, ws in WORDS.items() for _ in range(40)]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  items = ("task.source=file", f"task.data_file={path}", "task.classes=('garden', 'kitchen', 'harbor')")
  return f"--config.settings.tpp.overrides={items!r}"


def _demo(workdir, *flags, arg="tiny,only=ioi-tpp"):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  tpp = _tpp_file_overrides(workdir.parent / "topics.jsonl")
  cmd = [sys.executable, "-m", "recovery_jax.main", f"--config=configs/demo.py:{arg}", f"--workdir={workdir}", tpp,
         *flags]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def _report_rows(workdir):
  lines = (workdir / "report.md").read_text().splitlines()
  return [[c.strip() for c in l.strip("|").split("|")] for l in lines if l.startswith("| ") and "---" not in l][1:]


def test_demo_runs_every_setting_then_resumes(tmp_path):
  wd = tmp_path / "demo"
  proc = _demo(wd)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = _report_rows(wd)
  assert {r[0] for r in rows} == {"ioi", "tpp"}
  for name in ("ioi", "tpp"):  # each setting's own rows, in the runner's summary format, with links
    summary = [json.loads(l) for l in open(wd / name / "summary.jsonl")]
    mine = [r for r in rows if r[0] == name]
    assert len(mine) == len(summary)
    assert [r[3] for r in mine] == [f"{s['n_valid']}/{s['n_examples']}" for s in summary]
    assert all(f"[summary.md]({name}/summary.md)" in r[-1] for r in mine)
    assert (wd / name / "demo_done.json").exists()
  assert "[cards/cards.md](ioi/cards/cards.md)" in rows[0][-1]
  again = _demo(wd)  # finished settings are not run again; the report is the same
  assert again.returncode == 0 and again.stdout.count("not run again") == 2, again.stdout[-2000:]
  assert _report_rows(wd) == rows


def test_a_failing_setting_is_reported_and_the_others_still_run(tmp_path):
  wd = tmp_path / "demo"
  proc = _demo(wd, "--config.settings.ioi.overrides=('sweep.n_features=(100000,)',)")
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "1 setting(s) failed: ioi" in proc.stderr
  rows = {r[0]: r for r in _report_rows(wd)}
  assert rows["ioi"][5].startswith("failed: UserError") and "d_sae" in rows["ioi"][5]
  assert rows["tpp"][3] != "-" and (wd / "tpp" / "demo_done.json").exists()
  assert not (wd / "ioi" / "demo_done.json").exists()


def test_bad_override_is_an_error_before_anything_runs(tmp_path):
  wd = tmp_path / "demo"
  proc = _demo(wd, "--config.settings.tpp.overrides=('task.nope=1',)")
  assert proc.returncode == 2 and "settings.tpp" in proc.stderr and "task.nope" in proc.stderr, proc.stderr[-2000:]
  assert not (wd / "ioi").exists()
