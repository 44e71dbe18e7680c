"""This process's role among the processes that run a pipeline's calls together, for techniques to ask.

`accel.parallelize` spreads one call over several processes (ranks); every rank runs the same call,
one of them writes what the call produces. It records that here (`set_role`), and a technique that
writes files or takes a decision every rank must share (the approximate cache) asks here
(`writes_files`, `decide`), without importing the parallel strategies. A process that runs its calls
alone (the default) writes, and decides alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .patching import Ledger

_ATTR = "_accel_role"


@dataclass(frozen=True)
class Role:
    """What this process does for a pipeline's calls, among the processes that run each call together.

    Args:
        writes_files: whether this process writes the files a call produces (outputs, cache entries): every
            process that runs its calls alone, one per group when a call is spread over several.
        decide: ``decide(fn)`` runs ``fn`` on the process that writes files and returns its result on every
            process of the group (a collective: each process calls it at the same point of the call).
    """

    writes_files: bool = True
    decide: Callable[[Callable[[], Any]], Any] | None = None


def set_role(target, role: Role, ledger: Ledger) -> None:
    """Record this process's `Role` for ``target`` (undone with ``ledger``).

    Args:
        target: the pipeline (or bare denoiser) whose calls the role is about.
        role: the role.
        ledger: the ledger of whoever sets it (`accel.parallelize`).
    """
    ledger.set_attr(target, _ATTR, role)


def role_of(target) -> Role:
    """This process's `Role` for ``target``; a process on its own (the default) writes and decides alone."""
    return target.__dict__.get(_ATTR) or Role()


def writes_files(target) -> bool:
    """Whether this process writes the files of ``target``'s calls.

    Returns:
        True when this process runs the calls alone, or is the one writer of the processes running them together.
    """
    return role_of(target).writes_files


def decide(target, fn: Callable[[], Any]) -> Any:
    """One decision for every process running ``target``'s call: ``fn()`` of the writing process.

    Args:
        target: the pipeline whose call needs the decision.
        fn: computes the decision; runs on the writing process only; its result must pickle.

    Returns:
        The writing process's result, on every process of the group (``fn()`` for a process on its own).
    """
    role = role_of(target)
    return fn() if role.decide is None else role.decide(fn)
