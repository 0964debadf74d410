"""The absl app: ``config.experiment`` picks ``recovery_jax.experiments.<name>``, whose
``run(config, workdir)`` it calls.

  python -m recovery_jax.main --config=configs/ioi.py --workdir=runs/ioi_default
  python -m recovery_jax.main --config=configs/ioi.py:sweep --config.recovery.steps=50 --workdir=...
  python -m recovery_jax.main --config=configs/train_sae.py:smoke --workdir=/tmp/sae_smoke

Help without running anything (no JAX import; docs/cli.md):

  python -m recovery_jax.main --list           # every experiment, its config files and their variants
  python -m recovery_jax.main --config=configs/ioi.py:tiny --describe   # the config's fields and meanings
  python -m recovery_jax.main --help           # this text, the experiment list and the flags

Input problems (an unknown experiment, an unusable workdir, a bad config field: ``errors.UserError``;
an unknown ``--config.<field>``, a value of the wrong type, an unknown config variant or file: flag
parsing) end with one line ``error: <message>`` on stderr naming the field and the nearest valid names,
and exit status 2, without a traceback.

The workdir is the run's (``recovery_jax.workdir``): locked while the run lives (a second process in
it fails at once, naming the first) and refused when it holds a run of another config, unless
``--overwrite`` discards that run. Compiled programs persist across runs
(``recovery_jax.compilation_cache``). INFO records of other libraries (orbax, jax) are hidden unless
``--verbosity`` is 1 or more (``-v``).
"""

from __future__ import annotations

import logging as py_logging
import os
import re
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from recovery_jax import compilation_cache, config_utils, errors, experiments
from recovery_jax import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; an interrupted run resumes from it.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Discard a run of another config found in --workdir (else "
                                "that is an error); a run of the same config resumes either way.")
_LIST = flags.DEFINE_bool("list", False, "Print every experiment with its config files, variants and arguments "
                          "(one line each, from the config files' docstrings) and exit; also `main list`.")
_DESCRIBE = flags.DEFINE_bool("describe", False, "Print the fields of --config (with any --config.<field> "
                              "overrides), their values and meanings (the comments next to them in the config "
                              "file) and exit; no --workdir needed.")
flags.mark_flags_as_required(["config", "workdir"])
_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")
_OWN_FLAGS = ("config", "workdir", "overwrite", "list", "describe")

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


def _config_spec(args) -> str | None:
  """The value of ``--config`` in ``args`` (``--config=x`` or ``--config x``), None when absent."""
  for i, a in enumerate(args):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(args):
      return args[i + 1]
  return None


def _last_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
  return lines[-1] if lines else type(e).__name__


def _config_file_problem(spec: str, e: BaseException) -> str:
  """The message of a config file that failed to load, with the nearest variant or file names."""
  msg = e.args[0] if isinstance(e, ValueError) and e.args else _last_line(e)
  msg = config_utils.with_nearest_variant(msg)  # configs/<x>.py: "unknown variant 'v'; expected a, b or c"
  path = spec.partition(":")[0]
  if not os.path.exists(path):
    folder = os.path.dirname(path) or "."
    names = sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(folder) else []
    msg = f"{path} does not exist{config_utils.nearest(os.path.basename(path), names)}"
  return f"--config={spec}: {msg}"


def flag_error_message(args, e: BaseException) -> str:
  """One line for a flag-parsing failure ``e`` of ``args`` (argv without the program): an unknown
  ``--config.<field>`` or config file problem names the field or file and the nearest valid names; a
  value of the wrong type names the field's type and value."""
  spec = _config_spec(args)
  if spec is None:
    return _last_line(e)
  try:
    cfg = config_utils.load_config_file(spec)
  except Exception as load_error:  # pylint: disable=broad-except
    return _config_file_problem(spec, load_error)
  overrides = [a[len("--config."):].partition("=") for a in args if a.startswith("--config.")]
  for key, _, value in overrides:
    try:
      config_utils.field_parent(cfg, key)
    except KeyError as missing:
      return f"--config.{key}={value}: {missing.args[0]}"
  m = re.search(r"flag --config\.([\w.]+)=(.*?): (.*)", str(e))
  if m:
    key, value, why = m.groups()
    node = config_utils.field_parent(cfg, key)[key.split(".")[-1]]
    if hasattr(node, "keys"):
      return (f"--config.{key}={value}: {key!r} is a group of fields ({', '.join(sorted(node.keys()))}); set one of "
              f"them, e.g. --config.{key}.{sorted(node.keys())[0]}=...")
    kind = type(node).__name__
    return (f"--config.{key}={value}: expected a{'n' if kind[0] in 'aeiou' else ''} {kind} like the config's "
            f"{node!r} ({why.strip()})")
  return _last_line(e)


