"""`SparseAttention`: one call of masked block-sparse attention, with cached masks, profiling and stats.

The processor hands it q, k, v ([B, H, N, D], model token order) of one attention call together
with the token grid and text span; it regroups tokens into tiles (`layout`), picks the block mask
for the configured pattern (`patterns`), runs the backend (`backends`), applies the optional
Re-ttention correction, and restores the model's token order.
"""

from __future__ import annotations

from collections import Counter

import torch

from . import backends
from .config import AttentionConfig
from .layout import BlockLayout, build_layout, from_blocks, to_blocks
from .patterns import STATIC, SparseMask, dense_mask, kept_mass, pooled_blocks, static_mask, topk_mask

MODEL_ORDER_PATTERNS = (*STATIC, "dense")  # masks built from shapes alone


class SparseAttention:
    def __init__(self, cfg: AttentionConfig, backend: str):
        self.cfg = cfg
        self.backend = backend
        self._site_state: dict = {}  # per site, per pipeline call: head choices, renorm ratios
        self._st_masks: dict = {}  # spatial_temporal: (layout, head choice) -> SparseMask
        self.reset_stats()

    def reset_stats(self) -> None:
        self._site_state.clear()
        self.counts = {"sparse_calls": 0, "dense_calls": 0, "passthrough_calls": 0}
        self.reasons = Counter()  # why calls ran dense (REASONS)
        self.ran = Counter()  # backend -> sparse calls it ran
        self._density = [0.0, 0.0, 0]  # video-pair density sum, with-text density sum, n
        self.heads = {"spatial": 0, "temporal": 0}

    def skip(self, reason: str) -> None:
        """Count one call that ran the module's dense attention, and why (a key of REASONS)."""
        self.counts["passthrough_calls" if reason in PASSTHROUGH else "dense_calls"] += 1
        self.reasons[reason] += 1

    def why_dense(self) -> str | None:
        """When no call ran sparse although some ran: the most common reason, as advice; else None."""
        if self.counts["sparse_calls"] or not self.reasons:
            return None
        reason, n = self.reasons.most_common(1)[0]
        return f"{n} of {sum(self.reasons.values())} calls: {REASONS[reason]}"

    def stats(self) -> dict:
        n = self._density[2]
        ran = self.ran.most_common(1)[0][0] if self.ran else self.backend
        out = {"pattern": self.cfg.pattern, "backend": ran, "configured_backend": self.cfg.backend,
               "backend_calls": dict(self.ran), "density": self.cfg.density,
               **self.counts, "dense_reasons": dict(self.reasons), "why_dense": self.why_dense(),
               "realised_density": round(self._density[0] / n, 6) if n else None,
               "realised_density_with_text": round(self._density[1] / n, 6) if n else None,
               "masks_cached": _cached_masks() + len(self._st_masks), "renorm": self.cfg.renorm}
        if self.cfg.pattern == "spatial_temporal":
            out["heads"] = dict(self.heads)
        return out

    # --- masks --------------------------------------------------------------------------------
    def _mask(self, site_key, layout: BlockLayout, qb, kb, scale) -> SparseMask:
        cfg = self.cfg
        if cfg.pattern == "dense":
            return dense_mask(layout)
        if cfg.pattern == "topk":
            return topk_mask(qb, kb, layout, cfg.density, cfg.topk_mass, scale)
        if cfg.pattern != "spatial_temporal":
            return static_mask(layout, cfg.pattern, cfg.density, cfg.sinks, cfg.local_fraction)
        state = self._site_state.setdefault(site_key, {})
        if "choice" not in state:  # profile once per site and pipeline call
            sp = static_mask(layout, "spatial", cfg.density, 0, 1.0)
            tp = static_mask(layout, "temporal", cfg.density, 0, 1.0)
            m_sp, m_tp = kept_mass(qb, kb, layout, [sp.allowed.to(qb.device), tp.allowed.to(qb.device)],
                                   cfg.profile_rows, scale)
            state["choice"] = tuple(bool(x) for x in (m_sp >= m_tp).tolist())
            self.heads["spatial"] += sum(state["choice"])
            self.heads["temporal"] += len(state["choice"]) - sum(state["choice"])
        key = (id(layout), state["choice"])
        if key not in self._st_masks:
            sp = static_mask(layout, "spatial", cfg.density, 0, 1.0).allowed
            tp = static_mask(layout, "temporal", cfg.density, 0, 1.0).allowed
            choice = torch.tensor(state["choice"], device=sp.device)[None, :, None, None]
            self._st_masks[key] = (layout, SparseMask(torch.where(choice, sp, tp), layout))
        return self._st_masks[key][1]

    # --- one call -----------------------------------------------------------------------------
    def attend(self, q, k, v, scale: float, site_key, grid, text_len: int, text_first: bool):
        """Sparse attention for one call; None when the shape gives nothing to skip (caller runs dense)."""
        layout = build_layout(tuple(grid), int(text_len), bool(text_first), self.cfg.block_size)
        if layout.n_video_blocks <= 1 and self.cfg.pattern != "dense":
            return None
        layout = layout.to(q.device)
        cfg = self.cfg
        kernel = backends.auto_backend(q.device, q.dtype) if self.backend == "auto" else self.backend
        model_order = backends.get(kernel).run_model_order
        if model_order is not None and not cfg.renorm and cfg.pattern in MODEL_ORDER_PATTERNS:
            # masks that need no q/k statistics: a backend that reads and writes the model's order runs on it
            mask = self._mask(site_key, layout, None, None, scale)
            if self.backend == "auto":
                out, ran = backends.run_auto(q, k, v, mask, scale, cfg.flex_compile, model_order=True, backend=kernel)
            else:
                out, ran = model_order(q, k, v, mask, scale), kernel
            self._count(mask, ran)
            return out
        qb, kb, vb = to_blocks(q, layout), to_blocks(k, layout), to_blocks(v, layout)
        mask = self._mask(site_key, layout, qb, kb, scale)
        if mask.allowed.device != q.device:
            mask.allowed = mask.allowed.to(q.device)
        if self.backend == "auto":
            ob, ran = backends.run_auto(qb, kb, vb, mask, scale, cfg.flex_compile, backend=kernel)
        else:
            ob, ran = backends.run(self.backend, qb, kb, vb, mask, scale, cfg.flex_compile), self.backend
        if cfg.renorm and cfg.pattern != "dense":
            ob = self._renorm(site_key, ob, qb, kb, vb, mask, scale)
        self._count(mask, ran)
        return from_blocks(ob, layout)

    def _count(self, mask: SparseMask, ran: str) -> None:
        self.ran[ran] += 1
        self.counts["sparse_calls"] += 1
        self._density[0] += mask.video_density()
        self._density[1] += mask.density()
        self._density[2] += 1

    def _renorm(self, site_key, ob, qb, kb, vb, mask: SparseMask, scale):
        """Re-ttention-style correction: o = r * o_sparse + (1 - r) * mean(v over skipped keys).

        ``r`` is each head's share of softmax mass inside the mask, measured on sampled rows at the
        first sparse call of a pipeline call and reused at later steps (attention statistics drift
        slowly across denoising steps); the skipped keys' values are averaged at the current step.
        """
        layout = mask.layout
        state = self._site_state.setdefault(site_key, {})
        if "r" not in state:
            (r,) = kept_mass(qb, kb, layout, [mask.allowed], self.cfg.profile_rows, scale)
            state["r"] = r.to(ob.dtype)
        r = state["r"][None, :, None, None]  # [1, H, 1, 1]
        B, H, Np, D = ob.shape
        nb, T = layout.n_blocks, layout.block
        counts = layout.block_count.to(vb.dtype)
        vsum = pooled_blocks(vb, layout) * counts[:, None]  # [B, H, nb, D]
        allowed = mask.allowed.to(vb.dtype).expand(B, H, nb, nb)
        kept_sum = allowed @ vsum
        skipped_n = counts.sum() - allowed @ counts  # [B, H, nb]
        skipped_mean = (vsum.sum(2, keepdim=True) - kept_sum) / skipped_n.clamp(min=1)[..., None]
        has_skip = (skipped_n > 0)[..., None]
        o = ob.view(B, H, nb, T, D)
        corrected = r[..., None] * o + (1 - r[..., None]) * skipped_mean[:, :, :, None, :]
        return torch.where(has_skip[..., None], corrected, o).view(B, H, Np, D)


REASONS = {
    "dense_steps": "within attention.dense_steps (configured)",
    "dense_layers": "within attention.dense_layers (configured)",
    "below_min_tokens": "fewer video tokens than attention.min_tokens (sparse attention does not pay there); "
                        "lower min_tokens to use it at this size",
    "one_block": "the video grid fits in one block, so there is nothing to skip; lower attention.block_size",
    "grid_lost": "the attention input does not match the video token grid: a technique that changes the token "
                 "sequence ran first (token reduction; sparse attention and token reduction do not stack, use one), "
                 "or the pipeline adds tokens outside the grid (a Flux Kontext reference image of another size "
                 "than the output)",
    "not_self_attention": "not full self/joint attention over the grid (cross-attention shapes, causal, dropout, "
                          "or a mask other than a text key-padding mask)",
}
PASSTHROUGH = ("grid_lost", "not_self_attention", "one_block")


def _cached_masks() -> int:
    return static_mask.cache_info().currsize
