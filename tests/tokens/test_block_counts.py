"""What the attention projections of one block actually receive, per step and per method.

Counted with forward pre-hooks on ``to_q`` / ``to_k`` (below every hook of ours), so the test
does not trust our own stats: a wrong count, a missing unmerge (the block's output would keep
the reduced length) or a merged query under ``kv_downsample`` fails here.
"""

import pytest
import torch
from helpers.snapshot import run

import accel

RATIO = 0.5


def _first_block(pipe, name):
    if name == "sd15":  # first top-level BasicTransformerBlock
        return pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    return pipe.transformer.blocks[0]  # wan


def _record(pipe, name, config, steps):
    block = _first_block(pipe, name)
    attn = block.attn1
    seen = {"q": [], "k": [], "in": [], "out": []}

    def rows(key):
        def hook(mod, args):
            seen[key].append(args[0].shape[1])
        return hook

    def block_in(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen["in"].append(x.shape[1])

    def block_out(mod, args, kwargs, out):
        y = out if isinstance(out, torch.Tensor) else out[0]
        seen["out"].append(y.shape[1])

    handles = [attn.to_q.register_forward_pre_hook(rows("q")), attn.to_k.register_forward_pre_hook(rows("k")),
               block.register_forward_pre_hook(block_in, with_kwargs=True),
               block.register_forward_hook(block_out, with_kwargs=True)]
    try:
        with accel.applied(pipe, config):
            run(pipe, name, num_inference_steps=steps)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("name", ["sd15", "wan"])
def test_merge_attention_sees_exactly_n_minus_ratio_n_and_the_block_returns_n(tiny_cache, name):
    pipe = tiny_cache(name)
    seen = _record(pipe, name, {"tokens": {"ratio": RATIO}}, steps=2)
    n = seen["in"][0]
    assert set(seen["in"]) == set(seen["out"]) == {n}, "shape not restored after unmerge"
    assert set(seen["q"]) == set(seen["k"]) == {n - int(RATIO * n)}, seen


def test_kv_downsample_keeps_every_query_and_pools_keys_by_whole_windows(tiny_cache):
    pipe = tiny_cache("sd15")  # BasicTransformerBlock: keys/values come from the pooled tokens
    seen = _record(pipe, "sd15", {"tokens": {"ratio": RATIO, "method": "kv_downsample"}}, steps=2)
    n = seen["in"][0]
    assert set(seen["q"]) == set(seen["out"]) == {n}
    # 2x2 windows pooled to one row remove 3 tokens each, as many as fit in int(ratio * n)
    assert set(seen["k"]) == {n - 3 * (int(RATIO * n) // 3)}, seen


@pytest.mark.parametrize("name", ["sd15", "wan"])
def test_prune_recomputes_exactly_the_kept_tokens_between_refreshes(tiny_cache, name):
    pipe = tiny_cache(name)
    seen = _record(pipe, name, {"tokens": {"ratio": RATIO, "method": "prune", "refresh_interval": 2}}, steps=4)
    n = seen["in"][0]
    assert set(seen["out"]) == {n}
    kept = n - int(RATIO * n)
    calls_per_step = len(seen["q"]) // 4  # Wan runs cond and uncond apart; SD1.5 batches them
    per_step = [seen["q"][i * calls_per_step] for i in range(4)]
    assert per_step == [n, kept, n, kept], seen["q"]  # refresh every 2nd run of the block


def test_match_per_block_builds_a_matching_in_every_block(tiny_cache):
    # Default: one matching per step and resolution, reused by every block of that resolution.
    # match_per_block (tomesd's way): each block matches its own input, so merges differ by block.
    pipe = tiny_cache("sd15")
    counts = {}
    for per_block in (False, True):
        with accel.applied(pipe, {"tokens": {"ratio": RATIO, "match_per_block": per_block}}):
            run(pipe, "sd15", num_inference_steps=2)
            st = accel.stats(pipe)["tokens"]
        reduced = sum(b["runs"] for b in st["blocks"].values() if b["removed"] > 0)
        counts[per_block] = (st["merges_built"], st["merges_reused"], reduced)
    built, reused, reduced = counts[False]
    assert built == 2 and reused == reduced - built, counts  # one per step (top level only)
    built, reused, reduced = counts[True]
    assert built == reduced and reused == 0, counts
