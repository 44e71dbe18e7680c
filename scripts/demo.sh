#!/usr/bin/env bash
# Quickstart, main job: set up, then generate one image with the default built-in model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
accel generate --prompt "${1:-a red circle on a blue background}" --out outputs/demo.png
