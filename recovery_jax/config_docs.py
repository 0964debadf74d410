"""What the config files say about themselves, read without running an experiment (no JAX).

* ``file_doc(path)``: a ``configs/*.py`` file's summary (the module docstring's first paragraph), its
  experiment (the ``<c>.experiment = "..."`` assignment, found by ``ast``) and its variants and
  arguments with one line each: the entries of the docstring's ``Variants ...:`` / ``Arguments ...:``
  section (``  name  text``, two-space indent; deeper-indented lines continue the text).
* ``accepted_args(path)``: the variants and ``key=value`` arguments the file's ``get_config`` itself
  accepts, read from the errors it raises for a name it cannot know (``config_utils.parse_arg``'s
  "known: ..." and the files' "unknown variant ...; expected a, b or c").
* ``field_docs(path)``: dotted field -> meaning, from the comments next to the field's first
  assignment in ``get_config`` (the comment block right above it and the comment at its line's end).
  ``COMMON_FIELDS`` documents the fields every config has in the same sense (``experiment``,
  ``variant``, ``seed``) unless the file comments them itself.
* ``describe(cfg, docs)``: the config's fields, values and meanings as text (``main.py --describe``).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import io
import os
import re
import textwrap
import tokenize
from pathlib import Path

from recovery_jax import config_utils

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

COMMON_FIELDS = {  # fields every app reads the same way
    "experiment": "the recovery_jax.experiments module that runs this config (python -m recovery_jax.main --list)",
    "variant": "the variant the config was built from (configs/<file>.py:<variant>)",
    "seed": "the run's random seed (random-model and SAE init, sampling, delta init)",
    "model": "the model: a named one (smollm2-135m-instruct, tiny-random-llama, ...), a .gguf file or a HF folder",
    "model_processing": "'' or 'transformer_lens' (weights processed as TransformerLens does, for GPT-2 + res-jb SAEs)",
    "site": "the TransformerLens hook (blocks.L.hook_resid_pre / hook_resid_post) where the SAE is attached",
    "sae_override_checks": "True: an SAE whose d_in, hook or model name does not match the model only warns",
    "mesh": "device mesh axis sizes: data (batch sharding; -1: every device) and model",
    "plots": "write the run's figures (PNG) into the workdir",
    "progress": "show progress bars",
    "log_every": "log every N optimisation steps",
    "unit_size": "sweep points per resumable work unit; 0: one unit per (mode, variant) group",
}
_PROBE = "zz_no_such_name"
_SECTION = re.compile(r"\b(Variants|Arguments)\b.*:\s*$")
_ENTRY = re.compile(r"^  (\S+)\s+(\S.*)$")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One variant (a bare word) or argument (``key`` / ``key=value``) of a config file."""
  name: str
  text: str

  @property
  def key(self) -> str:
    return self.name.split("=", 1)[0]


@dataclasses.dataclass(frozen=True)
class FileDoc:
  path: Path
  summary: str
  experiment: str | None
  entries: tuple[Entry, ...]


def config_files(folder: str | os.PathLike | None = None) -> list[Path]:
  """The config files (``*.py`` with a ``get_config``) of ``folder`` (default: the repository's ``configs/``)."""
  root = Path(folder) if folder is not None else CONFIG_DIR
  if not root.is_dir():
    return []
  return [p for p in sorted(root.glob("*.py")) if not p.name.startswith("_") and _get_config(_parse(p)) is not None]


def _parse(path: Path) -> ast.Module:
  return _read(Path(path))[1]


def _read(path: Path):
  """(source, module, get_config's assignments) of ``path``, cached while the file is unchanged."""
  st = path.stat()
  return _read_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _read_cached(path: str, mtime_ns: int, size: int):
  del mtime_ns, size  # cache keys only
  source = Path(path).read_text()
  module = ast.parse(source, path)
  fn = _get_config(module)
  return source, module, tuple(_assignments(fn)) if fn is not None else ()


def _get_config(module: ast.Module) -> ast.FunctionDef | None:
  return next((n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "get_config"), None)


