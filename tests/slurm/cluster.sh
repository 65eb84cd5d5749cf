#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for lmforge's integration tests:
# munged, slurmctld and two slurmd ("node1", "node2": two emulated nodes on one host).
#
#   tests/slurm/cluster.sh start    install the Debian packages if missing, configure, start,
#                                   wait until the nodes are idle; prints `export SLURM_CONF=...`
#   tests/slurm/cluster.sh stop     stop the daemons this script started (by their PID files)
#   tests/slurm/cluster.sh status   sinfo
#
# Everything lives in $LMFORGE_SLURM_DIR (default /tmp/lmforge-slurm). Needs root (CI runs as
# root). Settings that matter on a container-like machine, where SLURM's cgroup plugin fails:
# linuxproc process tracking and no task plugin (no cgroups), no accounting, munge on a private
# socket, short scheduler intervals for fast tests.
set -euo pipefail

DIR=${LMFORGE_SLURM_DIR:-/tmp/lmforge-slurm}
CONF=$DIR/slurm.conf
SOCKET=$DIR/munge/munge.socket
HOST=$(hostname -s)

install() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null
  fi
}

write_config() {
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))  # MiB per emulated node
  mkdir -p "$DIR"/{state,spool/node1,spool/node2,munge,log}
  chmod o+x "$DIR" "$DIR/munge"
  cat >"$CONF" <<CONF
ClusterName=lmforge
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET,cred_expire=10
SlurmctldPort=${LMFORGE_SLURMCTLD_PORT:-16817}
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=30
MpiDefault=none
NodeName=node1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=${LMFORGE_SLURMD_PORT:-16818} CPUs=$cpus RealMemory=$mem
NodeName=node2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$(( ${LMFORGE_SLURMD_PORT:-16818} + 1 )) CPUs=$cpus RealMemory=$mem
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
}

start() {
  if [ -f "$CONF" ] && SLURM_CONF=$CONF sinfo -h >/dev/null 2>&1; then  # already up
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  install
  write_config
  export SLURM_CONF=$CONF
  if [ ! -f "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 0400 "$DIR/munge/munge.key"
  fi
  munged --force --key-file="$DIR/munge/munge.key" --socket="$SOCKET" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed"
  slurmctld -f "$CONF"
  slurmd -f "$CONF" -N node1
  slurmd -f "$CONF" -N node2
  for _ in $(seq 1 60); do
    if [ "$(sinfo -h -o '%T' 2>/dev/null | sort -u | tr -d '\n')" = "idle" ]; then
      echo "export SLURM_CONF=$CONF"
      return 0
    fi
    sleep 0.5
  done
  echo "cluster.sh: nodes did not become idle; see $DIR/log" >&2
  sinfo >&2 || true
  return 1
}

stop() {
  local pidfile
  for pidfile in "$DIR/slurmd.node1.pid" "$DIR/slurmd.node2.pid" "$DIR/slurmctld.pid" \
                 "$DIR/munge/munged.pid"; do
    if [ -f "$pidfile" ]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF=$CONF sinfo ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
