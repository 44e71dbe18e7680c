"""On CUDA in bf16: every technique on every tiny family, and the sparse kernels at a real size.

Every test here carries the ``gpu`` marker (skipped without CUDA, see conftest.py);
scripts/gpu_check.sh runs them on a lent GPU. Budget: the whole file in under 3 minutes on an H200.

Pipeline cases (`test_technique_on_cuda`), per tiny family x technique: a reference run without
accel, the technique applied (finite output; engaged, by its own counts in `accel.stats`),
removed (bitwise the reference again). Tiny shapes need small attention blocks and no size
thresholds for a technique to engage (as in tests/attention/test_processor.py and
tests/tokens/test_pipelines.py); everything else is the shipped preset.

Kernel cases: each sparse backend against the masked dense reference (SDPA in fp32 on the
upcast bf16 inputs) at 16k video tokens, and our Triton kernel against flex on the same mask.
"""

import functools
import importlib.util

import numpy as np
import pytest
import torch

import accel
from accel.attention.backends import run
from accel.attention.layout import build_layout, to_blocks
from accel.attention.patterns import static_mask
from accel.families import denoisers_of, family_of
from accel.pipelines import tiny
from accel.pipelines.call import to_frames

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPE = torch.bfloat16
# {tiny name: (dtype, why)} for a family whose tiny pipeline cannot run in DTYPE for a reason outside
# accel (none so far).
OTHER_DTYPE: dict = {}
# Enough steps for each preset's cache to reuse one (block cache: 2 warm-up steps, then interval 2). Wan's
# balanced cache reuses on a change threshold (0.1), which the tiny model's early steps exceed; Wan 2.2's
# two experts split the steps between them, each with its own warm-up.
STEPS = {"wan": 8, "wan22": 8}
SIZE = {"height": 64, "width": 64}  # >= 3 attention blocks of 16 tokens per call in every family
TINY_ATTENTION = {"block_size": 16, "min_tokens": 0}
TINY_TOKENS = {"min_tokens": 0}
SPARSE = {"pattern": "radial", "density": 0.5, "backend": "auto", **TINY_ATTENTION}
TECHNIQUES = ("cache", "tokens", "attention", "safe", "balanced", "fast")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _auto_backends() -> tuple[str, ...]:
    """What ``backend="auto"`` may run here: our kernel on CUDA when triton imports, else flex; gather on CPU."""
    if torch.device(DEVICE).type != "cuda":
        return ("gather",)
    return ("triton",) if HAS_TRITON else ("flex",)


def _run(pipe, name) -> np.ndarray:
    # tiny.example_inputs gives a fresh seeded CPU generator: diffusers' randn_tensor draws the latents
    # on the host and moves them, so every run starts from the same noise on any device
    out = to_frames(pipe(**tiny.example_inputs(name, num_inference_steps=STEPS.get(name, 4), **SIZE)))
    return np.asarray(out, dtype=np.float32)


@functools.lru_cache(maxsize=None)
def _pipeline(name: str, dtype: torch.dtype | None = None):
    """(pipe on DEVICE, its family, reference output), built once per family and dtype for the module."""
    dtype = dtype or OTHER_DTYPE.get(name, (DTYPE, ""))[0]
    # as from_pretrained(torch_dtype=...).to(DEVICE) loads it: the model's declared fp32 modules
    # (Wan's norms and time embedder, ...) stay fp32, the rest is DTYPE
    pipe = tiny.make(name, dtype=dtype, device=DEVICE)
    ref = _run(pipe, name)
    assert np.array_equal(_run(pipe, name), ref), \
        f"{name}: two plain runs differ on {DEVICE}: not deterministic here, so restore cannot be checked"
    assert np.isfinite(ref).all(), f"{name}: the plain pipeline gives non-finite output in {dtype}"
    return pipe, family_of(denoisers_of(pipe)[0][1]).name, ref


def _config(technique: str, family: str) -> accel.Config:
    if technique == "attention":
        return accel.Config.from_dict({"attention": SPARSE})
    preset = accel.preset("balanced" if technique in ("cache", "tokens") else technique, family)
    preset = preset.replace(tokens=TINY_TOKENS)
    if preset.attention.enabled:
        preset = preset.replace(attention=TINY_ATTENTION)
    if technique == "cache":
        return accel.Config(cache=preset.cache)
    if technique == "tokens":
        return accel.Config(tokens=preset.tokens)
    return preset


