"""The entry point: experiments by name, config files from any directory, workdir checks, quiet logs."""

import logging
import os
import subprocess
import sys

import pytest

from recovery_jax import errors, experiments, main

pytestmark = pytest.mark.slow  # app subprocesses (make test, not make test-fast)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = f"--config={ROOT}/configs/ioi.py:tiny"


def _main(cwd, *args, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  return subprocess.run([sys.executable, "-m", "recovery_jax.main", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _user_error(proc, *words):
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert all(w in proc.stderr for w in words), proc.stderr[-3000:]


def test_tiny_ioi_runs_from_another_directory_with_a_short_log(tmp_path):
  wd = tmp_path / "run"
  proc = _main(tmp_path, TINY, f"--workdir={wd}", "--config.recovery.steps=2")
  assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  assert (wd / "summary.md").exists() and (wd / "results.jsonl").exists()
  lines = (proc.stdout + proc.stderr).splitlines()
  assert not [l for l in lines if "checkpoint_manager.py" in l or "compilation_cache.py" in l], lines
  assert len(lines) < 60, "\n".join(lines)


def test_unknown_experiment_lists_the_known_ones(tmp_path):
  assert {"ioi", "train_sae"} <= set(experiments.names()) and "runner" not in experiments.names()
  proc = _main(tmp_path, TINY, "--config.experiment=nope", f"--workdir={tmp_path / 'run'}")
  _user_error(proc, "'nope'", "ioi", "train_sae")
  assert not (tmp_path / "run").exists()


def test_workdir_under_a_regular_file_is_a_clear_error(tmp_path):
  (tmp_path / "file").write_text("x")
  wd = tmp_path / "file" / "run"
  _user_error(_main(tmp_path, TINY, f"--workdir={wd}"), str(wd), f"{tmp_path / 'file'} is a file, not a directory")
  _user_error(_main(tmp_path, TINY, f"--workdir={tmp_path / 'file'}"), "exists and is not a directory")


def test_check_workdir_creates_probes_and_rejects_unwritable(tmp_path):
  wd = tmp_path / "a" / "b"
  main.check_workdir(str(wd))
  assert wd.is_dir() and not os.listdir(wd)  # the probe file is removed
  if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses new files even to root
    ro = "/sys"
  else:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
  with pytest.raises(errors.UserError, match=f"--workdir='{ro}' is not writable"):
    main.check_workdir(str(ro))


def test_library_info_records_are_hidden_unless_verbose():
  lib = logging.LogRecord("orbax", logging.INFO, "/site-packages/orbax/checkpoint_manager.py", 1, "saved", None, None)
  own = logging.LogRecord("absl", logging.INFO, os.path.join(ROOT, "recovery_jax", "sae", "pipeline.py"), 1, "step",
                          None, None)
  warn = logging.LogRecord("jax", logging.WARNING, "/site-packages/jax/_src/x.py", 1, "careful", None, None)
  root = logging.getLogger()
  quiet, verbose = logging.Handler(), logging.Handler()
  before = {h: list(h.filters) for h in root.handlers}
  try:
    root.addHandler(quiet)
    main.quiet_library_logging(0)
    root.removeHandler(quiet)
    root.addHandler(verbose)
    main.quiet_library_logging(1)
  finally:
    for h in (quiet, verbose):
      root.removeHandler(h)
    for h, fs in before.items():
      h.filters[:] = fs
  assert [bool(quiet.filter(r)) for r in (lib, own, warn)] == [False, True, True]
  assert all(verbose.filter(r) for r in (lib, own, warn))
