"""The clip-parallel checks one spawned gloo group runs; rank 0 writes every rank's results (a list).

``python clip_checks.py PATH`` runs the 2-rank checks (clip=2); `cfg_clip`, the 4-rank composition
with CFG parallelism (cfg=2 x clip=2), runs in `cfg_sequence_checks`' 4-rank group. Videos are compared in latent
space (``output_type="latent"``): the VAE decode is the same on every path. The whole video has
``FRAMES`` latent frames, each clip ``FRAMES // 2``.
"""

from __future__ import annotations

import json
import sys

import torch

import accel
from accel.parallel import ParallelConfig, ParallelError, parallel_stats, unparallelize

FAMILIES = ("wan", "cogvideox", "ltx")
FRAMES = 4  # latent frames of the whole video; 2 per clip
SIZE = 64  # pixels: Wan/CogVideoX 4x4 tokens per frame, LTX 8x8
STEPS = 3
TEMPORAL = {"wan": 4, "cogvideox": 4, "ltx": 8}  # the tiny VAEs' temporal compression
DUAL = {"clip_neighbour_frames": 1, "clip_global_tokens": 8}


def latent_shape(name: str, frames: int) -> tuple:
    s = SIZE // 8
    return {"wan": (1, 16, frames, s, s), "cogvideox": (1, frames, 16, s, s), "ltx": (1, frames * s * s, 8)}[name]


def by_frame(name: str, x: torch.Tensor) -> torch.Tensor:
    """(B, F, ...) view of a latent video."""
    if name == "wan":
        return x.transpose(1, 2)
    if name == "ltx":
        return x.reshape(x.shape[0], -1, (SIZE // 8) ** 2 * x.shape[2])  # packed (B, F*H*W, C) tokens
    return x


def take(name: str, x: torch.Tensor, f0: int, f1: int) -> torch.Tensor:
    if name == "wan":
        return x[:, :, f0:f1]
    per = x.shape[1] // FRAMES if name == "ltx" else 1
    return x[:, f0 * per:f1 * per]


def call(pipe, name: str, latents: torch.Tensor, steps: int = STEPS, frames: int | None = None):
    from accel.pipelines import tiny

    frames = frames or by_frame(name, latents).shape[1]
    kw = tiny.example_inputs(name, num_inference_steps=steps, height=SIZE, width=SIZE, output_type="latent",
                             num_frames=(frames - 1) * TEMPORAL[name] + 1, latents=latents.clone())
    return pipe(**kw).frames


def call_alone(pipe, name: str, latents: torch.Tensor, f0: int, f1: int):
    """One process, frames f0:f1 only, at their positions in the whole video.

    CogVideoX's text tokens attend to video tokens whose rotary embedding is absolute, so a clip
    alone matches a clip of a longer video only with that video's rotary rows.
    """
    if name != "cogvideox":
        return call(pipe, name, take(name, latents, f0, f1))
    whole = pipe._prepare_rotary_positional_embeddings

    def rows_of_the_clip(height, width, num_frames, device):
        cos, sin = whole(height, width, FRAMES, device)
        per = cos.shape[0] // FRAMES
        return cos[f0 * per:f1 * per], sin[f0 * per:f1 * per]

    pipe._prepare_rotary_positional_embeddings = rows_of_the_clip
    try:
        return call(pipe, name, take(name, latents, f0, f1))
    finally:
        del pipe._prepare_rotary_positional_embeddings


def seam_error(name: str, x: torch.Tensor, ref: torch.Tensor) -> float:
    """How wrong the step across the clip boundary is: mean |dx - dref| / mean |dref|.

    ``d`` is the difference between the first frame of clip 1 and the last frame of clip 0, ``ref``
    the single-process video (full attention, no boundary). 0 = a seamless join.
    """
    v, r = by_frame(name, x).float(), by_frame(name, ref).float()
    b = FRAMES // 2
    dv, dr = v[:, b] - v[:, b - 1], r[:, b] - r[:, b - 1]
    return float((dv - dr).abs().mean() / dr.abs().mean())


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def _latents(name: str) -> torch.Tensor:
    return torch.randn(latent_shape(name, FRAMES), generator=torch.Generator().manual_seed(7))


def _clip_run(pipe, name: str, latents: torch.Tensor, **fields):
    accel.parallelize(pipe, ParallelConfig(clip=2, **fields))
    return call(pipe, name, latents), parallel_stats(pipe)


def run(rank: int, path: str) -> None:
    from accel.pipelines import tiny

    results = {}
    for name in FAMILIES:
        pipe = tiny.make(name)
        latents = _latents(name)
        f0, f1 = rank * FRAMES // 2, (rank + 1) * FRAMES // 2
        alone = call_alone(pipe, name, latents, f0, f1)
        full = call(pipe, name, latents)  # the whole video, one process

        independent, stats_ind = _clip_run(pipe, name, latents, clip_neighbour_frames=0, clip_global_tokens=0)
        dual, stats_dual = _clip_run(pipe, name, latents, **DUAL)
        whole_context, _ = _clip_run(pipe, name, latents, clip_neighbour_frames=FRAMES // 2, clip_global_tokens=0)
        try:  # 3 latent frames do not split into 2 clips
            call(pipe, name, take(name, latents, 0, 3), frames=3)
            odd = ""
        except ParallelError as e:
            odd = str(e)
        unparallelize(pipe)
        restored = call(pipe, name, latents)
        results[name] = {
            "clip_vs_alone_max_abs": float((take(name, independent, f0, f1) - alone).abs().max()),
            "whole_context_max_abs": float((whole_context - full).abs().max()),
            "restored_max_abs": float((restored - full).abs().max()),
            "seam_independent": seam_error(name, independent, full), "seam_dual": seam_error(name, dual, full),
            "err_independent": rel_err(independent, full), "err_dual": rel_err(dual, full),
            "kv_bytes_independent": stats_ind.get("clip_kv_bytes", 0),
            "kv_bytes_dual": stats_dual.get("clip_kv_bytes", 0), "gather_bytes": stats_dual.get("gather_bytes", 0),
            "strategies": stats_dual.get("strategies"), "odd_frames_error": odd,
        }
    _write(path, results)


def cfg_clip(rank: int) -> dict:
    """cfg=2 x clip=2 on 4 ranks (run from `cfg_sequence_checks`, which has the 4-rank group): with a
    neighbour scope over the whole other clip it equals the whole video in one process (wan)."""
    from accel.pipelines import tiny

    pipe = tiny.make("wan")
    latents = _latents("wan")
    full = call(pipe, "wan", latents, steps=2)
    accel.parallelize(pipe, ParallelConfig(cfg=2, clip=2, clip_neighbour_frames=FRAMES // 2, clip_global_tokens=0))
    out = call(pipe, "wan", latents, steps=2)
    stats = parallel_stats(pipe)
    unparallelize(pipe)
    return {"max_abs": float((out - full).abs().max()), "cfg_gathers": stats.get("cfg_gathers", 0),
            "clip_kv_bytes": stats.get("clip_kv_bytes", 0), "strategies": stats.get("strategies")}


def _write(path: str, mine: dict) -> None:
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    if torch.distributed.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(everyone, f, indent=1)


if __name__ == "__main__":
    from accel.parallel import spawn

    spawn(run, 2, (sys.argv[1],), backend="gloo", timeout_s=120)