def _check_engaged(st: dict, cfg: accel.Config, label: str) -> str | None:
    """Assert that every part of ``cfg`` that is on did its work."""
    sections = [s for s in ("cache", "tokens", "attention") if getattr(cfg, s).enabled]
    assert sections, f"{label}: nothing to check, the config is off"
    for section in sections:
        s = st[section]
        if section == "cache":
            # a change threshold decides from the data: composed with token merging (which moves the
            # probe), Wan's (0.1) reuses nothing at tiny sizes, so there it only has to have decided
            reuse_needed = cfg.cache.threshold == 0 or len(sections) == 1
            assert s["computed"] > 0 and (s["reused"] > 0 or not reuse_needed), (label, s)
        elif section == "tokens":
            assert s["reduced_blocks"] > 0 and s["realised_ratio"] > 0, (label, {k: v for k, v in s.items()
                                                                                if k != "blocks"})
        else:  # (a preset never pairs it with token reduction, under which it cannot run: tests/test_config.py)
            assert s["sparse_calls"] > 0 and s["realised_density"] < 1.0, (label, s)
            if cfg.attention.backend == "auto":
                ran = set(s.get("backend_calls") or {s["backend"]: 1})
                assert ran and ran <= set(_auto_backends()), (label, ran, _auto_backends())


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("name", tiny.NAMES)
def test_technique_on_cuda(name, technique):
    pipe, family, ref = _pipeline(name)
    cfg = _config(technique, family)
    label = f"{name}/{technique}"
    accel.apply(pipe, cfg)
    try:
        out = _run(pipe, name)
        st = accel.stats(pipe)
    finally:
        accel.remove(pipe)
    assert out.shape == ref.shape and np.isfinite(out).all(), label
    _check_engaged(st, cfg, label)
    after = _run(pipe, name)
    assert np.array_equal(after, ref), f"{label}: not bitwise the reference after remove " \
                                       f"(max diff {np.abs(after - ref).max()})"


# --- the kernels at a real size ---------------------------------------------------------------------------
GRID = (16, 32, 32)  # 16,384 video tokens: 128 blocks of 128
HEADS, HEAD_DIM = 4, 64
SPARSE_BACKENDS = ("triton", "flex", "gather")
TOL = 2e-2  # relative L2 error against fp32: bf16 rounding gives a few 1e-3, a wrong block or softmax > 1e-1


def _skip_unless_available(backend: str) -> None:
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    if backend == "flex":
        pytest.importorskip("torch.nn.attention.flex_attention")


@functools.lru_cache(maxsize=None)
def _kernel_case(pattern: str):
    """(mask, (q, k, v) in tiled order on DEVICE in DTYPE, scale, the fp32 masked dense output, valid slots)."""
    layout = build_layout(GRID, 0, True, 128).to(DEVICE)  # shape-only tables on the device, as the processor has them
    mask = static_mask(layout, pattern, 0.25, 1, 0.5)
    assert mask.video_density() < 0.5, (pattern, mask.video_density())
    g = torch.Generator().manual_seed(0)  # a CPU generator: the same inputs on every device
    n = GRID[0] * GRID[1] * GRID[2]
    q, k, v = (to_blocks(torch.randn(1, HEADS, n, HEAD_DIM, generator=g).to(DEVICE, DTYPE), layout)
               for _ in range(3))
    scale = HEAD_DIM ** -0.5
    ref = run("sdpa", q.float(), k.float(), v.float(), mask, scale)
    return mask, (q, k, v), scale, ref, layout.valid.to(ref.device)


