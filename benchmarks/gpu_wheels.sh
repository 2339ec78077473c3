#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels that a bare GPU machine lacks for
# benchmarks/gpu_check.sh, into .whl/ at the repository root (ignored by git):
#   mpich   the MPI library (the GPU image has mpi4py but no libmpi)
#   mpi4py  a build known to load that MPICH (4.1, MPI ABI)
# Everything else mpitrain needs (numpy, h5py, cupy-cuda13x, threadpoolctl, tqdm, pytest,
# pytest-timeout) is already in that image. PYTHON_VERSION picks the target interpreter (default 3.12).
#
#   benchmarks/gpu_wheels.sh            # then carry .whl/ to the GPU machine with the tree
set -euo pipefail
cd "$(dirname "$0")/.."
python_version="${PYTHON_VERSION:-3.12}"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation cp "${platforms[@]}" -d .whl "mpich>=4.1" "mpi4py>=4.1"
ls -l .whl
