#!/usr/bin/env bash
# GPU check, run from the repo root on one CUDA GPU (written for one H200: torch 2.11 + CUDA 13, triton 3.6):
#   1. the GPU-marked tests: pytest -m gpu (at most ~3 min; stopped at GPU_CHECK_PYTEST_S, default 180 s)
#   2. benchmarks/bench_attention_gpu.py: sparse vs dense attention kernels at Wan 1.3B 480p / 14B 720p sizes,
#      the Triton kernel's launch configs, and an 8-step Wan2.1-1.3B-size pipeline end to end (~3 min; it gets
#      what is left of GPU_CHECK_TOTAL_S and skips later rows rather than overrun it).
# The whole script stays under 6 minutes (GPU_CHECK_TOTAL_S, default 345 s, includes the wheel install below).
# Results: $OUT (default ./gpu_results): pytest.log, bench.log and the benchmark's markdown tables (results.md).
# Installs nothing, except the wheels of a .whl folder in the repo root when there is one (offline, no deps).
#   OUT=/tmp/out bash scripts/gpu_check.sh
#   BENCH_ARGS="--device cpu --smoke" bash scripts/gpu_check.sh   # the plumbing, on a CPU machine (~1 min)
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
OUT=${OUT:-./gpu_results}
mkdir -p "$OUT"
TOTAL_S=${GPU_CHECK_TOTAL_S:-345}
PYTEST_S=${GPU_CHECK_PYTEST_S:-180}

. scripts/gpu_env.sh  # carried wheels, this checkout first on PYTHONPATH

echo "== gpu_check: $(date -u +%FT%TZ), out $OUT, budget ${TOTAL_S} s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"

# 1. tests marked gpu; a failure does not stop the benchmark
pytest_rc=na
if python3 -c "import pytest" 2>/dev/null; then
  per_test=()
  if python3 -c "import pytest_timeout" 2>/dev/null; then per_test=(--timeout 300); else
    echo "pytest-timeout is not installed: no per-test timeout (the ${PYTEST_S} s cap still holds)"; fi
  # the files that hold gpu tests: collecting all of tests/ would import the app's packages (gradio, playwright)
  timeout -s INT -k 20 "$PYTEST_S" python3 -m pytest -m gpu -q -p no:cacheprovider --maxfail=20 \
    ${per_test[@]+"${per_test[@]}"} ${GPU_CHECK_TESTS:-tests/test_gpu.py tests/combos/test_offload.py tests/pipelines/test_shape.py} 2>&1 | tee "$OUT/pytest.log"
  pytest_rc=${PIPESTATUS[0]}
else
  echo "pytest is not installed: tests skipped" | tee "$OUT/pytest.log"
fi
pytest_s=$((SECONDS - START))  # with the wheel install

# 2. the benchmark, with what is left of the budget (15 s kept for the summary and slack)
left=$((TOTAL_S - (SECONDS - START) - 15))
[ "$left" -lt 60 ] && left=60
PYTHONUNBUFFERED=1 timeout -s INT -k 20 "$((left + 10))" \
  python3 benchmarks/bench_attention_gpu.py --out "$OUT" --budget-s "$left" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

echo
echo "== gpu_check summary ($((SECONDS - START)) s in all; pytest ${pytest_s} s)"
case $pytest_rc in
  0) p="passed" ;; 5) p="no tests selected by -m gpu" ;; 124) p="stopped at ${PYTEST_S} s" ;;
  na) p="not run" ;; *) p="FAILED (rc $pytest_rc)" ;;
esac
last=$(grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$OUT/pytest.log" | tail -n 1)
[ -n "$last" ] || last=$(grep -v '^[[:space:]]*$' "$OUT/pytest.log" | tail -n 1)
echo "pytest -m gpu: $p: $last"
case $bench_rc in
  0) b="all parts ok" ;; 124) b="stopped by the time limit" ;; *) b="some part failed (rc $bench_rc)" ;;
esac
echo "benchmark: $b"
grep -E '^(\[summary\]|!! )' "$OUT/bench.log" | sed 's/^/  /'
echo "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
