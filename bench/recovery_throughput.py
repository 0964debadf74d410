r"""Recovery throughput: the reference-shaped loop (a), the batched engine (b), a PyTorch loop (c).

  python -m bench.recovery_throughput --quick          # the documented CPU run (docs/benchmarks.md)
  python -m bench.recovery_throughput --models=gpt2-small-random --workloads=ioi \
      --batches=1,8,64,256 --k_max=16,64,256 --steps=100      # larger grids (GPU hosts)

For every (model, workload, K_max) the same examples are recovered three ways, and for every batch
size (b) recovers the whole batch at once:

  (a) reference   one example at a time, full forward every step (bench.reference_loop)
  (b) engine      recovery_jax.recovery.engine.recover_examples: vmapped, prefix-cached
  (c) torch       transformers model + hooks, torch.optim.Adam (bench.torch_loop; optional)

(a) and (c) are per-example loops: their cost per example does not depend on the batch, so they run
on ``--ref_examples`` examples and their rate is compared with (b) at every batch size. Figures:
examples recovered per second, example-steps per second, the model FLOP/s of a step (analytic
counts, bench.flops) and its fraction of the peak f32 matmul FLOP/s measured in the same run,
compile seconds, XLA memory of the compiled program, and the ratios (b)/(a), (b)/(c). Results go to
``<out_dir>/recovery_throughput.json`` and ``.md``.

Size: a benchmark script that runs three implementations on the same examples
and writes their table; its parts are only used together.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import engine_batched, flops, problems, reference_loop

# --quick: the documented CPU run (docs/benchmarks.md). Without --quick: the larger grid (GPU hosts).
QUICK = dict(models="smollm2-135m,gpt2-small-random", workloads="ioi,refusal",
             refusal_models="smollm2-135m,gpt2-small-random", ioi_batches="1,64", refusal_batches="8", k_max="64",
             ioi_steps=10, refusal_steps=2, ref_examples=2, refusal_ref_examples=1, torch_examples=2)
FULL = dict(models="smollm2-135m,gpt2-small-random", workloads="ioi,refusal", refusal_models=None,
            ioi_batches="1,8,64,256", refusal_batches="1,8,64", k_max="16,64,256", ioi_steps=100,
            refusal_steps=20, ref_examples=4, refusal_ref_examples=2, torch_examples=4)


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="the documented CPU subset (a few minutes)")
  ap.add_argument("--models", help="comma list of " + ",".join(problems.MODELS))
  ap.add_argument("--workloads", help="comma list of ioi,refusal")
  ap.add_argument("--refusal_models", help="models of the refusal-shaped workload (default: --models)")
  ap.add_argument("--ioi_batches", help="batch sizes of (b) for the IOI-shaped workload")
  ap.add_argument("--refusal_batches", help="batch sizes of (b) for the refusal-shaped workload")
  ap.add_argument("--k_max", help="comma list of K_max (features per clamp)")
  ap.add_argument("--ioi_steps", type=int)
  ap.add_argument("--refusal_steps", type=int)
  ap.add_argument("--project_steps_ioi", type=int, default=100, help="steps of the paper's IOI runs")
  ap.add_argument("--project_steps_refusal", type=int, default=120, help="steps of v4strong's stage 2")
  ap.add_argument("--refusal_corrections", type=int, default=0, help="Jacobian correction steps per step (v4: 5)")
  ap.add_argument("--ref_examples", type=int, help="IOI examples recovered by the per-example loops (a), (c)")
  ap.add_argument("--refusal_ref_examples", type=int, help="refusal examples recovered by (a), (c)")
  ap.add_argument("--torch_examples", type=int)
  ap.add_argument("--repeats", type=int, default=2, help="engine runs per row (the fastest is reported)")
  ap.add_argument("--no_torch", action="store_true", help="skip variant (c)")
  ap.add_argument("--remat", nargs="?", const="full", default="", choices=("", "off", "full", "dots"),
                  help="engine (b): rematerialise each scanned layer in the step's backward (RecoverySpec.remat: "
                       "off, full, or dots = keep matmul outputs; default: RecoverySpec's, dots)")
  ap.add_argument("--torch_device", default="cpu", choices=("cpu", "cuda"), help="device of the PyTorch loop (c)")
  ap.add_argument("--torch_threads", default="", help="torch thread counts to calibrate over (default: 1 and all)")
  ap.add_argument("--d_sae", type=int, default=None, help="SAE width (default 16 x d_model)")
  ap.add_argument("--peak_sizes", default="512,1024,2048", help="matmul sizes of the peak measurement")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="parameters and activations (bfloat16: bf16 weights and residual, f32 norms/softmax/logits)")
  ap.add_argument("--out_dir", default="bench/results")
  args = ap.parse_args(argv)
  defaults = dict(QUICK if args.quick else FULL)
  if args.models is not None:  # an explicit model list also applies to the refusal workload
    defaults["refusal_models"] = None
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.refusal_models is None:
    args.refusal_models = args.models
  return args


def _ints(s) -> list[int]:
  return [int(x) for x in str(s).split(",") if x]


def _strs(s) -> list[str]:
  return [x for x in str(s).split(",") if x]


# ----------------------------------------------------------------------------------------------
# machine


def machine_info() -> dict:
  info = {"python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count()}
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
      k, _, v = line.partition(":")
      if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Flags"):
        v = v.strip()
        if k.strip() == "Flags":
          v = " ".join(f for f in v.split() if f.startswith("avx512") or f in ("avx2", "fma"))
        info["lscpu_" + k.strip().replace(" ", "_").replace("(", "").replace(")", "")] = v
  except OSError:
    pass
  try:
    import torch  # pylint: disable=import-outside-toplevel
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
  except ImportError:
    pass
  return info


def measure_peak(sizes=(512, 1024, 2048), reps: int = 5) -> dict:
  """Best f32 matmul FLOP/s of jitted [n, n] @ [n, n] over ``sizes`` (a chain of 4 per call, to
  amortise dispatch): the machine's measured peak for XLA on this backend."""
  def chain(a, b):
    for _ in range(4):
      a = (a @ b) * (1.0 / a.shape[0])
    return a
  f = jax.jit(chain)
  per = {}
  for n in sizes:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
      t0 = time.perf_counter()
      f(a, b).block_until_ready()
      best = min(best, time.perf_counter() - t0)
    per[n] = 4 * flops.matmul(n) / best
  n_best = max(per, key=per.get)
  return {"n": n_best, "flops_per_s": per[n_best], "per_size": per}


