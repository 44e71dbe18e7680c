"""Fidelity of an accelerated output against the baseline of the same seed: PSNR and SSIM.

Inputs are images or videos as arrays in [0, 1] with channels last: (H, W, C), (N, H, W, C) or
(N, F, H, W, C). Video SSIM is the mean over frames.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _as_nhwc(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    if t.ndim == 3:
        t = t[None]
    if t.ndim == 5:
        t = t.flatten(0, 1)
    if t.ndim != 4:
        raise ValueError(f"expected an image or video array with channels last, got shape {tuple(t.shape)}")
    return t


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical inputs."""
    x, y = _as_nhwc(a), _as_nhwc(b)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def ssim(a, b, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004), Gaussian window, mean over channels and frames."""
    x, y = _as_nhwc(a).permute(0, 3, 1, 2), _as_nhwc(b).permute(0, 3, 1, 2)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    win = min(window, x.shape[-1], x.shape[-2])
    win -= (win + 1) % 2  # odd, so the window has a centre
    coords = torch.arange(win, dtype=torch.float64) - win // 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, win, win).contiguous()

    def blur(t):
        return F.conv2d(t, kernel, groups=x.shape[1])

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def compare(baseline, accelerated) -> dict:
    """``{"psnr": dB, "ssim": ...}`` of ``accelerated`` against ``baseline``; JSON-safe (inf as None)."""
    p = psnr(baseline, accelerated)
    return {"psnr": None if math.isinf(p) else round(p, 3), "ssim": round(ssim(baseline, accelerated), 5)}
