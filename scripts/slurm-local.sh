#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests and trials (needs root; no systemd).
#
#   scripts/slurm-local.sh up      install (apt) if missing, start munge, slurmctld, slurmd;
#                                  prints `export SLURM_CONF=...` (eval it)
#   scripts/slurm-local.sh down    stop the daemons started by `up` (by their pid files)
#   scripts/slurm-local.sh status  sinfo
#
# State lives in $SLURM_LOCAL_DIR (default /tmp/spd-mcp-slurm). Both commands are idempotent.
set -euo pipefail

STATE="${SLURM_LOCAL_DIR:-/tmp/spd-mcp-slurm}"
CONF="$STATE/slurm.conf"

log() { echo "slurm-local: $*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    log "must run as root (starts munged, slurmctld and slurmd)"
    exit 3
  fi
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
     && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || { log "apt-get not available to install SLURM"; exit 4; }
  log "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || { log "apt-get update failed"; exit 4; }
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >&2 \
    || { log "apt-get install failed"; exit 4; }
}

write_conf() {
  mkdir -p "$STATE/ctld" "$STATE/d" "$STATE/log"
  local cpus mem
  cpus="$(nproc)"
  mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"
  cat >"$CONF.tmp" <<EOF
ClusterName=spdlocal
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
  mv "$CONF.tmp" "$CONF"
}

start_munge() {
  if pgrep -x munged >/dev/null; then return; fi
  mkdir -p /run/munge
  chown munge:munge /run/munge
  if [ ! -f /etc/munge/munge.key ]; then
    (command -v mungekey >/dev/null && mungekey --create) \
      || (dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null)
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  runuser -u munge -- /usr/sbin/munged
}

up() {
  need_root
  install
  [ -f "$CONF" ] || write_conf
  start_munge
  alive "$STATE/slurmctld.pid" || slurmctld -f "$CONF"
  alive "$STATE/slurmd.pid" || slurmd -f "$CONF" -N localhost
  export SLURM_CONF="$CONF"
  for _ in $(seq 1 100); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "export SLURM_CONF=$CONF"
      return
    fi
    scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
    sleep 0.2
  done
  log "the node did not become idle; see $STATE/log"
  exit 5
}

down() {
  for pid in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
    if alive "$pid"; then
      kill "$(cat "$pid")"
      for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
    fi
  done
  log "stopped (munged left running)"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) SLURM_CONF="$CONF" sinfo ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
