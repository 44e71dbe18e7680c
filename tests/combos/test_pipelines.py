"""Every technique on pipelines beyond text-to-image: img2img, inpaint, Kontext, Fill, image-to-video,
video-to-video, ControlNet (SD1.5, Flux, SD3) and IP-Adapter (SD1.5), built from the tiny families'
components (variants.py).

Per pipeline x technique: engaged (its counts in `accel.stats`), within the technique's floor of the same
pipeline without accel (common.FLOOR_DB), and `remove` restores the output bitwise. ControlNet gets two
more checks: its residuals reach the denoiser in the steps the cache reuses, and the block cache keeps
them out of what it caches (the denoiser's forward adds them between blocks at every step). IP-Adapter:
its image prompt still steers the output while each technique is applied.
"""

import numpy as np
import pytest
from helpers.snapshot import state_of

import accel
from accel.config_base import ConfigError
from accel.eval.metrics import psnr
from combos import variants
from combos.common import FLOOR_DB, TECHNIQUES, check_technique, config


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("name", variants.NAMES)
def test_technique_on_pipeline(name, technique):
    pipe, family, call = variants.build(name)
    ref = variants.reference(name)
    before = state_of(pipe)
    check_technique(pipe, call, technique, family, ref)
    assert state_of(pipe) == before


def _reused_steps(pipe) -> list:
    return [step for _, step, action, _ in pipe.__dict__["_accel"].handles["cache"].trace() if action == "reuse"]


def test_sd15_controlnet_residuals_reach_the_steps_deepcache_reuses():
    """ControlNet applied at one step only (``control_guidance_start/end``), a step DeepCache reuses: the
    output must follow the control image, through the UNet's outer skip connection that a reused step
    still computes. A cache that dropped the residuals in reused steps gives the same output for any
    control image."""
    pipe, _, call = variants.build("sd15-controlnet")
    only_step_1 = dict(control_guidance_start=0.25, control_guidance_end=0.5)  # step 1 of 4
    refs = [call(image=variants.image(seed), **only_step_1) for seed in (1, 2)]
    assert not np.array_equal(*refs)
    with accel.applied(pipe, {"cache": {"method": "deepcache", "interval": 2}}):
        pipe.__dict__["_accel"].handles["cache"].trace()  # record reuse decisions
        outs = [call(image=variants.image(seed), **only_step_1) for seed in (1, 2)]
        assert _reused_steps(pipe) == [1, 3]
        off = call(controlnet_conditioning_scale=0.0)
    assert not np.array_equal(outs[0], outs[1]), "the control image made no difference in a reused step"
    assert not np.array_equal(outs[0], off)
    for ref, out in zip(refs, outs, strict=True):
        assert psnr(ref, out) >= 26.0  # the cache's floor (common.FLOOR_DB); measured ~50 dB



@pytest.mark.parametrize("technique", TECHNIQUES)
def test_sd15_ip_adapter_image_reaches_accelerated_calls(technique):
    """The IP-Adapter's image tokens enter through its own processors on the cross-attentions, which the
    techniques leave in place (sparse attention wraps self-attention only; token merging reduces the
    queries): while applied, `set_ip_adapter_scale` still takes effect and the image prompt still
    changes the output as much as without accel (scale 0 vs 1: ~24 dB apart)."""
    pipe, family, call = variants.build("sd15-ip-adapter")
    ref = variants.reference("sd15-ip-adapter")
    try:
        pipe.set_ip_adapter_scale(0.0)
        ref_off = call()
        with accel.applied(pipe, config(technique, family)):
            off = call()
            pipe.set_ip_adapter_scale(1.0)
            on = call()
    finally:
        pipe.set_ip_adapter_scale(1.0)
    assert psnr(ref, ref_off) < 30.0  # the image prompt matters
    assert psnr(on, off) < 30.0, "the image prompt made no difference while applied"
    assert psnr(ref, on) >= FLOOR_DB[technique] and psnr(ref_off, off) >= FLOOR_DB[technique]
    np.testing.assert_array_equal(call(), ref)

