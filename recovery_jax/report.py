"""``python -m recovery_jax.report --workdir=<run>``: re-renders any finished run of any setting.

The workdir's ``config.json`` names the experiment; its setting's ``render(workdir, plots)`` (the
module's ``SETTING``, ``experiments.setting.Setting``) writes the summary, the setting's own sections
and plots from the stored rows and units alone (no model).
"""

from __future__ import annotations

import json
import os
import sys

from recovery_jax import errors, experiments


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
  setting = getattr(experiments.load(name), "SETTING", None)
  if setting is None:
    raise errors.UserError(f"{workdir}: experiment {name!r} has no report (only the settings do: "
                           f"{', '.join(n for n in experiments.names() if n not in ('demo', 'train_sae'))})")
  from recovery_jax.experiments import runner  # pylint: disable=import-outside-toplevel
  return runner.render(workdir, setting, plots=plots)  # the setting's render, then the run's profile


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
