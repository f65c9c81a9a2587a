#!/usr/bin/env bash
# One host, all its devices (GPUs, TPU cores, or the CPU).
#   launch/local.sh configs/mtat.py:spec_att runs/spec_att [--config.train.batch_size=64 ...]
# On a CPU-only machine, FLAXTAG_CPU_DEVICES=8 splits the CPU into 8 JAX devices (the default mesh of the tests).
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [--config.key=value ...]}; workdir=${2:?workdir}; shift 2
if [[ -n "${FLAXTAG_CPU_DEVICES:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${FLAXTAG_CPU_DEVICES}"
fi
exec python -m flaxtag.train --config "$config" --workdir "$workdir" "$@"
