#!/usr/bin/env bash
# A real TWO-node SLURM cluster on this one machine, for running hpcfl's rendered multi-node jobs:
# `scripts/local_slurm_2node.sh start|stop|status|env|restart-controller|restart-node NODE`. Needs root, iproute2, slurm-wlm and munge
# (scripts/install.sh installs them with HPCFL_WITH_SLURM=1).
#
#   root namespace: slurmctld (port 6917) and munged, bridge hpcfl-br0 10.77.0.254/24
#        |-- veth --> netns hpcfl-n1: eth0 10.77.0.1, hostname hpcfl-n1, slurmd (port 6918)
#        `-- veth --> netns hpcfl-n2: eth0 10.77.0.2, hostname hpcfl-n2, slurmd (port 6918)
#
# Each node has its own network stack, address and hostname (a network + UTS namespace), so MPI
# sees two hosts and talks TCP between them; the filesystem is shared, like a cluster's.
# It lives beside scripts/local_slurm.sh's one-node cluster without touching it: its own config
# ($HPCFL_2NODE_DIR/etc/slurm.conf: point SLURM_CONF there, or `eval "$(... env)"`), ports,
# state, munged (own socket and key) and daemon names (hpcfl2n-*, so `pkill -x slurmd` in the
# other script does not reach them). Daemons are stopped by their pid files; `start` first
# removes whatever a previous run left behind.
#
# Both slurmd (and so every job step and rank they start) run in ONE cpu cgroup, hpcfl-2node: the two
# "nodes" share this machine's cores, and srun starts each node's tasks in a session of their own, which
# the kernel's autogroup scheduling (kernel.sched_autogroup_enabled, for tasks in the root cpu cgroup)
# makes a task group of its own. MPI and Horovod wait by spinning (sched_yield, mpi_yield_when_idle), and a
# yield only lets tasks of the yielder's own group run: a rank of node 2 spinning on core 0 for a message
# from a rank of node 1 pinned to the same core kept that core for 44 s while the node-1 rank, runnable,
# got no CPU at all (rounds of 0.1 s stalled 2-58 s at load average ~10). In one cgroup (no autogroup) the
# ranks of both nodes share a task group, as one node's ranks do. A real cluster's nodes share no cores.
set -euo pipefail
cmd="${1:-status}"
base="${HPCFL_2NODE_DIR:-/var/lib/hpcfl-2node}"
net="${HPCFL_2NODE_NET:-10.77.0}"  # a /24 this machine does not use
cpus="${HPCFL_2NODE_CPUS:-4}"      # slots each node offers (both share this machine's cores)
nodes=(hpcfl-n1 hpcfl-n2)
bridge=hpcfl-br0
conf="$base/etc/slurm.conf"
sock="$base/run/munge.socket"
host="$(hostname -s)"

die() { echo "local_slurm_2node: $*" >&2; exit "${2:-1}"; }

env_lines() { echo "export SLURM_CONF=$conf"; }

# A daemon under its own name: a symlink named hpcfl2n-X to the real binary gives the process that comm name.
bin() { ln -sf "$(command -v "$1")" "$base/bin/hpcfl2n-$1"; echo "$base/bin/hpcfl2n-$1"; }

# alive PID: running (a zombie is not: where PID 1 does not reap, dead daemons stay zombies)
alive() { [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }

kill_pidfile() {
  local f="$1" pid
  [ -s "$f" ] || return 0
  pid="$(cat "$f")"
  if alive "$pid" && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == hpcfl2n-* ]]; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 40); do alive "$pid" || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

stop() {
  local n pid
  for n in "${nodes[@]}"; do kill_pidfile "$base/run/slurmd-$n.pid"; done
  kill_pidfile "$base/run/slurmctld.pid"
  for n in "${nodes[@]}"; do
    if ip netns list 2>/dev/null | grep -qw "$n"; then
      # whatever still runs inside the node (job steps of a killed run) was started by this cluster
      for pid in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns del "$n" 2>/dev/null || true
    fi
    ip link del "$n-br" 2>/dev/null || true
    rm -rf "/etc/netns/$n"
  done
  ip link del "$bridge" 2>/dev/null || true
  kill_pidfile "$base/run/munged.pid"
  local g
  g="$(cpu_group_dir)"; [ -z "$g" ] || rmdir "$g" 2>/dev/null || true  # empty once its processes are gone
  rm -f "$sock" "$sock.lock"
  echo "local_slurm_2node: stopped"
}

network() {
  ip link add "$bridge" type bridge 2>/dev/null || die "cannot create network devices here (a container without CAP_NET_ADMIN?)" 77
  ip addr add "$net.254/24" dev "$bridge"
  ip link set "$bridge" up
  local i n
  for i in 1 2; do
    n="${nodes[$((i - 1))]}"
    ip netns add "$n"
    ip link add "$n-br" type veth peer name eth0 netns "$n"
    ip link set "$n-br" master "$bridge" up
    ip -n "$n" addr add "$net.$i/24" dev eth0
    ip -n "$n" link set eth0 up
    ip -n "$n" link set lo up
    # mounted over /etc/hosts inside the node (what `ip netns exec` does too)
    mkdir -p "/etc/netns/$n"
    printf '127.0.0.1 localhost\n%s.1 %s\n%s.2 %s\n%s.254 %s\n' \
      "$net" "${nodes[0]}" "$net" "${nodes[1]}" "$net" "$host" > "/etc/netns/$n/hosts"
  done
}

