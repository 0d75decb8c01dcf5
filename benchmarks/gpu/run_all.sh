#!/usr/bin/env bash
# Build, check, test and benchmark fastattn on a CUDA machine, in one command:
#   bash benchmarks/gpu/run_all.sh STAGE [STAGE ...]
# Stages run in the order given. Each writes its output under $OUT (default /tmp/fastattn-gpu)
# as it goes (the files named on the right; stages.log has each stage's start time), so that
# what a stage produced survives a later stage that hangs or is cut off:
#   info      GPU, driver, torch, nvcc                                    info.log
#   build     pip install --no-build-isolation . (FASTATTN_CUDA_ARCHS, default 90); register
#             and spill counts, the library and fastattn.build_info()      build.log, build-full.log
#   inplace   use a _C.so carried in python/fastattn/ instead of building (PYTHONPATH=python)
#                                                                         inplace.log
#   errors    calls that must raise a Python error, not crash (benchmarks/gpu/error_paths.py)
#                                                                         errors.log
#   smoke     a minute's check that the attention kernels finish, match the float64 reference and
#             repeat bitwise (benchmarks/gpu/smoke.py), under a time limit: a hang shows up here;
#             stops the run on failure                                    smoke.log
#   test      the CUDA tests (pytest -m cuda), in parallel                test.log
#   testall   the whole suite                                             testall.log
#   sanitize  compute-sanitizer memcheck + racecheck on small shapes
#             (benchmarks/gpu/sanitize_cases.py)                          sanitize-{memcheck,racecheck}.log
#   bench     every benchmark script on CUDA (BENCH_ARGS: extra options)   bench.log,
#             bench-<script>.log, and the tables recorded in $RECORD (default $OUT/cuda.md)
#   profile   CUDA time per kernel (benchmarks/gpu/profile_attention.py)  profile.log
# Exit code: 1 if a stage failed (the later stages still run, except after build or smoke).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/fastattn-gpu}
RECORD=${RECORD:-$OUT/cuda.md}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export FASTATTN_CUDA_ARCHS=${FASTATTN_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}
rc=0
step() { printf '\n=== %s (%ss)\n' "$1" "$SECONDS" | tee -a "$OUT/stages.log"; }
# log NAME CMD...: run CMD with its output shown and written to $OUT/NAME.log; returns CMD's status.
log() { local name=$1; shift; "$@" 2>&1 | tee "$OUT/$name.log"; return "${PIPESTATUS[0]}"; }

stage_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -2
}

stage_build() {
  $PY -m pip install -v --no-build-isolation --no-deps . > "$OUT/build-full.log" 2>&1 || { tail -60 "$OUT/build-full.log"; return 1; }
  grep -E "^fastattn:|registers|spill" "$OUT/build-full.log" | head -40
  local so
  so=$(cd /tmp && $PY -c "import fastattn, os; d = os.path.dirname(fastattn.__file__); print(os.path.join(d, [f for f in os.listdir(d) if f.startswith('_C')][0]))") || return 1
  ls -la "$so"
  echo "iostream instantiations defined in the library (expect none): $(nm -C --defined-only "$so" | grep -c '_M_insert<long>')"
  (cd /tmp && $PY -c "import fastattn; print(fastattn.build_info())")
}

stage_smoke() {
  timeout 240 $PY benchmarks/gpu/smoke.py
  local status=$?
  [ "$status" = 124 ] && echo "smoke: TIMED OUT after 240 s (a kernel hangs?)"
  return "$status"
}

stage_sanitize() {
  local tool status=0
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 3 $PY benchmarks/gpu/sanitize_cases.py > "$OUT/sanitize-$tool.log" 2>&1
    local s=$?
    echo "$tool: exit $s"; tail -5 "$OUT/sanitize-$tool.log"
    [ "$s" = 0 ] || status=1
  done
  return $status
}

# bench_one NAME ARGS...: one benchmark script, its log in $OUT/bench-NAME.log, tables in $RECORD.
bench_one() {
  local name=$1; shift
  echo "--- $name $*"
  $PY "benchmarks/$name.py" --device cuda "$@" --record "$RECORD" >> "$OUT/bench-$name.log" 2>&1
  local s=$?
  grep -E "^(PASS|FAIL|n/a|info)|^\| |^max " "$OUT/bench-$name.log" | tail -30
  [ "$s" = 0 ] || { echo "$name: exit $s"; tail -5 "$OUT/bench-$name.log"; }
  return $s
}

stage_bench() {
  local status=0
  rm -f "$OUT"/bench-bench_*.log
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
  bench_one bench_rotary --dtype bfloat16 || status=1
  bench_one bench_rotary --dtype float32 || status=1
  bench_one bench_attention ${BENCH_ARGS:-} || status=1
  bench_one bench_window ${BENCH_ARGS:-} || status=1
  bench_one bench_decode ${BENCH_ARGS:-} || status=1
  bench_one bench_dropout ${BENCH_ARGS:-} || status=1
  [ -s "$RECORD" ] && echo "tables recorded in $RECORD"
  return $status
}

for stage in "$@"; do
  case $stage in
    info)     step info;                 log info stage_info ;;
    build)    step "build (archs $FASTATTN_CUDA_ARCHS)"
              log build stage_build || { echo "build failed: stopping here"; exit 1; } ;;
    inplace)  step "carried library";    export PYTHONPATH=$PWD/python
              log inplace $PY -c "import fastattn; print(fastattn.build_info())" || exit 1 ;;
    errors)   step "error paths";        log errors $PY benchmarks/gpu/error_paths.py || rc=1 ;;
    smoke)    step smoke
              log smoke stage_smoke || { echo "smoke failed: stopping here"; exit 1; } ;;
    test)     step "CUDA tests"
              timeout 540 $PY -m pytest tests -q -m cuda -n 12 -p no:cacheprovider > "$OUT/test.log" 2>&1 || rc=1
              tail -40 "$OUT/test.log" ;;
    testall)  step "all tests"
              timeout 540 $PY -m pytest tests -q -n 12 -p no:cacheprovider > "$OUT/testall.log" 2>&1 || rc=1
              tail -40 "$OUT/testall.log" ;;
    sanitize) step compute-sanitizer;    log sanitize stage_sanitize || rc=1 ;;
    bench)    step benchmarks;           log bench stage_bench || rc=1 ;;
    profile)  step "kernel profile";     log profile $PY benchmarks/gpu/profile_attention.py || rc=1 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
step done
exit $rc
