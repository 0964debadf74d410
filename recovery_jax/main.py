"""The absl app: ``config.experiment`` picks ``recovery_jax.experiments.<name>``, whose
``run(config, workdir)`` it calls.

  python -m recovery_jax.main --config=configs/ioi.py --workdir=runs/ioi_default
  python -m recovery_jax.main --config=configs/ioi.py:sweep --config.recovery.steps=50 --workdir=...
  python -m recovery_jax.main --config=configs/train_sae.py:smoke --workdir=/tmp/sae_smoke

Input problems (an unknown experiment, an unusable workdir, a bad config field: ``errors.UserError``)
end with ``error: <message>`` on stderr and exit status 2, without a traceback. INFO records of
other libraries (orbax, jax) are hidden unless ``--verbosity`` is 1 or more (``-v``).
"""

from __future__ import annotations

import logging as py_logging
import os
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from recovery_jax import errors, experiments

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; an interrupted run resumes from it.")
flags.mark_flags_as_required(["config", "workdir"])

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def check_workdir(path: str) -> None:
  """Creates ``path`` if needed and writes and removes a probe file there; a UserError naming the
  path and the problem when either fails."""
  where = f"--workdir={path!r}"
  if not path:
    raise errors.UserError("--workdir is empty")
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.UserError(f"{where} exists and is not a directory")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    why = e.strerror if os.path.isdir(parent) else f"{parent} is a file, not a directory"
    raise errors.UserError(f"{where} cannot be created: {why}") from e
  try:
    fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise errors.UserError(f"{where} is not writable: {e.strerror}") from e


class OwnRecordsOnly(py_logging.Filter):
  """Passes WARNING and above, and records logged from this package's own files."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or record.pathname.startswith(_PACKAGE_DIR + os.sep)


def quiet_library_logging(verbosity: int) -> None:
  """Hides other libraries' INFO records (orbax, jax) from the root handlers unless ``verbosity`` >= 1."""
  if verbosity >= 1:
    return
  for handler in py_logging.getLogger().handlers:
    if not any(isinstance(f, OwnRecordsOnly) for f in handler.filters):
      handler.addFilter(OwnRecordsOnly())


DISTRIBUTED_ENV = ("RECOVERY_JAX_COORDINATOR", "RECOVERY_JAX_NUM_PROCESSES", "RECOVERY_JAX_PROCESS_ID")


def distributed_settings(env) -> dict | None:
  """``jax.distributed.initialize`` kwargs from ``RECOVERY_JAX_COORDINATOR`` (host:port),
  ``RECOVERY_JAX_NUM_PROCESSES``, ``RECOVERY_JAX_PROCESS_ID`` and optional
  ``RECOVERY_JAX_INIT_TIMEOUT`` (seconds, default 300); None when none of the three is set. A partial
  or malformed set is a UserError naming the variable."""
  given = {k: env.get(k, "") for k in DISTRIBUTED_ENV}
  if not any(given.values()):
    return None
  missing = [k for k, v in given.items() if not v]
  if missing:
    raise errors.UserError(f"multi-process run: set all of {', '.join(DISTRIBUTED_ENV)} (missing {', '.join(missing)})")
  ints = {}
  for k in DISTRIBUTED_ENV[1:] + ("RECOVERY_JAX_INIT_TIMEOUT",):
    try:
      ints[k] = int(env.get(k, "300"))
    except ValueError as e:
      raise errors.UserError(f"{k}={env.get(k)!r}: expected an integer") from e
  n, i = ints["RECOVERY_JAX_NUM_PROCESSES"], ints["RECOVERY_JAX_PROCESS_ID"]
  if n < 1 or not 0 <= i < n:
    raise errors.UserError(f"RECOVERY_JAX_PROCESS_ID={i} with RECOVERY_JAX_NUM_PROCESSES={n}: expected 0 <= id < n")
  return {"coordinator_address": given["RECOVERY_JAX_COORDINATOR"], "num_processes": n, "process_id": i,
          "initialization_timeout": ints["RECOVERY_JAX_INIT_TIMEOUT"]}


def _maybe_initialize_distributed():
  """Multi-process runs call ``jax.distributed.initialize``: with the explicit settings of
  ``distributed_settings`` (a failure is fatal: running on alone would duplicate the work and the
  writes), or auto-detected on TPU pods / with RECOVERY_JAX_DISTRIBUTED=1 (a failure falls back to
  single-host with a warning)."""
  import jax  # pylint: disable=import-outside-toplevel
  explicit = distributed_settings(os.environ)
  if explicit is not None:
    jax.distributed.initialize(**explicit)
    logging.info("process %d of %d, %d local of %d devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return
  if os.environ.get("RECOVERY_JAX_DISTRIBUTED", "") == "1" or "TPU_WORKER_HOSTNAMES" in os.environ:
    try:
      jax.distributed.initialize()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("jax.distributed.initialize() failed (%s); continuing single-host", e)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  quiet_library_logging(flags.FLAGS.verbosity)
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    name = config.get("experiment", None)
    if not name:
      raise errors.UserError(f"the config has no field 'experiment'; set it to one of: {', '.join(experiments.names())}")
    module = experiments.load(name)
    check_workdir(workdir)
    _maybe_initialize_distributed()
    module.run(config, workdir)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