def _dotted(node: ast.AST, root: str) -> str | None:
  """``c.a.b`` -> ``"a.b"`` when the chain starts at the name ``root``, else None."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if isinstance(node, ast.Name) and node.id == root and parts:
    return ".".join(reversed(parts))
  return None


def _root_name(fn: ast.FunctionDef) -> str:
  """The name ``get_config`` returns (``c``)."""
  for node in ast.walk(fn):
    if isinstance(node, ast.Return) and isinstance(node.value, ast.Name):
      return node.value.id
  return "c"


def _assignments(fn: ast.FunctionDef) -> list[tuple[str, ast.stmt]]:
  """(dotted field, statement) of every single-target ``<c>.x.y = ...`` in source order."""
  root, out = _root_name(fn), []
  for node in ast.walk(fn):
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
      name = _dotted(node.targets[0], root)
      if name:
        out.append((name, node))
  return sorted(out, key=lambda x: (x[1].lineno, x[1].col_offset))


def _summary(doc: str) -> str:
  first = doc.strip().split("\n\n", 1)[0]
  return " ".join(first.split())


def _entries(doc: str) -> tuple[Entry, ...]:
  out: list[list[str]] = []
  inside = False
  for line in doc.splitlines():
    if _SECTION.search(line):
      inside = True
      continue
    if not inside:
      continue
    m = _ENTRY.match(line)
    if m:
      out.append([m.group(1), m.group(2).strip()])
    elif out and line.startswith("   ") and line.strip():
      out[-1][1] += " " + line.strip()
    elif line.strip() and not line.startswith(" "):
      inside = False  # back at the left margin: the section ended
  return tuple(Entry(n, t) for n, t in out)


def file_doc(path: str | os.PathLike) -> FileDoc:
  """Summary, experiment and documented variants / arguments of one config file (no import)."""
  path = Path(path)
  module = _parse(path)
  doc = ast.get_docstring(module) or ""
  experiment = None
  for name, node in _read(path)[2]:
    if name == "experiment" and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
      experiment = node.value.value
      break
  return FileDoc(path, _summary(doc), experiment, _entries(doc))


def accepted_args(path: str | os.PathLike) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(variants, argument keys) the file's ``get_config`` accepts, from its errors for an unknown
  variant and an unknown key (runs ``get_config``: a config file is cheap to build)."""
  variants: tuple[str, ...] = ()
  keys: tuple[str, ...] = ()
  spec = str(path)
  try:
    config_utils.load_config_file(f"{spec}:{_PROBE}")
  except ValueError as e:
    m = re.search(r"unknown variant '[^']*'; expected (.+)$", str(e))
    if m:
      variants = tuple(v for v in re.split(r",\s*|\s+or\s+", m.group(1).strip().rstrip(".")) if v)
  try:
    config_utils.load_config_file(f"{spec}:{_PROBE}=1")
  except ValueError as e:
    m = re.search(r"known: (.+)$", str(e))
    if m:
      keys = tuple(k.strip() for k in m.group(1).split(","))
  return variants, keys


def field_docs(path: str | os.PathLike) -> dict[str, str]:
  """Dotted field -> the comments next to its first assignment in ``get_config`` (the block of
  comment lines right above it, then the comment ending its line(s)); a field the file leaves
  uncommented takes the comment of another config file of the same experiment in its folder (the
  same app reads it), then ``COMMON_FIELDS``."""
  path = Path(path)
  docs = _own_field_docs(path)
  experiment = file_doc(path).experiment
  for other in config_files(path.parent):
    if other.resolve() != path.resolve() and experiment and file_doc(other).experiment == experiment:
      for name, text in _own_field_docs(other).items():
        docs.setdefault(name, text)
  for name, text in COMMON_FIELDS.items():
    docs.setdefault(name, text)
  return docs


def _own_field_docs(path: Path) -> dict[str, str]:
  source, _, assignments = _read(path)
  comments: dict[int, str] = {}
  code_lines: set[int] = set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string.lstrip("#").strip()
    elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
      code_lines.update(range(tok.start[0], tok.end[0] + 1))
  docs: dict[str, str] = {}
  for name, node in assignments:
    if name in docs:
      continue
    above, line = [], node.lineno - 1
    while line in comments and line not in code_lines:
      above.insert(0, comments[line])
      line -= 1
    after = [comments[l] for l in range(node.lineno, node.end_lineno + 1) if l in comments]
    text = " ".join(above + after[:1]).strip()
    docs[name] = text
  return {k: v for k, v in docs.items() if v}


