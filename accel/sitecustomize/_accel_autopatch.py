"""Wrap every diffusers pipeline class's ``__call__`` so the first call of each pipeline applies accel.

Used by `accel run` (through ``sitecustomize``) and by ``import accel.auto``, and only in a process
that opted in to one of them. This is the one place accel changes classes: the design otherwise
patches instances only, but a zero-code patch must catch pipelines it never sees being made
(``from_pretrained``, a constructor, ``tiny.make``, a custom subclass). It wraps diffusers' own
classes, never a user's object, and it applies accel at the first *call* rather than at
construction, so a script may still swap the scheduler, move the pipeline to a device or enable
offloading before generating.

This file sits outside the ``accel`` package on purpose: ``sitecustomize`` installs it while
diffusers is still being imported, when importing accel (torch, diffusers.hooks) would be too
early. Nothing here imports accel; the wrapper imports
``accel.zero_code`` at the first pipeline call.
"""

import functools
import weakref

_MARK = "_accel_auto_wrapped"
_depth = weakref.WeakKeyDictionary()  # pipeline -> nesting of wrapped __call__s (a subclass calling super())


def patch_pipeline_class(base) -> None:
    """Wrap ``__call__`` of every existing and future subclass of ``base`` (diffusers' DiffusionPipeline)."""
    if base.__dict__.get(_MARK):
        return
    previous = base.__dict__.get("__init_subclass__")

    def __init_subclass__(cls, **kwargs):
        if previous is not None:
            previous.__func__(cls, **kwargs)
        else:
            super(base, cls).__init_subclass__(**kwargs)
        _wrap(cls)

    base.__init_subclass__ = classmethod(__init_subclass__)
    setattr(base, _MARK, True)
    stack = list(base.__subclasses__())
    while stack:
        cls = stack.pop()
        _wrap(cls)
        stack.extend(cls.__subclasses__())


def _wrap(cls) -> None:
    call = cls.__dict__.get("__call__")
    if call is None or getattr(call, _MARK, False):
        return

    @functools.wraps(call)
    def __call__(self, *args, **kwargs):
        from accel import zero_code as auto

        depth = _depth.get(self, 0)
        if depth == 0:
            auto.before_call(self)
        _depth[self] = depth + 1
        try:
            return call(self, *args, **kwargs)
        finally:
            _depth[self] = depth
            if depth == 0:
                auto.after_call(self)

    setattr(__call__, _MARK, True)
    cls.__call__ = __call__
