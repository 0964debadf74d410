#!/usr/bin/env bash
# Runs a config on this machine (CPU or a local GPU).
#   launch/local.sh configs/ioi.py:sweep runs/ioi_sweep [--config.recovery.steps=50 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?config, e.g. configs/ioi.py}; workdir=${2:?workdir}; shift 2
[ -x .venv/bin/python ] || bash scripts/setup.sh
exec .venv/bin/python -m recovery_jax.main --config="$config" --workdir="$workdir" "$@"
