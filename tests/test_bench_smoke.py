"""Smoke runs of the benchmark harnesses on tiny random models (no timing assertions): recovery
throughput, harvest sites, generation (JAX vs transformers) and whole runs (the tiny demo)."""

import json
import math
import os
from pathlib import Path

import jax
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


# ----------------------------------------------------------------------------------------------
# bench.generation and bench.whole_run at tiny sizes (output structure, not timings)


@pytest.fixture(scope="module")
def generation(tmp_path_factory):
  from bench import generation as gen_bench
  out = tmp_path_factory.mktemp("gen") / "generation.json"
  args = gen_bench.parse_args(["--tiny", "--batch=3", "--new_tokens=6", "--repeats=2", f"--out={out}"])
  result = gen_bench.run(args, log=lambda *a: None)
  return gen_bench, result, gen_bench.write(result, str(out))


def test_generation_bench_rows_agreement_and_files(generation):
  """The three variants' rows, the greedy tokens of the JAX decoder equal transformers' on the tiny model,
  the clamp changes the output, and the JSON / markdown files hold them."""
  gen_bench, result, (js, md) = generation
  rows = {r["variant"]: r for r in result["rows"]}
  assert sorted(rows) == sorted(gen_bench.VARIANTS)
  for v, r in rows.items():
    assert len(r["times_s"]) == 2 and r["median_s"] > 0 and math.isclose(r["tokens_per_s"], 3 * 6 / r["median_s"])
    assert r["flops"] == rows["jax"]["flops"] > 0 and math.isclose(r["flops_per_s"], r["flops"] / r["median_s"])
    assert (r["compile_s"] is None) == (v == "transformers") and r["speedup_vs_transformers"] > 0
  assert result["agreement"] == {"tokens": 6, "rows_agree": 3, "rows": 3, "token_fraction": 1.0,
                                 "mean_common_prefix": 6.0, "min_common_prefix": 6}
  assert np.asarray(result["tokens"]["jax+clamp"]).shape == (3, 6) and result["clamp_changed_rows"] >= 1
  assert result["defence"]["kind"] == "set" and len(result["defence"]["features"]) == 8
  saved = json.loads(Path(js).read_text())
  assert [r["variant"] for r in saved["rows"]] == [r["variant"] for r in result["rows"]]
  assert len(saved["loadavg_start"]) == 3 and len(saved["loadavg_end"]) == 3
  text = Path(md).read_text()
  assert all(f"| {v} |" in text for v in gen_bench.VARIANTS) and "3/3 rows identical" in text
  floor = result["floor"]
  assert sorted(floor) == ["jax", "transformers"] and "| matmuls of |" in text
  for f in floor.values():
    assert len(f["times_s"]) == 5 and math.isclose(f["tokens_per_s"], 3 / f["median_s"])


def test_generation_floor_covers_the_same_weights_in_both_libraries():
  """The floor's JAX matmuls and torch's linears are the same weights: equal sizes, equal sums."""
  import torch
  from bench import decode_floor, problems, torch_loop
  params, cfg, _ = problems.load_bench_model("tiny-llama")
  jax_w = [np.asarray(w) for w in jax.tree.leaves(decode_floor.jax_floor_weights(params))]
  with torch.no_grad():
    torch_w = [w.numpy() for w in decode_floor.torch_floor_weights(torch_loop.to_hf(params, cfg))]
  assert sum(w.size for w in jax_w) == sum(w.size for w in torch_w)
  assert math.isclose(sum(float(np.abs(w).sum()) for w in jax_w), sum(float(np.abs(w).sum()) for w in torch_w),
                      rel_tol=1e-5)


def test_generation_bench_agreement_counts_the_common_prefix():
  from bench.generation import agreement
  a = np.array([[1, 2, 3, 4], [1, 2, 3, 4]])
  b = np.array([[1, 2, 3, 4], [1, 9, 3, 4]])
  assert agreement(a, b, 3) == {"tokens": 3, "rows_agree": 1, "rows": 2, "token_fraction": 5 / 6,
                                "mean_common_prefix": 2.0, "min_common_prefix": 1}


@pytest.mark.parametrize("flags,message", [(["--settings=ioi,nope"], "unknown ['nope']"),
                                           (["--cold", "--cache_dir=/tmp"], "--cache_dir is for --warm"),
                                           (["--warm", "--cold"], "not allowed with")])
def test_whole_run_bench_names_bad_flags(flags, message, capsys):
  from bench import whole_run
  with pytest.raises(SystemExit):
    whole_run.parse_args(flags)
  assert message in capsys.readouterr().err


