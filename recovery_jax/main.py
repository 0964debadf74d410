"""The absl app: parse the config, build the mesh, run the experiment, report.

  python -m recovery_jax.main --config=configs/ioi.py --workdir=runs/ioi_default
  python -m recovery_jax.main --config=configs/ioi.py:sweep --config.recovery.steps=50 --workdir=...
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; an interrupted run resumes from it.")
flags.mark_flags_as_required(["config", "workdir"])



def _maybe_initialize_distributed():
  """Multi-host runs (TPU pods, multi-node GPU) call jax.distributed.initialize()."""
  import jax  # pylint: disable=import-outside-toplevel
  if os.environ.get("RECOVERY_JAX_DISTRIBUTED", "") == "1" or "TPU_WORKER_HOSTNAMES" in os.environ:
    try:
      jax.distributed.initialize()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("jax.distributed.initialize() failed (%s); continuing single-host", e)


def main(argv):
  del argv
  _maybe_initialize_distributed()
  from recovery_jax.experiments import ioi  # pylint: disable=import-outside-toplevel
  from recovery_jax import errors  # pylint: disable=import-outside-toplevel
  try:
    ioi.run(_CONFIG.value, _WORKDIR.value)
  except errors.UserError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())  # so that configs/ imports its helpers
  app.run(main)