def _rel_l2(out: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor) -> float:
    out, ref = out.float()[..., valid, :], ref.float()[..., valid, :]
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("pattern", ["tile", "radial"])
def test_sparse_backend_matches_masked_dense_at_16k_tokens(pattern, backend):
    _skip_unless_available(backend)
    mask, (q, k, v), scale, ref, valid = _kernel_case(pattern)
    out = run(backend, q, k, v, mask, scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert torch.isfinite(out[..., valid, :]).all()
    err = _rel_l2(out, ref, valid)
    assert err < TOL, f"{backend} on {pattern}: relative L2 error {err:.2e} against masked dense (fp32)"


@pytest.mark.parametrize("pattern", ["tile", "radial"])
def test_triton_kernel_matches_flex(pattern):
    _skip_unless_available("triton")
    _skip_unless_available("flex")
    mask, (q, k, v), scale, _, valid = _kernel_case(pattern)
    ours, flex = run("triton", q, k, v, mask, scale), run("flex", q, k, v, mask, scale)
    err = _rel_l2(ours, flex, valid)
    assert err < TOL, f"triton vs flex on {pattern}: relative L2 difference {err:.2e}"



@pytest.mark.parametrize("pattern", ["tile", "radial"])
def test_engine_model_order_route_matches_masked_dense(pattern):
    """The engine's triton route reads and writes the model's token order through the layout (no tiled copies);
    q/k/v arrive as diffusers hands them over, [B, H, N, D] views of [B, N, H, D] tensors."""
    from accel.attention.config import AttentionConfig
    from accel.attention.layout import from_blocks
    from accel.attention.sparse import SparseAttention

    _skip_unless_available("triton")
    mask, tiled, scale, ref, valid = _kernel_case(pattern)
    lay = mask.layout
    q, k, v = (from_blocks(x, lay).transpose(1, 2).contiguous().transpose(1, 2) for x in tiled)
    eng = SparseAttention(AttentionConfig(pattern=pattern, density=0.25, block_size=128), "auto")
    out = eng.attend(q, k, v, scale, "site", GRID, 0, True)
    assert eng.stats()["backend_calls"] == {"triton": 1}
    err = _rel_l2(out, from_blocks(ref, lay), torch.ones(out.shape[2], dtype=torch.bool, device=out.device))
    assert err < TOL, f"engine on {pattern}: relative L2 error {err:.2e}"


def test_autotuned_kernel_matches_the_default(monkeypatch):
    from accel.attention.kernels import block_sparse

    _skip_unless_available("triton")
    mask, (q, k, v), scale, _, valid = _kernel_case("tile")
    default = run("triton", q, k, v, mask, scale)
    monkeypatch.setenv("ACCEL_TRITON_AUTOTUNE", "1")
    tuned = run("triton", q, k, v, mask, scale)
    assert _rel_l2(tuned, default, valid) < 1e-2
    assert block_sparse._autotuned.cache, "the autotuner did not run"


VIDEO_FAMILIES = ("wan", "wan22", "cogvideox", "hunyuanvideo", "ltx")


@pytest.mark.parametrize("name", VIDEO_FAMILIES)
def test_sparse_attention_on_video_families_in_fp16(name):
    """The bf16 cases above, in fp16: sparse attention (auto: our kernel) on every video family."""
    pipe, family, ref = _pipeline(name, torch.float16)
    cfg = accel.Config.from_dict({"attention": SPARSE})
    with accel.applied(pipe, cfg):
        out = _run(pipe, name)
        st = accel.stats(pipe)
    assert np.isfinite(out).all(), name
    _check_engaged(st, cfg, f"{name}/fp16")
    assert np.array_equal(_run(pipe, name), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["triton", "flex", "gather"])
@pytest.mark.parametrize("pattern", ["tile", "spatial_temporal", "radial", "global_local", "topk"])
def test_every_pattern_and_backend_on_cuda(pattern, backend, dtype):
    """Each pattern on each skipping backend, through the engine on model-order q/k/v with text tokens (the
    video grid 4x8x16 divides into no whole number of 64-token blocks), against the same engine's masked dense
    reference (backend sdpa: same mask, from the same q/k) in the same dtype."""
    from accel.attention.config import AttentionConfig
    from accel.attention.sparse import SparseAttention

    _skip_unless_available(backend)
    grid, text = (4, 8, 15), 10
    n = grid[0] * grid[1] * grid[2] + text
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, n, 4, 64, generator=g).to(DEVICE, dtype).transpose(1, 2) for _ in range(3))
    cfg = AttentionConfig(pattern=pattern, density=0.25, block_size=64)
    outs = [SparseAttention(cfg, b).attend(q, k, v, 0.125, "site", grid, text, True) for b in (backend, "sdpa")]
    assert outs[0].dtype == dtype and torch.isfinite(outs[0]).all()
    err = float((outs[0].float() - outs[1].float()).norm() / outs[1].float().norm())
    assert err < TOL, f"{pattern} on {backend} in {dtype}: relative L2 {err:.2e} against masked dense"


@pytest.mark.parametrize("name", ["flux", "sd15", "hunyuanvideo"])
def test_approx_cache_hit_reproduces_the_run_on_cuda(name, tmp_path):
    """The approximate cache on CUDA in bf16: the stored latent (kept on the host) comes back on the device in
    the pipeline's dtype, and a self-match resumed at K gives the full run bit for bit (first-order schedulers)."""
    pipe, _, ref = _pipeline(name)
    try:
        accel.apply(pipe, {"approx": {"dir": str(tmp_path), "similarity": [0.999], "skip": [0.5]}})
        np.testing.assert_array_equal(_run(pipe, name), ref)  # a miss that stores
        out = _run(pipe, name)
        st = accel.stats(pipe)["approx"]
        assert st["hit"] and st["skipped_steps"] == STEPS.get(name, 4) // 2, st
        np.testing.assert_array_equal(out, ref)
    finally:
        accel.remove(pipe)
