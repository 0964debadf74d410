#!/usr/bin/env bash
# Runs a config on every worker of a Cloud TPU VM pod slice (one program, all hosts).
#   launch/tpu_pod.sh TPU_NAME ZONE configs/ioi.py:sweep gs://bucket/runs/ioi_sweep [extra flags]
# Each host runs the same command; the app calls jax.distributed.initialize() (RECOVERY_JAX_DISTRIBUTED=1)
# and the sweep's work units are sharded over the global ("data", "model") mesh. Use a workdir that every
# host can write (a GCS path mounted with gcsfuse, or a shared filesystem) so that resume works.
set -euo pipefail
cd "$(dirname "$0")/.."
tpu=${1:?TPU name}; zone=${2:?zone}; config=${3:?config}; workdir=${4:?workdir}; shift 4
project_flag=${PROJECT:+--project=$PROJECT}
tar czf /tmp/recovery_jax.tgz --exclude .venv --exclude .cache --exclude runs .
gcloud compute tpus tpu-vm scp /tmp/recovery_jax.tgz "$tpu":~/ --zone="$zone" --worker=all $project_flag
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all $project_flag --command "
  set -e; mkdir -p ~/recovery_jax && tar xzf ~/recovery_jax.tgz -C ~/recovery_jax && cd ~/recovery_jax &&
  bash scripts/setup.sh && .venv/bin/pip install -q -U 'jax[tpu]' &&
  RECOVERY_JAX_DISTRIBUTED=1 .venv/bin/python -m recovery_jax.main --config='$config' --workdir='$workdir' $*"
