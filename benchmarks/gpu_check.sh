#!/usr/bin/env bash
# The GPU check in one command, on a bare GPU machine (CuPy and h5py installed, no package index):
#
#   benchmarks/gpu_wheels.sh                  # first, where pip can download: MPICH + mpi4py into .whl/
#   benchmarks/gpu_check.sh OUT_DIR           # on the GPU machine, from the repository root
#
# Installs mpitrain from this tree (and the wheels in .whl/) into a venv that sees the system's
# packages, then runs, each part under its own timeout so a hang in one leaves the others' results:
#   1. the GPU tests (every test with a CuPy variant, tests/test_gpu.py) under mpirun -n 1,
#   2. the same under mpirun -n 2 (two ranks sharing one GPU); tests/test_gpu.py holds the
#      GPU-vs-CPU equality test (parameters after 20 Adam steps, float64, 1e-10, dp and --tp 2),
#   3. benchmarks/gpu.py under mpirun -n 1 and mpirun -n 2.
# Writes at most 8 files into OUT_DIR: summary.txt (machine, versions, each part's exit status),
# tests-n1.log, tests-n2.log, bench-n1.log, bench-n2.log, gpu-n1.json, gpu-n2.json.
# Takes under 8 minutes on an H200; exits non-zero when any part failed.
# Dry run on a machine without a GPU, in an environment that has mpitrain's test extra:
#   MPITRAIN_GPU_VENV=none GPU_CHECK_DEVICE=cpu GPU_CHECK_BENCH_ARGS="--models 784-1024-10 --steps 2 \
#       --batch-size 128" benchmarks/gpu_check.sh /tmp/gpu-dry
# (the GPU tests skip, saying why, and the benchmark measures the same step with NumPy).
set -uo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-${OUT:-gpu-check}}")"
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }

venv="${MPITRAIN_GPU_VENV:-/tmp/mpitrain-gpu-venv}"
device="${GPU_CHECK_DEVICE:-gpu}"
read -r -a bench_args <<< "${GPU_CHECK_BENCH_ARGS:-}"
if [ "$venv" != none ]; then
    python3 -m venv --system-site-packages "$venv" && source "$venv/bin/activate" || { say "venv failed"; exit 1; }
    if compgen -G ".whl/*.whl" > /dev/null; then
        python -m pip install --quiet --no-index --no-deps --no-compile .whl/*.whl || say "wheel install failed"
    fi
    python -m pip install --quiet --no-index --no-deps --no-build-isolation -e . > /dev/null 2>&1 \
        || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

say "== $(date -u +%FT%TZ) $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$summary"
python - <<'PY' 2>&1 | tee -a "$summary"
import sys, numpy
import mpi4py.MPI as MPI
import mpi4py
print("python", sys.version.split()[0], "| numpy", numpy.__version__, "| mpi4py", mpi4py.__version__)
print("MPI:", MPI.Get_library_version().splitlines()[0])
try:
    import cupy
    rt = cupy.cuda.runtime.runtimeGetVersion()
    print("cupy", cupy.__version__, "| CUDA runtime", f"{rt // 1000}.{rt % 1000 // 10}", "| devices", cupy.cuda.runtime.getDeviceCount())
except Exception as exc:
    print("cupy unusable:", exc)
from mpitrain.backend import cuda_aware_mpi
print("CUDA-aware MPI:", cuda_aware_mpi())
PY

failed=0
part() {  # part NAME SECONDS COMMAND...: run under a timeout, log to OUT/NAME.log, record the status
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    [ "$rc" -eq 0 ] || failed=1
    say "-- $name: exit $rc in $((SECONDS - started)) s (limit $limit s): $*"
    tail -n 12 "$out/$name.log" | tee -a "$summary"
}

gpu_tests=(python -m pytest -q -rs -p no:randomly -k "cupy or gpu" tests)
part tests-n1 100 mpirun -n 1 "${gpu_tests[@]}"
part tests-n2 130 mpirun -n 2 "${gpu_tests[@]}"
part bench-n1 100 mpirun -n 1 python benchmarks/gpu.py --device "$device" "${bench_args[@]}" --json "$out/gpu-n1.json"
part bench-n2 100 mpirun -n 2 python benchmarks/gpu.py --device "$device" "${bench_args[@]}" --json "$out/gpu-n2.json"
say "== done: $([ $failed -eq 0 ] && echo all parts passed || echo some part failed)"
exit $failed
