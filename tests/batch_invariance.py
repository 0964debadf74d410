"""Helpers for the batch-size / device-count / resume equality tests of the settings' apps: run an app
on its tiny variant in a subprocess (optionally with 8 fake CPU devices) and compare per-example rows
field by field."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd_env(config: str, workdir, flags, devices: int) -> tuple[list[str], dict]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  if devices > 1:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
  return [sys.executable, "-m", "recovery_jax.main", f"--config={config}", f"--workdir={workdir}", *flags], env


def run_app(config: str, workdir, *flags, devices: int = 1, timeout: int = 900) -> subprocess.CompletedProcess:
  """``python -m recovery_jax.main --config=<config> --workdir=<workdir> <flags>``; fails with its output."""
  cmd, env = _cmd_env(config, workdir, flags, devices)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f"app failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


def kill_after_units(config: str, workdir, *flags, units: int = 1, timeout: int = 600) -> None:
  """Starts the app and SIGKILLs it once ``units`` work units are stored (a real kill, mid-run);
  fails if the run finished first or left a results file behind."""
  cmd, env = _cmd_env(config, workdir, flags, 1)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  store = os.path.join(workdir, "units")
  deadline = time.time() + timeout
  try:
    while time.time() < deadline:
      if os.path.isdir(store) and sum(d.isdigit() for d in os.listdir(store)) >= units:
        break
      if proc.poll() is not None:
        raise AssertionError(f"the run ended ({proc.returncode}) before it could be killed")
      time.sleep(0.1)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert not any(os.path.exists(os.path.join(workdir, f)) for f in ("results.jsonl", "recovery.jsonl"))


def read_rows(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _close(a, b, rtol: float, atol: float) -> bool:
  if isinstance(a, float) or isinstance(b, float):
    if a is None or b is None:
      return a is b
    if math.isnan(a) or math.isnan(b):
      return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= atol + rtol * abs(b)
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(_close(x, y, rtol, atol) for x, y in zip(a, b))
  return a == b


def assert_same_rows(rows_a: list[dict], rows_b: list[dict], *, rtol: float = 1e-3, atol: float = 1e-4,
                     ignore: tuple[str, ...] = ()) -> None:
  """Same rows in the same order, every field equal (floats to tolerance); names the first
  differing row and field."""
  assert len(rows_a) == len(rows_b), (len(rows_a), len(rows_b))
  for i, (a, b) in enumerate(zip(rows_a, rows_b)):
    keys = (set(a) | set(b)) - set(ignore)
    assert set(a) - set(ignore) == set(b) - set(ignore), (i, sorted(set(a) ^ set(b)))
    for k in sorted(keys):
      assert _close(a[k], b[k], rtol, atol), f"row {i} field {k!r}: {a[k]!r} != {b[k]!r}"


def drop_units(workdir, keep: int) -> int:
  """Simulates a run killed after ``keep`` finished work units: removes the later units and every
  output written after the grid. Returns how many units were removed."""
  units = os.path.join(workdir, "units")
  steps = sorted((d for d in os.listdir(units) if d.isdigit()), key=int)
  for d in steps[keep:]:
    shutil.rmtree(os.path.join(units, d))
  for name in os.listdir(workdir):
    path = os.path.join(workdir, name)
    if os.path.isfile(path) and not name.startswith(("config.", ".")):
      os.remove(path)
  return len(steps) - keep
