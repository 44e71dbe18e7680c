#!/usr/bin/env bash
# The dependency floor: a subset of the suite against the lowest diffusers and transformers that pyproject.toml
# declares (scripts/floor-pins.txt), in a second venv, .venv-floor. scripts/test.sh runs it after the main suite.
#
# .venv-floor holds the pinned packages and what they need that .venv lacks (huggingface_hub 1.x, tokenizers
# 0.22, ...); torch and the rest of this package's requirements are linked from .venv, and nothing else of .venv
# (no torchao, peft, gradio) is visible there (scripts/floor_env.py). Needs .venv (scripts/setup.sh); the first
# run downloads the pinned wheels (~20 MB, ~15 s), a rerun only checks them (~1 s).
#
# The subset (-m "not slow", 70-80 s on 2 shared CPU cores): the public API and the techniques that sit on
# diffusers' hooks and attention processors (tests/test_api.py tests/cache tests/tokens tests/approx
# tests/attention/test_processor.py), and the built-in pipelines built and loaded at these versions
# (tests/pipelines/test_tiny.py tests/pipelines/test_ref_models.py tests/pipelines/test_sized.py).
# Arguments replace the subset: bash scripts/floor.sh tests/test_api.py -x
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "floor: no .venv; run scripts/setup.sh first" >&2; exit 1; }
FLOOR=.venv-floor
ver='import sys; print(sys.version)'
# (re)created when missing or when .venv's python changed: torch's compiled modules are linked from .venv
if [ "$("$FLOOR/bin/python" -c "$ver" 2>/dev/null)" != "$(.venv/bin/python -c "$ver")" ]; then
  rm -rf "$FLOOR" && .venv/bin/python -m venv "$FLOOR" || exit 1
fi
.venv/bin/python scripts/floor_env.py "$FLOOR" scripts/floor-pins.txt || { echo "floor: could not build $FLOOR" >&2; exit 1; }

SUBSET=(tests/test_api.py tests/cache tests/tokens tests/approx tests/attention/test_processor.py
        tests/pipelines/test_tiny.py tests/pipelines/test_ref_models.py tests/pipelines/test_sized.py)
[ "$#" -gt 0 ] && SUBSET=("$@")
# This checkout's accel, not an installed one.
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$FLOOR/bin/python" -c \
  'import diffusers, transformers; print(f"floor: diffusers {diffusers.__version__}, transformers {transformers.__version__}")'
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$FLOOR/bin/python" -m pytest -p no:cacheprovider -m "not slow" "${SUBSET[@]}"
rc=$?
if [ "$rc" -eq 5 ]; then echo "floor: no tests were collected: failing" >&2; exit 1; fi
exit "$rc"
