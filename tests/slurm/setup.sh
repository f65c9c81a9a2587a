#!/usr/bin/env bash
# The test suite's one-node SLURM cluster (slurmctld + slurmd + munged) on 127.0.0.1, as root on Debian/Ubuntu,
# without systemd or cgroups (proctrack/linuxproc, task/none): installs slurm-wlm and munge with apt if missing.
# Idempotent; prints timings. Exit status 3: this machine has a SLURM configuration of its own, left untouched.
# After ../shared/slurm/setup_slurm.sh, which brought such a cluster up on the development machines.
set -euo pipefail
MARK="# written by flaxtag's tests/slurm/setup.sh"
if [[ -e /etc/slurm/slurm.conf ]] && ! grep -qxF "$MARK" /etc/slurm/slurm.conf; then
  echo "/etc/slurm/slurm.conf exists and is not the test cluster's: not touching it" >&2; exit 3
fi
t0=$(date +%s.%N)
export DEBIAN_FRONTEND=noninteractive
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends slurm-wlm munge
fi
t1=$(date +%s.%N)

# --- munge: key (the Debian postinst usually made one), runtime dirs, daemon as user munge
if [[ ! -s /etc/munge/munge.key ]]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n | unmunge | grep -q 'STATUS: *Success'

# --- slurm.conf: this machine's real CPU layout (slurmd -C), one node called localhost on 127.0.0.1
read -r cpus sockets cores threads mem < <(slurmd -C | head -1 | tr ' ' '\n' | awk -F= '
  $1=="CPUs"{c=$2} $1=="SocketsPerBoard"{s=$2} $1=="CoresPerSocket"{k=$2} $1=="ThreadsPerCore"{t=$2}
  $1=="RealMemory"{m=$2} END{print c, s, k, t, m}')
mem=$(( mem > 2048 ? mem - 1024 : mem ))   # leave headroom so the node never registers below its config
install -d -m 0755 /etc/slurm
cat > /etc/slurm/slurm.conf <<CONF
$MARK
ClusterName=ci
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=${cpus} Sockets=${sockets} CoresPerSocket=${cores} ThreadsPerCore=${threads} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
install -d -o slurm -g slurm -m 0755 /var/spool/slurmctld /var/log/slurm
install -d -o root -g root -m 0755 /var/spool/slurmd

# --- daemons (they fork into the background; pids in /run/slurm{ctld,d}.pid)
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd -N localhost
for _ in $(seq 120); do
  [[ "$(sinfo -h -n localhost -o %T 2>/dev/null)" == idle ]] && break; sleep 0.5
done
sinfo
if [[ "$(sinfo -h -n localhost -o %T)" != idle ]]; then
  tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log; exit 1
fi
timeout 60 srun -N1 -n2 hostname
t2=$(date +%s.%N)
awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN{printf "setup_slurm: install %.1f s, configure+start %.1f s, total %.1f s\n", b-a, c-b, c-a}'