write_conf() {
  mkdir -p "$base/etc"
  cat > "$conf" <<CONF
# scripts/local_slurm_2node.sh: two nodes (network namespaces) on one machine
ClusterName=hpcfl-2node
SlurmctldHost=$host($net.254)
SlurmctldPort=6917
SlurmdPort=6918
AuthType=auth/munge
AuthInfo=socket=$sock
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$base/spool/ctld
SlurmdSpoolDir=$base/spool/%n
SlurmctldPidFile=$base/run/slurmctld.pid
SlurmdPidFile=$base/run/slurmd-%n.pid
SlurmctldLogFile=$base/log/slurmctld.log
SlurmdLogFile=$base/log/slurmd-%n.log
MpiDefault=none
SlurmdParameters=config_overrides
NodeName=${nodes[0]} NodeAddr=$net.1 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=4000 State=UNKNOWN
NodeName=${nodes[1]} NodeAddr=$net.2 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=4000 State=UNKNOWN
# hpcfl's jobs ask --exclusive: they run one after another, as on a cluster
PartitionName=two Nodes=${nodes[0]},${nodes[1]} Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces, slurmd)" 77
  command -v ip >/dev/null || die "ip not found: apt-get install iproute2" 77
  command -v slurmctld >/dev/null && command -v munged >/dev/null || die "slurm-wlm/munge not installed" 77
  stop >/dev/null
  mkdir -p "$base"/{bin,run,log,spool/ctld} "${nodes[@]/#/$base/spool/}"
  chmod 0700 "$base/run"
  [ -s "$base/etc/munge.key" ] || { mkdir -p "$base/etc"; head -c 1024 /dev/urandom > "$base/etc/munge.key"; }
  chmod 0400 "$base/etc/munge.key"
  write_conf
  network
  "$(bin munged)" --force --socket="$sock" --key-file="$base/etc/munge.key" --pid-file="$base/run/munged.pid" \
    --log-file="$base/log/munged.log" --seed-file="$base/run/munged.seed"
  "$(bin slurmctld)" -c -f "$conf"  # -c: forget jobs a previous cluster left behind
  local n
  for n in "${nodes[@]}"; do start_node "$n"; done
  wait_up
}

# The directory of the cpu cgroup hpcfl-2node (v1: the hierarchy mounted with the cpu controller; v2: the
# unified tree, if it offers the cpu controller), or nothing where there is none.
cpu_group_dir() {
  local dev mnt type opts rest
  while read -r dev mnt type opts rest; do
    if [ "$type" = cgroup ] && [[ ",$opts," == *,cpu,* ]]; then echo "$mnt/hpcfl-2node"; return; fi
  done < /proc/mounts
  while read -r dev mnt type opts rest; do
    if [ "$type" = cgroup2 ] && grep -qw cpu "$mnt/cgroup.controllers" 2>/dev/null; then echo "$mnt/hpcfl-2node"; return; fi
  done < /proc/mounts
}

# Create the cgroup (see the top of this file); prints its cgroup.procs, or nothing (with a warning) where
# this machine does not let root create one (a container may mount cgroups read-only).
cpu_group() {
  local g
  g="$(cpu_group_dir)"
  if [ -n "$g" ]; then
    [[ "$(stat -f -c %T "$(dirname "$g")")" == cgroup2fs ]] && { echo +cpu > "$(dirname "$g")/cgroup.subtree_control"; } 2>/dev/null || true
    mkdir -p "$g" 2>/dev/null && [ -w "$g/cgroup.procs" ] && { echo "$g/cgroup.procs"; return; }
  fi
  echo "local_slurm_2node: warning: no cpu cgroup for the two nodes here: their ranks share cores in separate task groups (autogroups) and can starve each other for seconds under load" >&2
}

start_node() {
  local n="$1" slurmd procs
  slurmd="$(bin slurmd)"
  procs="$(cpu_group)"
  # its own network (the netns), hostname (--uts), and in its own mount namespace its /etc/hosts and a
  # node-local /tmp (as on a real cluster: the two slurmd's PMIx and Open MPI's session directories,
  # named by job and step, would collide in one shared /tmp). Not `ip netns exec`: it remounts /sys
  # without the cgroup filesystem slurmd needs.
  mkdir -p "$base/tmp/$n"; chmod 1777 "$base/tmp/$n"
  nsenter --net="/run/netns/$n" unshare --uts --mount --propagation slave -- sh -c \
    'hostname "$1" && mount --bind "/etc/netns/$1/hosts" /etc/hosts && mount --bind "$4" /tmp \
     && { [ -z "$5" ] || echo $$ > "$5"; } && exec "$2" -f "$3" -N "$1"' sh "$n" "$slurmd" "$conf" "$base/tmp/$n" "$procs"
}

