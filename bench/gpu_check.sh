#!/usr/bin/env bash
# The GPU check in one command, within 7 minutes (BUDGET_S=420) on a cold GPU machine, so that a session's 15 device
# minutes (machine start included) hold one run, a fix and a rerun. The FIRST stage group answers the question that
# matters (do both fused backends pass their GPU tests and memcheck on this GPU?) and writes $OUT/verdict.md within
# 4 minutes, before any benchmark starts; each stage's results are copied to the output folder AS SOON AS THE STAGE
# ENDS, so a run cut short returns what it did.
#
#   bash bench/gpu_check.sh "$OUT"            # the command to run first: build, verify, record (verdict.md),
#                                             # sync count, quick op + model benchmarks
#   FULL=1 bash bench/gpu_check.sh "$OUT"     # (or --full) a second call: build, then the FULL benchmarks
#   STAGES=build,bench_model FULL=1 bash bench/gpu_check.sh "$OUT"    # only some stages (names below)
#
# Stages, in order, with their budgets in seconds (timeout per stage; the whole run also stops at BUDGET_S, each
# stage's limit shrinks to what is left, and a stage with under 15 s left is skipped and says so):
#   build 120      pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST=9.0, CUDA_HOME), then the
#                  compiled wfnet._C MUST import (exit 3 otherwise; ALLOW_NO_EXT=1 to go on without it)
#   verify 110     AT ONCE (one GPU, three processes): pytest over the GPU test files (-m "cuda or not cuda",
#                  WFNET_AUTOTUNE=0, --junitxml, 100 s) and compute-sanitizer memcheck of bench/memcheck_ops.py --once
#                  for the triton and the cuda backend (100 s each)
#   record 10      bench/record_verification.py: wf_kernels/verification.json (+ a copy in the output folder), then
#                  verdict.md (stage table, test counts, memcheck summaries, verified=...) -> first answer <= 240 s
#   sync 25        bench/sync_count.py: host syncs per forward (CPU / int / CUDA rows) and per untraining step
#   bench_ops 40   bench/bench_ops.py --quick (WFNET_AUTOTUNE=0)     FULL: all shapes, --record-dispatch, 170 s
#   bench_model 60 bench/bench_model.py --quick (WFNET_AUTOTUNE=0)   FULL: torch.compile included, 200 s
# Budget: preflight ~10 + 120 + 110 + 10 = 250 s worst case to the verdict (the build took ~90 s for two archs on 2
# cores here; TORCH_CUDA_ARCH_LIST=9.0 on 16 cores is faster); + 25 + 40 + 60 = 375 s <= 420 s in all.
# FULL=1 runs build, bench_model, then bench_ops (a fresh machine needs the build again). Both write after every
# model / shape, so a cut run keeps what it measured; BENCH_MODEL_ARGS / BENCH_OPS_ARGS add arguments (e.g.
# BENCH_MODEL_ARGS="--models vgg16" to spread a FULL run over several calls).
#
# The first lines fail loudly (exit 2) when there is no CUDA device, or pytest, triton, or nvcc is missing.
# Output folder (at most 8 files, the device tool's limit): verdict.md, summary.md (environment, TF32 flags, stage
# table, verification, sync counts), gpu_check.log (every stage's log), results.tgz (everything, re-packed after
# every stage), verification.json, sync_count.json, bench_ops.md, bench_model.md. Exit status: 0 when every stage
# that ran passed, else the last failing stage's status.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD

FULL=${FULL:-0}
OUTDIR=""
for a in "$@"; do
  case "$a" in
    --full) FULL=1 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) OUTDIR=$a ;;
  esac
