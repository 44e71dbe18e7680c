"""Text tokens are never merged; merged image tokens attend at their destinations' rotary positions.

Both are checked on what the attention modules actually receive, captured with forward
pre-hooks at the first merged block of the first step (where inputs are still identical to the
unmerged run's).
"""

import torch
from helpers.snapshot import run

import accel
from accel.families import bind_inputs
from accel.tokens import matching


def _capture(module, store):
    def hook(mod, args, kwargs):
        store.append({k: v for k, v in kwargs.items()} | {"_args": args})
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def _first_attn_inputs(pipe, name, block_attr, config=None):
    store = []
    block = getattr(pipe.transformer, block_attr)[0]
    handle = _capture(block.attn, store)
    try:
        if config is None:
            run(pipe, name, num_inference_steps=1)
        else:
            with accel.applied(pipe, config):
                run(pipe, name, num_inference_steps=1)
    finally:
        handle.remove()
    return store[0]


def _hidden(call):
    return call["_args"][0] if call.get("_args") else call["hidden_states"]


def test_joint_attention_text_tokens_are_untouched(tiny_cache):
    """Flux double blocks get the text apart: it must reach attention exactly as without merging.
    Single blocks (Flux: [text, image], text first; HunyuanVideo: [image, text], text last) hold
    text and image in one sequence: its text rows must be exactly the normalised text the block was
    given (a merged text token would change their count or values)."""
    pipe = tiny_cache("flux")
    base = _first_attn_inputs(pipe, "flux", "transformer_blocks")
    merged = _first_attn_inputs(pipe, "flux", "transformer_blocks", {"tokens": {"ratio": 0.5}})
    assert torch.equal(base["encoder_hidden_states"], merged["encoder_hidden_states"]), "text tokens changed"
    assert _hidden(merged).shape[1] < _hidden(base).shape[1], "image tokens were not merged"
    for name, text_first in (("flux", True), ("hunyuanvideo", False)):
        pipe = tiny_cache(name)
        block = pipe.transformer.single_transformer_blocks[0]
        block_calls, attn_calls = [], []
        handles = [_capture(block, block_calls), _capture(block.attn, attn_calls)]
        try:
            with accel.applied(pipe, {"tokens": {"ratio": 0.5}}):
                run(pipe, name, num_inference_steps=1)
        finally:
            for h in handles:
                h.remove()
        call = bind_inputs(block, block_calls[0].pop("_args"), block_calls[0])
        seq = _hidden(attn_calls[0])
        text = call["encoder_hidden_states"]
        n_img = _hidden(call).shape[1]  # the block's input, before our hook merges it
        text_len = text.shape[1]
        attn_text = attn_calls[0].get("encoder_hidden_states")
        if attn_text is not None:  # HunyuanVideo hands attention [image] and [text] apart
            seq = torch.cat([seq, attn_text], dim=1)
        assert seq.shape[1] == text_len + n_img - int(0.5 * n_img), "not [all text, merged image]"
        with torch.no_grad():
            text_normed = block.norm(text, emb=call["temb"])[0]
        rows = seq[:, :text_len] if text_first else seq[:, -text_len:]
        torch.testing.assert_close(rows, text_normed, rtol=0, atol=1e-6, msg="a text token was merged")


def _text_len(pipe, name):
    seen = {}

    def hook(m, a, kw):
        seen.setdefault("t", kw["encoder_hidden_states"].shape[1])

    h = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run(pipe, name, num_inference_steps=1)
    finally:
        h.remove()
    return seen["t"]


def test_prune_never_drops_text_tokens(tiny_cache):
    """At the second (pruned) step the single block's text rows keep their full length."""
    pipe = tiny_cache("flux")
    text_len = _text_len(pipe, "flux")
    lengths = []
    block = pipe.transformer.single_transformer_blocks[0]

    def hook(m, a, kw):
        lengths.append(_hidden({**kw, "_args": a}).shape[1])

    h = block.attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with accel.applied(pipe, {"tokens": {"ratio": 0.5, "method": "prune", "refresh_interval": 2}}):
            run(pipe, "flux", num_inference_steps=2)
    finally:
        h.remove()
    full, pruned = lengths
    n_img = full - text_len
    assert pruned == text_len + n_img - int(0.5 * n_img)


def test_merged_tokens_use_their_destinations_rotary_positions(tiny_cache, monkeypatch):
    pipe = tiny_cache("flux")
    base = _first_attn_inputs(pipe, "flux", "transformer_blocks")
    keeps = []
    orig = matching.bipartite

    def spy(*a, **kw):
        m = orig(*a, **kw)
        keeps.append(m.keep[0].clone())
        return m

    monkeypatch.setattr(matching, "bipartite", spy)
    merged = _first_attn_inputs(pipe, "flux", "transformer_blocks", {"tokens": {"ratio": 0.5}})
    cos, sin = base["image_rotary_emb"]
    cos_m, sin_m = merged["image_rotary_emb"]
    text_len = base["encoder_hidden_states"].shape[1]
    keep = keeps[0]
    expected = torch.cat([torch.arange(text_len), text_len + keep])
    assert torch.equal(cos_m, cos[expected]) and torch.equal(sin_m, sin[expected])
    assert cos_m.shape[0] == text_len + _hidden(merged).shape[1]
