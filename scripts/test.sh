#!/usr/bin/env bash
# Quickstart, tests: set up, check the layer contract, then run the whole suite (a run that collects no test fails).
# Contributors' inner loop: `.venv/bin/python -m pytest -m "not slow"` (see README "Contributing").
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
. .venv/bin/activate
lint-imports --no-cache || { echo "the import contract in pyproject.toml [tool.importlinter] is broken" >&2; exit 1; }
python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "no tests were collected: failing" >&2; exit 1; fi
exit "$rc"
