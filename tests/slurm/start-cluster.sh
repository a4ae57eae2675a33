#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests/test_slurm.py and for trying
# `snakemake --profile profiles/slurm` without a real cluster.
#
# Installs Debian's packages (munge, slurmctld, slurmd, slurm-client, slurmdbd, MariaDB),
# writes slurm.conf for this host with its real cores and memory (from `slurmd -C`), starts
# munged, MariaDB, slurmdbd, slurmctld and slurmd directly (no systemd needed), registers the
# cluster in accounting so `sacct` works as on a real cluster, and waits until the node is idle.
# Idempotent: a rerun starts only what is not running and restarts SLURM only if its config
# changed. Needs root (or sudo). Stop everything with tests/slurm/stop-cluster.sh.
#
# The node advertises CONVVIZ_SLURM_GPUS (default 2) stand-in GPUs (GRES whose device files are
# links to /dev/null), so SLURM schedules and accounts `--gpus` requests as on a GPU cluster;
# the jobs themselves run on the CPU.
set -euo pipefail

CLUSTER=convviz
PARTITION=main
ACCOUNT=convviz
GPUS=${CONVVIZ_SLURM_GPUS:-2}
CONF=/etc/slurm
LOGS=/var/log/slurm
WAIT_S=${CONVVIZ_SLURM_WAIT_S:-120}

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "start-cluster.sh: run as root or install sudo" >&2; exit 1; }
    SUDO="sudo"
