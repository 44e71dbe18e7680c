"""`apply_technique`: install the token hooks on every denoiser of a target, through its ledger."""

from __future__ import annotations

from .config import TokenConfig
from .hooks import HOOK_NAME, BasicBlockHook, DiTBlockHook, SelfAttentionFlag, SubmoduleMergeHook
from .state import TokenState

BASIC_BLOCK = "BasicTransformerBlock"


class TokenHandle:
    def __init__(self, cfg: TokenConfig, states: list[TokenState]):
        self.cfg, self.states = cfg, states

    def stats(self) -> dict:
        """Tokens removed per block (average per run) and the ratio realised over the last call."""
        blocks, tokens, removed, built, reused = {}, 0, 0, 0, 0
        for ts in self.states:
            s = ts.stats()
            prefix = f"{ts.adapter.component}." if len(self.states) > 1 else ""
            blocks.update({prefix + k: v for k, v in s["blocks"].items()})
            tokens, removed = tokens + s["tokens"], removed + s["removed"]
            built, reused = built + s["merges_built"], reused + s["merges_reused"]
        reduced = [b for b in blocks.values() if b["removed"]]
        return {
            "method": self.cfg.method,
            "ratio": self.cfg.ratio,
            "realised_ratio": round(removed / tokens, 4) if tokens else 0.0,
            "reduced_blocks": len(reduced),
            "average_removed": round(sum(b["removed"] for b in reduced) / len(reduced), 1) if reduced else 0.0,
            "merges_built": built,
            "merges_reused": reused,
            "blocks": blocks,
        }


def _skip(adapter, cfg, index: int, total: int) -> bool:
    return adapter.family.kind == "dit" and (index < cfg.skip_blocks or index >= total - cfg.skip_blocks)


def apply_technique(target, cfg: TokenConfig) -> TokenHandle:
    """Hook the transformer blocks of each denoiser of ``target`` (an `accel.api.Target`)."""
    states = []
    for adapter in target.adapters:
        ts = TokenState(cfg, target.tracker, adapter)
        target.tracker.on_call_start(ts.reset)
        target.ledger.on_undo(ts.reset)
        states.append(ts)
        sites = {id(s.module): s.role for s in adapter.attention()}
        blocks = adapter.blocks()
        for i, (name, block) in enumerate(blocks):
            if _skip(adapter, cfg, i, len(blocks)):
                continue
            basic = type(block).__name__ == BASIC_BLOCK
            attn1 = getattr(block, "attn1", None)
            if basic and sites.get(id(attn1)) == "temporal":
                continue  # AnimateDiff motion modules: tokens are frames, not an image grid
            if basic and cfg.method != "prune":
                target.ledger.add_hook(block, BasicBlockHook(ts, name), HOOK_NAME)
                if cfg.method == "kv_downsample":
                    target.ledger.add_hook(attn1, SubmoduleMergeHook(ts, pool_keys=True), HOOK_NAME)
                    continue
                for attr, on in (("attn1", cfg.merge_attn), ("attn2", cfg.merge_crossattn), ("ff", cfg.merge_mlp)):
                    sub = getattr(block, attr, None)
                    if on and sub is not None:
                        target.ledger.add_hook(sub, SubmoduleMergeHook(ts), HOOK_NAME)
                continue
            target.ledger.add_hook(block, DiTBlockHook(ts, name), HOOK_NAME)
            if cfg.method == "kv_downsample":
                for sub in block.modules():
                    if sites.get(id(sub)) in ("self", "joint"):
                        target.ledger.add_hook(sub, SelfAttentionFlag(ts), HOOK_NAME)
    return TokenHandle(cfg, states)
