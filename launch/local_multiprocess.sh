#!/usr/bin/env bash
# Several JAX processes on one machine (default 2 × 4 CPU devices), joined through jax.distributed on 127.0.0.1:
# the same program a multi-host cluster runs, testable on a laptop.
#   launch/local_multiprocess.sh configs/synth.py:gmp runs/mp [--config.key=value ...]
# Ctrl-C or SIGTERM reaches every process: they agree on one step, save it and exit 0. A process that fails stops
# the others, as `srun --kill-on-bad-exit` does: without it they would wait at their next collective for the
# coordination service to notice the missing peer (minutes).
set -euo pipefail
config=${1:?usage: launch/local_multiprocess.sh CONFIG WORKDIR [--config.key=value ...]}; workdir=${2:?workdir}; shift 2
processes=${FLAXTAG_PROCESSES:-2}; devices=${FLAXTAG_CPU_DEVICES:-4}; port=${FLAXTAG_PORT:-12355}
grace=${FLAXTAG_KILL_GRACE_S:-10}  # a stopped run's processes get this long to exit before SIGKILL
export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"
pids=()
for ((i = 0; i < processes; i++)); do
  python -m flaxtag.train --config "$config" --workdir "$workdir" --coordinator_address "127.0.0.1:$port" \
    --num_processes "$processes" --process_id "$i" "$@" &
  pids+=($!)
done
trap 'for pid in "${pids[@]}"; do [[ $pid == done ]] || kill -TERM "$pid" 2>/dev/null || true; done' INT TERM
any_alive() { for pid; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }

# Polls instead of `wait -n`, which macOS's bash 3.2 lacks; bash reaps each child as it exits and keeps its status.
status=0; running=$processes; failed=-1
while ((running > 0)); do
  running=0
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [[ $pid == done ]] && continue
    if kill -0 "$pid" 2>/dev/null; then running=$((running + 1)); continue; fi
    code=0; wait "$pid" || code=$?
    pids[$i]=done
    if ((code != 0 && failed < 0)); then failed=$i; status=$code; fi
  done
  if ((failed >= 0 && running > 0)); then
    echo "local_multiprocess: process $failed exited with status $status; stopping the other processes" >&2
    others=(); for pid in "${pids[@]}"; do [[ $pid != done ]] && others+=("$pid"); done
    kill -TERM "${others[@]}" 2>/dev/null || true
    for ((t = 0; t < grace * 10; t++)); do any_alive "${others[@]}" || break; sleep 0.1; done
    kill -KILL "${others[@]}" 2>/dev/null || true
    wait "${others[@]}" 2>/dev/null || true
    break
  fi
  sleep 0.5
done
exit $status
