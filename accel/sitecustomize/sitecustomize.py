"""Put first on ``PYTHONPATH`` by `accel run`, so that every Python process the command starts
accelerates the diffusers pipelines it calls, without a change to its code.

Python imports ``sitecustomize`` at start-up. This one imports nothing heavy: it waits for
``diffusers.pipelines.pipeline_utils`` to be imported (a meta-path finder), then wraps the pipeline
classes' ``__call__`` (see ``_accel_autopatch``); ``accel.zero_code`` is imported at the first pipeline
call and reads ``ACCEL_PRESET`` / ``ACCEL_CONFIG``. A script that never imports diffusers pays
nothing, and one that sets environment variables (HF_HOME, ...) before importing diffusers keeps
working. A ``sitecustomize`` this one shadows (a distribution's, a virtualenv's) still runs.
"""

import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_TARGET = "diffusers.pipelines.pipeline_utils"


class _AccelFinder:
    """Finds nothing itself; hands diffusers' pipeline_utils a loader that patches it once executed."""

    def __init__(self):
        self._busy = False

    def find_spec(self, name, path=None, target=None):
        if name != _TARGET or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            _remove_finder()
            import _accel_autopatch

            _accel_autopatch.patch_pipeline_class(module.DiffusionPipeline)

        spec.loader.exec_module = exec_module
        return spec


def _remove_finder():
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AccelFinder)]


def _run_shadowed_sitecustomize():
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    ours = sys.modules.get("sitecustomize")
    sys.modules["sitecustomize"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # as Python does for a failing sitecustomize: say so and go on
        print(f"Error in sitecustomize ({spec.origin}): {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        sys.modules["sitecustomize"] = ours


if _TARGET in sys.modules:  # imported late (someone ran `import sitecustomize`): patch now
    import _accel_autopatch

    _accel_autopatch.patch_pipeline_class(sys.modules[_TARGET].DiffusionPipeline)
else:
    sys.meta_path.insert(0, _AccelFinder())
_run_shadowed_sitecustomize()
