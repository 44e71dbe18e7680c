#!/usr/bin/env bash
# Quickstart, tests: set up, check the layer contract, run the whole suite (a run that collects no test fails), then
# scripts/floor.sh: a stated subset against the lowest declared diffusers and transformers.
# Contributors' inner loop: `.venv/bin/python -m pytest -m "not slow"` (see README "Contributing").
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
. .venv/bin/activate
lint-imports --no-cache || { echo "the import contract in pyproject.toml [tool.importlinter] is broken" >&2; exit 1; }
python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "no tests were collected: failing" >&2; rc=1; fi
# Then a subset against the lowest declared diffusers and transformers (a second venv; ~80 s): either failing
# fails the run. ACCEL_SKIP_FLOOR=1 leaves it out.
if [ -z "${ACCEL_SKIP_FLOOR:-}" ]; then
  bash scripts/floor.sh
  floor_rc=$?
  if [ "$floor_rc" -ne 0 ]; then echo "the dependency-floor run failed (rc $floor_rc)" >&2; [ "$rc" -ne 0 ] || rc=$floor_rc; fi
fi
exit "$rc"
