"""Token merging and pruning. Configured by `accel.TokenConfig`; see config.py.

``apply_technique(target, cfg)`` hooks the transformer blocks (hooks.py); matching.py builds the
index tensors; blockio.py reduces a block's inputs (rotary tables, masks) with its tokens.
"""

from .._lazy import lazy

__getattr__, __dir__ = lazy(__name__, dict.fromkeys(("TokenHandle", "apply_technique"), ".technique"))

__all__ = ["apply_technique", "TokenHandle"]