fi
say() { echo "[slurm] $*"; }
# alive PIDFILE: the daemon named by the pid file's basename runs (a stale file whose pid now
# belongs to another program does not count).
alive() {
    local pid
    pid=$($SUDO cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$(basename "$1" .pid | sed 's/^mysqld$/mariadbd/')" ]
}
wait_for() {  # wait_for WHAT COMMAND...: retry COMMAND for up to WAIT_S seconds
    local what=$1; shift
    for _ in $(seq "$((WAIT_S * 2))"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
    echo "start-cluster.sh: $what did not come up within ${WAIT_S}s; see $LOGS/ and /var/log/mysql*" >&2
    return 1
}

# 1. Packages (skipped when present).
PACKAGES="munge slurmctld slurmd slurm-client slurmdbd mariadb-server"
if ! dpkg -s $PACKAGES >/dev/null 2>&1; then
    say "installing $PACKAGES"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
fi
$SUDO mkdir -p "$LOGS" /var/spool/slurmctld /var/spool/slurmd /run/munge /run/mysqld
$SUDO chown slurm:slurm "$LOGS" /var/spool/slurmctld
$SUDO chown munge:munge /run/munge
$SUDO chown mysql:mysql /run/mysqld

# 2. munge: the authentication every SLURM daemon and client uses.
if ! $SUDO test -s /etc/munge/munge.key; then
    $SUDO mungekey --create --keyfile /etc/munge/munge.key
    $SUDO chown munge:munge /etc/munge/munge.key && $SUDO chmod 600 /etc/munge/munge.key
fi
if ! alive /run/munge/munged.pid; then
    say "starting munged"
    $SUDO runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
fi
wait_for munged sh -c 'munge -n | unmunge'

# 3. MariaDB and the accounting database slurmdbd writes to.
if ! alive /run/mysqld/mysqld.pid; then
    say "starting MariaDB"
    $SUDO setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
        --socket=/run/mysqld/mysqld.sock --skip-networking --innodb-lock-wait-timeout=900 \
        </dev/null >>"$LOGS/mariadb.log" 2>&1 &
fi
wait_for MariaDB $SUDO mariadb-admin --socket=/run/mysqld/mysqld.sock ping
if $SUDO test -s "$CONF/slurmdbd.conf"; then
    DB_PASS=$($SUDO sed -n 's/^StoragePass=//p' "$CONF/slurmdbd.conf")
else
    DB_PASS=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
fi
$SUDO mariadb --socket=/run/mysqld/mysqld.sock <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL

# 4. Config files, rewritten only when their content changes.
changed=0
install_conf() {  # install_conf NAME OWNER MODE < content
    local tmp; tmp=$(mktemp)
    cat >"$tmp"
    if ! $SUDO cmp -s "$tmp" "$CONF/$1"; then
        $SUDO install -o "$2" -g "$2" -m "$3" "$tmp" "$CONF/$1"
        changed=1
    fi
    rm -f "$tmp"
}
HOST=$(hostname -s)
# The machine's real cores, sockets, threads and memory, as slurmd itself detects them.
HARDWARE=$(slurmd -C | head -1 | sed 's/^NodeName=[^ ]* //')
install_conf slurmdbd.conf slurm 600 <<CONFEOF
# Written by convviz tests/slurm/start-cluster.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
LogFile=$LOGS/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
CONFEOF
install_conf slurm.conf root 644 <<CONFEOF
# Written by convviz tests/slurm/start-cluster.sh: one node ($HOST) that is also the controller.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
AuthType=auth/munge
SlurmUser=slurm
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# No cgroups in a container: track processes through /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
KillWait=5
MinJobAge=300
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
# sacct shows each job's --comment, where the Snakemake plugin names the rule and wildcards.
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=10
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 $HARDWARE Gres=gpu:$GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONFEOF
# Stand-in GPU devices: SLURM drops GPUs without a device file, any character device will do.
$SUDO mkdir -p /var/lib/convviz-slurm
for i in $(seq 0 $((GPUS - 1))); do $SUDO ln -sfn /dev/null "/var/lib/convviz-slurm/gpu$i"; done
install_conf gres.conf root 644 <<CONFEOF
# Stand-in GPUs (links to /dev/null): scheduled and accounted by SLURM, never opened.
NodeName=$HOST Name=gpu File=/var/lib/convviz-slurm/gpu[0-$((GPUS - 1))]
CONFEOF

# 5. The daemons: slurmdbd (accounting), slurmctld (controller), slurmd (the node).
start() {  # start NAME: start /usr/sbin/NAME unless running; restart it if a config changed
    local pidfile=/run/$1.pid
    if alive "$pidfile" && [ "$changed" = 1 ]; then
        say "config changed: restarting $1"
        $SUDO kill "$($SUDO cat "$pidfile")"
        for _ in $(seq 20); do alive "$pidfile" || break; sleep 0.5; done
    fi
    if ! alive "$pidfile"; then
        say "starting $1"
        $SUDO "/usr/sbin/$1" || { echo "start-cluster.sh: $1 failed to start:" >&2; tail -n 20 "$LOGS/$1.log" >&2; exit 1; }
    fi
}
start slurmdbd
wait_for slurmdbd sacctmgr -n list cluster
# The cluster, an account and this user in accounting, as an administrator would set them up.
if [ -z "$(sacctmgr -n -P list cluster "$CLUSTER" format=cluster)" ]; then
    $SUDO sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi
if [ -z "$(sacctmgr -n -P list account "$ACCOUNT" format=account)" ]; then
    $SUDO sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="convviz tests" organization=convviz >/dev/null
fi
if [ -z "$(sacctmgr -n -P list assoc user="$(id -un)" account="$ACCOUNT" format=account)" ]; then
    $SUDO sacctmgr -i add user "$(id -un)" account="$ACCOUNT" defaultaccount="$ACCOUNT" >/dev/null
fi
start slurmctld
wait_for slurmctld scontrol ping
start slurmd

# 6. Idle, or resumed from a state an earlier run left (down/drained).
state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null; }
for _ in $(seq "$((WAIT_S * 2))"); do
    case "$(state)" in
        idle*|mixed*|allocated*) break ;;
        down*|drain*|fail*) $SUDO scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
case "$(state)" in
    idle*|mixed*|allocated*) ;;
    *) echo "start-cluster.sh: node $HOST is '$(state)', not idle; see $LOGS/slurmd.log and $LOGS/slurmctld.log" >&2; exit 1 ;;
esac
say "cluster $CLUSTER up: $(sinfo -h -N -o '%N %T, %c CPUs, %m MB, %G')"
