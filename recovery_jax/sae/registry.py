"""Named access to the SAEs this project ships in ``assets/`` (one SAELens folder each).

``resolve("smollm2-135m-instruct", "blocks.9.hook_resid_post")`` is the folder of the shipped SAE at
that site; ``formats.load_sae("smollm2-135m-instruct", site=...)`` loads it. The registry is read from
the folders' ``cfg.json`` (``model_name``, ``hook_name``, ``architecture``), so a folder copied into
``assets/`` is found without code changes. ``$RECOVERY_JAX_ASSETS`` points elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path

from recovery_jax import errors

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


# --- SAEs by SAELens release and id --------------------------------------------------------------

SAE_ROOT_ENV = "RECOVERY_JAX_SAE_ROOT"
SHIPPED_PREFIX = "recovery-jax-"
_NAME = re.compile(r"^(?P<release>[A-Za-z0-9][A-Za-z0-9_.+-]+):(?P<sae_id>[^:]+)$")


class SAENotFound(errors.UserError):
  """A named SAE (``release:id``) with no files where it was looked for; the message lists the
  places and the nearest names."""


@dataclasses.dataclass(frozen=True)
class SAEName:
  """An SAE named as SAELens names it: ``release`` (``gemma-scope-2b-pt-res-canonical``) and ``sae_id``
  (``layer_12/width_16k/canonical``); written ``release:sae_id``."""
  release: str
  sae_id: str

  def __str__(self) -> str:
    return f"{self.release}:{self.sae_id}"


@dataclasses.dataclass(frozen=True)
class FoundSAE:
  """Where a named SAE's files are. ``repo_id``/``repo_path``: the SAELens directory's entry (None when
  SAELens does not list it); ``norm_scaling_factor``: the directory's input scale for the id, if any."""
  name: SAEName
  path: Path
  repo_id: str | None = None
  repo_path: str | None = None
  norm_scaling_factor: float | None = None

  def load_kwargs(self) -> dict:
    """Extra ``formats.load_sae`` arguments the SAELens directory implies: its ``norm_scaling_factor``
    for a SAELens-format folder (SAELens applies it on load too); else {}."""
    if self.norm_scaling_factor is None:
      return {}
    from recovery_jax.sae import formats  # pylint: disable=import-outside-toplevel
    return {"norm_scaling_factor": float(self.norm_scaling_factor)} if formats.detect_format(self.path) == "saelens" else {}


def parse_name(text: str) -> SAEName | None:
  """``"release:id"`` -> SAEName; None for anything else (a path, ``shipped``, ``random``).

  A name's release is one word (letters, digits, ``_.+-``; no ``/``, not starting with ``.``), so a
  folder path never parses as a name: write ``./a:b`` for a folder whose name holds a colon."""
  m = _NAME.match(str(text).strip())
  if not m:
    return None
  sae_id = m.group("sae_id").strip("/")
  return SAEName(m.group("release"), sae_id) if sae_id else None


def is_name(text) -> bool:
  return parse_name(str(text)) is not None


def sae_roots(roots: str | os.PathLike | list | tuple | None = None) -> list[Path]:
  """The local roots named SAEs are looked up under: ``roots`` (a list, or one string of
  ``os.pathsep``-separated folders), else ``$RECOVERY_JAX_SAE_ROOT`` (same syntax); [] when unset."""
  if roots is None:
    roots = os.environ.get(SAE_ROOT_ENV, "")
  if isinstance(roots, (str, os.PathLike)):
    roots = [r for r in str(roots).split(os.pathsep) if r]
  return [Path(r).expanduser() for r in roots]


def shipped_names(assets: str | os.PathLike | None = None) -> dict[str, ShippedSAE]:
  """Release-style names of the shipped SAEs: ``recovery-jax-<model_name>:<hook_name>``, with
  ``/<architecture>`` appended where one model ships several SAEs at a hook."""
  all_saes = shipped(assets)
  count: dict[tuple[str, str], int] = {}
  for s in all_saes:
    count[(s.model_name, s.hook_name)] = count.get((s.model_name, s.hook_name), 0) + 1
  out = {}
  for s in all_saes:
    sae_id = s.hook_name if count[(s.model_name, s.hook_name)] == 1 else f"{s.hook_name}/{s.architecture}"
    out[str(SAEName(SHIPPED_PREFIX + s.model_name, sae_id))] = s
  return out


