"""Experiments: one module (or package) per name, each with a top-level ``run(config, workdir)``.

``config.experiment`` names the module; ``main.py`` imports it with ``load(name)``. Helper modules
(``setup``, ``runner``: no such ``run``) are not experiments. A package is an experiment when its
``app.py`` defines ``run`` (its ``__init__`` re-exports it).
"""

from __future__ import annotations

import ast
import functools
import importlib
import pathlib
import types

from recovery_jax import errors

_DIR = pathlib.Path(__file__).parent


def _defines_run(path: pathlib.Path) -> bool:
  """Whether ``path`` has a top-level ``run(config, workdir)`` (further parameters only with defaults)."""
  st = path.stat()
  return _defines_run_cached(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=128)
def _defines_run_cached(path: str, mtime_ns: int, size: int) -> bool:
  del mtime_ns, size  # cache keys: a changed file is parsed again
  for node in ast.parse(pathlib.Path(path).read_text(), path).body:
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


def one_line(name: str) -> str:
  """The first paragraph of experiment ``name``'s docstring (package: ``__init__``'s, else ``app.py``'s),
  on one line; read without importing."""
  candidates = [_DIR / f"{name}.py", _DIR / name / "__init__.py", _DIR / name / "app.py"]
  for path in candidates:
    if path.exists():
      doc = ast.get_docstring(ast.parse(path.read_text(), str(path))) or ""
      if doc.strip():
        return " ".join(doc.strip().split("\n\n", 1)[0].split())
  return ""


def load(name: str) -> types.ModuleType:
  """The experiment module ``name``; a ``UserError`` naming the nearest and all known names when there is none."""
  known = names()
  if name not in known:
    from recovery_jax import config_utils  # pylint: disable=import-outside-toplevel
    raise errors.UserError(f"config field 'experiment'={name!r} is not a known experiment"
                           f"{config_utils.nearest(name, known)}; known: {', '.join(known)}")
  return importlib.import_module(f"{__name__}.{name}")
