"""Tiny offline pipelines: real diffusers classes, tiny random weights, deterministic."""

import diffusers
import numpy as np
import pytest
import torch

from accel.pipelines import parts, tiny

VIDEO = {"animatediff", "cogvideox", "wan", "wan22", "ltx", "hunyuanvideo"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These models are so small that intra-op threading only adds wake-up
    # latency; on a busy 2-core box the video pipelines run ~10x slower with 2.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(pipe, name, **overrides) -> np.ndarray:
    out = pipe(**tiny.example_inputs(name, **overrides))
    return np.asarray(out.frames if name in VIDEO else out.images)


def modules(pipe) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", tiny.NAMES)
def test_builds_runs_and_is_deterministic(name):
    pipe = tiny.make(name)
    assert type(pipe) is getattr(diffusers, tiny.describe()[name])

    inputs = tiny.example_inputs(name)
    out = run(pipe, name)
    size = (inputs["height"], inputs["width"], 3)
    assert out.shape == ((1, inputs["num_frames"], *size) if name in VIDEO else (1, *size))
    assert np.isfinite(out).all()
    assert out.std() > 0

    # Same pipeline, fresh inputs: no state (scheduler, generator) leaks between calls.
    np.testing.assert_array_equal(run(pipe, name), out)

    again = tiny.make(name)
    for key, module in modules(pipe).items():
        assert same_weights(module, modules(again)[key]), key
    np.testing.assert_array_equal(run(again, name), out)


@pytest.mark.parametrize("name", tiny.NAMES)
def test_seed_changes_every_model(name):
    a, b = modules(tiny.make(name, seed=0)), modules(tiny.make(name, seed=1))
    assert a.keys() == b.keys()
    for key in a:
        assert not same_weights(a[key], b[key]), key


def test_wan22_has_two_distinct_experts():
    pipe = tiny.make("wan22")
    assert pipe.transformer_2 is not None
    assert pipe.config.boundary_ratio == 0.875
    assert not same_weights(pipe.transformer, pipe.transformer_2)

    wan21 = tiny.make("wan")
    assert wan21.transformer_2 is None and wan21.config.boundary_ratio is None


def test_unknown_name_lists_valid_names():
    for fn in (tiny.make, tiny.example_inputs):
        with pytest.raises(ValueError) as err:
            fn("sd99")
        assert all(name in str(err.value) for name in tiny.NAMES)


def test_example_inputs_overrides_and_fresh_generator():
    base = tiny.example_inputs("flux")
    changed = tiny.example_inputs("flux", num_inference_steps=2, height=64, output_type="pt")
    assert changed["num_inference_steps"] == 2 and changed["height"] == 64 and changed["output_type"] == "pt"
    assert changed["width"] == base["width"] and changed["prompt"] == base["prompt"]
    assert changed["generator"] is not base["generator"]
    assert "negative_prompt" not in base  # guidance-distilled
    assert tiny.example_inputs("sd15")["guidance_scale"] > 1


def test_describe_names_real_classes():
    classes = tiny.describe()
    assert tuple(classes) == tiny.NAMES
    assert all(hasattr(diffusers, cls) for cls in classes.values())


def test_make_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tiny.make("pixart")
    assert torch.equal(torch.rand(4), expected)


def test_dtype_keeps_declared_fp32_modules():
    pipe = tiny.make("wan", dtype=torch.bfloat16)
    block = pipe.transformer.blocks[0]
    assert block.attn1.to_q.weight.dtype == torch.bfloat16
    # WanTransformer3DModel._keep_in_fp32_modules, as from_pretrained keeps them.
    assert block.norm2.weight.dtype == torch.float32
    assert block.scale_shift_table.dtype == torch.float32
    assert pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    assert np.isfinite(run(pipe, "wan", num_inference_steps=1)).all()


@pytest.mark.parametrize("build", [parts.clip_tokenizer, parts.t5_tokenizer, parts.llama_tokenizer])
def test_tokenizers_keep_vocabulary_words_whole(build):
    tok = build()
    split = [w for w in parts.WORDS if len(tok(w, add_special_tokens=False).input_ids) != 1]
    assert not split
    # Unknown words still encode (character/byte fallback) and round-trip.
    ids = tok("zebra", add_special_tokens=False).input_ids
    assert len(ids) > 1 and tok.decode(ids).strip() == "zebra"


def test_clip_pools_at_end_of_text():
    pipe = tiny.make("sd15")
    # eos_token_id == 2 would switch CLIPTextModel to argmax-of-ids pooling.
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id != 2
    ids = pipe.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids[0, 3] == pipe.tokenizer.eos_token_id
