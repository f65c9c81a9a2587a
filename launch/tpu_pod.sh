#!/usr/bin/env bash
# TPU pod slice: the same command on every worker VM; jax.distributed.initialize() finds the pod by itself.
# The workdir must be shared storage that all workers see (e.g. a gs:// bucket).
#   launch/tpu_pod.sh my-tpu us-central2-b configs/msd.py:spec_att gs://bucket/runs/msd --config.half_precision=True
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]}
zone=${2:?zone}; config=${3:?config}; workdir=${4:?workdir}; shift 4
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/flaxtag && python -m flaxtag.train --config $config --workdir $workdir$extra"
