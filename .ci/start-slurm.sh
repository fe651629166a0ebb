#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine and print the line that points srun, sbatch,
# squeue and scancel at it:
#
#     eval "$(.ci/start-slurm.sh [DIR])"      # prints: export SLURM_CONF=DIR/slurm.conf
#     .ci/start-slurm.sh --stop [DIR]         # stops the daemons this script started in DIR
#
# DIR holds slurm.conf, the controller's state, the spool, logs and pid files (default
# /tmp/terabrain-slurm). Ports: $SLURMCTLD_PORT and $SLURMD_PORT (default 6817 and 6818).
# Needs root and Debian's slurm-wlm and munge (.ci/run installs them). If this DIR's cluster
# is already up (its slurmctld answers), nothing is started again.
#
# The recipe, found by trial on these machines: munged runs as user munge with its socket in
# /run/munge (owner munge, mode 0711), and slurm.conf uses proctrack/linuxproc and task/none
# (no cgroups in a container), select/cons_tres with CR_Core, SlurmUser=SlurmdUser=root,
# MpiDefault=none, the NodeName line that `slurmd -C` prints, and one partition with
# OverSubscribe=YES, so that `srun --overcommit` may start more ranks than there are cores.
set -euo pipefail

stop=0
if [ "${1:-}" = "--stop" ]; then
    stop=1
    shift
fi
dir=${1:-/tmp/terabrain-slurm}
export PATH="$PATH:/usr/sbin:/sbin"

if [ "$stop" = 1 ]; then
    for daemon in slurmd slurmctld; do
        if [ -f "$dir/$daemon.pid" ] && kill -0 "$(cat "$dir/$daemon.pid")" 2>/dev/null; then
            kill "$(cat "$dir/$daemon.pid")"
        fi
    done
    exit 0
fi

say() { echo "start-slurm: $*" >&2; }
fail() { say "$*"; exit 1; }

[ "$(id -u)" = 0 ] || fail "needs root (slurmd starts every task as its user)"
for program in munged slurmctld slurmd sinfo srun; do
    command -v "$program" >/dev/null || fail "$program not found (Debian: apt-get install slurm-wlm munge)"
done

mkdir -p "$dir/state" "$dir/spool"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"

node_idle() {
    [ -f "$conf" ] && [ "$(timeout 10 sinfo -h -o %t 2>/dev/null | head -1)" = idle ]
}
if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null && node_idle; then
    say "the cluster in $dir is already running"
    echo "export SLURM_CONF=$conf"
    exit 0
fi

# munge: one munged per machine, shared by every cluster on it.
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    install -d -o munge -g munge -m 0711 /run/munge
    install -d -o munge -g munge -m 0700 /etc/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=128 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- munged
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.2
    done
    munge -n </dev/null | unmunge >/dev/null || fail "munged did not start (see /var/log/munge)"
fi

host=$(hostname)
# The node as slurmd sees it (CPUs, sockets, cores, threads, memory), so that slurmctld
# accepts its registration.
node=$(slurmd -C | head -1)
[[ "$node" == NodeName=* ]] || fail "slurmd -C printed no NodeName line: $node"
cat >"$conf" <<EOF
ClusterName=terabrain
SlurmctldHost=$host
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
PlugStackConfig=/dev/null
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF

slurmctld -c -f "$conf"          # daemonizes; -c: no old state
slurmd -f "$conf"
for _ in $(seq 150); do
    node_idle && break
    sleep 0.2
done
if ! node_idle; then
    tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
    fail "the node did not become idle within 30 s (logs above, in $dir)"
fi
say "one-node cluster up: $host, config $conf"
echo "export SLURM_CONF=$conf"
