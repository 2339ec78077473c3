#!/usr/bin/env bash
# CI: the jobs/ templates on a real two-node Slurm, one node per emulated host (.ci/hosts-up.sh).
#
#   .ci/slurm-2nodes.sh                       # run from anywhere, in the environment that has mpitrain installed
#   MPITRAIN_SLURM_KEEP=1 .ci/slurm-2nodes.sh # keep the logs and run folders even when all checks pass
#
# hostA (10.199.0.1) runs slurmctld and a slurmd, hostB (10.199.0.2) a slurmd; one munged in this
# namespace serves both through its socket on the shared file system. Every Slurm client runs on
# hostA. Submits, with -N 2 and 2 tasks per node: jobs/train-srun.sbatch (COMPLETED, ranks on both
# nodes, bytes on the link), jobs/train-2nodes-gpu.sbatch without GPUs (--gpus-per-node=0), and
# one more train-srun.sbatch preempted after its first checkpoint (SIGUSR1 to the batch script),
# requeued and resumed, whose final parameters must equal the uninterrupted job's bit for bit.
# Stops every daemon and takes the hosts down at exit, whatever happened.
#
# Skips (exit 0, saying why) where it cannot run: not root, namespaces refused, no Slurm and no apt-get.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

if [ "$(id -u)" -ne 0 ]; then
    echo "slurm-2nodes: skipped: the Slurm daemons and the hosts' namespaces need root (running as $(id -un))"
    exit 0
fi
if ! unshare --uts --net --mount true 2>/dev/null; then
    echo "slurm-2nodes: skipped: this machine refuses network/UTS/mount namespaces (unshare failed)"
    exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    if ! command -v apt-get >/dev/null; then
        echo "slurm-2nodes: skipped: Slurm is not installed and there is no apt-get to install it"
        exit 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

started=$(date +%s.%N)
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
dir=$(mktemp -d /tmp/mpitrain-slurm-2nodes.XXXXXX)
hosts=$dir/hosts
failures=0

stop_pid() {  # stop_pid PID: SIGTERM, up to 10 s, then SIGKILL
    kill "$1" 2>/dev/null || return 0
    for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$1" 2>/dev/null
}
stop_all() {  # the jobs and the daemons, then the hosts with whatever still runs there
    local stopping; stopping=$(date +%s.%N)
    [ -f "$dir/slurmctld.pid" ] && on_a scancel --user=root 2>/dev/null
    # Each daemon takes about 2 s to stop: the slurmds together, then slurmctld and munged together.
    for group in "slurmd-hostA.pid slurmd-hostB.pid" "slurmctld.pid munge/munged.pid"; do
        for pidfile in $group; do
            [ -f "$dir/$pidfile" ] && stop_pid "$(cat "$dir/$pidfile")" &
        done
        wait
    done
    "$repo/.ci/hosts-down.sh" "$hosts"
    echo "slurm-2nodes: daemons stopped and hosts taken down in $(since "$stopping") s"
}
trap stop_all EXIT

"$repo/.ci/hosts-up.sh" "$hosts" || exit 1
# shellcheck disable=SC1091
source "$hosts/env"  # MPI over the link: MPIR_CVAR_CH4_NETMOD=ofi, FI_PROVIDER=tcp, FI_TCP_IFACE=mpt0
on() { local host=$1; shift; nsenter --target "$(cat "$hosts/$host.pid")" --uts --net --mount --wd="$PWD" -- "$@"; }
on_a() { on hostA "$@"; }

