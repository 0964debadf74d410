"""Train an SAE on a model's activations (``recovery_jax.sae.pipeline.run``).

  python -m recovery_jax.main --config=configs/train_sae.py --workdir=runs/sae
  python -m recovery_jax.main --config=configs/train_sae.py:smoke --workdir=/tmp/sae_smoke

A killed run resumes when started again with the same workdir (activation stores and orbax
checkpoints live there). The workdir is this run's (``recovery_jax.workdir.claim``): a workdir made
under another config is an error unless ``--overwrite`` is given, and a second process in the same
workdir fails at once, naming the first.
"""

from __future__ import annotations

import json
from typing import Any

from absl import logging

from recovery_jax import workdir as workdir_lib
from recovery_jax.sae import pipeline


def run(config, workdir: str) -> dict[str, Any]:
  """Trains, evaluates and exports the SAE; prints the result as JSON and returns it."""
  workdir_lib.claim(workdir, config)
  result = pipeline.run(config, workdir)
  logging.info("result: %s", json.dumps(result.get("heldout", result), default=str))
  print(json.dumps(result, indent=1, default=str), flush=True)
  return result
