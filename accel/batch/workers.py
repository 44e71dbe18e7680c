"""Processes for `accel batch`: the rank a process is, `--gpus N` spawning, signals, and a folder lock.

A process learns its rank from the variables ``torchrun`` and ``accelerate launch`` set (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), so multi-node runs go through
their rendezvous. ``--gpus N`` sets the same variables for N children of its own. The ranks only
talk to agree on a run id and to meet at the end (gloo, on CPU, whatever the device): which rows a
rank does is fixed by the row index, so no rank waits on another while working.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Rank:
    """This process in the batch's world. With ``degree`` > 1 (``accel batch --parallel``) the world
    splits into copies of ``degree`` consecutive ranks that make each image together; rows are
    sharded across copies, and a copy's first rank (its leader) alone writes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    degree: int = 1

    @classmethod
    def from_env(cls) -> "Rank":
        env = os.environ
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise RuntimeError("RANK/WORLD_SIZE/LOCAL_RANK must be whole numbers") from None
        if not 0 <= rank < max(world, 1):
            raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return cls(rank, max(world, 1), local)

    @property
    def copy(self) -> int:
        return self.rank // self.degree

    @property
    def copies(self) -> int:
        return self.world // self.degree

    @property
    def leader(self) -> bool:
        return self.rank % self.degree == 0

    def owns(self, index: int) -> bool:
        return index % self.copies == self.copy


class Group:
    """A gloo process group for agreement and the final meeting; a no-op for a single process.

    ``backend`` is that of the default group this creates (``nccl`` when the parallel strategies of
    ``--parallel`` run on GPUs); the meetings always go through a gloo group of their own."""

    def __init__(self, rank: Rank, backend: str = "gloo"):
        self.rank = rank
        self.dist = None
        self.copy_group = None
        if rank.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                for var in ("MASTER_ADDR", "MASTER_PORT"):
                    if var not in os.environ:
                        raise RuntimeError(f"WORLD_SIZE={rank.world} but {var} is not set; launch with torchrun, "
                                           "accelerate launch, or `accel batch --gpus N`")
                dist.init_process_group(backend, rank=rank.rank, world_size=rank.world, timeout=LONG)
                self._owned = True
            else:
                self._owned = False
            self.dist = dist
            self.group = dist.new_group(backend="gloo", timeout=LONG)
            if rank.degree > 1:  # new_group is collective: every rank creates every copy's group
                for c in range(rank.copies):
                    g = dist.new_group(list(range(c * rank.degree, (c + 1) * rank.degree)), backend="gloo",
                                       timeout=LONG)
                    if c == rank.copy:
                        self.copy_group = g

    def from_leader(self, obj):
        """The copy leader's ``obj`` on every rank of its copy (they must work on the same rows)."""
        if self.copy_group is None:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=self.rank.copy * self.rank.degree, group=self.copy_group)
        return box[0]

    def run_id(self) -> str:
        ids = [uuid.uuid4().hex[:12]]
        if self.dist:
            self.dist.broadcast_object_list(ids, src=0, group=self.group)
        return ids[0]

    def wait_all(self, poll=None, every: float = 0.5) -> None:
        """Meet every rank here; ``poll()`` runs meanwhile (rank 0 updates its progress bar)."""
        if not self.dist:
            return
        import time

        work = self.dist.barrier(group=self.group, async_op=True)
        while poll is not None and not work.is_completed():
            poll()
            time.sleep(every)
        work.wait()

    def gather(self, obj) -> list:
        if not self.dist:
            return [obj]
        out = [None] * self.rank.world
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def close(self) -> None:
        if self.dist and self._owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


# Ranks finish their shards at different times; a short timeout would kill the early ones.
LONG = datetime.timedelta(days=7)


class Interrupted(BaseException):
    """SIGTERM/SIGINT arrived; a BaseException so no row's error handling swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """Turn SIGTERM/SIGINT into `Interrupted`, except inside `commit()`, where they wait for its end.

    An interrupted row leaves no file behind (the atomic writers remove their temporary files on the
    way out); a row being committed (output, sidecar, manifest line) finishes first.
    """

    def __init__(self):
        self._depth = 0
        self._pending = None
        self._fired = False
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handle(self, signum, frame):
        # Only the first signal counts: a second one (Ctrl-C reaches a whole process group, and
        # `--gpus` forwards it too) must not cut the clean-up of the first short.
        if self._fired:
            return
        self._fired = True
        if self._depth:
            self._pending = signum
        else:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def commit(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth and self._pending is not None:
                signum, self._pending = self._pending, None
                raise Interrupted(signum)


@contextlib.contextmanager
def folder_lock(folder: Path, rank: int):
    """One writer per (folder, rank): a second `accel batch` on the same folder stops with a clear error."""
    import fcntl

    path = Path(folder) / f".accel-batch.rank{rank}.lock"
    while True:
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise RuntimeError(f"another accel batch is writing to {str(folder)!r} (rank {rank}); wait for it to "
                               "finish or give another --out") from None
        # the holder before us removes the file as it lets go: a lock on a removed file guards nothing, so retry
        if path.exists() and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
            break
        f.close()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding the lock: a finished batch leaves no lock file behind
        f.close()


def spawn(n: int, argv: list[str]) -> int:
    """Run ``python -m accel <argv>`` as ranks 0..n-1 of one group on this machine; their combined status.

    Each child gets one GPU (``LOCAL_RANK``) when there are GPUs; on CPU the cores are split between
    them. SIGTERM/SIGINT are passed on; if a child dies abnormally the others are stopped.
    """
    import time

    import torch

    from ..parallel.runtime import free_port

    port = free_port()
    cpu_threads = None
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        cpu_threads = str(max(1, (os.cpu_count() or 1) // n))
    procs = []
    for r in range(n):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(r),
               "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        if cpu_threads:
            env["OMP_NUM_THREADS"] = cpu_threads
        procs.append(subprocess.Popen([sys.executable, "-m", "accel", *argv], env=env))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes: dict[int, int] = {}
        while len(codes) < n:
            for r, p in enumerate(procs):
                if r not in codes and p.poll() is not None:
                    codes[r] = p.returncode
                    if p.returncode not in (0, 1):  # 1: some rows failed, which the others report too
                        for q in procs:
                            if q.poll() is None:
                                q.terminate()
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    bad = [c for c in codes.values() if c not in (0, 1)]
    if bad:
        return 128 - bad[0] if bad[0] < 0 else bad[0]
    return max(codes.values())
