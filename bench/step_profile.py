r"""Where a recovery step's time goes: the batched engine's XLA operations, grouped by kind.

  python -m bench.step_profile                                   # SmolLM2, IOI-shaped, batch 64, 20 steps
  python -m bench.step_profile --batch=4 --workload=refusal
  python -m bench.step_profile --model=tiny-llama --batch=2 --steps=3     # the smoke test

The workload is ``bench.problems``' (the one ``bench.recovery_throughput`` times as variant (b)). Its
compiled recovery (prepare, then ``--steps`` steps) and its prepare part alone each run once under
``jax.profiler`` (a Perfetto trace); every XLA CPU operation's time is summed by name, the prepare's
sums are taken off the recovery's, and the rest is divided by the steps (control flow, ``while`` and
``conditional``, is left out: its time is its operations'). What a recovery does once outside the
prepare part (the projection's factorisation, the final evaluation) is spread over the steps, so use
enough steps. Kinds, from the fusion names
XLA gives:

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


def step_ops(recover_s: dict[str, float], prepare_s: dict[str, float], steps: int) -> dict[str, float]:
  """Per-step seconds per operation: the recovery's sums less the prepare's, over ``steps``."""
  names = set(recover_s) | set(prepare_s)
  return {n: max(recover_s.get(n, 0.0) - prepare_s.get(n, 0.0), 0.0) / steps for n in names}


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
  rec, prep = eng.compiled
  call_args = eng._args()  # pylint: disable=protected-access
  rec_s = op_seconds(lambda: jax.block_until_ready(rec(*call_args).objective))
  prep_s = op_seconds(lambda: jax.block_until_ready(prep(*call_args[:3])))
  ops = step_ops(rec_s, prep_s, args.steps)
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
