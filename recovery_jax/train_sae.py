"""Train an SAE on a model's activations (absl app; the logic is ``recovery_jax.sae.pipeline.run``).

  python -m recovery_jax.train_sae --config=configs/train_sae.py --workdir=runs/sae
  python -m recovery_jax.train_sae --config=configs/train_sae.py:smoke --workdir=/tmp/sae_smoke

A killed run resumes when started again with the same workdir (activation stores and orbax
checkpoints live there).
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/train_sae.py[:args]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder (stores, checkpoints, export)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from recovery_jax.sae import pipeline  # after flag parsing: jax initialises lazily
  result = pipeline.run(_CONFIG.value, _WORKDIR.value)
  logging.info("result: %s", json.dumps(result.get("heldout", result), default=str))
  print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
  app.run(main)
