#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (for the slurm test tier and for trying hpcfl's
# rendered scripts): `scripts/local_slurm.sh start|stop|status`. Needs root and Debian's
# slurm-wlm + munge (scripts/install.sh installs them with HPCFL_WITH_SLURM=1).
# HPCFL_SLURM_CGROUP=1 (stop the cluster first): jobs run in memory cgroups that enforce --mem (task/cgroup,
# memory a consumable resource), as on a production cluster; exit 77 where no memory cgroup controller is
# writable here. Without it, TaskPlugin=task/none: --mem is recorded, not enforced.
set -euo pipefail
cmd="${1:-status}"
host="$(hostname -s)"
cpus="${HPCFL_SLURM_CPUS:-8}"  # slots the node offers: more than the VM's cores, so 5-rank jobs fit (config_overrides)
conf=/etc/slurm/slurm.conf
cgroup="${HPCFL_SLURM_CGROUP:-0}"

# The memory cgroup version slurmd can manage here (1 or 2), or nothing: a v1 memory hierarchy or a v2 tree with
# the memory controller, in which root can create a cgroup (a container may mount them read-only).
cgroup_version() {
  local probe
  if [ -e /sys/fs/cgroup/memory/memory.limit_in_bytes ]; then
    probe=/sys/fs/cgroup/memory/hpcfl-probe-$$; mkdir "$probe" 2>/dev/null && rmdir "$probe" && echo 1 && return
  fi
  if grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
    probe=/sys/fs/cgroup/hpcfl-probe-$$; mkdir "$probe" 2>/dev/null && rmdir "$probe" && echo 2 && return
  fi
  return 0
}

# TaskPlugin and SelectTypeParameters; /etc/slurm/cgroup.conf with HPCFL_SLURM_CGROUP=1
task_lines() {
  local v
  if [ "$cgroup" != 1 ]; then
    rm -f /etc/slurm/cgroup.conf
    printf 'TaskPlugin=task/none\nSelectTypeParameters=CR_Core\n'
    return
  fi
  v="$(cgroup_version)"
  [ -n "$v" ] || { echo "local_slurm: HPCFL_SLURM_CGROUP=1, but no memory cgroup controller is writable here (neither /sys/fs/cgroup/memory nor a cgroup v2 tree with memory)" >&2; exit 77; }
  printf 'CgroupPlugin=cgroup/v%s\nCgroupMountpoint=/sys/fs/cgroup\nConstrainRAMSpace=yes\nConstrainSwapSpace=yes\n' "$v" \
    > /etc/slurm/cgroup.conf
  if [ "$v" = 2 ]; then echo "IgnoreSystemd=yes" >> /etc/slurm/cgroup.conf; fi  # no systemd in a container
  printf 'TaskPlugin=task/cgroup\nSelectTypeParameters=CR_Core_Memory\n'
}

start() {
  [ "$(id -u)" = 0 ] || { echo "local_slurm: needs root" >&2; exit 77; }
  command -v slurmctld >/dev/null || { echo "local_slurm: slurm-wlm not installed" >&2; exit 77; }
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge
  [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
  local tasks; tasks="$(task_lines)"
  cat > "$conf" <<CONF
ClusterName=hpcfl-local
SlurmctldHost=$host
AuthType=auth/munge
# a requeued job waits cred_expire before it starts again (slurmd refuses it while the revoked credential
# of its previous run is remembered): 20 s instead of 120 keeps the requeue tests short
AuthInfo=cred_expire=20
ProctrackType=proctrack/linuxproc
$tasks
SlurmUser=root
SchedulerType=sched/backfill
SelectType=select/cons_tres
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
    # with HPCFL_SLURM_CGROUP=1, a slurmd that cannot manage cgroups here exits: 77, what this machine lacks
    pgrep -x slurmd >/dev/null || { echo "local_slurm: slurmd exited: $(tail -3 /var/log/slurm/slurmd.log | tr '\n' ' ')" >&2
                                    [ "$cgroup" = 1 ] && exit 77; exit 1; }
    if sinfo -h -o "%t" 2>/dev/null | grep -qE "idle|mix|alloc"; then echo "local_slurm: up ($host, $cpus CPUs)"; return 0; fi
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "local_slurm: the node did not come up; see /var/log/slurm/ ($(tail -2 /var/log/slurm/slurmd.log | tr '\n' ' '))" >&2
  [ "$cgroup" = 1 ] && exit 77  # most likely slurmd's cgroup plugin: what this machine lacks
  exit 1
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
