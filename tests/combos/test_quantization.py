"""accel on a torchao-quantized denoiser (int8 weight-only, ``quantize_(denoiser, Int8WeightOnlyConfig())``,
which runs on CPU): every technique engages, stays within its floor of the same quantized pipeline without
accel (common.FLOOR_DB), and `remove` restores that pipeline's output bitwise.

bitsandbytes is not covered: diffusers' bitsandbytes quantizer refuses to load without a GPU.
"""

import pytest
import torch
from helpers.snapshot import run

from accel.eval.metrics import psnr
from accel.pipelines import tiny
from combos.common import TECHNIQUES, check_technique, denoiser

torchao = pytest.importorskip("torchao", reason="torchao is not installed (pip install -e '.[dev]')")

# video DiTs at 64 px: three attention blocks of 16 tokens per call (32 px fits one)
CASES = {"sd15": {}, "flux": {}, "wan": {"height": 64, "width": 64}}


def _quantized(name: str):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    pipe = tiny.make(name)
    plain = run(pipe, name, **CASES[name])
    quantize_(denoiser(pipe), Int8WeightOnlyConfig())
    linear = next(m for m in denoiser(pipe).modules() if isinstance(m, torch.nn.Linear))
    assert type(linear.weight).__module__.startswith("torchao"), type(linear.weight)  # really quantized
    return pipe, plain


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("name", CASES)
def test_technique_on_int8_weight_only_denoiser(name, technique):
    pipe, plain = _quantized(name)
    ref = run(pipe, name, **CASES[name])
    assert 30.0 < psnr(plain, ref) < float("inf")  # quantization changed the numbers, a little (measured 65-77 dB)
    check_technique(pipe, lambda: run(pipe, name, **CASES[name]), technique, name, ref)
