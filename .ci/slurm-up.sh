#!/usr/bin/env bash
# Start a one-node Slurm cluster (munged, slurmctld, slurmd) with every file under one folder.
#
#   .ci/slurm-up.sh DIR        # installs Debian's slurm + munge packages if missing, then starts
#   source DIR/env             # SLURM_CONF for sbatch, squeue, scontrol ...
#   .ci/slurm-down.sh DIR      # stops the daemons by the pids in DIR
#
# Needs root (the daemons run as root) and apt-get. Prints how long the start took.
set -euo pipefail

dir=$(realpath -m "${1:?usage: $0 DIR}")
started=$(date +%s.%N)
seconds() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    echo "slurm-up: installed $(dpkg-query -W -f='${Package} ${Version}  ' slurmctld munge)in $(seconds "$started") s"
fi

host=$(hostname -s)
# At least 4 CPUs are declared, so the `-n 4` test job fits a small CI machine; config_overrides
# makes slurmd accept a declaration that differs from the hardware.
cpus=$(( $(nproc) > 4 ? $(nproc) : 4 ))
mkdir -p "$dir"/{munge,state,spool,log}
# munged refuses a socket whose folders are not searchable by everyone (mktemp -d gives 700).
chmod 755 "$dir" "$dir/munge"
[ -f "$dir/munge/munge.key" ] || mungekey -c -k "$dir/munge/munge.key"

cat > "$dir/slurm.conf" <<CONF
ClusterName=ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket.2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=pmi2
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
cat > "$dir/env" <<ENV
export SLURM_CONF=$dir/slurm.conf
ENV
export SLURM_CONF=$dir/slurm.conf

munged -S "$dir/munge/munge.socket.2" --key-file="$dir/munge/munge.key" --log-file="$dir/log/munged.log" \
    --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed"
slurmctld -i
slurmd

for _ in $(seq 300); do
    [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && break
    sleep 0.1
done
if [ "$(sinfo -h -o %T 2>/dev/null)" != idle ]; then
    echo "slurm-up: node not idle after 30 s: $(sinfo -h -o '%T %E' 2>&1)" >&2
    tail -n 20 "$dir"/log/*.log >&2
    exit 1
fi
echo "slurm-up: one-node cluster '$host' ($cpus CPUs) idle, $(seconds "$started") s after start; SLURM_CONF=$dir/slurm.conf"
