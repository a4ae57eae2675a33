#!/usr/bin/env bash
# Stop the single-node SLURM cluster that tests/slurm/start-cluster.sh started: slurmd, slurmctld,
# slurmdbd, MariaDB and munged, each by the pid in its pid file. Configs, the accounting database
# and the packages stay, so start-cluster.sh brings the same cluster back. Safe to rerun.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/slurmdbd.pid /run/mysqld/mysqld.pid /run/munge/munged.pid; do
    $SUDO test -s "$pidfile" || continue
    pid=$($SUDO cat "$pidfile")
    name=$(basename "$pidfile" .pid | sed 's/^mysqld$/mariadbd/')
    # Only the daemon the pid file names: a stale pid may belong to another program by now.
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
        echo "[slurm] stopping $name ($pid)"
        $SUDO kill "$pid"
        for _ in $(seq 60); do $SUDO kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        if $SUDO kill -0 "$pid" 2>/dev/null; then echo "stop-cluster.sh: $pid did not stop" >&2; exit 1; fi
    fi
done