def _saelens_yaml() -> Path | None:
  """SAELens' ``pretrained_saes.yaml`` (release -> repo_id, id -> path), found without importing sae_lens."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  try:
    spec = importlib.util.find_spec("sae_lens")
  except (ImportError, ValueError):
    return None
  for folder in (spec.submodule_search_locations or []) if spec else []:
    path = Path(folder) / "pretrained_saes.yaml"
    if path.exists():
      return path
  return None


@functools.lru_cache(maxsize=None)
def _yaml_text() -> str:
  path = _saelens_yaml()
  return path.read_text() if path else ""


def saelens_releases() -> list[str]:
  """Every release SAELens' directory lists ([] without sae_lens)."""
  return re.findall(r"^([A-Za-z0-9][^\s:#]*):\s*$", _yaml_text(), flags=re.M)


@functools.lru_cache(maxsize=256)
def saelens_release(release: str) -> dict | None:
  """SAELens' directory entry of ``release`` (``repo_id``, ``model``, ``saes``: id -> {path,
  norm_scaling_factor?}), read from its ``pretrained_saes.yaml``; None without sae_lens / PyYAML or
  for a release it does not list. Only that release's block is parsed."""
  text = _yaml_text()
  m = re.search(rf"^{re.escape(release)}:\s*$", text, flags=re.M)
  if not m:
    return None
  end = re.search(r"^\S", text[m.end():], flags=re.M)
  block = text[m.start(): m.end() + (end.start() if end else len(text))]
  try:
    import yaml  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  entry = (yaml.safe_load(block) or {}).get(release) or {}
  saes = {str(s["id"]): {"path": str(s["path"]), "norm_scaling_factor": s.get("norm_scaling_factor")}
          for s in entry.get("saes", ())}
  return {"repo_id": entry.get("repo_id"), "model": entry.get("model"), "saes": saes}


def _hf_cache() -> Path:
  """The Hugging Face hub cache SAELens downloads into (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
  if os.environ.get("HF_HUB_CACHE"):
    return Path(os.environ["HF_HUB_CACHE"])
  return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def candidates(name: SAEName, roots: list[Path]) -> list[Path]:
  """The folders a named SAE may be in, in the order they are tried: under each root
  ``<root>/<release>/<id>``, then (for a release SAELens lists, whose id maps to a path in a Hugging
  Face repo) ``<root>/<release>/<path>`` and ``<root>/<repo_id>/<path>`` (a ``hf download <repo_id>
  --local-dir <root>/<repo_id>`` copy); last, the path in the local Hugging Face cache's snapshots,
  where SAELens' own downloads are (nothing is downloaded)."""
  entry = saelens_release(name.release)
  hit = (entry or {}).get("saes", {}).get(name.sae_id)
  out = []
  for root in roots:
    out.append(root / name.release / name.sae_id)
    if hit:
      out += [root / name.release / hit["path"], root / entry["repo_id"] / hit["path"]]
  if hit:
    repo = _hf_cache() / ("models--" + entry["repo_id"].replace("/", "--")) / "snapshots"
    out += sorted(repo.glob(f"*/{hit['path']}")) or [repo / "<revision>" / hit["path"]]
  return list(dict.fromkeys(out))


def _holds_sae(path: Path) -> bool:
  from recovery_jax.sae import formats  # pylint: disable=import-outside-toplevel  (formats imports registry)
  if not path.is_dir():
    return False
  try:
    formats.detect_format(path)
  except errors.UserError:
    return False
  return True