cpus=2  # per node: 2 tasks of one core each; config_overrides lets slurmd declare more than it has
mkdir -p "$dir"/{munge,state,spool,log}
chmod 755 "$dir" "$dir/munge"
mungekey -c -k "$dir/munge/munge.key"
cat > "$dir/slurm.conf" <<CONF
ClusterName=ci2
SlurmctldHost=hostA(10.199.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket.2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
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
NodeName=hostA NodeAddr=10.199.0.1 CPUs=$cpus State=UNKNOWN
NodeName=hostB NodeAddr=10.199.0.2 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=hostA,hostB Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$dir/slurm.conf
munged -S "$dir/munge/munge.socket.2" --key-file="$dir/munge/munge.key" --log-file="$dir/log/munged.log" \
    --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed"
on_a slurmctld -i
on hostA slurmd -N hostA
on hostB slurmd -N hostB
for _ in $(seq 300); do
    [ "$(on_a sinfo -h -N -o %T 2>/dev/null | sort -u)" = idle ] && [ "$(on_a sinfo -h -N -o %N | wc -l)" = 2 ] && break
    sleep 0.1
done
if [ "$(on_a sinfo -h -N -o %T 2>/dev/null | sort -u)" != idle ]; then
    echo "slurm-2nodes: nodes not idle after 30 s: $(on_a sinfo -h -N -o '%N %T %E' 2>&1)" >&2
    tail -n 20 "$dir"/log/*.log >&2
    exit 1
fi
echo "slurm-2nodes: nodes hostA, hostB idle $(since "$started") s after the start; SLURM_CONF=$SLURM_CONF"

check() {  # check NAME CONDITION-EXIT-STATUS DETAIL
    if [ "$2" -eq 0 ]; then echo "  ok    $1"; else echo "  FAIL  $1: $3"; failures=$((failures + 1)); fi
}
field() { on_a scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p"; }
wait_gone() {  # wait_gone SECONDS JOBID...
    local deadline=$(( $(date +%s) + $1 )); shift
    while on_a squeue -h -j "$(IFS=,; echo "$*")" 2>/dev/null | grep -q .; do
        [ "$(date +%s)" -lt "$deadline" ] || { echo "slurm-2nodes: jobs $* still queued after the deadline"; return 1; }
        sleep 0.3
    done
}
finished_ok() {  # finished_ok NAME JOBID OUTPUT PATTERN...
    local name=$1 id=$2 output=$3 state exit_code nodes; shift 3
    state=$(field "$id" JobState); exit_code=$(field "$id" ExitCode); nodes=$(field "$id" NumNodes)
    check "$name: job $id $state, exit $exit_code, on $nodes node(s)" \
        "$([ "$state" = COMPLETED ] && [ "$exit_code" = 0:0 ] && [ "$nodes" = 2 ]; echo $?)" "$(tail -n 15 "$output" 2>/dev/null)"
    for pattern in "$@"; do
        grep -q -- "$pattern" "$output"
        check "$name: output has '$pattern'" $? "$(tail -n 15 "$output" 2>/dev/null)"
    done
}
link_bytes() { on hostB awk '/mpt0:/ { sub(/.*:/, ""); print $1 + $9 }' /proc/net/dev; }

train_args=(--model 784-256-10 --synth-samples 3000 --batch-size 64 --steps 200 --seed 3)
export MPITRAIN_CHECKPOINT_EVERY=20
two_nodes=(--nodes=2 --ntasks-per-node=2 --cpus-per-task=1)
submit() { local name=$1; shift; on_a sbatch --parsable --output="$dir/$name.out" "$@"; }
bytes_before=$(link_bytes)
srun_job=$(MPITRAIN_RUN_DIR=$dir/runs/srun submit srun "${two_nodes[@]}" jobs/train-srun.sbatch "${train_args[@]}")
gpu_job=$(MPITRAIN_RUN_DIR=$dir/runs/gpu submit gpu "${two_nodes[@]}" --gpus-per-node=0 \
    jobs/train-2nodes-gpu.sbatch "${train_args[@]}" --steps 40)
requeue_job=$(MPITRAIN_RUN_DIR=$dir/runs/requeue submit requeue "${two_nodes[@]}" jobs/train-srun.sbatch "${train_args[@]}")
echo "== submitted with -N 2: train-srun $srun_job, train-2nodes-gpu (no GPU) $gpu_job, train-srun to preempt $requeue_job"

# Preempt like .ci/slurm-ci.sh: signal the batch script once the first checkpoint exists, wait for
# the requeue and for the first run's step daemons to end (on both nodes), then release the job.
first=$dir/runs/requeue/checkpoints/ckpt-00000020.h5
deadline=$(( $(date +%s) + 240 ))
until [ -f "$first" ] || [ "$(date +%s)" -ge "$deadline" ]; do sleep 0.1; done
on_a scancel --batch --signal=USR1 "$requeue_job"
until [ "$(field "$requeue_job" Restarts)" = 1 ] && [ "$(field "$requeue_job" JobState)" = PENDING ] \
        || [ "$(date +%s)" -ge "$deadline" ] || ! on_a squeue -h -j "$requeue_job" | grep -q .; do
    sleep 0.2
done
while grep -qs "^slurmstepd: \[$requeue_job\." /proc/[0-9]*/cmdline && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
on_a scontrol update JobId="$requeue_job" StartTime=now 2>/dev/null
echo "  job $requeue_job: SIGUSR1 after its first checkpoint, requeued and released $(since "$started") s in"

wait_gone 400 "$srun_job" "$gpu_job" "$requeue_job"
bytes_moved=$(( $(link_bytes) - bytes_before ))
echo "== results (all jobs done $(since "$started") s after the start of this step)"
finished_ok "train-srun.sbatch -N 2" "$srun_job" "$dir/srun.out" "4 rank(s)" "checkpoint: step 200"
finished_ok "train-2nodes-gpu.sbatch -N 2 --gpus-per-node=0" "$gpu_job" "$dir/gpu.out" "4 rank(s), cpu" \
    "node hostA local rank 1" "node hostB local rank 1" "checkpoint: step 40"
finished_ok "requeued train-srun.sbatch -N 2" "$requeue_job" "$dir/requeue.out" \
    "preempted by SIGUSR1 on rank(s)" "requeueing" "run 1:" "resumed from" "checkpoint: step 200"
check "job $requeue_job restarted once" "$([ "$(field "$requeue_job" Restarts)" = 1 ]; echo $?)" \
    "Restarts=$(field "$requeue_job" Restarts)"
# 200 steps of a 784-256-10 float32 gradient (about 0.8 MB), each all-reduced across the link.
check "the jobs' all-reduces crossed the link: $bytes_moved bytes on hostB's mpt0" \
    "$([ "$bytes_moved" -gt $(( 200 * 800000 )) ]; echo $?)" "expected more than $(( 200 * 800000 ))"
python - "$dir/runs/srun/model.h5" "$dir/runs/requeue/model.h5" <<'EOF'
import sys
import numpy as np
from mpitrain.checkpoint import load_parameters
a, b = (load_parameters(path) for path in sys.argv[1:])
sys.exit(0 if a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a) else 1)
EOF
check "the requeued job's final parameters equal the uninterrupted job's, bit for bit" $? "model.h5 differs"

echo "slurm-2nodes: $failures failure(s), $(since "$started") s in all; logs in $dir"
if [ "$failures" -eq 0 ] && [ -z "${MPITRAIN_SLURM_KEEP:-}" ]; then
    trap 'stop_all; rm -rf "$dir"' EXIT
fi
exit "$failures"
