"""Smoke run of the throughput benchmark harness on a tiny random model (no timing assertions)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench import recovery_throughput as rt

pytestmark = pytest.mark.slow  # benchmark subprocesses (make test, not make test-fast)

ARGS = ["--models=tiny-llama", "--workloads=ioi,refusal", "--ioi_batches=3", "--refusal_batches=2", "--k_max=8",
        "--ioi_steps=4", "--refusal_steps=2", "--ref_examples=2", "--refusal_ref_examples=1", "--torch_examples=0",
        "--d_sae=128", "--peak_sizes=128", "--repeats=1", "--no_torch"]


CHECKPOINTS = []  # rows finished at each checkpoint call of the module's run


@pytest.fixture(scope="module")
def result():
  return rt.run(rt.parse_args(ARGS), log=lambda *a: None, checkpoint=lambda r: CHECKPOINTS.append(len(r["rows"])))


def test_finished_cells_are_checkpointed(result, tmp_path):
  """One checkpoint per (model, workload, K_max) cell with the rows so far: a run stopped by a time
  limit keeps what it finished (``recovery_throughput.partial.json``)."""
  assert CHECKPOINTS == [2, 4]  # ioi: reference + engine; then refusal
  path = rt.write_partial(result, str(tmp_path))
  assert json.loads(open(path).read())["rows"][0]["variant"] == "reference"
  assert not (tmp_path / "recovery_throughput.partial.json.tmp").exists()


def test_rows_and_figures_are_finite(result):
  rows = result["rows"]
  assert {(r["workload"], r["variant"]) for r in rows} == {
      ("ioi", "reference"), ("ioi", "engine"), ("refusal", "reference"), ("refusal", "engine")}
  for r in rows:
    for k in ("examples_per_s", "projected_examples_per_s", "example_steps_per_s", "step_ms", "step_flops_per_s",
              "step_peak_fraction", "recovery_flops_per_s", "compile_s"):
      assert math.isfinite(r[k]) and r[k] > 0, (r["variant"], r["workload"], k, r[k])
    assert all(math.isfinite(o) for o in r["objectives"])
  assert result["peak_flops_per_s"] > 0
  engines = [r for r in rows if r["variant"] == "engine"]
  for r in engines:
    for k in ("speedup_vs_reference", "projected_speedup_vs_reference", "step_speedup_vs_reference"):
      assert math.isfinite(r[k]) and r[k] > 0
  md = rt.markdown(result)
  assert md.count("| tiny-llama |") == 2 * len(rows)  # throughput and utilisation tables


def test_reference_and_engine_recover_the_same_objectives(result):
  rows = {(r["workload"], r["variant"]): r for r in result["rows"]}
  for kind, rtol in (("ioi", 1e-4), ("refusal", 1e-2)):
    ref, eng = rows[(kind, "reference")], rows[(kind, "engine")]
    n = len(ref["objectives"])
    np.testing.assert_allclose(eng["objectives"][:n], ref["objectives"], rtol=rtol, atol=1e-4)


def _harvest_bench(out, *flags):
  """Runs ``python -m bench.harvest_sites`` on the tiny model from the repository root."""
  import subprocess
  import sys
  return subprocess.run([sys.executable, "-m", "bench.harvest_sites", "--model=tiny-random", f"--out={out}", *flags],
                        capture_output=True, text=True, cwd=Path(__file__).parents[1])


def test_harvest_sites_bench_runs_both_sides(tmp_path):
  """``bench.harvest_sites`` on the tiny model: one timing per site and for all sites together."""
  out = tmp_path / "hs"
  r = _harvest_bench(out, "--layers=0-1", "--windows=8", "--seq_len=32", "--forward_batch=4")
  assert r.returncode == 0, r.stderr
  res = json.loads(out.with_suffix(".json").read_text())
  assert res["tokens"] == 8 * 32 and sorted(res["alone_s"]) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
  assert res["together_s"] > 0 and math.isclose(res["speedup"], res["alone_total_s"] / res["together_s"])
  assert "one forward" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("flags,message", [(["--layers=0-x"], "--layers='0-x'"),
                                           (["--windows=2", "--forward_batch=4"], "--forward_batch (4)")])
def test_harvest_sites_bench_names_bad_flags(tmp_path, flags, message):
  r = _harvest_bench(tmp_path / "hs", *flags)
  assert r.returncode != 0 and message in r.stderr + r.stdout
  assert not (tmp_path / "hs.json").exists()
