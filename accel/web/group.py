"""A parallel worker group behind the web app: ``accel app --parallel cfg=2``.

Rank 0 serves the page and runs the `accel.web.engine.Engine`; the other ranks follow. Every
action of a request that touches the pipeline (load another model, remove or apply the
acceleration, call it) is first broadcast from rank 0, and the followers do the same with the same
arguments and seed, so the collectives of the parallel strategies meet. Stop is mirrored too: at
the end of every step rank 0 broadcasts whether to stop, so every rank skips the same remaining
steps. The messages go over a gloo group of their own (CPU objects, whatever the device).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import api
from ..config import Config
from ..pipelines.call import is_video
from ..pipelines.load import ModelLoadError
from .engine import request_kwargs


class Leader:
    """Rank 0's end: `send` an action before doing it; `step` decides, for every rank, whether to stop."""

    def __init__(self, group):
        self.group = group

    def send(self, *message) -> None:
        dist.broadcast_object_list([message], src=0, group=self.group)

    def step(self, stop: bool) -> bool:
        return _stop_flag(self.group, stop)

    def close(self) -> None:
        self.send("quit")


def _stop_flag(group, stop: bool) -> bool:
    flag = torch.tensor([int(stop)])  # on the host by design: the message group is gloo, whose tensors live on the CPU
    dist.broadcast(flag, src=0, group=group)
    return bool(flag.item())


def message_group():
    """The gloo group the app's messages use (collective: every rank calls it once, at the start)."""
    return dist.new_group(backend="gloo")


def follow(loader, model: str, group) -> None:
    """A follower rank's loop: do what rank 0 broadcasts until it says ``quit``."""
    pipe = loader(model, 0)
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        action, *args = box[0]
        if action == "quit":
            return
        if action == "model":
            pipe = None
            try:
                pipe, model = loader(args[0], 0), args[0]
            except (ModelLoadError, ValueError):  # rank 0 falls back to its served model as well
                pipe = loader(model, 0)
        elif action == "remove":
            api.remove(pipe)
        elif action == "apply":
            try:
                api.apply(pipe, Config.from_dict(args[0]))
            except ValueError:
                pass  # rank 0 reports it to the page and sends no call
        elif action == "call":
            req = args[0]
            kw = request_kwargs(pipe, model, is_video(pipe), req)
            if args[1]:  # rank 0 watches for Stop after every step
                def step_end(p, i, t, tensors):
                    if _stop_flag(group, False):
                        p._interrupt = True
                    return {}

                kw["callback_on_step_end"] = step_end
            try:
                pipe(**kw)
            except (ValueError, TypeError):
                pass  # the same check failed on rank 0, which reports it
