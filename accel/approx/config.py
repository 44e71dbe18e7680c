"""`ApproxCacheConfig`: request-level approximate caching (NIRVANA) across pipeline calls."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_base import ConfigBase, ConfigError, spec

# NIRVANA's policy shape: the closer the match, the more leading steps are skipped. Similarities are cosine
# similarities of the pipeline's own pooled prompt embeddings; the skip is a fraction of the call's steps.
# Measured on ref-sd (BENCHMARKS.md, "Approximate caching"); `accel.eval.approx_policy` measures another model.
SIMILARITY = (0.97, 0.93, 0.88)
SKIP = (0.4, 0.3, 0.2)


@dataclass(frozen=True)
class ApproxCacheConfig(ConfigBase):
    """Approximate caching across calls (NIRVANA, NSDI 2024).

    Important: ``dir`` (the cache folder; empty is off). A call whose prompt is close to an earlier
    prompt's (same model, scheduler, size, frames, guidance, negative prompt, steps and dtype) starts from
    that call's stored latent at step K and skips the first K steps; K comes from the similarity by the
    table ``similarity`` -> ``skip`` (the first threshold met wins). A call that finds no match runs fully
    and stores its latents at the fractions ``store_at`` of its steps.
    Tinkering: ``max_gb`` (size limit of the folder's entries; the least useful are evicted: fewest steps
    saved by their hits, then least recently used).
    """

    section = "approx"
    dir: str = spec("", help="cache folder (created if missing); empty turns the approximate cache off")
    similarity: tuple[float, ...] = spec(SIMILARITY, min=-1.0, max=1.0,
                                         help="cosine similarity thresholds of the policy table, descending")
    skip: tuple[float, ...] = spec(SKIP, min=0.0, max=0.9,
                                   help="fraction of the steps skipped at each similarity threshold")
    store_at: tuple[float, ...] = spec((0.1, 0.2, 0.3, 0.4, 0.5), min=0.0, max=0.9,
                                       help="fractions of the steps at which a full run stores its latent")
    max_gb: float = spec(10.0, min=0.0, min_exclusive=True, help="size limit of the cache folder's entries")

    @property
    def enabled(self) -> bool:
        return bool(self.dir)

    def validate(self) -> None:
        if len(self.similarity) != len(self.skip):
            raise ConfigError(f"approx.skip: {len(self.skip)} values for {len(self.similarity)} similarity "
                              "thresholds; give one skip fraction per threshold")
        if list(self.similarity) != sorted(self.similarity, reverse=True):
            raise ConfigError(f"approx.similarity: {list(self.similarity)} must be in descending order "
                              "(the first threshold a match meets picks its skip)")
        if self.enabled and not self.store_at:
            raise ConfigError("approx.store_at: empty; give the fractions of the steps at which latents are stored")


PRESETS: dict = {}  # never on by a preset: it needs a folder, and it changes outputs across calls
