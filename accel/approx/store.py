"""`ApproxCache`: a folder of intermediate latents of earlier calls, found by prompt-embedding similarity.

Each entry is one safetensors file written once (to a temporary name, then renamed, so a kill leaves
no partial entry): the pooled prompt embedding, the latents at a few steps, and metadata (format,
scope key, step count, the prompt). An entry serves only calls of the same scope: the scope key is a
hash of the model, scheduler, sizes, frames, guidance, negative prompt, steps and dtype, so a latent is
never served across any of them. Usage (hits, steps saved, last use) lives in ``usage.json``,
rewritten atomically; the size limit evicts the entries whose hits saved the fewest steps, then the
least recently used (NIRVANA's utility: hits x steps saved, recency). A file that cannot be read or
is not ours is skipped with a warning, never served.

Nearest-neighbour search is a matrix product over the scope's embeddings in plain torch: for the
thousands of entries a folder holds it takes well under a millisecond, so no index library is used.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "accel.approx/1"
SUFFIX = ".safetensors"
_TMP_PREFIX = ".tmp-"
logger = logging.getLogger("accel.approx")


@dataclass
class Entry:
    id: str
    scope: str
    steps: int  # the call's step count
    stored: tuple[int, ...]  # steps whose latent the entry holds (latent after that many steps)
    bytes: int
    prompt: str = ""
    hits: int = 0
    saved: int = 0  # steps saved by its hits
    last_used: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Match:
    entry: Entry
    similarity: float


class ApproxCache:
    """The entries of one folder. ``max_bytes`` bounds the total size of the entry files."""

    def __init__(self, folder: str | os.PathLike, max_bytes: int = 10 * 2**30):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"approx.dir {str(folder)!r}: cannot create the cache folder ({e.strerror or e}); "
                          "give a writable folder") from None
        self.max_bytes = max_bytes
        self.entries: dict[str, Entry] = {}
        self._embeddings: dict[str, torch.Tensor] = {}  # id -> unit-norm float32 embedding (CPU)
        self.skipped: list[str] = []  # files skipped as corrupt or foreign, with why
        self.evicted = 0
        self._lock = threading.RLock()  # the app's workers share one cache from several threads
        self._seen_mtime = None
        self._bad: set[str] = set()
        self._scan()

    # --- reading ------------------------------------------------------------------------------
    def _scan(self) -> None:
        """Read the entries not read yet, and forget those gone: other processes (ranks of a batch) add and
        evict in the same folder. Runs when the folder's modification time changed."""
        from safetensors import safe_open

        mtime = self.folder.stat().st_mtime_ns
        if mtime == self._seen_mtime:
            return
        self._seen_mtime = mtime
        usage = self._read_usage()
        present = set()
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            if path.name.startswith("."):
                continue
            eid = path.name[: -len(SUFFIX)]
            present.add(eid)
            if eid in self.entries or eid in self._bad:
                continue
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    if meta.get("format") != FORMAT:
                        raise ValueError(f"not an accel approximate-cache entry (format {meta.get('format')!r})")
                    emb = f.get_tensor("embedding").float()
                    stored = tuple(int(s) for s in json.loads(meta["stored"]))
                    missing = [s for s in stored if f"latent_{s}" not in f.keys()]
                    if missing:
                        raise ValueError(f"latents for steps {missing} are missing")
                entry = Entry(eid, meta["scope"], int(meta["steps"]), stored, path.stat().st_size,
                              meta.get("prompt", ""))
            except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, never served
                why = f"{path.name}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
                self.skipped.append(why)
                self._bad.add(eid)
                logger.warning("approximate cache: skipping %s", why)
                continue
            u = usage.get(eid, {})
            entry.hits, entry.saved = int(u.get("hits", 0)), int(u.get("saved", 0))
            entry.last_used = float(u.get("last_used", path.stat().st_mtime))
            self.entries[eid] = entry
            self._embeddings[eid] = _unit(emb)
        for eid in [e for e in self.entries if e not in present]:  # evicted by another process
            del self.entries[eid], self._embeddings[eid]
        for tmp in self.folder.glob(f"{_TMP_PREFIX}*"):  # left by a killed writer; never read
            if time.time() - tmp.stat().st_mtime > 3600:
                tmp.unlink(missing_ok=True)

    def _read_usage(self) -> dict:
        try:
            data = json.loads((self.folder / "usage.json").read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def nearest(self, scope: str, embedding: torch.Tensor) -> Match | None:
        """The entry of ``scope`` whose embedding is closest (cosine) to ``embedding``, or None."""
        q = _unit(embedding.detach().float().cpu().reshape(-1))
        with self._lock:
            self._scan()
            ids = [eid for eid, e in self.entries.items() if e.scope == scope]
            if not ids:
                return None
            m = torch.stack([self._embeddings[i] for i in ids])
            if m.shape[1] != q.shape[0]:
                return None
            sims = m @ q
            best = int(sims.argmax())
            return Match(self.entries[ids[best]], min(1.0, float(sims[best])))

    def latent(self, entry: Entry, step: int) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.folder / f"{entry.id}{SUFFIX}"), framework="pt") as f:
            return f.get_tensor(f"latent_{step}")

    # --- writing ------------------------------------------------------------------------------
    def add(self, scope: str, steps: int, embedding: torch.Tensor, latents: dict[int, torch.Tensor],
            prompt: str = "") -> Entry:
        """Store one full call's latents (``{steps done: latent}``) atomically; evicts to the size limit."""
        from safetensors.torch import save_file

        eid = f"{scope[:12]}-{uuid.uuid4().hex[:12]}"
        tensors = {"embedding": embedding.detach().float().cpu().reshape(-1).contiguous()}
        tensors.update({f"latent_{s}": t.detach().cpu().contiguous() for s, t in latents.items()})
        meta = {"format": FORMAT, "scope": scope, "steps": str(steps), "stored": json.dumps(sorted(latents)),
                "prompt": prompt[:500]}
        tmp = self.folder / f"{_TMP_PREFIX}{eid}{SUFFIX}.part"  # a name the scan never reads
        final = self.folder / f"{eid}{SUFFIX}"
        try:
            save_file(tensors, str(tmp), metadata=meta)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        entry = Entry(eid, scope, steps, tuple(sorted(latents)), final.stat().st_size, prompt[:500])
        with self._lock:
            self.entries[eid] = entry
            self._embeddings[eid] = _unit(tensors["embedding"])
            self._evict(keep=eid)
            self._write_usage()
        return entry

    def record_hit(self, entry: Entry, steps_saved: int) -> None:
        with self._lock:
            entry.hits += 1
            entry.saved += steps_saved
            entry.last_used = time.time()
            self._write_usage()

    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.entries.values())

    def _evict(self, keep: str) -> None:
        # NIRVANA's utility: the steps an entry's hits saved (hits x K), then recency.
        order = sorted((e for e in self.entries.values() if e.id != keep), key=lambda e: (e.saved, e.last_used))
        total = self.total_bytes()
        for e in order:
            if total <= self.max_bytes:
                break
            (self.folder / f"{e.id}{SUFFIX}").unlink(missing_ok=True)  # another process may have evicted it
            total -= e.bytes
            del self.entries[e.id]
            del self._embeddings[e.id]
            self.evicted += 1

    def _write_usage(self) -> None:
        data = {e.id: {"hits": e.hits, "saved": e.saved, "last_used": e.last_used} for e in self.entries.values()}
        tmp = self.folder / f"{_TMP_PREFIX}usage-{uuid.uuid4().hex[:8]}.json"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.folder / "usage.json")


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-12)