def measure_torch_peak(sizes=(512, 1024, 2048), reps: int = 5) -> dict | None:
  """The same for torch.mm (MKL/oneDNN), at 1 thread and at all cores (for reference)."""
  if importlib.util.find_spec("torch") is None:
    return None
  import torch  # pylint: disable=import-outside-toplevel
  before = torch.get_num_threads()
  out = {}
  for threads in sorted({1, os.cpu_count() or 1}):
    torch.set_num_threads(threads)
    for n in sizes:
      a, b = torch.randn(n, n), torch.randn(n, n)
      a @ b
      best = float("inf")
      for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
      out[f"{threads}t_{n}"] = flops.matmul(n) / best
  torch.set_num_threads(before)
  return {"per_config": out, "flops_per_s": max(out.values())}


def maxrss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------------
# one (model, workload, K_max) cell


def _row(variant, model, kind, batch, k_max, steps, res: dict, n_examples, fixed_s, step_s, step_flops, rec_flops,
         peak, project_steps, compile_s=None, memory=None, **extra) -> dict:
  """One table row.

  res: the run's wall/cpu seconds and objectives. fixed_s: seconds of the step-independent work per
  call (per example for the loops (a)/(c); per batch for the engine: prepare). step_s: seconds of
  one step (one example's step for (a)/(c); the whole batch's step for the engine). step_flops /
  rec_flops: FLOPs per example. project_steps: the step count of the paper's runs, used for the
  projected examples/s (fixed + project_steps x step).
  """
  wall, objectives = res["wall_s"], res["objectives"]
  per_call = batch if variant == "engine" else 1
  row = {"variant": variant, "model": model, "workload": kind, "batch": batch, "k_max": k_max, "steps": steps,
         "examples": n_examples, "wall_s": wall, "cpu_s": res.get("cpu_s"), "fixed_s": fixed_s,
         "examples_per_s": n_examples / wall, "example_steps_per_s": per_call / step_s, "step_ms": 1e3 * step_s,
         "step_gflop": per_call * step_flops / 1e9, "recovery_gflop_per_example": rec_flops / 1e9,
         "compile_s": compile_s, "memory": memory or {}, "project_steps": project_steps,
         "projected_examples_per_s": per_call / (fixed_s + project_steps * step_s),
         "objective_mean": float(np.mean(objectives)) if objectives else None,
         "objectives": [float(o) for o in objectives] if objectives else []}
  row["step_flops_per_s"] = per_call * step_flops / step_s
  row["step_peak_fraction"] = row["step_flops_per_s"] / peak
  row["recovery_flops_per_s"] = rec_flops * n_examples / wall
  row.update(extra)
  return row