def test_whole_run_bench_needs_the_corpus_for_unlearning_and_tpp(monkeypatch, tmp_path):
  from bench import whole_run
  monkeypatch.setattr(whole_run, "CORPUS_MANIFEST", str(tmp_path / "MANIFEST.json"))
  whole_run.check_corpus(["ioi", "refusal"])
  with pytest.raises(SystemExit, match="make corpus"):
    whole_run.check_corpus(["ioi", "tpp"])


def test_whole_run_bench_collects_a_tiny_setting(tmp_path):
  """One warm run of the tiny IOI demo (the suite's compilation cache): its profile in the table's row,
  phases that add up to the run, and the JSON / markdown files."""
  from bench import whole_run
  from recovery_jax import compilation_cache
  cache = compilation_cache.cache_dir() or str(tmp_path / "cache")
  os.makedirs(cache, exist_ok=True)
  out = tmp_path / "whole_run.json"
  args = whole_run.parse_args(["--tiny", "--settings=ioi", "--warm", f"--cache_dir={cache}",
                               f"--workroot={tmp_path / 'runs'}", f"--out={out}"])
  result = whole_run.run(args, log=lambda *a: None)
  js, md = whole_run.write(result, args.out)
  assert result["failed"] == [] and [r["pass"] for r in result["runs"]] == ["warm"]
  (row,) = result["rows"]
  assert (row["setting"], row["pass"], row["returncode"]) == ("ioi", "warm", 0)
  assert set(row["phases"]) == set(whole_run.PHASES) and row["programs"] == row["compiled"] + row["cache_hits"] > 0
  assert math.isclose(sum(p["seconds"] for p in row["phases"].values()), row["wall_s"], rel_tol=0.01, abs_tol=0.05)
  assert row["process_s"] > row["wall_s"] > 0
  saved = json.loads(Path(js).read_text())
  assert saved["runs"][0]["profiles"]["ioi"]["wall_s"] == row["wall_s"] and len(saved["loadavg_end"]) == 3
  assert "| ioi | warm |" in Path(md).read_text()


# ----------------------------------------------------------------------------------------------
# bench.step_profile: where a step's time goes, by XLA operation kind


def test_step_profile_kinds_and_per_step_arithmetic():
  from bench import step_profile as sp
  assert [sp.kind_of(n) for n in ("ynn_fusion.65", "dot.3", "triangular_solve.6", "dynamic-slice_bitcast_fusion.2",
                                  "bitcast_dynamic-update-slice_fusion", "copy_bitcast_fusion.20", "transpose.1",
                                  "wrapped_reduce.1", "add_divide_fusion")] == \
      ["dot", "dot", "solve", "slice", "update", "copy", "copy", "reduce", "elementwise"]
  short = {"ynn_fusion.1": 0.2, "copy.2": 0.1, "add.3": 0.3}
  ops = sp.step_ops(short, {"ynn_fusion.1": 1.0, "copy.2": 0.6, "add.3": 0.1}, steps=4)
  assert ops == {"ynn_fusion.1": 0.2, "copy.2": 0.125, "add.3": 0.0}  # the once-per-run part off, never negative
  with pytest.raises(RuntimeError, match="differ beyond their step count"):
    sp.step_ops(short, {"ynn_fusion.1": 1.0}, steps=4)
  kinds = sp.by_kind(ops, top=1)
  assert math.isclose(sum(k["fraction"] for k in kinds.values()), 1.0)
  assert kinds["dot"]["top"] == [("ynn_fusion.1", 0.2)] and kinds["slice"]["seconds"] == 0


def test_step_profile_runs_on_the_tiny_model(tmp_path):
  """The traced run finds the engine's matmuls in the profiler's trace and writes its files."""
  from bench import step_profile as sp
  from bench import whole_run
  args = sp.parse_args(["--model=tiny-llama", "--batch=2", "--steps=3", "--repeats=1", f"--out={tmp_path / 'sp.json'}"])
  result = sp.run(args, log=lambda *a: None)
  assert result["kinds"]["dot"]["seconds"] > 0 and result["step_wall_s"] > 0
  assert math.isclose(sum(k["fraction"] for k in result["kinds"].values()), 1.0)
  tops = [n for k in result["kinds"].values() for n, _ in k["top"]]
  assert tops and not any(n.startswith(sp.CONTAINERS) for n in tops)  # a while loop's time is its ops' time
  js, md = whole_run.write_json_md(result, args.out, sp.markdown)
  assert json.loads(Path(js).read_text())["batch"] == 2 and "| dot |" in Path(md).read_text()