def local_names(roots: str | os.PathLike | list | None = None, *, max_depth: int = 6,
                max_dirs: int = 20_000) -> list[str]:
  """``release:id`` of every SAE folder laid out ``<root>/<release>/<id>/`` under the roots
  (``sae_roots``), found by walking at most ``max_depth`` levels."""
  out = []
  for root in sae_roots(roots):
    seen = 0
    for folder, subdirs, _ in os.walk(root):
      seen += 1
      rel = Path(folder).relative_to(root)
      if seen > max_dirs or len(rel.parts) >= max_depth:
        subdirs[:] = []
      if len(rel.parts) >= 2 and _holds_sae(Path(folder)):
        out.append(str(SAEName(rel.parts[0], "/".join(rel.parts[1:]))))
        subdirs[:] = []
      subdirs.sort()
  return sorted(set(out))


def find(name: str | SAEName, roots: str | os.PathLike | list | None = None,
         assets: str | os.PathLike | None = None) -> FoundSAE:
  """The folder of the SAE named ``release:id``: a shipped SAE (``recovery-jax-<model>:<hook>``,
  ``shipped_names``), else the first of ``candidates`` that holds SAE files (any format
  ``formats.load_sae`` reads). ``SAENotFound`` lists where it looked and the nearest names (local,
  shipped and, for a release SAELens lists, its ids)."""
  parsed = name if isinstance(name, SAEName) else parse_name(name)
  if parsed is None:
    raise SAENotFound(f"SAE name {name!r}: expected <release>:<id>, e.g. "
                      "gemma-scope-2b-pt-res-canonical:layer_12/width_16k/canonical")
  text = str(parsed)
  ships = shipped_names(assets)
  if text in ships:
    return FoundSAE(parsed, ships[text].path)
  root_list = sae_roots(roots)
  entry = saelens_release(parsed.release)
  hit = (entry or {}).get("saes", {}).get(parsed.sae_id)
  looked = [] if parsed.release.startswith(SHIPPED_PREFIX) else candidates(parsed, root_list)
  for path in looked:
    if _holds_sae(path):
      return FoundSAE(parsed, path, entry["repo_id"] if hit else None, hit["path"] if hit else None,
                      hit.get("norm_scaling_factor") if hit else None)
  from recovery_jax import config_utils  # pylint: disable=import-outside-toplevel
  known = list(ships) + local_names(root_list)
  if entry:
    known += [str(SAEName(parsed.release, i)) for i in entry["saes"]]
  else:
    known += [f"{r}:..." for r in saelens_releases()]
  near = "" if hit else config_utils.nearest(text, [k for k in known if k != text], n=3)
  if not near and not entry:
    near = config_utils.nearest(f"{parsed.release}:...", known, n=3)
  where = "; ".join(str(p) for p in looked) or "nowhere"
  if parsed.release.startswith(SHIPPED_PREFIX):
    where = f"the shipped SAEs in {Path(assets) if assets is not None else assets_dir()}"
  roots_note = (f"${SAE_ROOT_ENV}={os.pathsep.join(map(str, root_list))}" if root_list else
                f"${SAE_ROOT_ENV} is not set: set it to the folder holding <release>/<id>/")
  msg = f"SAE {text!r} not found{near}; looked in: {where} ({roots_note})"
  if entry and not hit:
    msg += f"; SAELens' release {parsed.release!r} has no id {parsed.sae_id!r}"
  elif hit:
    msg += (f"; SAELens maps it to {entry['repo_id']}/{hit['path']}: copy those files to "
            f"<root>/{parsed.release}/{parsed.sae_id}/")
  by_release: dict[str, list[str]] = {}
  for shipped_name in ships:
    release, _, sae_id = shipped_name.partition(":")
    by_release.setdefault(release, []).append(sae_id)
  listing = "; ".join(f"{r}: {', '.join(ids)}" for r, ids in by_release.items())
  msg += f"; shipped ({listing or 'none'})"
  raise SAENotFound(msg)


def main() -> None:
  """``python -m recovery_jax.sae.registry``: the shipped SAEs and the local ones under the roots."""
  for name, s in shipped_names().items():
    print(f"{name}  ({s.architecture}; {s.path})")
  for name in local_names():
    print(name)


if __name__ == "__main__":
  main()
