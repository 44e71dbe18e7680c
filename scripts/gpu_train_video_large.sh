#!/usr/bin/env bash
# Train ref-video-large and judge every preset and technique part on it: one call on one H100/H200, at most
# 9 minutes of wall time (training/train_video_large.py says what it does and how the time is split).
#   OUT=/tmp/out bash scripts/gpu_train_video_large.sh
#   EXTRA="--micro --device cpu" bash scripts/gpu_train_video_large.sh     # the plumbing, on a CPU (~10 s)
# The run's own --time-budget ends it in time (what is left of TOTAL_S, default 530 s from this script's start,
# less 40 s for Python's start-up and slack); `timeout` at TOTAL_S backs it.
# Results in $OUT (default ./gpu_results): train.log, training.json, judge.md, judge.json, and the model folder
# as a tar split into parts under 15 MB (a lent machine returns at most 8 files of at most 16 MiB). Here:
#   cat $OUT/ref-video-large.tar.part-* | tar -x -C accel/pipelines/ref_models/
# Installs nothing, except the wheels of a .whl folder in the repo root when there is one (offline, no deps):
# diffusers is not on the H200 image, carry it as a wheel (/work/.library/device/README.md, Notes).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
OUT=${OUT:-./gpu_results}
WORK=${WORK:-/tmp/ref-video-large-run}
mkdir -p "$OUT"
TOTAL_S=${TRAIN_VIDEO_LARGE_TOTAL_S:-530}

. scripts/gpu_env.sh  # carried wheels, this checkout first on PYTHONPATH

echo "== gpu_train_video_large: $(date -u +%FT%TZ), out $OUT, ${TOTAL_S} s in all"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"

left=$((TOTAL_S - (SECONDS - START)))
budget=$((left - 40))
rm -rf "$WORK"
PYTHONUNBUFFERED=1 timeout -s INT -k 15 "$left" python3 -m training.train_video_large \
  --out "$WORK/ref-video-large" --time-budget "$budget" ${EXTRA:-} 2>&1 | tee "$OUT/train.log"
rc=${PIPESTATUS[0]}

for f in training.json judge.md judge.json; do
  [ -f "$WORK/ref-video-large/$f" ] && cp "$WORK/ref-video-large/$f" "$OUT/"
done
if [ -f "$WORK/ref-video-large/model_index.json" ]; then
  tar -cf - -C "$WORK" ref-video-large | split -b 15000000 - "$OUT/ref-video-large.tar.part-"
fi

echo
echo "== gpu_train_video_large summary ($((SECONDS - START)) s in all): rc $rc"
[ -f "$OUT/training.json" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
print('held-out', d.get('held_out'), '| steps', d.get('steps'), '| weights MB', d['weights']['total_mb'])" "$OUT/training.json"
[ -f "$OUT/judge.md" ] && sed -n '/^Re-derived/,$p' "$OUT/judge.md"
echo "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit "$rc"
