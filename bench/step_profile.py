r"""Where a recovery step's time goes: the batched engine's XLA operations, grouped by kind.

  python -m bench.step_profile                                   # SmolLM2, IOI-shaped, batch 64, 20 steps
  python -m bench.step_profile --batch=4 --workload=refusal
  python -m bench.step_profile --model=tiny-llama --batch=2 --steps=3     # the smoke test

The workload is ``bench.problems``' (the one ``bench.recovery_throughput`` times as variant (b)). Its
compiled recovery runs once under ``jax.profiler`` (a Perfetto trace) with ``--steps`` steps and once
with twice as many; every XLA CPU operation's time is summed by name in each, and the difference,
divided by ``--steps``, is what a step costs (the prepare part and whatever a recovery does once
cancel out). The two programs differ only in the loop's trip count, so their operations have the same
names; a run where they do not is an error. Control flow (``while``, ``conditional``, ``call``) is left
out: its time is its operations'. Kinds, from the fusion names XLA gives:

  dot             matmuls (``dot``, and the XNNPACK / YNNPACK / oneDNN fusions that wrap them)
  solve           triangular solves and Cholesky factorisations (the encoder projection's ridge solve)
  slice           ``dynamic-slice`` fusions: a layer's weights (or KV slice) copied out of the stack
  update          ``dynamic-update-slice`` fusions: per-layer results written into stacked buffers
  copy            copies and transposes (layout changes)
  reduce          reductions
  elementwise     everything else (norms, activations, softmax, the optimiser's updates)

Times are thread time: XLA runs independent operations at once on a multi-core host, so the sum can
pass the step's wall time, which is reported beside it (``--repeats`` untraced calls, the fastest).
Results: ``--out`` (JSON, default ``bench/results/step_profile_<date>.json``) and the table next to it.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import sys
import tempfile

import jax

from bench import engine_batched, problems, whole_run

KINDS = ("dot", "solve", "slice", "update", "copy", "reduce", "elementwise")
CONTAINERS = ("while", "conditional", "call")  # their time is their operations' time: left out


def kind_of(op: str) -> str:
  """The kind of an XLA operation, from its HLO name (``ynn_fusion.65``, ``copy_bitcast_fusion.20``)."""
  name = op.split(".")[0]
  if name.startswith(("ynn_fusion", "xnn_fusion", "onednn", "dot")) or name in ("custom-call",):
    return "dot"
  if name.startswith(("triangular_solve", "cholesky")):
    return "solve"
  if "dynamic-update-slice" in name:
    return "update"
  if "dynamic-slice" in name:
    return "slice"
  if "copy" in name or "transpose" in name:
    return "copy"
  if "reduce" in name:
    return "reduce"
  return "elementwise"


def op_seconds(fn) -> dict[str, float]:
  """Seconds per XLA operation (HLO name) over one traced call of ``fn`` (after it has run once): the
  trace's complete events that carry an ``hlo_op``, so runtime and Python events are left out."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      fn()
    paths = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
      raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {d}")
    with gzip.open(paths[0]) as f:
      events = json.load(f)["traceEvents"]
  out: dict[str, float] = collections.Counter()
  for e in events:
    op = e.get("args", {}).get("hlo_op") if e.get("ph") == "X" and "dur" in e else None
    if op and not op.split(".")[0].startswith(CONTAINERS):
      out[op] += e["dur"] * 1e-6
  return dict(out)


def step_ops(short_s: dict[str, float], long_s: dict[str, float], steps: int) -> dict[str, float]:
  """Per-step seconds per operation: (the ``2 * steps`` run's sums - the ``steps`` run's) / ``steps``,
  never negative. Both runs must have the same operations (names)."""
  if set(short_s) != set(long_s):
    diff = sorted(set(short_s) ^ set(long_s))[:5]
    raise RuntimeError(f"the two recoveries' programs differ beyond their step count (operations {diff})")
  return {n: max(long_s[n] - short_s[n], 0.0) / steps for n in short_s}


