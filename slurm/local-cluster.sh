#!/usr/bin/env bash
# Run a single-node SLURM cluster on 127.0.0.1 for the tests and CI.
#
#   slurm/local-cluster.sh start    install (Debian packages) if missing, configure, start; idempotent
#   slurm/local-cluster.sh status   print whether slurmctld responds, and the node state
#   slurm/local-cluster.sh stop     stop slurmd, slurmctld and munged
#
# Needs root: it writes /etc/slurm/slurm.conf and /etc/munge/munge.key and
# starts the daemons directly (no systemd). Tested with SLURM 22.05 from
# Debian 12. The node gets all CPUs of this machine; jobs run as root.
set -euo pipefail

NODE="$(hostname -s)"
CONF=/etc/slurm/slurm.conf
STATE=/var/lib/slurm-local
LOGS=/var/log/slurm-local

log() { echo "local-cluster: $*" >&2; }

need_root() {
    if [[ "$(id -u)" != 0 ]]; then
        log "must run as root (it configures and starts the SLURM daemons); try: sudo $0 $*"
        exit 2
    fi
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    if ! munge -n >/dev/null 2>&1 </dev/null; then
        runuser -u munge -- /usr/sbin/munged
        for _ in $(seq 50); do munge -n >/dev/null 2>&1 </dev/null && return; sleep 0.1; done
        log "munged did not start; see /var/log/munge/munged.log"
        exit 1
    fi
}

write_config() {
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$LOGS"
    local conf
    conf="$(cat <<EOF
# Written by resilient's slurm/local-cluster.sh: one node on 127.0.0.1.
ClusterName=resilient-local
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=300
StateSaveLocation=${STATE}/ctld
SlurmdSpoolDir=${STATE}/d
SlurmctldPidFile=/run/slurmctld-local.pid
SlurmdPidFile=/run/slurmd-local.pid
SlurmctldLogFile=${LOGS}/slurmctld.log
SlurmdLogFile=${LOGS}/slurmd.log
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)"
    if [[ ! -f "$CONF" ]] || [[ "$(cat "$CONF")" != "$conf" ]]; then
        printf '%s\n' "$conf" >"$CONF"
    fi
}

daemons_answer() {
    timeout 5 scontrol ping 2>/dev/null | grep -q "UP" \
        && timeout 5 sinfo -h -o %T 2>/dev/null | grep -qE "idle|mix|alloc"
}

start() {
    need_root start
    install_packages
    start_munge
    write_config
    if daemons_answer; then
        log "already running"
        return
    fi
    for _ in $(seq 60); do
        pgrep -x slurmctld >/dev/null || slurmctld
        pgrep -x slurmd >/dev/null || slurmd
        if daemons_answer; then
            log "running: node ${NODE}, partition debug, $(nproc) CPUs"
            return
        fi
        # A node that was down when slurmctld last stopped stays down until it is resumed.
        timeout 5 scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
        sleep 0.5
    done
    log "the cluster did not come up within 60 s; see ${LOGS}/slurmctld.log and ${LOGS}/slurmd.log"
    sinfo 2>&1 | sed 's/^/  /' >&2 || true
    exit 1
}

status() {
    if daemons_answer; then
        echo "running"
        sinfo
    else
        echo "not running"
        return 1
    fi
}

stop() {
    need_root stop
    local name
    for name in slurmd slurmctld munged; do
        pkill -x "$name" 2>/dev/null || true
        # Wait, so that a start right after this one does not find a daemon that is still saving its state.
        for _ in $(seq 100); do pgrep -x "$name" >/dev/null || break; sleep 0.1; done
        pkill -9 -x "$name" 2>/dev/null || true
    done
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
