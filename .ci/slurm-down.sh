#!/usr/bin/env bash
# Stop the cluster that .ci/slurm-up.sh DIR started: cancel its jobs, stop slurmd, slurmctld and
# munged by the pids in their pid files, then end what the jobs left running.
#
# Stopping slurmd does not end the slurmstepd processes of running jobs nor the ranks under them,
# and a rank left behind keeps its MPICH shared-memory segment, which a later job of the same
# job.step name would attach to. They are found by the SLURM_CONF=DIR/slurm.conf they inherited
# (a slurmstepd, or a process with SLURM_JOB_ID, never this script or its callers) and ended by pid.
set -uo pipefail

dir=$(realpath -m "${1:?usage: $0 DIR}")
export SLURM_CONF=$dir/slurm.conf  # for squeue and scancel; this script's own children are never matched

stop_pid() {  # stop_pid PID: SIGTERM, up to 10 s, then SIGKILL
    kill "$1" 2>/dev/null || return 0
    for _ in $(seq 100); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$1" 2>/dev/null
}

if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
    jobs=$(squeue -h -o %i 2>/dev/null)
    if [ -n "$jobs" ]; then
        scancel $jobs 2>/dev/null
        for _ in $(seq 100); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.1
        done
    fi
fi
for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    [ -f "$pidfile" ] && stop_pid "$(cat "$pidfile")"
done
ancestors=" "
for (( pid = $$; pid > 1; pid = $(awk '{ print $4 }' "/proc/$pid/stat" 2>/dev/null || echo 1) )); do
    ancestors+="$pid "
done
left=()
for environ in /proc/[0-9]*/environ; do
    pid=${environ#/proc/}; pid=${pid%/environ}
    [[ $ancestors == *" $pid "* ]] && continue
    variables=$(tr '\0' '\n' 2>/dev/null <"$environ") || continue
    grep -qx "SLURM_CONF=$dir/slurm.conf" <<<"$variables" || continue
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmstepd ] || grep -q "^SLURM_JOB_ID=" <<<"$variables"; then
        left+=("$pid")
    fi
done
for pid in "${left[@]}"; do stop_pid "$pid"; done
echo "slurm-down: stopped the daemons of $dir${left:+ and ${#left[@]} process(es) its jobs left}"
