#!/usr/bin/env bash
# Several JAX processes on one machine (default 2 × 4 CPU devices), joined through jax.distributed on 127.0.0.1:
# the same program a multi-host cluster runs, testable on a laptop.
#   launch/local_multiprocess.sh configs/synth.py:gmp runs/mp [--config.key=value ...]
set -euo pipefail
config=${1:?usage: launch/local_multiprocess.sh CONFIG WORKDIR [--config.key=value ...]}; workdir=${2:?workdir}; shift 2
processes=${FLAXTAG_PROCESSES:-2}; devices=${FLAXTAG_CPU_DEVICES:-4}; port=${FLAXTAG_PORT:-12355}
export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"
pids=()
for ((i = 0; i < processes; i++)); do
  python -m flaxtag.train --config "$config" --workdir "$workdir" --coordinator_address "127.0.0.1:$port" \
    --num_processes "$processes" --process_id "$i" "$@" &
  pids+=($!)
done
# Ctrl-C or SIGTERM reaches every process; they agree on one step, save it and exit 0.
trap 'kill -TERM "${pids[@]}" 2>/dev/null' INT TERM
status=0
for pid in "${pids[@]}"; do
  # `wait` returns early when the trap runs: wait again while the process lives.
  until wait "$pid"; do
    code=$?
    kill -0 "$pid" 2>/dev/null || { status=$code; break; }
  done
done
exit $status
