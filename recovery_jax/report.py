"""``python -m recovery_jax.report --workdir=<run>``: re-renders any finished run of any setting.

The workdir's ``config.json`` names the experiment; its module's ``render(workdir, plots)`` writes the
summary, the setting's own sections and plots from the stored rows and units alone (no model). A
setting without its own ``render`` uses the runner's (``experiments.summary.render``).
"""

from __future__ import annotations

import json
import os
import sys

from recovery_jax import errors, experiments
from recovery_jax.experiments import summary


def render(workdir: str, plots: bool = True) -> str:
  """The finished run in ``workdir`` re-rendered by its experiment; returns the markdown."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise errors.UserError(f"{workdir}: not a finished run (missing {path})")
  try:
    with open(path) as f:
      name = json.load(f).get("experiment", "")
  except (OSError, ValueError) as e:
    raise errors.UserError(f"{path}: unreadable ({e}); expected the run's config as JSON") from e
  module = experiments.load(name)
  fn = getattr(module, "render", None)
  if fn is None:
    return summary.render(workdir, plots=plots)[0]
  return fn(workdir, plots=plots)


def _main(argv) -> None:  # pragma: no cover - exercised through the CLI test
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    text = render(flags.FLAGS.workdir, plots=not flags.FLAGS.no_plots)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(text)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=ungrouped-imports
  flags.DEFINE_string("workdir", None, "A finished run's folder (config.json, results or units).")
  flags.DEFINE_bool("no_plots", False, "Skip the plots.")
  flags.mark_flags_as_required(["workdir"])
  app.run(_main)
