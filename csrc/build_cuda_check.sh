#!/usr/bin/env bash
# Compile-only check of the CUDA build (no GPU needed): builds rmda_fused._C with the CUDA
# kernels into a scratch directory, leaving the in-place build alone.
#   csrc/build_cuda_check.sh [python]      (default python: python3)
# Needs CUDA_HOME (default /usr/local/cuda) and a CUDA build of torch. TORCH_CUDA_ARCH_LIST
# defaults to 9.0; MAX_JOBS is honoured by torch's ninja build.
set -euo pipefail
PYTHON="${1:-python3}"
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export RMDA_FUSED_BUILD_CUDA=1
OUT="$(mktemp -d "${TMPDIR:-/tmp}/rmda_fused_cuda_build.XXXXXX")"
trap 'rm -rf "$OUT"' EXIT
start=$(date +%s)
"$PYTHON" setup.py -q build_ext --build-temp "$OUT/temp" --build-lib "$OUT/lib"
so=$(find "$OUT/lib" -name '_C*.so' | head -1)
test -n "$so" || { echo "build_cuda_check: no library produced" >&2; exit 1; }
# the library must hold the CUDA kernel, not only the CPU one
if ! readelf -S -W "$so" | grep -q "nv_fatbin"; then
  echo "build_cuda_check: $so holds no CUDA device code" >&2; exit 1
fi
echo "build_cuda_check: CUDA build OK ($(( $(date +%s) - start )) s, arch ${TORCH_CUDA_ARCH_LIST})"
