#!/usr/bin/env bash
# Stops what tests/slurm/setup.sh started, by the pids the daemons recorded: jobs, slurmd, slurmctld, then munged.
set -uo pipefail
scancel --full --user=root 2>/dev/null; sleep 1
stop() {  # pidfile
  [[ -s $1 ]] || return 0
  local pid; pid=$(cat "$1")
  kill "$pid" 2>/dev/null
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null  # slurmd outlives SIGTERM while a step it started will not end
  rm -f "$1"   # a stale /run/slurmctld.pid makes slurmctld's prerm (apt-get remove) run scancel and fail
}
stop /run/slurmd.pid
pkill -9 -x slurmstepd 2>/dev/null  # job steps a failed test left behind (seen after a timed-out requeue)
stop /run/slurmctld.pid
stop /run/munge/munged.pid
