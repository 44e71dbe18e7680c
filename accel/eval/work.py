"""The work a call really did: denoiser stages computed, counted from outside, the same way for ours and the peers.

A step cache (ours, diffusers', cache-dit's, DeepCache) skips a stage by not running its body: the stage's
module may still be called (its hook returns the cached output), but none of its layers run. So a stage
counts as computed when one of the layers inside it ran between the stage's entry and exit. The stages
are `accel.families.Adapter.stages` (DiT blocks; a UNet's resnets, attentions, resamplers and mid block).

    with StageWork(pipe) as work:
        pipe(...)
    work.computed, work.entered    # stages whose layers ran / stages called
"""

from __future__ import annotations

import torch

from ..families import Adapter, denoisers_of


class StageWork:
    """Counts, while entered, the denoiser stages whose layers ran (``computed``) and were called (``entered``)."""

    def __init__(self, pipe):
        self.stages = [m for name, den in denoisers_of(pipe) for _, m, _ in Adapter(den, name).stages()]
        self.computed = self.entered = 0
        self._handles: list = []
        self._ran: list[int] = []

    def __enter__(self) -> StageWork:
        for stage in self.stages:
            leaves = [m for m in stage.modules() if any(True for _ in m.parameters(recurse=False))] or [stage]
            self._handles.append(stage.register_forward_pre_hook(self._enter))
            self._handles.append(stage.register_forward_hook(self._exit))
            for leaf in leaves:
                if leaf is not stage:
                    self._handles.append(leaf.register_forward_pre_hook(self._layer))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _enter(self, module, args):
        self._ran.append(0)

    def _layer(self, module, args):
        if self._ran:
            self._ran[-1] += 1

    def _exit(self, module, args, output):
        ran = self._ran.pop() if self._ran else 0
        self.entered += 1
        if ran or _is_leaf(module):
            self.computed += 1


def _is_leaf(module: torch.nn.Module) -> bool:
    """A stage that is itself one layer (a UNet's ``conv_in``): calling it is computing it."""
    return next(module.children(), None) is None