done
OUTDIR=${OUTDIR:-${OUT:-$ROOT/bench/results/gpu_check_$(date +%Y%m%d_%H%M%S)}}
mkdir -p "$OUTDIR" || { echo "gpu_check: cannot create the output folder $OUTDIR" >&2; exit 2; }
OUTDIR=$(cd "$OUTDIR" && pwd)
W=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/wfnet_gpu_check.XXXXXX")}
mkdir -p "$W"
START=$(date +%s)
BUDGET_S=${BUDGET_S:-420}
DEADLINE=$((START + BUDGET_S))
status=0
STAGE_ROWS=""

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3 python; do command -v "$cand" >/dev/null 2>&1 && { PY=$(command -v "$cand"); break; }; done
fi
die() {  # a failure before the verdict still leaves verdict.md (FAIL + the reason) in the output folder
  echo "gpu_check: FATAL: $1" | tee -a "$W/gpu_check.log" >&2
  [ "$VERDICT_DONE" = 1 ] || verdict "FATAL: $1"
  summary; publish; exit "${2:-2}"
}
VERDICT_DONE=0
# a TERM / INT (the device call's own time limit, a Ctrl-C) before the verdict still writes one; after it, the
# verdict stands and only the summary is refreshed
STAGE_PID=""
trap 'echo "gpu_check: interrupted at $(date +%T)" >> "$W/gpu_check.log"; [ -n "$STAGE_PID" ] && kill -TERM "$STAGE_PID" 2>/dev/null; [ "$VERDICT_DONE" = 1 ] || verdict "interrupted by a signal before the first stage group finished"; summary; publish; exit 130' INT TERM

