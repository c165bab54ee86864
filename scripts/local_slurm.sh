#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (for the slurm test tier and for trying hpcfl's
# rendered scripts): `scripts/local_slurm.sh start|stop|status`. Needs root and Debian's
# slurm-wlm + munge (scripts/install.sh installs them with HPCFL_WITH_SLURM=1).
set -euo pipefail
cmd="${1:-status}"
host="$(hostname -s)"
cpus="${HPCFL_SLURM_CPUS:-8}"  # slots the node offers: more than the VM's cores, so 5-rank jobs fit (config_overrides)
conf=/etc/slurm/slurm.conf

start() {
  [ "$(id -u)" = 0 ] || { echo "local_slurm: needs root" >&2; exit 77; }
  command -v slurmctld >/dev/null || { echo "local_slurm: slurm-wlm not installed" >&2; exit 77; }
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge
  [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
  cat > "$conf" <<CONF
ClusterName=hpcfl-local
SlurmctldHost=$host
AuthType=auth/munge
# a requeued job waits cred_expire before it starts again (slurmd refuses it while the revoked credential
# of its previous run is remembered): 20 s instead of 120 keeps the requeue tests short
AuthInfo=cred_expire=20
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MpiDefault=none
SlurmdParameters=config_overrides
NodeName=$host CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
CONF
  pgrep -x munged >/dev/null || su -s /bin/sh munge -c "munged" 2>/dev/null || munged --force
  pgrep -x slurmctld >/dev/null || slurmctld -c  # -c: forget jobs a previous cluster left behind
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 60); do
    if sinfo -h -o "%t" 2>/dev/null | grep -qE "idle|mix|alloc"; then echo "local_slurm: up ($host, $cpus CPUs)"; return 0; fi
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "local_slurm: the node did not come up; see /var/log/slurm/" >&2; exit 1
}

stop() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  pkill -x munged 2>/dev/null || true
  for _ in $(seq 30); do
    pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || pgrep -x munged >/dev/null || break
    sleep 0.5
  done
  echo "local_slurm: stopped"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
