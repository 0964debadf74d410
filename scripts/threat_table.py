"""The threat model x mode table of a grid setting from several finished runs (one run per threat model).

  python scripts/threat_table.py after=runs/ioi_threat_after upstream=runs/ioi_threat_upstream ...

Each run folder is a relative-budget sweep (``recovery.budget_scale=relative``, several ``sweep.budget``);
reads its ``summary.jsonl`` (written by ``python -m recovery_jax.report``) and ``min_budget.jsonl``, and
prints one markdown row per threat model x mode x variant: valid/N, recovered with its Wilson interval at
each rho, the median minimum rho (bisected where the run bisected) with its bootstrap interval, and the
activation / pre-activation drift and reactivation of the clamped features at the smallest and largest rho.
"""

import json
import os
import sys

import numpy as np

from recovery_jax import outputs
from recovery_jax.recovery import min_budget


def _jsonl(path):
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def main(argv):
  rows, rhos = [], set()
  runs = [a.split("=", 1) for a in argv[1:]]
  for _, wd in runs:
    rhos |= {s["budget"] for s in _jsonl(os.path.join(wd, "summary.jsonl"))}
  rhos = sorted(rhos)
  fmt = lambda x: "-" if x is None else ("inf" if np.isinf(x) else f"{x:.3g}")
  for name, wd in runs:
    summ = _jsonl(os.path.join(wd, "summary.jsonl"))
    mb = os.path.join(wd, "min_budget.jsonl")
    mins = _jsonl(mb) if os.path.exists(mb) else []
    for mode in dict.fromkeys(s["mode"] for s in summ):
      for variant in dict.fromkeys(s["variant"] for s in summ if s["mode"] == mode):
        pts = {s["budget"]: s for s in summ if s["mode"] == mode and s["variant"] == variant}
        first, last = pts[rhos[0]], pts[rhos[-1]]
        cells = [name, mode, variant, f"{first['n_valid']}/{first['n_examples']}"]
        cells += [f"{pts[r]['n_recovered']}/{pts[r]['n_valid']} [{pts[r]['ci'][0]:.2f}, {pts[r]['ci'][1]:.2f}]"
                  if r in pts else "-" for r in rhos]
        m = [min_budget.rho(r["min_rho"]) for r in mins if r["mode"] == mode and r["variant"] == variant]
        med, lo, hi = min_budget.median_ci(m) if m else (None, None, None)
        cells.append(f"{fmt(med)} [{fmt(lo)}, {fmt(hi)}]")
        cells.append(f"{first['act_drift_valid']:.3f} / {last['act_drift_valid']:.3f}")
        pre = [p.get("pre_act_drift_valid") for p in (first, last)]  # None: no clamp at the delta site
        cells.append("-" if None in pre else f"{pre[0]:.3f} / {pre[1]:.3f}")
        cells.append(f"{first['reactivation_valid']:.3f} / {last['reactivation_valid']:.3f}")
        rows.append(cells)
  header = (["threat model", "mode", "variant", "valid/N"] + [f"recovered at rho={r:g} [W 95%]" for r in rhos]
            + ["median min rho [95% CI]", "act drift (min / max rho)", "pre-act drift (min / max rho)",
               "react. frac (min / max rho)"])
  print(outputs.format_table(header, rows))


if __name__ == "__main__":
  main(sys.argv)
