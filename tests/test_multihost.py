"""Multi-host for real: the IOI app on ``configs/ioi.py:tiny,grid`` across 2 processes on this
machine (``jax.distributed`` with a coordinator on 127.0.0.1, 4 fake CPU devices each, one ``data``
mesh over all 8), SIGKILLed mid-sweep and restarted, resumes to the results of a single-process run
on 8 devices; only process 0 writes the outputs.

Each process runs ``python -m tests.test_multihost <app flags>``: the app itself, with every
write-mode ``open`` and ``os.replace`` under the workdir (outside ``units/``, which orbax shares)
recorded to ``$RJ_WRITE_LOG``, so the test sees which process wrote what. Every wait is bounded.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/ioi.py:tiny,grid"
FLAGS = ("--config.plots=True", "--config.progress=False", "--config.recovery.modes=('encoder',)")  # 2 units of 2
OUTPUTS = ("config.json", "results.jsonl", "curves.json", "run.json", "summary.md", "summary.jsonl",
           "recovery_vs_drift.png", "objective_curves.png")
RUN_TIMEOUT = 420  # seconds for one whole run (cold compiles ~2-3 min on this 2-core CPU)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, cache: str, **extra) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.update(extra)
  return env


def _launch(workdir, cache, logs) -> list[subprocess.Popen]:
  """Starts the 2 processes of one multi-process run; their output goes to ``logs/p{i}.log``."""
  os.makedirs(logs, exist_ok=True)
  port, procs = _free_port(), []
  for i in range(2):
    env = _env(4, cache, RECOVERY_JAX_COORDINATOR=f"127.0.0.1:{port}", RECOVERY_JAX_NUM_PROCESSES="2",
               RECOVERY_JAX_PROCESS_ID=str(i), RECOVERY_JAX_INIT_TIMEOUT="120",
               RJ_WRITE_LOG=os.path.join(logs, f"writes{i}.txt"))
    out = open(os.path.join(logs, f"p{i}.log"), "w")  # pylint: disable=consider-using-with
    procs.append(subprocess.Popen([sys.executable, "-m", "tests.test_multihost", f"--config={CONFIG}",
                                   f"--workdir={workdir}", *FLAGS], cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT))
  return procs


def _kill(procs) -> None:
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)


def _log(logs, i) -> str:
  with open(os.path.join(logs, f"p{i}.log")) as f:
    return f.read()


def _wait(procs, logs, timeout=RUN_TIMEOUT) -> None:
  """Waits for both processes (bounded); kills both and fails with their logs on a timeout or error."""
  deadline = time.time() + timeout
  while time.time() < deadline and any(p.poll() is None for p in procs):
    time.sleep(0.5)
  hung = any(p.poll() is None for p in procs)
  _kill(procs)
  if hung or any(p.returncode for p in procs):
    pytest.fail(f"multi-process run {'timed out' if hung else 'failed'} (rc {[p.returncode for p in procs]}):\n"
                + "\n".join(f"--- process {i}:\n{_log(logs, i)[-3000:]}" for i in range(2)))


def _rows(workdir):
  with open(os.path.join(workdir, "results.jsonl")) as f:
    return sorted((json.loads(line) for line in f), key=lambda r: (r["point_id"], r["example"]))


def _writes(logs, i) -> set[str]:
  path = os.path.join(logs, f"writes{i}.txt")
  if not os.path.exists(path):
    return set()
  with open(path) as f:
    return {os.path.basename(line.strip()) for line in f if line.strip()}  # temp files and final names


NUMBERS = ("base", "defended", "recovered_score", "act_drift_l2", "delta_norm", "pre_act_drift_l2")


def _assert_same(a, b, rtol):
  assert len(a) == len(b) == 4 * 16
  for ra, rb in zip(a, b):
    assert (ra["point_id"], ra["prompt"], ra["valid"], ra["recovered"]) == (rb["point_id"], rb["prompt"],
                                                                             rb["valid"], rb["recovered"])
    for k in NUMBERS:
      assert abs(ra[k] - rb[k]) <= rtol * (1 + abs(ra[k])), (k, ra, rb)


@pytest.mark.multidevice
def test_two_processes_equal_one_write_once_and_resume_after_a_kill(tmp_path):
  cache = str(tmp_path / "jax_cache")
  # the single-process reference: 8 devices in one process, the same data mesh
  ref = tmp_path / "single"
  proc = subprocess.run([sys.executable, "-m", "recovery_jax.main", f"--config={CONFIG}", f"--workdir={ref}",
                         *FLAGS], cwd=ROOT, env=_env(8, cache), capture_output=True, text=True, timeout=RUN_TIMEOUT)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

  # 2 processes x 4 devices: SIGKILL process 1 once a unit is saved (the other is stuck without it: kill
  # it too), restart both; the resumed run equals the single-process one and only process 0 writes
  wd, logs = tmp_path / "multi", str(tmp_path / "logs_killed")
  procs = _launch(wd, cache, logs)
  units, deadline = wd / "units", time.time() + RUN_TIMEOUT
  while time.time() < deadline:
    if units.exists() and any(d.name.isdigit() for d in units.iterdir()):
      break
    if any(p.poll() is not None for p in procs):
      _kill(procs)
      pytest.fail("a process ended before a unit was saved:\n" + _log(logs, 0)[-2000:] + _log(logs, 1)[-2000:])
    time.sleep(0.2)
  else:
    _kill(procs)
    pytest.fail("no work unit was saved in time")
  procs[1].send_signal(signal.SIGKILL)
  procs[1].wait(timeout=60)
  try:  # the survivor fails (missing peer) or waits in a collective: give it a moment, then kill it
    procs[0].wait(timeout=20)
  except subprocess.TimeoutExpired:
    pass
  _kill(procs)
  saved = sorted(d.name for d in units.iterdir() if d.name.isdigit())
  assert len(saved) == 1 and not (wd / "results.jsonl").exists(), saved
  assert "config.json" in _writes(logs, 0) and _writes(logs, 1) == set(), (_writes(logs, 0), _writes(logs, 1))
  logs = str(tmp_path / "logs_resumed")
  _wait(_launch(wd, cache, logs), logs)
  assert "resuming: 1 of 2 work units already finished" in _log(logs, 0)
  assert "process 1 of 2, 4 local of 8 devices" in _log(logs, 1)
  assert "{'data': 8, 'model': 1} mesh" in _log(logs, 0)
  _assert_same(_rows(ref), _rows(wd), 1e-5)
  assert set(OUTPUTS) - {"config.json"} <= _writes(logs, 0), _writes(logs, 0)
  assert _writes(logs, 1) == set(), _writes(logs, 1)


def test_distributed_settings_from_env():
  from recovery_jax import errors, main  # pylint: disable=import-outside-toplevel
  assert main.distributed_settings({}) is None
  env = {"RECOVERY_JAX_COORDINATOR": "127.0.0.1:1234", "RECOVERY_JAX_NUM_PROCESSES": "2",
         "RECOVERY_JAX_PROCESS_ID": "1"}
  assert main.distributed_settings(env) == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2,
                                             "process_id": 1, "initialization_timeout": 300}
  for bad, word in (({**env, "RECOVERY_JAX_PROCESS_ID": ""}, "missing RECOVERY_JAX_PROCESS_ID"),
                    ({**env, "RECOVERY_JAX_PROCESS_ID": "2"}, "0 <= id < n"),
                    ({**env, "RECOVERY_JAX_NUM_PROCESSES": "two"}, "expected an integer")):
    with pytest.raises(errors.UserError, match=word):
      main.distributed_settings(bad)


def _record_writes(workdir: str, log_path: str) -> None:
  """Wraps ``open`` and ``os.replace`` to append every write-mode path under ``workdir`` (outside
  ``units/``) to ``log_path``."""
  import builtins  # pylint: disable=import-outside-toplevel
  root, units = os.path.abspath(workdir), os.path.join(os.path.abspath(workdir), "units")
  real_open, real_replace = builtins.open, os.replace

  def note(path):
    try:
      p = os.path.abspath(os.fspath(path))
    except TypeError:
      return
    if p.startswith(root + os.sep) and not p.startswith(units + os.sep):
      with real_open(log_path, "a") as f:
        f.write(p + "\n")

  def open_(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
      note(file)
    return real_open(file, mode, *args, **kwargs)

  def replace(src, dst, *args, **kwargs):
    note(dst)
    return real_replace(src, dst, *args, **kwargs)

  builtins.open, os.replace = open_, replace


if __name__ == "__main__":  # one process of a multi-process run: the app, with its writes recorded
  from absl import app  # pylint: disable=import-outside-toplevel
  from recovery_jax import main  # pylint: disable=import-outside-toplevel
  wd = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
  _record_writes(wd, os.environ["RJ_WRITE_LOG"])
  app.run(main.main)
