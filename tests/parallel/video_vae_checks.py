"""The checks one spawned 2-process gloo group runs for the parallel video VAE decode (results to JSON).

Each video VAE of the tiny pipelines decodes the same random latent on one rank (before
`parallelize`) and then split in row bands across the 2 ranks; the Wan pipeline also runs end to
end with ``vae=True`` (the denoiser replicated), to show the decode hooks work inside the pipeline.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

import accel
from accel.parallel import ParallelConfig, parallel_stats, unparallelize

# name -> latent shape (batch, channels, latent frames, latent rows, latent columns)
LATENTS = {"wan": (1, 16, 3, 6, 4), "cogvideox": (1, 16, 3, 6, 4), "ltx": (1, 8, 2, 6, 4)}


def _decode(pipe, z):
    with torch.no_grad():
        return pipe.vae.decode(z, return_dict=False)[0]


def run(rank: int, path: str) -> None:
    from accel.pipelines import tiny

    results = {}
    for name, shape in LATENTS.items():
        pipe = tiny.make(name)
        z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        ref = _decode(pipe, z)
        accel.parallelize(pipe, ParallelConfig(vae=True))
        out = _decode(pipe, z)
        stats = parallel_stats(pipe)["vae"]
        unparallelize(pipe)
        restored = _decode(pipe, z)
        results[name] = {"max_abs": float((out - ref).abs().max()), "shape": list(out.shape),
                         "ref_range": float(ref.abs().max()), "restored_max_abs": float((restored - ref).abs().max()),
                         "stats": stats}
        if name == "wan":
            kw = lambda: tiny.example_inputs("wan", num_inference_steps=2, height=48)  # noqa: E731
            ref_video = np.asarray(pipe(**kw()).frames, dtype=np.float32)
            accel.parallelize(pipe, ParallelConfig(vae=True))
            video = np.asarray(pipe(**kw()).frames, dtype=np.float32)
            unparallelize(pipe)
            results["wan/pipeline"] = {"max_abs": float(np.abs(video - ref_video).max()),
                                       "shape": list(video.shape)}
    if rank == 0:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    from accel.parallel import spawn

    spawn(run, 2, (sys.argv[1],), backend="gloo", timeout_s=120)