# A node that was lost (every process in it killed, as tests/slurm/test_lost_node.py does) or cut off (its
# link down, test_unreachable_node.py) comes back: its link up and forwarding, whatever still runs in it
# killed (and gone, so that the new slurmd can bind its port), its slurmd started again, then the same
# checks as `start` (both nodes up in SLURM, each reaching the other).
restart_node() {
  local n="$1" pid left
  [[ " ${nodes[*]} " == *" $n "* ]] || die "restart-node: no node $n (${nodes[*]})" 2
  ip link show "$n-br" >/dev/null 2>&1 || die "restart-node: $n's link $n-br does not exist: the cluster is not up (start it)"
  ip link set "$n-br" up
  ip -n "$n" link set eth0 up
  for _ in $(seq 40); do  # a bridge port that comes up may pass through listening/learning before forwarding
    bridge link show dev "$n-br" 2>/dev/null | grep -q 'state forwarding' && break
    sleep 0.25
  done
  bridge link show dev "$n-br" 2>/dev/null | grep -q 'state forwarding' \
    || die "restart-node: $n's port $n-br on $bridge is not forwarding after 10 s: $(bridge link show dev "$n-br" 2>&1)"
  for _ in $(seq 40); do
    left=""
    for pid in $(ip netns pids "$n" 2>/dev/null); do
      alive "$pid" && { kill -9 "$pid" 2>/dev/null || true; left="$left $pid"; }
    done
    [ -z "$left" ] && break
    sleep 0.25
  done
  [ -z "$left" ] || die "restart-node: processes$left in $n survive kill -9 after 10 s (uninterruptible I/O?)"
  # a node that comes back has an empty /tmp, as after a reboot, and none of its dead steps' PMIx sockets: a
  # requeued job keeps its id, and the killed run's stepd.slurm.pmix.JOB.0 in the node's spool made the requeued
  # step's launch there fail ("Cannot bind() UNIX socket ...: Address already in use", then "Cannot create directory .../pmix.JOB.0/: File exists")
  find "$base/tmp/$n" -mindepth 1 -delete 2>/dev/null || true
  rm -rf "$base/spool/$n"/stepd.slurm.pmix.* "$base/spool/$n"/pmix.*
  rm -f "$base/run/slurmd-$n.pid"
  start_node "$n"
  wait_up
}

# Each node reaches the other's slurmd port (MPI goes node to node over the same bridge). Retried: a slurmd
# just started may not listen yet, a port just up may not forward yet.
reach_each_other() {
  local a b why=""
  for _ in $(seq 30); do
    why=""
    for a in 0 1; do
      b=$((1 - a))
      timeout 5 ip netns exec "${nodes[$a]}" bash -c "exec 3<>/dev/tcp/$net.$((b + 1))/6918" 2>/dev/null \
        || why="$why ${nodes[$a]} -> ${nodes[$b]} ($net.$((b + 1)):6918) failed;"
    done
    [ -z "$why" ] && return 0
    sleep 1
  done
  die "the two nodes cannot reach each other over $bridge after 30 s:$why links: $(ip -br link show master "$bridge" | tr '\n' ' ')(a firewall on bridged traffic? see $base/log/)"
}

wait_up() {
  local n
  export SLURM_CONF="$conf"
  for _ in $(seq 60); do
    if [ "$(sinfo -h -N -o '%t' 2>/dev/null | grep -cE 'idle|mix|alloc')" = 2 ]; then
      reach_each_other
      echo "local_slurm_2node: up (${nodes[*]} at $net.1 and $net.2, $cpus CPUs each; SLURM_CONF=$conf)"
      return 0
    fi
    for n in "${nodes[@]}"; do scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true; done
    sleep 1
  done
  die "the nodes did not come up in 60 s ($(sinfo -h -N -o '%N %t' 2>&1 | tr '\n' ' ')); see $base/log/"
}

# Debian 12's Slurm 22.05.8: a job that ran an `srun --distribution=arbitrary` step (hpcfl's srun
# launcher) leaves "make_node_comp: run_job_cnt underflow" in slurmctld.log when it ends, and the next
# submission can crash slurmctld (SIGSEGV in bit_size); seen on a plain one-node cluster too. A restart
# recovers every job from the state files (no -c).
restart_controller() {
  kill_pidfile "$base/run/slurmctld.pid"
  "$(bin slurmctld)" -f "$conf"
  wait_up
}

case "$cmd" in
  start) start ;;
  restart-controller) restart_controller ;;
  restart-node) restart_node "${2:-}" ;;
  stop) stop ;;
  status) SLURM_CONF="$conf" sinfo -N ;;
  env) env_lines ;;
  *) echo "usage: $0 start|stop|status|env|restart-controller|restart-node NODE" >&2; exit 2 ;;
esac