def _project_steps(args, kind: str) -> int:
  return args.project_steps_ioi if kind == "ioi" else args.project_steps_refusal


def run_reference(params, wl, model, n, peak, args) -> dict:
  loop = reference_loop.ReferenceLoop(params, wl)
  info = loop.compile()
  res = loop.run(n)
  steps = wl.spec.config.steps
  return _row("reference", model, wl.kind, 1, wl.k_max, steps, res, n, res["fixed_s"] / n,
              float(np.median(res["step_times"])), flops.reference_step(wl),
              flops.reference_recovery(wl, steps), peak, _project_steps(args, wl.kind),
              compile_s=info["compile_s"], memory=info["step_memory"])


def run_engine(params, wl, model, peak, args) -> dict:
  if args.remat:
    wl = dataclasses.replace(wl, spec=dataclasses.replace(wl.spec, remat=False if args.remat == "off" else args.remat))
  eng = engine_batched.EngineBatched(params, wl)
  info = eng.compile()
  res = eng.run(args.repeats)
  steps, b = wl.spec.config.steps, wl.n
  step_s = max(res["wall_s"] - res["prepare_s"], 1e-9) / steps
  return _row("engine", model, wl.kind, b, wl.k_max, steps, res, b, res["prepare_s"], step_s,
              flops.engine_step(wl), flops.engine_recovery(wl, steps), peak, _project_steps(args, wl.kind),
              compile_s=info["compile_s"], memory=info["memory"], suffix_len=wl.spec.suffix_len, remat=wl.spec.remat)


def run_torch(params, wl, model, n, peak, args) -> dict | None:
  if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
    return None
  from bench import torch_loop  # pylint: disable=import-outside-toplevel
  from recovery_jax.models import transformer  # pylint: disable=import-outside-toplevel
  loop = torch_loop.TorchLoop(params, wl, device=args.torch_device)
  threads = loop.calibrate_threads(_ints(args.torch_threads) if args.torch_threads else (1, None))
  tokens = wl.problems.tokens[:1, 0]
  parity = loop.logits_parity(np.asarray(transformer.forward(params, wl.spec.model_cfg, tokens).logits[0]))
  res = loop.run(n)
  steps = wl.spec.config.steps
  return _row("torch", model, wl.kind, 1, wl.k_max, steps, res, n, res["fixed_s"] / n,
              float(np.median(res["step_times"])),
              flops.reference_step(wl, dense_vjps=False),
              flops.reference_recovery(wl, steps, dense_vjps=False), peak, _project_steps(args, wl.kind),
              logits_parity=parity, torch_threads=threads)


def run_cell(params, cfg, tok, model: str, kind: str, k_max: int, batches: list[int], args, peak: float,
             log=print) -> list[dict]:
  steps = args.ioi_steps if kind == "ioi" else args.refusal_steps
  kw = dict(k_max=k_max, steps=steps, d_sae=args.d_sae)
  if kind == "refusal":
    kw["correction_steps"] = args.refusal_corrections
  n_ref = args.ref_examples if kind == "ioi" else args.refusal_ref_examples
  n_torch = min(args.torch_examples, n_ref)
  n_max = max(max(batches), n_ref)
  wl = problems.make_workload(kind, params, cfg, tok, n=n_max, **kw)
  rows = []
  ref = run_reference(params, wl, model, n_ref, peak, args)
  rows.append(ref)
  log(_fmt(ref))
  tor = None
  if not args.no_torch and n_torch > 0:
    try:
      tor = run_torch(params, wl, model, n_torch, peak, args)
    except Exception as e:  # pylint: disable=broad-except
      log(f"variant (c) failed on {args.torch_device}, no torch row: {type(e).__name__}: {e}")
    if tor is not None:
      rows.append(tor)
      log(_fmt(tor))
  for b in batches:
    row = run_engine(params, wl.head(b), model, peak, args)
    n_cmp = min(b, n_ref)
    row["objective_max_abs_diff_vs_reference"] = float(np.max(np.abs(
        np.asarray(row["objectives"][:n_cmp]) - np.asarray(ref["objectives"][:n_cmp]))))
    for name, other in (("reference", ref), ("torch", tor)):
      if other is not None:
        row[f"speedup_vs_{name}"] = row["examples_per_s"] / other["examples_per_s"]
        row[f"step_speedup_vs_{name}"] = row["example_steps_per_s"] / other["example_steps_per_s"]
        row[f"projected_speedup_vs_{name}"] = row["projected_examples_per_s"] / other["projected_examples_per_s"]
    rows.append(row)
    log(_fmt(row))
  return rows


