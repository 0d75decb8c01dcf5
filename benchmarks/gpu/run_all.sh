#!/usr/bin/env bash
# One lent-GPU session in one command (the device machine starts bare and keeps nothing):
#   bash benchmarks/gpu/session.sh STAGE [STAGE ...]
# Stages, run in the order given; logs and recorded tables go to $OUT (default /tmp/fastattn-gpu):
#   info      GPU, driver, torch, nvcc
#   build     pip install --no-build-isolation . (FASTATTN_CUDA_ARCHS, default 90), keeps _C.so
#   inplace   use a _C.so carried in python/fastattn/ instead of building (PYTHONPATH=python)
#   smoke     a minute's check that the attention kernels finish, match the float64 reference and
#             repeat bitwise (benchmarks/gpu/smoke.py), under a time limit: a hang shows up here
#   test      the CUDA tests (pytest -m cuda), in parallel
#   testall   the whole suite
#   sanitize  compute-sanitizer memcheck + racecheck on small shapes (benchmarks/gpu/sanitize_cases.py)
#   bench     every benchmark script on CUDA, recorded in $OUT/h100.md
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/fastattn-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export FASTATTN_CUDA_ARCHS=${FASTATTN_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}
step() { printf '\n=== %s (%ss)\n' "$1" "$SECONDS"; }
rc=0
for stage in "$@"; do
  case $stage in
    info)
      step info
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
      $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
      nvcc --version | tail -2
      ;;
    build)
      step "build (archs $FASTATTN_CUDA_ARCHS)"
      $PY -m pip install -v --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
      grep -E "^fastattn:|registers|spill" "$OUT/build.log" | head -40
      so=$(cd /tmp && $PY -c "import fastattn, os; print(os.path.join(os.path.dirname(fastattn.__file__), [f for f in os.listdir(os.path.dirname(fastattn.__file__)) if f.startswith('_C')][0]))")
      ls -la "$so"
      echo "iostream instantiations defined in the library (expect none): $(nm -C --defined-only "$so" | grep -c '_M_insert<long>')"
      (cd /tmp && $PY -c "import fastattn; print(fastattn.build_info())")
      ;;
    inplace)
      step "carried library"
      export PYTHONPATH=$PWD/python
      $PY -c "import fastattn; print(fastattn.build_info())" || exit 1
      ;;
    errors)
      step "error paths"
      $PY benchmarks/gpu/error_paths.py || rc=1
      ;;
    smoke)
      step "smoke"
      timeout 240 $PY benchmarks/gpu/smoke.py 2>&1 | tee "$OUT/smoke.log"
      status=${PIPESTATUS[0]}
      [ "$status" = 124 ] && echo "smoke: TIMED OUT after 240 s (a kernel hangs?)"
      [ "$status" = 0 ] || { echo "smoke failed (exit $status): stopping here"; exit 1; }
      ;;
    test)
      step "CUDA tests"
      timeout 540 $PY -m pytest tests -q -m cuda -n 12 -p no:cacheprovider 2>&1 | tee "$OUT/test-cuda.log" | tail -40
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1
      ;;
    testall)
      step "all tests"
      timeout 540 $PY -m pytest tests -q -n 12 -p no:cacheprovider 2>&1 | tee "$OUT/test-all.log" | tail -40
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1
      ;;
    sanitize)
      step "compute-sanitizer"
      for tool in memcheck racecheck; do
        compute-sanitizer --tool $tool --error-exitcode 3 $PY benchmarks/gpu/sanitize_cases.py > "$OUT/sanitize-$tool.log" 2>&1
        echo "$tool: exit $?"; tail -5 "$OUT/sanitize-$tool.log"
      done
      ;;
    bench)
      step "benchmarks"
      rec="$OUT/h100.md"
      $PY benchmarks/bench_rotary.py --device cuda --dtype bfloat16 --record "$rec" > "$OUT/bench-rotary.log" 2>&1
      $PY benchmarks/bench_rotary.py --device cuda --dtype float32 --record "$rec" >> "$OUT/bench-rotary.log" 2>&1
      grep -iE "copy|target|x " "$OUT/bench-rotary.log" | tail -12
      $PY benchmarks/bench_attention.py --device cuda ${BENCH_ARGS:-} --record "$rec" > "$OUT/bench-attention.log" 2>&1
      tail -30 "$OUT/bench-attention.log"
      $PY benchmarks/bench_window.py --device cuda ${BENCH_ARGS:-} --record "$rec" > "$OUT/bench-window.log" 2>&1
      tail -25 "$OUT/bench-window.log"
      $PY benchmarks/bench_decode.py --device cuda ${BENCH_ARGS:-} --record "$rec" > "$OUT/bench-decode.log" 2>&1
      tail -8 "$OUT/bench-decode.log"
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
step done
exit $rc
