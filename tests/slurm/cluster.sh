#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests of rwcflow's SLURM path (DESIGN.md §8):
# munged (as user munge), a local MariaDB, slurmdbd (so that `sacct` answers, as Pydra's SLURM worker
# needs), slurmctld and slurmd. Everything the cluster writes (configuration, state, spool, logs, pid
# files, the database) lives under one folder, except munge, which keeps Debian's /etc/munge key and
# /run/munge (a munged already running is used, and left running by `stop`).
#
#   tests/slurm/cluster.sh install        Debian packages: slurm-wlm slurmdbd munge mariadb-server (root)
#   tests/slurm/cluster.sh start DIR      start the cluster with its files under DIR; prints
#                                         SLURM_CONF=DIR/etc/slurm.conf, which clients need in their environment
#                                         (slurmdbd reads slurmdbd.conf from the same folder)
#   tests/slurm/cluster.sh stop DIR       stop what `start DIR` started
#
# `start` installs the packages when they are missing, and waits until the node is idle and the
# accounting database answers. Needs root (munge, slurmd and the database run as system users).
set -euo pipefail

PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)
DB_PORT=${RWCFLOW_SLURM_DB_PORT:-3307}

die() { echo "cluster.sh: $*" >&2; exit 1; }

need_root() { [[ $(id -u) == 0 ]] || die "must run as root (munged, slurmd and MariaDB are started as system users)"; }

install_packages() {
    need_root
    command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v munged >/dev/null \
        && command -v mariadbd >/dev/null && return 0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null \
        || die "apt-get install ${PACKAGES[*]} failed"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    for _ in $(seq "$((seconds * 2))"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
    die "timed out after ${seconds}s waiting for $what (logs in $ROOT/log)"
}

write_configs() {
    local cpus memory
    cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -1)
    memory=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
    memory=$((memory * 9 / 10))  # a node claiming more memory than it has is drained by slurmctld
    cat > "$ROOT/etc/slurm.conf" <<EOF
ClusterName=rwcflow-test
SlurmctldHost=localhost
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
MinJobAge=300
NodeName=localhost CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    cat > "$ROOT/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$ROOT/run/slurmdbd.pid
LogFile=$ROOT/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ROOT/etc/slurmdbd.conf"
}

start_munge() {
    munge -n >/dev/null 2>&1 && return 0
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- munged || die "munged did not start (see /var/log/munge/munged.log)"
    touch "$ROOT/run/munged.started"  # so that `stop` stops it too
    wait_for 10 munge munge -n
}

start_database() {
    install -d -o mysql -g mysql "$ROOT/mysql" "$ROOT/run/mysqld" "$ROOT/log/mariadb"
    mariadb-install-db --user=mysql --datadir="$ROOT/mysql" --auth-root-authentication-method=socket \
        >"$ROOT/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $ROOT/log/mariadb-install.log)"
    runuser -u mysql -- mariadbd --datadir="$ROOT/mysql" --socket="$ROOT/run/mysqld/mysqld.sock" \
        --pid-file="$ROOT/run/mysqld/mysqld.pid" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --log-error="$ROOT/log/mariadb/error.log" --skip-name-resolve </dev/null >/dev/null 2>&1 &
    wait_for 60 "MariaDB" mariadb --socket="$ROOT/run/mysqld/mysqld.sock" -e "select 1"
    mariadb --socket="$ROOT/run/mysqld/mysqld.sock" <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
}

start() {
    need_root
    install_packages
    mkdir -p "$ROOT"/{etc,state,spool,run,log}
    ROOT=$(cd "$ROOT" && pwd)
    chmod 755 "$ROOT"
    runuser -u mysql -- test -x "$ROOT" || die "$ROOT: the mysql user cannot reach it (a parent folder is private)"
    export SLURM_CONF=$ROOT/etc/slurm.conf
    write_configs
    start_munge
    start_database
    slurmdbd || die "slurmdbd did not start (see $ROOT/log/slurmdbd.log)"
    wait_for 60 "slurmdbd" sacctmgr -i list cluster
    sacctmgr -i add cluster rwcflow-test >/dev/null 2>&1 || true
    slurmctld -f "$SLURM_CONF" || die "slurmctld did not start (see $ROOT/log/slurmctld.log)"
    slurmd -f "$SLURM_CONF" -N localhost || die "slurmd did not start (see $ROOT/log/slurmd.log)"
    wait_for 60 "the node to be idle" bash -c 'sinfo -h -N -o %T | grep -qx idle'
    wait_for 60 "sacct" sacct -n -X
    echo "SLURM_CONF=$SLURM_CONF"
}

stop_pidfile() {  # stop_pidfile FILE: TERM the process, wait for it to end
    [[ -f $1 ]] || return 0
    local pid; pid=$(cat "$1")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    ROOT=$(cd "$ROOT" && pwd)
    stop_pidfile "$ROOT/run/slurmd.pid"
    stop_pidfile "$ROOT/run/slurmctld.pid"
    stop_pidfile "$ROOT/run/slurmdbd.pid"
    stop_pidfile "$ROOT/run/mysqld/mysqld.pid"
    [[ ! -f $ROOT/run/munged.started ]] || stop_pidfile /run/munge/munged.pid
}

case "${1:-}" in
    install) install_packages ;;
    start) [[ $# == 2 ]] || die "usage: $0 start DIR"; ROOT=$2; start ;;
    stop) [[ $# == 2 ]] || die "usage: $0 stop DIR"; ROOT=$2; stop ;;
    *) die "usage: $0 install | start DIR | stop DIR" ;;
esac
