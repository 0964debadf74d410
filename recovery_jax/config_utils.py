"""Helpers for the config files in ``configs/`` (big_vision style ``file.py:key=value,flag`` args).

Config files import them from the package, so they load from any working directory.
"""

from __future__ import annotations

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
