"""Median and range over repeated ``bench.recovery_throughput`` runs (issue 13: three runs, median
and range, with the load average of each run).

  python -m bench.recovery_throughput --quick --out_dir=bench/results/quick_run1   # x3 (run1..3)
  python -m bench.median_of_runs bench/results/quick_run{1,2,3} --out=bench/results/quick_median.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# (column title, row key, format)
COLUMNS = (
    ("step ms", "step_ms", "{:.0f}"),
    ("ex-steps/s", "example_steps_per_s", "{:.2f}"),
    ("% peak", "step_peak_fraction", "{:.0%}"),
    ("(b)/(a) run", "speedup_vs_reference", "{:.1f}x"),
    ("(b)/(a) steps", "step_speedup_vs_reference", "{:.1f}x"),
    ("(b)/(c) run", "speedup_vs_torch", "{:.1f}x"),
    ("(b)/(c) steps", "step_speedup_vs_torch", "{:.1f}x"),
)


def load_runs(dirs: list[str]) -> list[dict]:
  runs = []
  for d in dirs:
    path = Path(d) / "recovery_throughput.json"
    if not path.is_file():
      raise SystemExit(f"median_of_runs: {path} does not exist (run bench.recovery_throughput with --out_dir={d})")
    runs.append(json.loads(path.read_text()))
  return runs


def _cell(values: list[float], fmt: str) -> str:
  if not values:
    return ""
  med = fmt.format(statistics.median(values))
  return med if len(values) == 1 else f"{med} ({fmt.format(min(values))} to {fmt.format(max(values))})"


def table(runs: list[dict]) -> str:
  """Markdown: per (model, workload, variant, batch, K_max) row the median (range) of each column."""
  keyf = lambda r: (r["model"], r["workload"], r["variant"], r["batch"], r["k_max"])
  keys = list(dict.fromkeys(keyf(r) for run in runs for r in run["rows"]))
  lines = ["| model | workload | variant | B | K_max | " + " | ".join(c[0] for c in COLUMNS) + " |",
           "|" + "---|" * (5 + len(COLUMNS))]
  for k in keys:
    rows = [r for run in runs for r in run["rows"] if keyf(r) == k]
    cells = [_cell([float(r[key]) for r in rows if r.get(key) is not None], fmt) for _, key, fmt in COLUMNS]
    lines.append("| " + " | ".join(map(str, k)) + " | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def header(runs: list[dict]) -> str:
  lines = [f"{len(runs)} runs; median (min to max). Per run: command, wall, 1-min load average at start/end, peak:"]
  for run in runs:
    lines.append(f"- `{run['command']}`: {run['total_s']:.0f} s, load {run['loadavg_start'][0]:.1f} / "
                 f"{run['loadavg_end'][0]:.1f}, peak {run['peak_flops_per_s'] / 1e9:.0f} GFLOP/s")
  return "\n".join(lines)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("dirs", nargs="+", help="out_dirs of bench.recovery_throughput runs")
  ap.add_argument("--out", default="", help="also write the markdown here")
  args = ap.parse_args(argv)
  runs = load_runs(args.dirs)
  text = header(runs) + "\n\n" + table(runs) + "\n"
  print(text)
  if args.out:
    Path(args.out).write_text(text)


if __name__ == "__main__":
  main()