def _zero_gates(blocks, names=("norm1.linear", "norm1_context.linear", "norm.linear")) -> None:
    """Zero the AdaLN modulation of ``blocks``: their gates are zero, so each returns its input."""
    for block in blocks:
        for name, m in block.named_modules():
            if name in names:
                m.weight.data.zero_()
                m.bias.data.zero_()


def _identity_span_flux():
    """A Flux transformer of 2 + 2 blocks whose cached span (every block after the first) adds nothing: the
    AdaLN gates of those blocks are zero, so each returns its input. Caching that span is exact."""
    transformer = variants.flux_transformer(layers=2, single=2)
    _zero_gates([transformer.transformer_blocks[1], *transformer.single_transformer_blocks])
    return variants.flux_controlnet(transformer, layers=2, single=2)


def _identity_span_sd3():
    """An SD3 transformer of 4 joint blocks whose cached span (every block after the first) adds nothing
    (zero AdaLN gates), with a ControlNet of 2 blocks: SD3Transformer2DModel adds ControlNet residual i // 2
    after block i, so two of them (after blocks 1 and 2) fall inside the span."""
    transformer = variants.sd3_transformer(layers=4)
    _zero_gates(transformer.transformer_blocks[1:])
    return variants.sd3_controlnet(transformer, layers=2)


def _check_residuals_added_once(pipe, kwargs: dict, refused: str):
    """With an exact-to-cache span, the block cache (plain and Taylor) gives the uncached output; diffusers'
    FirstBlockCache / MagCache, which keep the span's output minus its input, are refused (``refused``: the
    error's pattern); the pipeline is untouched afterwards. Returns the uncached output."""
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(kwargs, control_image=variants.image(1), num_inference_steps=4)
    ref = variants.run(pipe, **kwargs)
    assert psnr(ref, variants.run(pipe, **kwargs, controlnet_conditioning_scale=0.0)) < 30.0  # control matters
    for cache in ({"method": "block", "interval": 2}, {"method": "block", "interval": 2, "taylor_order": 1}):
        with accel.applied(pipe, {"cache": cache}):
            out = variants.run(pipe, **kwargs)
            assert accel.stats(pipe)["cache"]["reused"] == 2
        np.testing.assert_allclose(out, ref, atol=1e-6)
    for method in ("diffusers.first_block", "diffusers.mag"):
        with pytest.raises(ConfigError, match=refused):
            accel.apply(pipe, {"cache": {"method": method, "threshold": 0.5}})
        assert not accel.is_applied(pipe)
    np.testing.assert_array_equal(variants.run(pipe, **kwargs), ref)
    return ref


def test_flux_controlnet_residuals_are_added_once_in_reused_steps():
    """FluxTransformer2DModel adds each ControlNet residual after its block, in its own forward. With an
    exact-to-cache span (see `_identity_span_flux`), the cached run must equal the uncached one: a cache
    that kept the residuals added inside the span in its cached residual would add them twice per reused
    step (measured 35 dB here before the fix), one that dropped them would lose them. diffusers'
    span-residual caches are refused, naming the pair."""
    pipe = _identity_span_flux()
    ref = _check_residuals_added_once(pipe, variants.FLUX_CALL, refused="ControlNet")
    # applied to the bare transformer, no pipeline to look at: refused at the first forward given residuals
    kwargs = dict(variants.FLUX_CALL, control_image=variants.image(1), num_inference_steps=4)
    with accel.applied(pipe.transformer, {"cache": {"method": "diffusers.first_block", "threshold": 0.5}}):
        with pytest.raises(ConfigError, match="controlnet_block_samples given"):
            variants.run(pipe, **kwargs)
    np.testing.assert_array_equal(variants.run(pipe, **kwargs), ref)


def test_sd3_controlnet_residuals_are_added_once_in_reused_steps():
    """As the Flux test, for SD3's ``block_controlnet_hidden_states`` (`_identity_span_sd3`; without the
    family's ``between_blocks`` the cached run is off by up to 0.028). diffusers' span-residual caches are
    refused: SD3Transformer2DModel has no CacheMixin in diffusers 0.42 (were it given one, the ControlNet
    refusal applies)."""
    _check_residuals_added_once(_identity_span_sd3(), variants.SD3_CALL, refused="ControlNet|CacheMixin")
