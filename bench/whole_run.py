r"""Whole runs: the demo's settings from a cold and from a warm compilation cache, per phase.

  python -m bench.whole_run                           # the four demo settings, cold then warm
  python -m bench.whole_run --settings=ioi,tpp --cold
  python -m bench.whole_run --tiny --settings=ioi     # tiny random models (the smoke test)
  python -m bench.whole_run --one_process             # configs/demo.py itself, all settings in one process

Every run is a fresh ``python -m recovery_jax.main --config=configs/demo.py[:tiny],only=<setting>``
subprocess into a new workdir (``--one_process``: one subprocess per pass running every setting, as
``make demo`` does). The passes:

  cold   ``RECOVERY_JAX_COMPILATION_CACHE`` points at a new empty folder, shared by the pass's settings
         in order (as in one demo run; ``--cache_per_setting``: a new folder per setting, and each
         setting's cold and warm runs follow each other), and ``RECOVERY_JAX_CACHE`` (converted
         weights, tokenizers) at another beside it, as on a fresh machine
  warm   a second run of each setting with the folder(s) the cold pass filled. ``--warm`` alone fills a
         new folder with an unrecorded ``prime`` run first, or uses ``--cache_dir`` as it is

Each run writes ``<workdir>/<setting>/profile.json`` (``recovery_jax.profile``: seconds per phase,
compile count, persistent-cache hits); they are collected into one table (per setting x pass: the
subprocess's wall time, the run's own wall time, each phase's seconds and fraction, XLA programs,
compiled, cache hits), with the 1-minute load average at the start and end of every run and of the
benchmark. Results: ``bench/results/whole_run_<date>.json`` and ``.md`` (``--tiny``:
``whole_run_tiny_<date>``), rewritten after every run (``"partial": true`` until the last), the
table printed. The unlearning and TPP settings read the offline corpus (``make corpus``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ("ioi", "refusal", "unlearning", "tpp")  # configs/demo.py's ORDER
NEEDS_CORPUS = ("unlearning", "tpp")
CORPUS_MANIFEST = os.path.join(ROOT, ".cache", "corpus", "MANIFEST.json")  # the Makefile's corpus target
PHASES = ("load", "compile", "preflight", "recovery", "generation", "evaluation", "report", "other")
CACHE_ENV = "RECOVERY_JAX_COMPILATION_CACHE"
ASSETS_ENV = "RECOVERY_JAX_CACHE"  # converted weights and tokenizers (models/loading.py)


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--settings", default=",".join(SETTINGS), help="comma list of " + ",".join(SETTINGS))
  ap.add_argument("--tiny", action="store_true", help="configs/demo.py:tiny (tiny random models; smoke test)")
  which = ap.add_mutually_exclusive_group()
  which.add_argument("--cold", action="store_true", help="only the cold pass")
  which.add_argument("--warm", action="store_true", help="only the warm pass (see --cache_dir)")
  which.add_argument("--both", action="store_true", help="cold, then warm (the default)")
  ap.add_argument("--cache_dir", default="", help="--warm: use this compilation cache folder as it is (default: "
                  "a new folder filled by an unrecorded run first)")
  ap.add_argument("--cache_per_setting", action="store_true", help="a new cache folder per setting (default: one "
                  "per pass, shared by its settings in order, as one demo run)")
  ap.add_argument("--one_process", action="store_true", help="one subprocess per pass running every setting "
                  "(configs/demo.py,only=a-b-...), as make demo")
  ap.add_argument("--workroot", default="", help="folder for the runs' workdirs, caches and logs (default: a new "
                  "temporary folder)")
  ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess")
  ap.add_argument("--out", default="", help="results JSON (default bench/results/whole_run[_tiny]_<date>.json; "
                  "the markdown table goes next to it as .md)")
  args = ap.parse_args(argv)
  args.settings = [s for s in args.settings.split(",") if s]
  unknown = [s for s in args.settings if s not in SETTINGS]
  if unknown or not args.settings:
    ap.error(f"--settings={','.join(args.settings)!r}: unknown {unknown or 'empty'}; expected a comma list of "
             f"{','.join(SETTINGS)}")
  if args.cache_dir and not args.warm:
    ap.error("--cache_dir is for --warm alone (cold and --both make new folders)")
  if args.cache_dir and not os.path.isdir(args.cache_dir):
    ap.error(f"--cache_dir={args.cache_dir!r} is not a folder")
  args.passes = ("cold",) if args.cold else ("warm",) if args.warm else ("cold", "warm")
  if not args.out:
    date = datetime.date.today().isoformat()
    args.out = os.path.join(ROOT, "bench", "results", f"whole_run{'_tiny' if args.tiny else ''}_{date}.json")
  return args


def check_corpus(settings) -> None:
  """The unlearning and TPP demos read the offline corpus: fail before any run when it is missing."""
  need = [s for s in settings if s in NEEDS_CORPUS]
  if need and not os.path.exists(CORPUS_MANIFEST):
    raise SystemExit(f"error: the settings {need} read the offline corpus, and {CORPUS_MANIFEST} does not exist: "
                     "run `make corpus` first (about 40 s, once)")


def config_spec(names, tiny: bool) -> str:
  """``configs/demo.py:[tiny,]only=a-b``: the demo config restricted to ``names``."""
  return f"configs/demo.py:{'tiny,' if tiny else ''}only={'-'.join(names)}"


def folder_stats(path: str) -> dict:
  """Files and bytes under ``path`` (a compilation cache folder)."""
  n = size = 0
  for base, _, files in os.walk(path):
    for f in files:
      try:
        size += os.path.getsize(os.path.join(base, f))
        n += 1
      except OSError:
        pass
  return {"files": n, "bytes": size}


def machine_speed() -> float:
  """GFLOP/s of the best of 5 jitted f32 [1024, 1024] matmul chains (about a second): the host's speed
  now. Shared virtual CPUs change speed under other tenants' load, which the load average does not
  show; a run whose speed before and after differ is timed on a different machine than its neighbours."""
  from bench.recovery_throughput import measure_peak  # pylint: disable=import-outside-toplevel
  return measure_peak(sizes=(1024,))["flops_per_s"] / 1e9


def run_once(names, *, tiny: bool, cache_dir: str, workdir: str, log_path: str, timeout: float,
             assets_dir: str = "") -> dict:
  """One ``recovery_jax.main`` subprocess running the settings ``names`` into ``workdir`` with the
  compilation cache at ``cache_dir`` (and, when given, ``RECOVERY_JAX_CACHE`` at ``assets_dir``): its
  wall time, exit status, load averages, cache folder sizes and each setting's ``profile.json`` (None
  when missing)."""
  env = dict(os.environ, **{CACHE_ENV: cache_dir})
  if assets_dir:
    env[ASSETS_ENV] = assets_dir
  env.setdefault("HF_HUB_OFFLINE", "1")
  cmd = [sys.executable, "-m", "recovery_jax.main", f"--config={config_spec(names, tiny)}", f"--workdir={workdir}"]
  out = {"settings": list(names), "command": " ".join(cmd), "cache_dir": cache_dir, "workdir": workdir,
         "log": log_path, "cache_before": folder_stats(cache_dir), "loadavg_start": os.getloadavg(),
         "gflops_start": machine_speed()}
  t0 = time.perf_counter()
  with open(log_path, "w") as log:
    try:
      rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                          check=False).returncode
    except subprocess.TimeoutExpired:
      rc = "timeout"
  out.update(process_s=time.perf_counter() - t0, returncode=rc, loadavg_end=os.getloadavg(),
             cache_after=folder_stats(cache_dir), gflops_end=machine_speed())
  out["profiles"] = {}
  for name in names:
    try:
      with open(os.path.join(workdir, name, "profile.json")) as f:
        out["profiles"][name] = json.load(f)
    except (OSError, ValueError):
      out["profiles"][name] = None
  if rc != 0:
    with open(log_path, errors="replace") as f:
      out["log_tail"] = f.read()[-2000:]
  return out


def run(args, log=print, checkpoint=None) -> dict:
  """Every pass of ``args.passes`` over ``args.settings``; the result dict written by ``write``.
  ``checkpoint(result)`` (if given) is called after every run with the rows so far (a benchmark
  stopped by a time limit keeps what it finished)."""
  check_corpus(args.settings)
  root = args.workroot or tempfile.mkdtemp(prefix="whole_run_")
  os.makedirs(root, exist_ok=True)
  result = {"command": "python -m bench.whole_run " + " ".join(sys.argv[1:]) if __name__ == "__main__"
            else "bench.whole_run.run", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "settings": args.settings, "tiny": args.tiny, "one_process": args.one_process,
            "cache_per_setting": args.cache_per_setting, "passes": list(args.passes), "workroot": root,
            "machine": machine(), "loadavg_start": os.getloadavg(), "runs": []}
  groups = [args.settings] if args.one_process else [[s] for s in args.settings]

  def cache_for(group) -> str:
    if args.cache_dir:
      return args.cache_dir
    return os.path.join(root, "cache" + (f"_{'-'.join(group)}" if args.cache_per_setting else ""))

  def one(pass_name, group):
    tag = f"{pass_name}_{'-'.join(group)}"
    log(f"[{tag}] {config_spec(group, args.tiny)} (cache {cache_for(group)})")
    r = run_once(group, tiny=args.tiny, cache_dir=cache_for(group), workdir=os.path.join(root, tag),
                 log_path=os.path.join(root, tag + ".log"), timeout=args.timeout,
                 assets_dir="" if args.cache_dir else cache_for(group) + "_assets")
    r["pass"] = pass_name
    log(f"[{tag}] exit {r['returncode']}, {r['process_s']:.1f} s, load {r['loadavg_start'][0]:.2f} -> "
        f"{r['loadavg_end'][0]:.2f}")
    result["runs"].append(r)
    if checkpoint is not None:
      checkpoint(dict(result, rows=rows(result["runs"]), loadavg_end=os.getloadavg(), partial=True))

  passes = (("prime",) if args.passes == ("warm",) and not args.cache_dir else ()) + tuple(args.passes)
  if args.cache_per_setting:  # independent folders: each setting's passes together (a time limit keeps pairs)
    order = [(p, g) for g in groups for p in passes]
  else:  # one folder per pass sequence, filled in the settings' order as one demo run fills it
    order = [(p, g) for p in passes for g in groups]
  for pass_name, group in order:
    one(pass_name, group)
  result["loadavg_end"] = os.getloadavg()
  result["rows"] = rows(result["runs"])
  result["failed"] = [f"{r['pass']}_{'-'.join(r['settings'])}" for r in result["runs"] if r["returncode"] != 0]
  result["partial"] = False
  return result


def machine() -> dict:
  import platform  # pylint: disable=import-outside-toplevel
  info = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        info["cpu"] = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return info


def rows(runs) -> list[dict]:
  """One row per (pass, setting): seconds and fraction per phase, compilations (no ``wall_s`` when the
  run left no profile); plus a ``total`` row per pass of several settings (fractions of the summed run
  time)."""
  out = []
  for r in runs:
    if r["pass"] == "prime":
      continue
    for name in r["settings"]:
      p = r["profiles"].get(name)
      row = {"pass": r["pass"], "setting": name, "returncode": r["returncode"],
             "process_s": r["process_s"] if len(r["settings"]) == 1 else None,
             "loadavg_start": r["loadavg_start"][0], "loadavg_end": r["loadavg_end"][0],
             "gflops": (r.get("gflops_start"), r.get("gflops_end"))}
      if p is not None:
        c = p["compilations"]
        row.update(wall_s=p["wall_s"], phases={k: p["phases"].get(k, {"seconds": 0.0, "fraction": 0.0})
                                                for k in PHASES},
                   programs=c["programs"], compiled=c["compiled"], cache_hits=c["persistent_cache_hits"],
                   traces=c["traces"])
      out.append(row)
  for pass_name in dict.fromkeys(r["pass"] for r in out):
    done = [r for r in out if r["pass"] == pass_name and "wall_s" in r]
    if len(done) < 2:
      continue
    wall = sum(r["wall_s"] for r in done)
    phases = {k: sum(r["phases"][k]["seconds"] for r in done) for k in PHASES}
    procs = sum(r["process_s"] for r in runs if r["pass"] == pass_name)
    out.append({"pass": pass_name, "setting": "total", "wall_s": wall, "process_s": procs,
                "phases": {k: {"seconds": s, "fraction": s / wall if wall else 0.0} for k, s in phases.items()},
                **{k: sum(r[k] for r in done) for k in ("programs", "compiled", "cache_hits", "traces")}})
  return out


def markdown(result: dict) -> str:
  """The table: per setting x pass, process and run wall time, each phase as seconds (fraction),
  compilations and the run's load average."""
  head = ["setting", "cache", "process s", "run s", *PHASES, "programs", "compiled", "cache hits", "load start/end",
          "GFLOP/s start/end"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in result["rows"]:
    if "wall_s" not in r:
      lines.append(f"| {r['setting']} | {r['pass']} | failed (exit {r['returncode']}) |" + " |" * (len(head) - 3))
      continue
    proc = "-" if r.get("process_s") is None else f"{r['process_s']:.1f}"
    cells = [f"{r['phases'][k]['seconds']:.1f} ({100 * r['phases'][k]['fraction']:.0f}%)" for k in PHASES]
    load = "" if r["setting"] == "total" else f"{r['loadavg_start']:.2f} / {r['loadavg_end']:.2f}"
    speed = "" if r["setting"] == "total" or None in r.get("gflops", (None,)) else "%.0f / %.0f" % r["gflops"]
    name = f"**{r['setting']}**" if r["setting"] == "total" else r["setting"]
    lines.append("| " + " | ".join([name, r["pass"], proc, f"{r['wall_s']:.1f}", *cells, str(r["programs"]),
                                     str(r["compiled"]), str(r["cache_hits"]), load, speed]) + " |")
  la0, la1 = result["loadavg_start"][0], result["loadavg_end"][0]
  return (("**Partial**: the runs finished so far. " if result.get("partial") else "")
          + f"Whole runs ({'tiny' if result['tiny'] else 'demo'} configs, "
          f"{'one process per pass' if result['one_process'] else 'one process per setting'}; "
          f"{result['machine'].get('cpu', '?')}, {result['machine']['cpu_count']} CPUs), 1-min load average "
          f"{la0:.2f} at the start, {la1:.2f} at the end. process s: the subprocess's wall time (interpreter, "
          "imports); run s: the run's own (profile.json); phases: exclusive seconds (fraction of run s); GFLOP/s: "
          "an f32 matmul's speed on this host just before and after the run (``machine_speed``).\n\n"
          + "\n".join(lines) + "\n")


def write_json_md(result: dict, out: str, render) -> tuple[str, str]:
  """``out`` (JSON) and ``render(result)`` (markdown) next to it (``.md``): a benchmark's result files."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  md = os.path.splitext(out)[0] + ".md"
  with open(out, "w") as f:
    json.dump(result, f, indent=1, default=str)
  with open(md, "w") as f:
    f.write(render(result))
  return out, md


def write(result: dict, out: str) -> tuple[str, str]:
  """``out`` (JSON) and the markdown table next to it (``.md``)."""
  return write_json_md(result, out, markdown)


def main(argv=None) -> None:
  args = parse_args(argv)
  # a SIGTERM (``timeout``) ends the running subprocess too: subprocess.run kills its child on the exit
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  result = run(args, checkpoint=lambda r: write(r, args.out))
  js, md = write(result, args.out)
  print(markdown(result))
  print(f"wrote {js} and {md}")
  if result["failed"]:
    raise SystemExit(f"error: runs failed: {', '.join(result['failed'])} (logs under {result['workroot']})")


if __name__ == "__main__":
  main()
