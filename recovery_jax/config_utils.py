"""Helpers for the config files in ``configs/`` (big_vision style ``file.py:key=value,flag`` args).

Config files import them from the package, so they load from any working directory.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Sequence

import ml_collections

_TRUE = ("1", "true", "yes", "on")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"a=1,b=x,flag"`` into a ConfigDict typed after ``defaults``.

  A bare word sets a boolean default to True, or is taken as the ``variant`` when one is declared.
  ``key=value`` converts ``value`` to the default's type (booleans: 1/true/yes/on; a None default
  keeps the string). Unknown keys are an error naming the key and the known ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    if "=" in item:
      key, value = item.split("=", 1)
    elif item in defaults and isinstance(defaults[item], bool):
      key, value = item, "True"
    elif "variant" in defaults:
      key, value = "variant", item
    else:
      raise ValueError(f"config arg {item!r}: unknown argument; expected key=value or a boolean flag, "
                       f"known: {sorted(defaults)}")
    if key not in defaults:
      raise ValueError(f"config arg {key!r}: unknown argument; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in _TRUE
    elif defaults[key] is None:
      out[key] = value
    else:
      try:
        out[key] = kind(value)
      except ValueError as e:
        raise ValueError(f"config arg {key}={value!r}: expected a {kind.__name__}") from e
  return out


def load_config_file(spec: str, overrides: Sequence[str] = (), *, root: str | None = None) -> ml_collections.ConfigDict:
  """``"configs/x.py:arg"`` -> that file's ``get_config(arg)``, then ``overrides`` applied in order.

  A relative path is taken from the working directory, else from ``root`` (the repository). Each
  override is ``"dotted.key=value"`` as on the command line (``--config.dotted.key=value``): the value
  is a Python literal (numbers, strings, tuples, booleans) or else a bare string; an unknown key or a
  value of the wrong type is a ``ValueError`` naming the spec and the key."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path) and root and not os.path.isabs(path):
    path = os.path.join(root, path)
  if not os.path.exists(path):
    raise ValueError(f"config file {spec!r}: {path} does not exist")
  name = "_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  cfg = module.get_config(arg or None)
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"config {spec!r}: override {item!r} is not dotted.key=value")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      if p not in node:
        raise ValueError(f"config {spec!r}: override {item!r}: no field {key!r}")
      node = node[p]
    if leaf not in node:
      raise ValueError(f"config {spec!r}: override {item!r}: no field {key!r}")
    try:
      node[leaf] = value
    except TypeError as e:
      raise ValueError(f"config {spec!r}: override {item!r}: {e}") from e
  return cfg
