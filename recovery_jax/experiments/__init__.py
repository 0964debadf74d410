"""Experiments: one module (or package) per name, each with a top-level ``run(config, workdir)``.

``config.experiment`` names the module; ``main.py`` imports it with ``load(name)``. Helper modules
(``setup``, ``runner``: no such ``run``) are not experiments. A package is an experiment when its
``app.py`` defines ``run`` (its ``__init__`` re-exports it).
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import types

from recovery_jax import errors

_DIR = pathlib.Path(__file__).parent


def _defines_run(path: pathlib.Path) -> bool:
  """Whether ``path`` has a top-level ``run(config, workdir)`` (further parameters only with defaults)."""
  for node in ast.parse(path.read_text(), str(path)).body:
    if isinstance(node, ast.FunctionDef) and node.name == "run":
      a = node.args
      return ([p.arg for p in a.posonlyargs + a.args][:2] == ["config", "workdir"]
              and len(a.posonlyargs + a.args) - len(a.defaults) == 2 and None not in a.kw_defaults)
  return False


def names() -> tuple[str, ...]:
  """Known experiment names: modules here, or packages whose ``app.py``, define ``run(config, workdir)``
  (found without importing)."""
  modules = [p.stem for p in _DIR.glob("*.py") if not p.stem.startswith("_") and _defines_run(p)]
  packages = [p.parent.name for p in _DIR.glob("*/app.py") if _defines_run(p)]
  return tuple(sorted(modules + packages))


def load(name: str) -> types.ModuleType:
  """The experiment module ``name``; a ``UserError`` listing the known names when there is none."""
  known = names()
  if name not in known:
    raise errors.UserError(f"config field 'experiment'={name!r} is not a known experiment; known: {', '.join(known)}")
  return importlib.import_module(f"{__name__}.{name}")
