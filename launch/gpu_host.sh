#!/usr/bin/env bash
# Runs a config on a remote GPU host over ssh: syncs the repository, installs jax[cuda12], runs.
#   launch/gpu_host.sh user@host configs/ioi.py:sweep runs/ioi_sweep [extra flags]
set -euo pipefail
cd "$(dirname "$0")/.."
host=${1:?user@host}; config=${2:?config}; workdir=${3:?workdir}; shift 3
remote_dir=${REMOTE_DIR:-recovery_jax}
rsync -az --delete --exclude .venv --exclude .cache --exclude runs ./ "$host:$remote_dir/"
ssh "$host" "cd $remote_dir && bash scripts/setup.sh && .venv/bin/pip install -q -U 'jax[cuda12]' && \
  XLA_PYTHON_CLIENT_PREALLOCATE=false .venv/bin/python -m recovery_jax.main --config='$config' --workdir='$workdir' $*"
rsync -az "$host:$remote_dir/$workdir/" "$workdir/"
