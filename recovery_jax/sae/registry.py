"""Named access to the SAEs this project ships in ``assets/`` (one SAELens folder each).

``resolve("smollm2-135m-instruct", "blocks.9.hook_resid_post")`` is the folder of the shipped SAE at
that site; ``formats.load_sae("smollm2-135m-instruct", site=...)`` loads it. The registry is read from
the folders' ``cfg.json`` (``model_name``, ``hook_name``, ``architecture``), so a folder copied into
``assets/`` is found without code changes. ``$RECOVERY_JAX_ASSETS`` points elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

ASSETS_ENV = "RECOVERY_JAX_ASSETS"


@dataclasses.dataclass(frozen=True)
class ShippedSAE:
  model_name: str
  hook_name: str
  architecture: str
  path: Path


def assets_dir() -> Path:
  """``$RECOVERY_JAX_ASSETS``, else the repository's ``assets/``."""
  env = os.environ.get(ASSETS_ENV)
  return Path(env) if env else Path(__file__).resolve().parents[2] / "assets"


def shipped(assets: str | os.PathLike | None = None) -> list[ShippedSAE]:
  """Every SAELens folder under ``assets`` (sorted by model, then layer order of the hook name)."""
  root = Path(assets) if assets is not None else assets_dir()
  out = []
  for cfg_path in sorted(root.glob("*/cfg.json")):
    try:
      d = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError):
      continue
    meta = {**(d.get("metadata") or {}), **d}
    if meta.get("model_name") and meta.get("hook_name"):
      out.append(ShippedSAE(meta["model_name"], meta["hook_name"], str(d.get("architecture", "")), cfg_path.parent))

  def key(s):
    parts = s.hook_name.split(".")
    layer = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else -1
    return s.model_name, layer, s.hook_name, s.architecture
  return sorted(out, key=key)


def resolve(model: str, site: str, *, architecture: str | None = None,
            assets: str | os.PathLike | None = None) -> Path:
  """The shipped folder of ``model``'s SAE at ``site``; a clear error lists what is shipped."""
  all_saes = shipped(assets)
  root = Path(assets) if assets is not None else assets_dir()
  mine = [s for s in all_saes if s.model_name == model]
  if not mine:
    models = sorted({s.model_name for s in all_saes})
    raise ValueError(f"no SAE is shipped for model {model!r} in {root}; shipped models: {models}")
  hits = [s for s in mine if s.hook_name == site and (architecture is None or s.architecture == architecture)]
  if not hits:
    listing = ", ".join(f"{s.hook_name} ({s.architecture})" for s in mine)
    raise ValueError(f"no SAE is shipped for model {model!r} at site {site!r}"
                     f"{f' with architecture {architecture!r}' if architecture else ''}; shipped sites: {listing}")
  if len(hits) > 1:
    raise ValueError(f"several SAEs are shipped for model {model!r} at site {site!r}: "
                     f"{[(s.architecture, str(s.path)) for s in hits]}; pass architecture=")
  return hits[0].path
