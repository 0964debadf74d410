"""Helpers for the config files in ``configs/`` (big_vision style ``file.py:key=value,flag`` args).

Config files import them from the package, so they load from any working directory.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import re
from typing import Sequence

import ml_collections

from recovery_jax import errors

_TRUE = ("1", "true", "yes", "on")


def nearest(word: str, known: Sequence[str], n: int = 3, prefix: str = "") -> str:
  """``" (did you mean 'x'?)"`` for the names of ``known`` closest to ``word`` (each shown after
  ``prefix``); ``""`` when none is close."""
  close = difflib.get_close_matches(str(word), [str(k) for k in known], n=n, cutoff=0.6)
  return f" (did you mean {' or '.join(repr(prefix + c) for c in close)}?)" if close else ""


def with_nearest_variant(message: str) -> str:
  """``message`` with the nearest names appended when it is a config file's "unknown variant 'v';
  expected a, b or c" (and names none yet)."""
  m = re.search(r"unknown variant '([^']*)'; expected (.+?)\.?$", message)
  if not m or "did you mean" in message:
    return message
  return message + nearest(m.group(1), [k for k in re.split(r",\s*|\s+or\s+", m.group(2)) if k])


def check_choice(what: str, value: str, known: Sequence[str]) -> str:
  """``value`` when it is one of ``known``, else a ``UserError`` naming ``what``, the nearest and all names
  (for config files: ``check_choice("configs/ioi.py: variant", a.variant, VARIANTS)``)."""
  if value not in known:
    raise errors.UserError(f"{what} {value!r} is unknown{nearest(value, known)}; expected one of: {', '.join(known)}")
  return value


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"a=1,b=x,flag"`` into a ConfigDict typed after ``defaults``.

  A bare word sets a boolean default to True, or is taken as the ``variant`` when one is declared.
  ``key=value`` converts ``value`` to the default's type (booleans: 1/true/yes/on; a None default
  keeps the string). Unknown keys are a ``UserError`` (a ValueError) naming the key, the nearest known
  keys and all of them.
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
      flags_ = sorted(k for k, v in defaults.items() if isinstance(v, bool))
      raise errors.UserError(f"config arg {item!r}: unknown argument{nearest(item, flags_ or sorted(defaults))}; "
                             f"expected key=value or a boolean flag ({', '.join(flags_) or 'none'}); known keys: "
                             f"{', '.join(sorted(defaults))}")
    if key not in defaults:
      raise errors.UserError(f"config arg {key!r}: unknown argument{nearest(key, sorted(defaults))}; known: "
                             f"{', '.join(sorted(defaults))}")
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in _TRUE
    elif defaults[key] is None:
      out[key] = value
    else:
      try:
        out[key] = kind(value)
      except ValueError as e:
        an = "an" if kind.__name__[0] in "aeiou" else "a"
        raise errors.UserError(f"config arg {key}={value!r}: expected {an} {kind.__name__} (default {defaults[key]!r})"
                               ) from e
  return out


def field_parent(cfg, key: str):
  """The node of ``cfg`` holding the dotted field ``key``; a KeyError whose message names the first
  missing part, the nearest fields there and all of them."""
  parts = key.split(".")
  node = cfg
  for i, p in enumerate(parts):
    where = ".".join(parts[:i])
    fields = sorted(node.keys()) if hasattr(node, "keys") else []
    if p not in fields:
      prefix = where + "." if where else ""
      near = nearest(p, fields, prefix=prefix)
      if not fields:
        of = f"; {where!r} is a value, not a group of fields"
      else:
        of = f"; fields of {where!r}: " if where else "; top-level fields: "
        of += ", ".join(fields)
      raise KeyError(f"no field {prefix + p!r}{near}{of}")
    if i < len(parts) - 1:
      node = node[p]
  return node


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
  try:
    cfg = module.get_config(arg or None)
  except ValueError as e:  # the files' "unknown variant 'v'; expected a, b or c": name the nearest
    message = with_nearest_variant(e.args[0]) if e.args and isinstance(e.args[0], str) else None
    if message is None or message == e.args[0]:
      raise
    raise type(e)(message) if isinstance(e, errors.UserError) else ValueError(message) from e
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"config {spec!r}: override {item!r} is not dotted.key=value")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    leaf = key.split(".")[-1]
    try:
      node = field_parent(cfg, key)
    except KeyError as e:
      raise ValueError(f"config {spec!r}: override {item!r}: {e.args[0]}") from e
    try:
      node[leaf] = value
    except TypeError as e:
      raise ValueError(f"config {spec!r}: override {item!r}: {e}") from e
  return cfg


def get_field(cfg, name: str):
  """The value of the dotted config field ``name`` (``"clamp.mode"``)."""
  for part in name.split("."):
    cfg = cfg[part]
  return cfg


def check_one_of(cfg, name: str, choices: Sequence) -> None:
  """A ``UserError`` naming field ``name``, its value, the nearest choice and all of them, unless the
  value is one of ``choices``."""
  value = get_field(cfg, name)
  if value not in tuple(choices):
    hint = nearest(value, choices) if isinstance(value, str) else ""
    raise errors.UserError(f"config field {name!r}={value!r}: expected one of {tuple(choices)}{hint}")


def check_each_one_of(cfg, name: str, choices: Sequence) -> None:
  """Every entry of the sequence field ``name`` one of ``choices`` (else a ``UserError`` naming it)."""
  for value in get_field(cfg, name):
    if value not in tuple(choices):
      hint = nearest(value, choices) if isinstance(value, str) else ""
      raise errors.UserError(f"config field {name!r} has {value!r}: expected one of {tuple(choices)}{hint}")


def check_at_least(cfg, name: str, low: float, each: bool = False) -> None:
  """Field ``name`` (every entry with ``each``) at least ``low`` (else a ``UserError`` naming it)."""
  values = get_field(cfg, name) if each else (get_field(cfg, name),)
  for value in values:
    if float(value) < low:
      what = f" has {value}" if each else f"={value}"
      raise errors.UserError(f"config field {name!r}{what}: expected >= {low:g}")