def _fmt(r: dict) -> str:
  s = (f"  {r['variant']:9s} {r['model']:18s} {r['workload']:7s} B={r['batch']:<4d} K={r['k_max']:<4d} "
       f"{r['examples_per_s']:8.3f} ex/s ({r['projected_examples_per_s']:8.3f} @{r['project_steps']})  "
       f"{r['example_steps_per_s']:8.1f} ex-steps/s  step {r['step_ms']:8.1f} ms  "
       f"{r['step_flops_per_s'] / 1e9:6.1f} GFLOP/s ({100 * r['step_peak_fraction']:4.1f}%)")
  if r.get("compile_s") is not None:
    s += f"  compile {r['compile_s']:.1f}s"
  for name, tag in (("reference", "a"), ("torch", "c")):
    if f"speedup_vs_{name}" in r:
      run_x, proj_x = r["speedup_vs_" + name], r["projected_speedup_vs_" + name]
      s += f"  x{run_x:.1f} (x{proj_x:.1f} @{r['project_steps']}) vs ({tag})"
  return s


def _cell(r: dict, key: str, fmt: str) -> str:
  v = r.get(key)
  return "" if v is None else fmt.format(v)


def markdown(result: dict) -> str:
  m, pk = result["machine"], result["peak"]
  sizes = "/".join(str(n) for n in pk["start"]["per_size"])
  lines = [
      f"Machine: {m.get('lscpu_Model_name', '?')}, {m.get('cpu_count')} CPUs; jax {m['jax']} ({m['backend']})"
      + (f", torch {m['torch']}" if "torch" in m else ""),
      f"Measured peak (best jitted f32 n^3 matmul, n in {sizes}): start {pk['start']['flops_per_s'] / 1e9:.1f}, "
      f"end {pk['end']['flops_per_s'] / 1e9:.1f} GFLOP/s; % peak uses {result['peak_flops_per_s'] / 1e9:.1f}"
      + (f" (torch.mm best: {pk['torch']['flops_per_s'] / 1e9:.1f})" if pk.get("torch") else "") + ".",
      f"Command: `{result['command']}` ({result['total_s']:.0f} s wall, peak RSS {result['maxrss_mb']:.0f} MB; "
      f"1-min load average {result['loadavg_start'][0]:.1f} at start, {result['loadavg_end'][0]:.1f} at end)",
      "",
      "Throughput. `ex/s` = examples recovered per second in this run (steps + fixed work; (b): the fastest of "
      "`--repeats` runs); `@N` = projected to the paper's N steps as fixed + N x step time; `ex-steps/s` = "
      "example-steps per second of the steps alone ((a), (c): median step; (b): (run - prepare) / steps); "
      "`fixed s` = step-independent seconds per example ((a), (c)) or per batch ((b): prepare). (b)/(a), (b)/(c): "
      "ratios of the engine row to the per-example loops of the same cell.",
      "",
      "| model | workload | variant | B | K_max | steps | ex/s | ex/s @N | ex-steps/s | fixed s | (b)/(a) | "
      "(b)/(a) @N | (b)/(a) steps | (b)/(c) | (b)/(c) @N | max abs obj diff vs (a) |",
      "|" + "---|" * 16,
  ]
  for r in result["rows"]:
    lines.append(
        f"| {r['model']} | {r['workload']} | {r['variant']} | {r['batch']} | {r['k_max']} | {r['steps']} | "
        f"{r['examples_per_s']:.3g} | {r['projected_examples_per_s']:.3g} @{r['project_steps']} | "
        f"{r['example_steps_per_s']:.3g} | {r['fixed_s']:.2f} | {_cell(r, 'speedup_vs_reference', '{:.1f}x')} | "
        f"{_cell(r, 'projected_speedup_vs_reference', '{:.1f}x')} | "
        f"{_cell(r, 'step_speedup_vs_reference', '{:.1f}x')} | "
        f"{_cell(r, 'speedup_vs_torch', '{:.1f}x')} | {_cell(r, 'projected_speedup_vs_torch', '{:.1f}x')} | "
        f"{_cell(r, 'objective_max_abs_diff_vs_reference', '{:.1e}')} |")
  lines += [
      "",
      "Utilisation of one step (model FLOPs counted analytically, bench/flops.py; (b): the whole batch's step). "
      "Memory: XLA's compiled-program temporaries ((a): one step; (b): the whole recovery).",
      "",
      "| model | workload | variant | B | step ms | GFLOP/step | step GFLOP/s | % peak | compile s | XLA temp MB | "
      "CPU s / wall s |",
      "|" + "---|" * 11,
  ]
  for r in result["rows"]:
    temp = r["memory"].get("temp_bytes")
    temp = "" if temp is None else f"{temp / 2**20:.0f}"
    cpu = "" if r.get("cpu_s") is None else f"{r['cpu_s'] / r['wall_s']:.2f}"
    lines.append(
        f"| {r['model']} | {r['workload']} | {r['variant']} | {r['batch']} | {r['step_ms']:.1f} | "
        f"{r['step_gflop']:.2f} | {r['step_flops_per_s'] / 1e9:.1f} | {100 * r['step_peak_fraction']:.1f} | "
        f"{_cell(r, 'compile_s', '{:.1f}')} | {temp} | {cpu} |")
  return "\n".join(lines) + "\n"