# --------------------------------------------------------------------------------------------- publishing
publish() {  # copy what exists now into the output folder (atomic renames: a cut run never leaves half a file)
  local f
  [ -f "$W/summary.md" ] && cp "$W/summary.md" "$OUTDIR/summary.md.tmp" && mv "$OUTDIR/summary.md.tmp" "$OUTDIR/summary.md"
  [ -f "$W/gpu_check.log" ] && cp "$W/gpu_check.log" "$OUTDIR/gpu_check.log.tmp" && mv "$OUTDIR/gpu_check.log.tmp" "$OUTDIR/gpu_check.log"
  f=$(ls -t "$W"/sync_count_*.json 2>/dev/null | head -1); [ -n "$f" ] && cp "$f" "$OUTDIR/sync_count.json"
  f=$(ls -t "$W"/bench_*.md 2>/dev/null | head -1); [ -n "$f" ] && cp "$f" "$OUTDIR/bench_ops.md"
  f=$(ls -t "$W"/model_*.md 2>/dev/null | head -1); [ -n "$f" ] && cp "$f" "$OUTDIR/bench_model.md"
  [ -f "$W/verification.json" ] && cp "$W/verification.json" "$OUTDIR/verification.json"
  [ -f "$W/verdict.md" ] && cp "$W/verdict.md" "$OUTDIR/verdict.md"
  tar czf "$OUTDIR/results.tgz.tmp" -C "$W" . 2>/dev/null && mv "$OUTDIR/results.tgz.tmp" "$OUTDIR/results.tgz"
  rm -f "$OUTDIR"/*.tmp
}

summary() {  # rewrite summary.md from what the work folder holds now
  {
    echo "# wfnet GPU check $(date -Iseconds) ($([ "$FULL" = 1 ] && echo FULL || echo quick))"
    echo
    echo '```'
    cat "$W/env.txt" 2>/dev/null
    echo '```'
    echo
    echo "| stage | budget s | limit s | seconds | status |"
    echo "|---|---|---|---|---|"
    printf "%b" "$STAGE_ROWS"
    if [ -f "$W/record.log" ]; then echo; echo "## Verification"; echo; echo '```'; grep -E "verified=|written" "$W/record.log"; echo '```'; fi
    if [ -f "$W/test.log" ]; then echo; echo "## GPU tests (tail)"; echo; echo '```'; grep -E "passed|failed|error" "$W/test.log" | tail -5; echo '```'; fi
    if [ -f "$W/sync.log" ]; then echo; echo "## Host syncs"; echo; echo '```'; grep -E "syncs=|skipped" "$W/sync.log"; echo '```'; fi
    f=$(ls -t "$W"/model_*.md 2>/dev/null | head -1)
    if [ -n "$f" ]; then echo; echo "## Model benchmark"; echo; sed -n '1,200p' "$f"; fi
  } > "$W/summary.md.new" && mv "$W/summary.md.new" "$W/summary.md"
}

overall() {  # overall [REASON]: "PASS" only when every stage that ran passed and both backends are verified=True
  if [ -n "${1:-}" ]; then echo "FAIL ($1)"; return; fi
  local why=""
  printf "%b" "$STAGE_ROWS" | grep -qE "FAILED|TIMEOUT" && why="a stage failed or timed out"
  for st in verify record; do
    printf "%b" "$STAGE_ROWS" | grep -qE "^\| $st \|" || why="${why:+$why; }the $st stage did not run"
  done
  for b in triton cuda; do
    grep -qE "/ $b: verified=True" "$W/record.log" 2>/dev/null || why="${why:+$why; }$b is not verified"
  done
  if [ -z "$why" ]; then echo "PASS"; else echo "FAIL ($why)"; fi
}

verdict() {  # verdict [REASON]: verdict.md, the first stage's answer (build, GPU tests, memcheck, verification)
  {
    echo "# wfnet GPU check verdict $(date -Iseconds)"
    echo
    echo "VERDICT: $(overall "${1:-}")   ($(( $(date +%s) - START )) s after the start)"
    echo
    grep -E "^device:|^torch " "$W/env.txt" 2>/dev/null
    echo
    printf "| stage | budget s | limit s | seconds | status |\n|---|---|---|---|---|\n%b" "$STAGE_ROWS"
    echo
    local t; t=$(grep -E "passed|failed" "$W/test.log" 2>/dev/null | tail -1)
    echo "GPU tests: ${t:-no pytest summary line (timed out or crashed: see gpu_check.log / results.tgz test.log)}"
    for b in triton cuda; do echo "memcheck $b: $(grep -E "ERROR SUMMARY|gpu_check: rc=" "$W/memcheck_$b.log" 2>/dev/null | tr '\n' ' ')"; done
    echo
    echo '```'
    grep -E "verified=" "$W/record.log" 2>/dev/null || echo "no verification record was written"
    echo '```'
  } > "$W/verdict.md.new" && mv "$W/verdict.md.new" "$W/verdict.md"
  cp "$W/verdict.md" "$OUTDIR/verdict.md.tmp" && mv "$OUTDIR/verdict.md.tmp" "$OUTDIR/verdict.md"
}

on() { [[ ",${STAGES}," == *",$1,"* ]]; }

stage() {  # stage NAME BUDGET_S CMD... : run under timeout, log to $W/NAME.log, then publish
  local name=$1 budget=$2; shift 2
  local now left limit t0 rc secs
  now=$(date +%s); left=$((DEADLINE - now - 5)); limit=$budget
  [ "$left" -lt "$limit" ] && limit=$left
  local need=15; [ "$budget" -lt "$need" ] && need=$budget
  if [ "$left" -lt "$need" ]; then
    echo "=== $name: SKIPPED, only ${left}s of the ${BUDGET_S}s budget left ===" | tee -a "$W/gpu_check.log"
    STAGE_ROWS+="| $name | $budget | - | - | skipped: out of time |\n"; summary; publish
    return 0
  fi
  echo "=== $name (limit ${limit}s) $(date +%T) ===" | tee -a "$W/gpu_check.log"
  t0=$(date +%s)
  # in the background + wait: a TERM / INT to this script runs its trap at once (bash defers traps while a
  # foreground child runs, and timeout's own process group would not get the signal)
  timeout -k 5 "$limit" "$@" > "$W/$name.log" 2>&1 &
  STAGE_PID=$!
  wait "$STAGE_PID"
  rc=$?
  STAGE_PID=""
  secs=$(( $(date +%s) - t0 ))
  tail -n 25 "$W/$name.log"
  { echo "--- $name log ---"; cat "$W/$name.log"; } >> "$W/gpu_check.log"
  local what="ok"
  [ "$rc" -ne 0 ] && what="FAILED rc=$rc" && status=$rc
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && what="TIMEOUT after ${limit}s (rc=$rc)"
  echo "=== $name: $what in ${secs}s ===" | tee -a "$W/gpu_check.log"
  STAGE_ROWS+="| $name | $budget | $limit | $secs | $what |\n"
  summary; publish
  return "$rc"
}

# --------------------------------------------------------------------------------------------- preflight
: > "$W/gpu_check.log"
echo "gpu_check: work folder $W, output folder $OUTDIR, budget ${BUDGET_S}s, FULL=$FULL" | tee -a "$W/gpu_check.log"
[ -n "$PY" ] || die "no python3 on PATH (set PYTHON=...)"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
[ -n "${CUDA_HOME:-}" ] && export PATH="$CUDA_HOME/bin:$PATH"
NVCC=$(command -v nvcc || true)
[ -n "$NVCC" ] || die "nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): the CUDA extension wfnet._C cannot be built and its tests would only skip"
SANITIZER=$(command -v compute-sanitizer || true)
[ -z "$SANITIZER" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/compute-sanitizer/compute-sanitizer" ] && SANITIZER="$CUDA_HOME/compute-sanitizer/compute-sanitizer"
"$PY" -c "import pytest" 2>/dev/null || die "pytest is not importable by $PY: the GPU tests cannot run"
"$PY" -c "import triton" 2>/dev/null || die "triton is not importable by $PY"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  # ALLOW_CPU=1: only to check this script's plumbing on a machine without a GPU (stages that need one fail)
  [ "${ALLOW_CPU:-0}" = 1 ] || die "torch.cuda.is_available() is False for $PY: no GPU, or a CPU-only torch"
  echo "gpu_check: WARNING: no CUDA device (ALLOW_CPU=1): checking the script's plumbing only" | tee -a "$W/gpu_check.log"
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
{
  echo "date: $(date -Iseconds)   host: $(hostname)   cpus: $(nproc)"
  echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'n/a (no git here)') $(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo '(+ local changes)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
  echo "nvcc: $NVCC ($("$NVCC" --version | tail -n 2 | head -n 1))"
  echo "compute-sanitizer: ${SANITIZER:-MISSING (memcheck stage fails; nothing is verified)}"
  "$PY" - <<'EOF'
import torch, triton, sys
print(f"python {sys.version.split()[0]} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, triton {triton.__version__}")
print(f"device: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})"
      if torch.cuda.is_available() else "device: NONE (no CUDA device)")
print(f"TF32: torch.backends.cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32} "
      f"torch.backends.cudnn.allow_tf32={torch.backends.cudnn.allow_tf32} "
      f"torch.get_float32_matmul_precision()={torch.get_float32_matmul_precision()!r}")
for m in ("timm", "xdist", "pytest_timeout"):
    try:
        __import__(m); print(f"{m}: yes")
    except ImportError:
        print(f"{m}: no")
EOF
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST CUDA_HOME=${CUDA_HOME:-} MAX_JOBS=$MAX_JOBS"
} > "$W/env.txt" 2>&1
nvidia-smi > "$W/nvidia-smi.txt" 2>&1
cat "$W/env.txt" | tee -a "$W/gpu_check.log"
summary; publish

if [ "$FULL" = 1 ]; then
  STAGES=${STAGES:-build,bench_model,bench_ops}
else
  STAGES=${STAGES:-build,verify,record,sync,bench_ops,bench_model}
fi

# --------------------------------------------------------------------------------------------- stages
if on build; then
  stage build 120 "$PY" -m pip install --no-build-isolation --no-deps -e . \
    || die "the build failed (see $OUTDIR/gpu_check.log)" 3
fi
EXT_ERR=$("$PY" -c "import wfnet._C" 2>&1) || {
  if [ "${ALLOW_NO_EXT:-0}" = 1 ]; then
    echo "gpu_check: WARNING: wfnet._C does not import (ALLOW_NO_EXT=1, going on): $EXT_ERR" | tee -a "$W/gpu_check.log"
  else
    die "the compiled extension wfnet._C does not import after the build: $EXT_ERR" 3
  fi
}
"$PY" -c "import wfnet; print('available backends:', wfnet.available_backends())" 2>&1 | tee -a "$W/env.txt" "$W/gpu_check.log"

verify_all() {  # GPU tests and both memchecks at once (one GPU, separate processes): the slowest sets the time
  local pids=() rc=0 p
  # the stage's timeout (or the script's trap) TERMs this shell: pass it on to the three timeouts, each in its own
  # process group, so that nothing of a cut run outlives it
  trap 'kill -TERM "${pids[@]}" 2>/dev/null; exit 143' TERM INT
  timeout -k 5 "$TEST_LIMIT" env WFNET_AUTOTUNE=0 "$PY" -m pytest "${PYTEST_ARGS[@]}" \
    tests/test_triton_linear.py tests/test_triton_conv2d.py tests/test_triton_epilogue.py \
    tests/test_triton_backward.py tests/test_triton_gates.py tests/test_compile.py tests/test_cuda_ext.py \
    tests/test_ops.py tests/test_layers.py tests/test_backends.py tests/test_rows.py > "$W/test.log" 2>&1 &
  pids+=($!)
  for b in triton cuda; do
    timeout -k 5 "$MEMCHECK_LIMIT" bash -c "$(declare -f memcheck_one); memcheck_one $b" > "$W/memcheck_$b.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  echo "--- tests ---"; grep -E "passed|failed|error" "$W/test.log" | tail -3
  for b in triton cuda; do echo "--- memcheck $b ---"; tail -n 3 "$W/memcheck_$b.log"; done
  return $rc
}
memcheck_one() {  # memcheck_one BACKEND: sanitizer log + the exit status, for record_verification.py
  local b=$1 rc
  if [ -z "$SANITIZER" ]; then echo "compute-sanitizer not found"; echo "gpu_check: rc=127"; return 127; fi
  # no caching allocator: every tensor is its own allocation, so out-of-bounds accesses are caught at its edge
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 WFNET_AUTOTUNE=0 \
    "$SANITIZER" --tool memcheck --error-exitcode 1 --print-limit 50 "$PY" bench/memcheck_ops.py --backend "$b" --once
  rc=$?
  echo "gpu_check: rc=$rc"
  return $rc
}
if on verify; then
  PYTEST_ARGS=(-q -rfEs --durations=15 -p no:cacheprovider -m "cuda or not cuda" --junitxml="$W/pytest_gpu.xml")
  "$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_ARGS+=(--timeout=60)
  WORKERS=${PYTEST_WORKERS:-4}
  if [ "$WORKERS" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then PYTEST_ARGS+=(-n "$WORKERS"); fi
  TEST_LIMIT=100 MEMCHECK_LIMIT=100
  export TEST_LIMIT MEMCHECK_LIMIT SANITIZER PY W
  stage verify 110 bash -c "$(declare -f verify_all memcheck_one); PYTEST_ARGS=($(printf '%q ' "${PYTEST_ARGS[@]}")); verify_all" || true
fi

if on record; then
  stage record 10 "$PY" bench/record_verification.py --junit "$W/pytest_gpu.xml" \
    --memcheck "triton=$W/memcheck_triton.log" --memcheck "cuda=$W/memcheck_cuda.log" --copy-to "$W" || true
fi
verdict; VERDICT_DONE=1  # the first stage's answer lands in $OUT before any benchmark starts

on sync && { stage sync 25 "$PY" bench/sync_count.py --out "$W" || true; }

run_bench_ops() {
  if [ "$FULL" = 1 ]; then
    stage bench_ops 170 "$PY" bench/bench_ops.py --record-dispatch --out "$W" --tag _full ${BENCH_OPS_ARGS:-} || true
    cp wf_kernels/dispatch_table.json "$W/" 2>/dev/null; publish
  else
    stage bench_ops 40 env WFNET_AUTOTUNE=0 "$PY" bench/bench_ops.py --quick --out "$W" --tag _quick ${BENCH_OPS_ARGS:-} || true
  fi
}
run_bench_model() {
  if [ "$FULL" = 1 ]; then
    stage bench_model 200 "$PY" bench/bench_model.py --out "$W" --tag _full ${BENCH_MODEL_ARGS:-} || true
  else
    stage bench_model 60 env WFNET_AUTOTUNE=0 "$PY" bench/bench_model.py --quick --out "$W" --tag _quick ${BENCH_MODEL_ARGS:-} || true
  fi
}
if [ "$FULL" = 1 ]; then  # the model table is the headline: first
  on bench_model && run_bench_model
  on bench_ops && run_bench_ops
else
  on bench_ops && run_bench_ops
  on bench_model && run_bench_model
fi

summary; publish
echo
echo "gpu_check: done in $(( $(date +%s) - START ))s, status $status; results in $OUTDIR (work folder $W)"
printf "| stage | budget s | limit s | seconds | status |\n|---|---|---|---|---|\n%b" "$STAGE_ROWS"
[ -f "$W/record.log" ] && grep -E "verified=" "$W/record.log"
exit $status
