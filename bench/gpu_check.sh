#!/usr/bin/env bash
# One call on the GPU machine (fits the device tool's 10-minute limit): build (incl. the CUDA extension), the GPU test
# run of the Triton and CUDA-extension tests (on a GPU every test in these files runs on CUDA tensors, `cuda`-marked ones included), the
# benchmark, results into $OUT when set.
#   bash bench/gpu_check.sh                  # all stages; benchmark in --quick mode, cut at BENCH_S seconds (rows
#                                            # are written after every shape, so a cut run keeps what it measured)
#   STAGES=bench FULL=1 bash bench/gpu_check.sh   # a second call: the full benchmark (default repetitions)
# Each stage logs to bench/results/gpu_check_<stage>.log; a failing stage does not stop later ones (exit = last error).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RES=bench/results
mkdir -p "$RES"
status=0
stage() {  # stage NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T)) ==="
  timeout "$limit" "$@" 2>&1 | tee "$RES/gpu_check_$name.log" | tail -40
  local rc=${PIPESTATUS[0]}
  echo "=== $name rc=$rc ==="
  [ "$rc" -ne 0 ] && status=$rc
  return 0
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$RES/gpu_check_device.txt"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
STAGES=${STAGES:-build,test,bench}
on() { [[ ",$STAGES," == *",$1,"* ]]; }
on build && stage build 200 $PY -m pip install --no-build-isolation --no-deps -e .
$PY -c "import wfnet; print(wfnet.available_backends())" | tee -a "$RES/gpu_check_device.txt"
# one tile config in tests (WFNET_AUTOTUNE=0): correctness, not tuning; the benchmark autotunes
on test && stage pytest 200 env WFNET_AUTOTUNE=0 $PY -m pytest -q --durations=10 -m "cuda or not cuda" \
  tests/test_triton_linear.py tests/test_triton_conv2d.py tests/test_compile.py tests/test_cuda_ext.py
if on bench; then
  if [ "${FULL:-0}" = 1 ]; then
    stage bench_conv 280 $PY bench/bench_ops.py --models vgg16,resnet18 --record-dispatch --tag _conv
    stage bench_vit 280 $PY bench/bench_ops.py --models vit --tag _vit
  else
    stage bench ${BENCH_S:-230} $PY bench/bench_ops.py --quick --record-dispatch --tag _quick
  fi
fi
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/results"
  cp -r "$RES"/. "$OUT/results/"
  cp wf_kernels/dispatch_table.json "$OUT/results/" 2>/dev/null
fi
exit $status
