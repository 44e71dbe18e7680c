#!/usr/bin/env bash
# `accel bench` on every shape model at its real size, on one CUDA GPU, in one call of at most 8 minutes:
# the presets (off, safe, balanced, fast) and the peers (diffusers' caches, cache-dit, tomesd, DeepCache) side by
# side, CUDA-event time and peak memory, PSNR/SSIM against the baseline of the same prompt and seed.
# Random weights: the fidelity columns say how far a setting moves the output, not whether it still draws the
# same thing (the trained models' tables in BENCHMARKS.md say that).
#
# Steps are cut so that every model fits its share (a step cache's gain grows with steps; the step count is
# in each table's header): flux 1024 px 14 steps, wan-1.3b 480x832 x 33 frames 10 steps, sd15 512 px 25 steps,
# sdxl 1024 px 20 steps. One round after a warm-up per row (GPU timings repeat to ~1%).
# Installs the wheels of a .whl folder in the repo root when there is one (diffusers, cache-dit, tomesd, DeepCache
# are not on the GPU machine): offline, no deps.
#   OUT=/tmp/out bash scripts/gpu_bench.sh
#   GPU_BENCH_SMOKE=1 bash scripts/gpu_bench.sh        # the plumbing on a CPU, reduced models (~1 min)
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
OUT=${OUT:-./gpu_results}
mkdir -p "$OUT"
TOTAL_S=${GPU_BENCH_TOTAL_S:-470}

. scripts/gpu_env.sh  # carried wheels, this checkout first on PYTHONPATH
export CACHE_DIT_LOG_LEVEL=error

if [ -n "${GPU_BENCH_SMOKE:-}" ]; then
  DEVICE=cpu
  MODELS=(
    "shape:flux:num_layers=1,num_single_layers=2,num_attention_heads=2,attention_head_dim=16,axes_dims_rope=(4,6,6)|--height 64 --width 64 --steps 6"
    "shape:wan-1.3b:num_layers=2,num_attention_heads=2,attention_head_dim=32,ffn_dim=64|--height 64 --width 64 --frames 9 --steps 6"
    "shape:sd15:block_out_channels=(32,32,32,32),layers_per_block=1,attention_head_dim=2|--height 64 --width 64 --steps 6"
    "shape:sdxl:block_out_channels=(32,32,32),layers_per_block=1,attention_head_dim=2,transformer_layers_per_block=1|--height 64 --width 64 --steps 6"
  )
  SHARE=(60 60 60 60)
else
  DEVICE=cuda
  MODELS=(
    "shape:flux|--steps 14"
    "shape:wan-1.3b|--frames 33 --steps 10"
    "shape:sd15|--steps 25"
    "shape:sdxl|--steps 20"
  )
  SHARE=(150 150 60 90)  # seconds each, within TOTAL_S
fi

echo "== gpu_bench: $(date -u +%FT%TZ), out $OUT, budget ${TOTAL_S} s, device $DEVICE"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
for i in "${!MODELS[@]}"; do
  model=${MODELS[$i]%%|*}
  args=${MODELS[$i]#*|}
  name=$(echo "${model#shape:}" | cut -d: -f1)
  left=$((TOTAL_S - (SECONDS - START) - 10))
  share=${SHARE[$i]}
  [ "$share" -gt "$left" ] && share=$left
  if [ "$share" -lt 30 ]; then echo "!! $name: skipped, ${left} s left"; continue; fi
  echo "== $name ($model $args), up to ${share} s"
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 timeout -s INT -k 15 "$share" python3 -m accel bench --model "$model" --device "$DEVICE" $args \
    --presets off,safe,balanced,fast --peers all --repeats 1 --n-prompts 1 --json "$OUT/$name.json" \
    > "$OUT/$name.md" 2> "$OUT/$name.log"
  rc=$?
  case $rc in 0) s="ok" ;; 130|124) s="stopped at ${share} s (rows measured so far are in the table)" ;; *) s="FAILED rc $rc" ;; esac
  echo "[summary] $name: $s ($((SECONDS - START)) s so far)"
  cat "$OUT/$name.md"
  tail -n 3 "$OUT/$name.log"
done
echo "== gpu_bench done in $((SECONDS - START)) s; files: $(cd "$OUT" && ls | tr '\n' ' ')"
