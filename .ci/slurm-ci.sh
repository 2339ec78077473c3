#!/usr/bin/env bash
# CI: the jobs/ templates under a real one-node Slurm. Starts the cluster (.ci/slurm-up.sh),
# submits every template with sbatch, signals the batch script of one srun job (SIGUSR1, as the
# time-limit warning does) and of the mpirun job (SIGTERM) and follows both through checkpoint,
# requeue and resume, checks each job's output and final state and that the requeued runs end
# bit-identical to an uninterrupted one, then stops the daemons by pid (.ci/slurm-down.sh).
#
#   .ci/slurm-ci.sh                       # run from anywhere, in the environment that has mpitrain installed
#   MPITRAIN_SLURM_KEEP=1 .ci/slurm-ci.sh # keep the job logs and run folders even when all checks pass
#
# Skips (exit 0, saying why) where it cannot run: not root, or no Slurm and no apt-get.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

if [ "$(id -u)" -ne 0 ]; then
    echo "slurm-ci: skipped: the Slurm daemons need root (running as $(id -un))"
    exit 0
fi
if ! command -v slurmctld >/dev/null && ! command -v apt-get >/dev/null; then
    echo "slurm-ci: skipped: Slurm is not installed and there is no apt-get to install it"
    exit 0
fi

started=$(date +%s.%N)
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
dir=$(mktemp -d /tmp/mpitrain-slurm-ci.XXXXXX)
failures=0

stop_cluster() {
    squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null
    "$repo/.ci/slurm-down.sh" "$dir"
}
trap stop_cluster EXIT

"$repo/.ci/slurm-up.sh" "$dir" || exit 1
# shellcheck disable=SC1091
source "$dir/env"