def undocumented(cfg, docs: dict[str, str]) -> list[str]:
  """Top-level fields of ``cfg`` without a description in ``docs``."""
  return [k for k in cfg.keys() if not docs.get(k)]


def _fmt(value) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def field_order(path: str | os.PathLike) -> list[str]:
  """Dotted fields in the order ``get_config`` first assigns them."""
  return list(dict.fromkeys(name for name, _ in _read(Path(path))[2]))


def describe(cfg, docs: dict[str, str], order: list[str] = (), *, width: int = 110) -> str:
  """``cfg``'s fields (groups indented under their name; in ``order``, the rest by name), each
  ``name = value`` with its meaning from ``docs`` wrapped after it."""
  lines: list[str] = []
  rank = {name: i for i, name in enumerate(order)}

  def walk(node, prefix: str, indent: str):
    for key in sorted(node.keys(), key=lambda k: (rank.get(prefix + k, len(rank)), k)):
      name, value = prefix + key, node[key]
      doc = docs.get(name, "")
      if hasattr(value, "keys"):
        head = f"{indent}{key}:"
      else:
        head = f"{indent}{key} = {_fmt(value)}"
      if doc:
        pad = max(40, len(head) + 2)
        wrapped = textwrap.wrap(doc, width=max(40, width - pad)) or [""]
        lines.append(head.ljust(pad) + wrapped[0])
        lines.extend(" " * pad + w for w in wrapped[1:])
      else:
        lines.append(head)
      if hasattr(value, "keys"):
        walk(value, name + ".", indent + "  ")

  walk(cfg, "", "")
  return "\n".join(lines)


def listing(folder: str | os.PathLike | None = None, experiment_names=None, summaries=None, *,
            width: int = 110) -> str:
  """Every experiment with its config files, each file's variants / arguments one line each.

  ``experiment_names``/``summaries`` (name -> line) default to ``recovery_jax.experiments``'."""
  from recovery_jax import experiments  # pylint: disable=import-outside-toplevel
  names = tuple(experiment_names) if experiment_names is not None else experiments.names()
  summaries = summaries if summaries is not None else {n: experiments.one_line(n) for n in names}
  by_experiment: dict[str, list[FileDoc]] = {}
  for path in config_files(folder):
    d = file_doc(path)
    by_experiment.setdefault(d.experiment or "?", []).append(d)
  cwd = Path.cwd()

  def shown(p: Path) -> str:
    try:
      return str(p.relative_to(cwd))
    except ValueError:
      return str(p)

  def one_line(text: str, indent: int) -> str:
    return textwrap.shorten(text, width=max(30, width - indent), placeholder=" ...")

  lines = ["Experiments (run one: python -m recovery_jax.main --config=<file>[:<variant>,key=value] --workdir=<dir>;",
           "see a config's fields: python -m recovery_jax.main --config=<file>[:<variant>] --describe):", ""]
  for name in names:
    lines.append(f"{name}  {one_line(summaries.get(name, ''), len(name) + 2)}".rstrip())
    files = by_experiment.get(name, [])
    if not files:
      lines.append("  (no config file in configs/)")
    for d in files:
      lines.append(f"  {shown(d.path)}  {one_line(d.summary, len(shown(d.path)) + 4)}")
      variants, _ = accepted_args(d.path)
      entries = list(d.entries) + [Entry(v, "(not described in the file's docstring)")
                                   for v in variants if v not in {e.name for e in d.entries}]
      pad = max((len(e.name) for e in entries), default=0) + 2
      for e in entries:
        lines.append(f"    {e.name.ljust(pad)}{one_line(e.text, pad + 4)}")
    lines.append("")
  stray = sorted(set(by_experiment) - set(names))
  for name in stray:
    for d in by_experiment[name]:
      lines.append(f"{shown(d.path)}: experiment {name!r} is not a known experiment")
  return "\n".join(lines).rstrip() + "\n"
