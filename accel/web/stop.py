"""Stopping the app's runs: the Stop button, and a client that went away.

Stop does not cancel the gradio event: a cancelled event can show nothing, so the page would never
learn how far the run got. Instead it sets the stop flag of its session's runs (`Runs.stop`); the
pipeline stops at the end of its current step and the run answers "stopped after N of M steps". A
run of that session still waiting in the queue stops as it starts.

A client that goes away is seen through gradio's queue (`client_watch`): when a tab closes, its
heartbeat stream ends and gradio marks the session's events closed; when an event stream drops (a
client killed or dropped), gradio marks its events not alive. Neither cancels the running handler,
so the run checks at every step and stops itself, which frees the worker for the next request.
A client's own ``cancel()`` still cancels the event; the handler sets the stop flag then too.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time


class Runs:
    """The stop flags of the runs in flight, per session (a page load, or one API client)."""

    def __init__(self, remember: int = 1024):
        self._lock = threading.Lock()
        self._flags: dict[str, set[threading.Event]] = {}
        self._stopped_at: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._remember = remember

    @contextlib.contextmanager
    def track(self, session: str, cancel: threading.Event, queued_at: float):
        """Register ``cancel`` for ``session`` while the block runs; set it at once when Stop was
        pressed after this run was queued (``queued_at``, `time.monotonic`)."""
        with self._lock:
            if self._stopped_at.get(session, float("-inf")) >= queued_at:
                cancel.set()
            self._flags.setdefault(session, set()).add(cancel)
        try:
            yield cancel
        finally:
            with self._lock:
                flags = self._flags.get(session, set())
                flags.discard(cancel)
                if not flags:
                    self._flags.pop(session, None)

    def stop(self, session: str) -> int:
        """Stop every run of ``session``, and those of it still queued; returns how many were running."""
        with self._lock:
            self._stopped_at[session] = time.monotonic()
            self._stopped_at.move_to_end(session)
            while len(self._stopped_at) > self._remember:
                self._stopped_at.popitem(last=False)
            flags = list(self._flags.get(session, ()))
        for flag in flags:
            flag.set()
        return len(flags)


def client_watch():
    """``(gone, queued_at)`` for the gradio event being handled: ``gone()`` is True once its client
    went away; ``queued_at`` is when it joined the queue. Outside a queued event: never gone, now."""
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    queue = getattr(blocks, "_queue", None)
    jobs = getattr(queue, "active_jobs", None) or []
    event = next((e for job in jobs if job for e in job if getattr(e, "_id", None) == event_id), None)
    if event is None:
        return (lambda: False), time.monotonic()
    return (lambda: not event.alive or event.closed), event.enqueue_time