check() {  # check NAME CONDITION-EXIT-STATUS DETAIL
    if [ "$2" -eq 0 ]; then
        echo "  ok    $1"
    else
        echo "  FAIL  $1: $3"
        failures=$((failures + 1))
    fi
}
field() { scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p"; }
wait_gone() {  # wait_gone SECONDS JOBID...: poll squeue (sbatch --wait polls more slowly)
    local deadline=$(( $(date +%s) + $1 )); shift
    while squeue -h -j "$(IFS=,; echo "$*")" 2>/dev/null | grep -q .; do
        [ "$(date +%s)" -lt "$deadline" ] || { echo "slurm-ci: jobs $* still queued after the deadline"; return 1; }
        sleep 0.3
    done
}
finished_ok() {  # finished_ok NAME JOBID OUTPUT PATTERN...
    local name=$1 id=$2 output=$3 state exit_code; shift 3
    state=$(field "$id" JobState); exit_code=$(field "$id" ExitCode)
    check "$name: job $id $state, exit $exit_code" "$([ "$state" = COMPLETED ] && [ "$exit_code" = 0:0 ]; echo $?)" \
        "$(tail -n 15 "$output" 2>/dev/null)"
    for pattern in "$@"; do
        grep -q -- "$pattern" "$output"
        check "$name: output has '$pattern'" $? "$(tail -n 15 "$output" 2>/dev/null)"
    done
}

# A small run of the reference model: long enough (a few seconds) to be signalled mid-run.
train_args=(--model 784-256-10 --synth-samples 3000 --batch-size 64 --steps 400 --seed 3)
export MPITRAIN_CHECKPOINT_EVERY=20

echo "== singleton detection: srun --mpi=none starts each task as a world of one"
output=$(srun -n 2 --mpi=none python -m mpitrain train --steps 1 2>&1); status=$?
check "srun --mpi=none: exit $status, message names --mpi=pmi2" \
    "$([ "$status" -ne 0 ] && grep -q -- "--mpi=pmi2" <<<"$output"; echo $?)" "$output"

echo "== submitting the templates"
submit() { local name=$1; shift; sbatch --parsable --output="$dir/$name.out" "$@"; }
srun_job=$(MPITRAIN_RUN_DIR=$dir/runs/srun submit srun -n 2 jobs/train-srun.sbatch "${train_args[@]}")
requeue_job=$(MPITRAIN_RUN_DIR=$dir/runs/requeue submit requeue -n 2 jobs/train-srun.sbatch "${train_args[@]}")
mpirun_job=$(MPITRAIN_RUN_DIR=$dir/runs/mpirun submit mpirun -n 2 jobs/train-mpirun.sbatch "${train_args[@]}")
# The 2-node GPU example, shrunk to what this node has: one node, two tasks, no GPU.
nodes_job=$(MPITRAIN_RUN_DIR=$dir/runs/nodes submit nodes --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 \
    --cpus-per-task=1 jobs/train-2nodes-gpu.sbatch "${train_args[@]}" --steps 40 --device cpu)
test_job=$(submit test jobs/test.sbatch tests/test_ring.py tests/test_checkpoint.py tests/test_consistency.py)
# Model-parallel layouts go through the same loop: each one uninterrupted and once preempted.
tp_args=("${train_args[@]}" --tp 2)
pp_args=("${train_args[@]}" --pp 2 --micro-batches 4)
tp_job=$(MPITRAIN_RUN_DIR=$dir/runs/tp submit tp -n 2 jobs/train-srun.sbatch "${tp_args[@]}")
requeue_tp_job=$(MPITRAIN_RUN_DIR=$dir/runs/requeue-tp submit requeue-tp -n 2 jobs/train-srun.sbatch "${tp_args[@]}")
pp_job=$(MPITRAIN_RUN_DIR=$dir/runs/pp submit pp -n 2 jobs/train-srun.sbatch "${pp_args[@]}")
requeue_pp_job=$(MPITRAIN_RUN_DIR=$dir/runs/requeue-pp submit requeue-pp -n 2 jobs/train-mpirun.sbatch "${pp_args[@]}")
echo "  srun $srun_job, requeue $requeue_job, mpirun $mpirun_job, 2-node example $nodes_job, tests $test_job," \
    "tp $tp_job/$requeue_tp_job, pp $pp_job/$requeue_pp_job"

preempt() {  # preempt JOBID RUN_DIR SIGNAL: signal the batch script once the job has a checkpoint
    local job=$1 first=$2/checkpoints/ckpt-00000020.h5 sig=$3 signalled deadline=$(( $(date +%s) + 240 ))
    until [ -f "$first" ] || [ "$(date +%s)" -ge "$deadline" ]; do sleep 0.1; done
    scancel --batch --signal="$sig" "$job"
    signalled=$(date +%s.%N)
    # `scontrol requeue` holds the job for 120 s before it may start again; CI does not wait that long.
    until [ "$(field "$job" Restarts)" = 1 ] && [ "$(field "$job" JobState)" = PENDING ] \
            || [ "$(date +%s)" -ge "$deadline" ] || ! squeue -h -j "$job" | grep -q .; do
        sleep 0.2
    done
    # Released at once, the job could start its step N.1 while the first run's slurmstepd for N.1 is
    # still cleaning up; seen here: the old one removed the new one's PMI2 socket and the new step
    # failed at MPI_Finalize ("failed to send temp kvs"). Slurm's own hold avoids that; so does waiting.
    while grep -qs "^slurmstepd: \[$job\." /proc/[0-9]*/cmdline && [ "$(date +%s)" -lt "$deadline" ]; do
        sleep 0.2
    done
    # slurmd compares a launch credential's creation time with the requeue's revocation time in whole
    # seconds: a job released within the same second is killed as "Job credential revoked" (seen here).
    sleep 2
    scontrol update JobId="$job" StartTime=now 2>/dev/null
    echo "  job $job: SIG$sig to its batch script $(since "$started") s into this step; requeued and released" \
        "$(since "$signalled") s later"
}
echo "== preemption: SIGUSR1 to job $requeue_job (srun), SIGTERM to job $mpirun_job (mpirun), each after a checkpoint"
preempt "$requeue_job" "$dir/runs/requeue" USR1 &
preempt "$mpirun_job" "$dir/runs/mpirun" TERM &
preempt "$requeue_tp_job" "$dir/runs/requeue-tp" USR1 &
preempt "$requeue_pp_job" "$dir/runs/requeue-pp" TERM &
wait

wait_gone 600 "$srun_job" "$requeue_job" "$mpirun_job" "$nodes_job" "$test_job" "$tp_job" "$requeue_tp_job" \
    "$pp_job" "$requeue_pp_job"
echo "== results (all jobs done $(since "$started") s after the start of this step)"
finished_ok "train-srun.sbatch" "$srun_job" "$dir/srun.out" "2 rank(s)" "epoch 2 step" "checkpoint: step 400"
finished_ok "train-2nodes-gpu.sbatch (1 node, cpu)" "$nodes_job" "$dir/nodes.out" "local rank 1" "checkpoint: step 40"
finished_ok "test.sbatch (4 ranks)" "$test_job" "$dir/test.out" " passed"
finished_ok "requeued train-srun.sbatch" "$requeue_job" "$dir/requeue.out" \
    "preempted by SIGUSR1 on rank(s)" "requeueing" "run 1:" "resumed from" "checkpoint: step 400"
finished_ok "requeued train-mpirun.sbatch" "$mpirun_job" "$dir/mpirun.out" \
    "preempted by SIGUSR1 on rank(s)" "requeueing" "run 1:" "resumed from" "checkpoint: step 400"
finished_ok "train-srun.sbatch --tp 2" "$tp_job" "$dir/tp.out" "dp 1 x tp 2 x pp 1" "checkpoint: step 400"
finished_ok "train-srun.sbatch --pp 2 --micro-batches 4" "$pp_job" "$dir/pp.out" "dp 1 x tp 1 x pp 2" "checkpoint: step 400"
finished_ok "requeued train-srun.sbatch --tp 2" "$requeue_tp_job" "$dir/requeue-tp.out" \
    "preempted by SIGUSR1 on rank(s)" "requeueing" "run 1:" "resumed from" "checkpoint: step 400"
finished_ok "requeued train-mpirun.sbatch --pp 2 --micro-batches 4" "$requeue_pp_job" "$dir/requeue-pp.out" \
    "preempted by SIGUSR1 on rank(s)" "requeueing" "run 1:" "resumed from" "checkpoint: step 400"
for job in "$requeue_job" "$mpirun_job" "$requeue_tp_job" "$requeue_pp_job"; do
    check "job $job restarted once" "$([ "$(field "$job" Restarts)" = 1 ]; echo $?)" "Restarts=$(field "$job" Restarts)"
done
for pair in srun:requeue srun:mpirun tp:requeue-tp pp:requeue-pp; do
    reference=${pair%%:*} run=${pair#*:}
    python - "$dir/runs/$reference/model.h5" "$dir/runs/$run/model.h5" <<'EOF'
import sys
import numpy as np
from mpitrain.checkpoint import load_parameters
a, b = (load_parameters(path) for path in sys.argv[1:])
sys.exit(0 if a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a) else 1)
EOF
    check "requeued $run run's final parameters equal the uninterrupted $reference run's, bit for bit" $? \
        "model.h5 differs"
done

echo "slurm-ci: $failures failure(s), $(since "$started") s in all; logs in $dir"
if [ "$failures" -eq 0 ] && [ -z "${MPITRAIN_SLURM_KEEP:-}" ]; then
    trap 'stop_cluster; rm -rf "$dir"' EXIT
fi
exit "$failures"