def help_text() -> str:
  """``--help``: this module's docstring, the experiment listing and the flags."""
  from recovery_jax import config_docs  # pylint: disable=import-outside-toplevel
  flag_lines = "\n".join(f"  --{name}: {flags.FLAGS[name].help}" for name in _OWN_FLAGS)
  return (f"{__doc__.strip()}\n\n{config_docs.listing()}\nflags:\n{flag_lines}\n"
          "  --config.<field>=<value>: override one field of the config (e.g. --config.recovery.steps=50)\n"
          "  -v / --verbosity=N: absl logging verbosity; --helpfull lists every absl flag\n")


def describe_text(args) -> str:
  """``--describe``: the config of ``--config`` (with its ``--config.<field>=<value>`` overrides) as
  field = value and meaning; a ``UserError`` (naming the nearest valid names) for a config that does
  not load."""
  from recovery_jax import config_docs  # pylint: disable=import-outside-toplevel
  spec = _config_spec(args)
  if spec is None:
    raise errors.UserError("--describe needs --config=<file>[:<variant>] (python -m recovery_jax.main --list shows them)")
  overrides = [a[len("--config."):] for a in args if a.startswith("--config.")]
  try:
    cfg = config_utils.load_config_file(spec)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(_config_file_problem(spec, e)) from e
  for item in overrides:
    key, _, value = item.partition("=")
    try:
      config_utils.field_parent(cfg, key)
    except KeyError as missing:
      raise errors.UserError(f"--config.{key}={value}: {missing.args[0]}") from None
  try:
    cfg = config_utils.load_config_file(spec, overrides)
  except ValueError as e:
    raise errors.UserError(f"--config={spec}: {e}") from e
  name, known = cfg.get("experiment", None), experiments.names()
  if name not in known:
    raise errors.UserError(f"--config={spec}: field 'experiment'={name!r} is not a known experiment"
                           f"{config_utils.nearest(str(name), known)}; known: {', '.join(known)}")
  path = spec.partition(":")[0]
  doc = config_docs.file_doc(path)
  head = f"{spec}  (experiment {cfg.get('experiment', '?')!r}): {doc.summary}"
  return f"{head}\n\n{config_docs.describe(cfg, config_docs.field_docs(path), config_docs.field_order(path))}\n"


def _info_request(argv) -> str | None:
  """'help', 'list' or 'describe' when ``argv`` asks for one (before absl parses: neither needs
  --workdir), else None."""
  args = argv[1:]
  if any(a in _HELP_FLAGS for a in args):
    return "help"
  if args[:1] == ["list"] or any(a in ("--list", "-list", "--list=true", "--list=True") for a in args):
    return "list"
  if any(a in ("--describe", "-describe", "--describe=true", "--describe=True") for a in args):
    return "describe"
  return None


def answer_info_request(argv) -> int | None:
  """Prints the help, listing or description ``argv`` asks for (an ``error:`` line on stderr for a
  bad one) and returns the exit status; None when ``argv`` asks for none of them."""
  what = _info_request(argv)
  if what is None:
    return None
  from recovery_jax import config_docs  # pylint: disable=import-outside-toplevel
  try:
    text = {"help": help_text, "list": config_docs.listing, "describe": lambda: describe_text(argv[1:])}[what]()
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  sys.stdout.write(text)
  sys.stdout.flush()
  return 0


def parse_flags(argv):
  """absl's flag parsing, with every failure (absl's, ml_collections' overrides, a config file that
  does not load) one ``error:`` line and exit status 2. ``--help``, ``--list`` / ``list`` and
  ``--describe`` are answered here and exit."""
  status = answer_info_request(argv)
  if status is not None:
    sys.exit(status)
  try:
    rest = flags.FLAGS(argv)
    cfg = flags.FLAGS["config"].value
    if cfg is not None:
      cfg.get("experiment", None)  # a config file that failed to load raises on first use
    return rest
  except Exception as e:  # pylint: disable=broad-except
    print(f"error: {flag_error_message(argv[1:], e)}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  quiet_library_logging(flags.FLAGS.verbosity)
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    name, known = config.get("experiment", None), experiments.names()
    if not name:
      raise errors.UserError(f"the config has no field 'experiment'; set it to one of: {', '.join(known)}")
    if name not in known:
      raise errors.UserError(f"config field 'experiment'={name!r} is not a known experiment"
                             f"{config_utils.nearest(name, known)}; known: {', '.join(known)}")
    module = experiments.load(name)
    check_workdir(workdir)
    compilation_cache.enable()  # a second run loads what the first compiled (RECOVERY_JAX_COMPILATION_CACHE=off)
    _maybe_initialize_distributed()
    if _OVERWRITE.value:
      workdir_lib.allow_overwrite(workdir)
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_index() == 0:  # the writing process owns the workdir (the others share its lock)
      workdir_lib.lock(workdir)
    module.run(config, workdir)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def run() -> None:
  """The app, with ``parse_flags``' one-line errors."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
