#!/usr/bin/env bash
# One GPU session in one command: build the CUDA extension against the machine's torch, run
# the test suite on the GPU, then the selftest and the step benchmark. Every log and report
# lands in $RESULTS (default ./gpu-session). Each part has its own time limit so that one slow
# part cannot starve the others; PARTS picks a subset, e.g. PARTS="build tests".
#
#   bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-gpu-session}
mkdir -p "$RESULTS"
PARTS=${PARTS:-"env build profile host tests selftest overhead"}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
has() { [[ " $PARTS " == *" $1 "* ]]; }

if has env; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv \
    | tee "$RESULTS/env.txt"
  $PY -c "import torch, triton, platform; print('torch', torch.__version__, 'triton', triton.__version__, 'python', platform.python_version(), torch.cuda.get_device_name())" \
    | tee -a "$RESULTS/env.txt"
fi

if has build; then
  # installed as a user would (editable, so rmda_fused.kernels maps to kernels/), with the
  # extension built against this machine's torch, for this card only
  arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  start=$SECONDS
  TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=16 timeout ${BUILD_S:-300} $PY -m pip install -q \
    --no-build-isolation --no-deps --no-index -e . >"$RESULTS/build.log" 2>&1
  echo "build: rc=$? in $((SECONDS - start)) s (TORCH_CUDA_ARCH_LIST=$arch)"
  tail -5 "$RESULTS/build.log"
  (cd /tmp && $PY -c "import rmda_fused; print('backends', rmda_fused.available_backends())")
fi

if has profile; then
  # kernels per step, their device time, and the wall time, per method
  for dtype in ${DTYPES:-fp32 bf16}; do
    timeout ${PROFILE_S:-120} $PY -m benchmarks.gpu_profile --dtype $dtype 2>&1 \
      | grep -v Warning | tee "$RESULTS/profile-$dtype.txt"
  done
fi

if has host; then
  timeout ${HOST_S:-120} $PY -m benchmarks.host_time --device cuda 2>&1 | tee "$RESULTS/host.txt"
fi

if has tests; then
  # xdist when present: the suite is many small cases
  par=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
  timeout ${TESTS_S:-300} $PY -m pytest ${TEST_PATHS:-tests} -q -ra -p no:cacheprovider $par \
    >"$RESULTS/tests.log" 2>&1
  echo "tests: rc=$?"
  grep -E "^(FAILED|ERROR)|passed|failed" "$RESULTS/tests.log" | tail -25
fi

if has selftest; then
  timeout ${SELFTEST_S:-240} $PY -m rmda_fused.selftest --report "$RESULTS/selftest.json" \
    >"$RESULTS/selftest.log" 2>&1
  echo "selftest: rc=$?"
  tail -30 "$RESULTS/selftest.log"
fi

if has overhead; then
  for dtype in ${DTYPES:-fp32 bf16}; do
    timeout ${OVERHEAD_S:-150} $PY -m benchmarks.overhead --model resnet50 --device cuda \
      --dtype $dtype --sections ${SECTIONS:-step} --out "$RESULTS/overhead-$dtype" \
      >"$RESULTS/overhead-$dtype.log" 2>&1
    echo "overhead $dtype: rc=$?"
    tail -25 "$RESULTS/overhead-$dtype.log"
  done
fi