def by_kind(ops: dict[str, float], top: int = 3) -> dict[str, dict]:
  """{kind: {"seconds", "fraction", "top": [(op, seconds)]}} over ``ops`` (per-step seconds)."""
  total = sum(ops.values()) or 1.0
  groups: dict[str, dict[str, float]] = {k: {} for k in KINDS}
  for n, s in ops.items():
    groups[kind_of(n)][n] = s
  return {k: {"seconds": sum(g.values()), "fraction": sum(g.values()) / total,
              "top": sorted(g.items(), key=lambda kv: -kv[1])[:top]} for k, g in groups.items()}


def run(args, log=print) -> dict:
  params, cfg, tok = problems.load_bench_model(args.model)
  wl = problems.make_workload(args.workload, params, cfg, tok, n=args.batch, k_max=args.k_max, steps=args.steps)
  eng = engine_batched.EngineBatched(params, wl)
  compile_s = eng.compile()["compile_s"]
  timed = eng.run(args.repeats)
  longer = engine_batched.EngineBatched(params, problems.make_workload(
      args.workload, params, cfg, tok, n=args.batch, k_max=args.k_max, steps=2 * args.steps))
  longer.compile()
  traced = []
  for e in (eng, longer):
    rec, call_args = e.compiled[0], e._args()  # pylint: disable=protected-access
    traced.append(op_seconds(lambda rec=rec, call_args=call_args: jax.block_until_ready(rec(*call_args).objective)))
  ops = step_ops(*traced, args.steps)
  step_wall = max(timed["wall_s"] - timed["prepare_s"], 0.0) / args.steps
  result = {"command": "python -m bench.step_profile " + " ".join(sys.argv[1:]) if __name__ == "__main__"
            else "bench.step_profile.run", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "args": vars(args), "model": args.model, "workload": args.workload, "batch": args.batch,
            "steps": args.steps, "remat": wl.spec.remat, "compile_s": compile_s, "step_wall_s": step_wall,
            "step_thread_s": sum(ops.values()), "kinds": by_kind(ops), "loadavg": os.getloadavg(),
            "devices": [str(d) for d in jax.devices()]}
  log(markdown(result))
  return result


def markdown(result: dict) -> str:
  lines = [f"{result['model']}, {result['workload']}-shaped, batch {result['batch']}, {result['steps']} steps, "
           f"remat {result['remat']!r}: a step takes {1e3 * result['step_wall_s']:.1f} ms of wall time and "
           f"{1e3 * result['step_thread_s']:.1f} ms of XLA thread time (1-min load {result['loadavg'][0]:.2f}).", "",
           "| kind | ms a step (thread) | share | largest operations (ms) |", "|---|---|---|---|"]
  for k in KINDS:
    g = result["kinds"][k]
    top = ", ".join(f"{n} {1e3 * s:.1f}" for n, s in g["top"])
    lines.append(f"| {k} | {1e3 * g['seconds']:.1f} | {100 * g['fraction']:.1f}% | {top} |")
  return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="smollm2-135m", choices=problems.MODELS)
  ap.add_argument("--workload", default="ioi", choices=problems.KINDS)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--k_max", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3, help="untraced calls for the wall time (the fastest)")
  ap.add_argument("--out", default="", help="results JSON (default bench/results/step_profile_<date>.json)")
  args = ap.parse_args(argv)
  for k in ("batch", "steps", "k_max", "repeats"):
    if getattr(args, k) < 1:
      ap.error(f"--{k}={getattr(args, k)}: must be >= 1")
  if not args.out:
    args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                            f"step_profile_{datetime.date.today().isoformat()}.json")
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  result = run(args)
  js, md = whole_run.write_json_md(result, args.out, markdown)
  print(f"wrote {js} and {md}")


if __name__ == "__main__":
  main()
