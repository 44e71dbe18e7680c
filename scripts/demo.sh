#!/usr/bin/env bash
# Quickstart, main job: set up, then generate one image with the default built-in model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# The default model, ref-sd, was trained on procedural shapes: prompts in its vocabulary work best
# (size, colour, shape, place, background: "a small blue triangle on the right on a gray background").
# Accelerated by default (preset balanced); --compare also runs it without acceleration (same seed) and
# prints the speed-up and the fidelity.
accel generate --prompt "${1:-a big red circle in the center on a white background}" --out outputs/demo.png --compare
