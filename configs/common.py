"""Config helpers shared by the config files (big_vision style ``file.py:key=value,flag`` args)."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"a=1,b=x,flag"`` into a ConfigDict typed after ``defaults``.

  A bare word sets a boolean default to True, or is taken as the ``variant`` when one is declared.
  Unknown keys are an error naming the key and the known ones.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
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
      raise ValueError(f"config arg {item!r}: expected key=value with key in {sorted(defaults)}")
    if key not in defaults:
      raise ValueError(f"config arg {key!r} is unknown; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      parsed = value.lower() in ("1", "true", "yes", "on")
    elif defaults[key] is None:
      parsed = value
    else:
      parsed = kind(value)
    out[key] = parsed
  return out