def run(args, log=print, checkpoint=None) -> dict:
  """The whole grid; ``checkpoint(result)`` (if given) is called after every cell with the rows so far."""
  t0 = time.perf_counter()
  result = {"machine": machine_info(), "args": vars(args),
            "command": "python -m bench.recovery_throughput " + " ".join(sys.argv[1:]) if __name__ == "__main__"
            else "bench.recovery_throughput.run", "rows": []}
  result["loadavg_start"] = os.getloadavg()
  log(f"machine: {result['machine']}, load average {result['loadavg_start']}")
  sizes = _ints(args.peak_sizes)
  result["peak"] = {"start": measure_peak(sizes),
                    "torch": None if args.no_torch else measure_torch_peak(sizes)}
  log(f"peak f32 matmul: {result['peak']['start']['flops_per_s'] / 1e9:.1f} GFLOP/s")
  peak = result["peak"]["start"]["flops_per_s"]
  models = list(dict.fromkeys(_strs(args.models) + (_strs(args.refusal_models) if "refusal" in args.workloads else [])))
  for model in models:
    params, cfg, tok = problems.load_bench_model(model, dtype=args.dtype)
    for kind in _strs(args.workloads):
      if (kind == "refusal" and model not in _strs(args.refusal_models)) or (
          kind != "refusal" and model not in _strs(args.models)):
        continue
      batches = _ints(args.ioi_batches if kind == "ioi" else args.refusal_batches)
      for k_max in _ints(args.k_max):
        log(f"{model} / {kind} / K_max={k_max}")
        result["rows"] += run_cell(params, cfg, tok, model, kind, k_max, batches, args, peak, log)
        if checkpoint is not None:
          checkpoint(result)
    del params
  result["peak"]["end"] = measure_peak(sizes)
  result["peak_flops_per_s"] = max(result["peak"]["start"]["flops_per_s"], result["peak"]["end"]["flops_per_s"])
  for r in result["rows"]:  # fractions of the best peak seen in this run
    r["step_peak_fraction"] = r["step_flops_per_s"] / result["peak_flops_per_s"]
  result["total_s"] = time.perf_counter() - t0
  result["loadavg_end"] = os.getloadavg()
  result["maxrss_mb"] = maxrss_mb()
  return result


def write(result: dict, out_dir: str) -> tuple[str, str]:
  os.makedirs(out_dir, exist_ok=True)
  js, md = os.path.join(out_dir, "recovery_throughput.json"), os.path.join(out_dir, "recovery_throughput.md")
  with open(js, "w") as f:
    json.dump(result, f, indent=1, default=str)
  with open(md, "w") as f:
    f.write(markdown(result))
  return js, md


def write_partial(result: dict, out_dir: str) -> str:
  """``recovery_throughput.partial.json``: the rows finished so far (a run stopped by a time limit keeps
  them); written atomically, removed by ``main`` when the run completes."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "recovery_throughput.partial.json")
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=1, default=str)
  os.replace(path + ".tmp", path)
  return path


def main(argv=None) -> None:
  args = parse_args(argv)
  result = run(args, checkpoint=lambda r: write_partial(r, args.out_dir))
  js, md = write(result, args.out_dir)
  partial = os.path.join(args.out_dir, "recovery_throughput.partial.json")
  if os.path.exists(partial):
    os.remove(partial)
  print(markdown(result))
  print(f"wrote {js} and {md}")


if __name__ == "__main__":
  main()
