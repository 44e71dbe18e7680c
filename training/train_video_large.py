"""Train ``ref-video-large`` (a WanPipeline at 9,216 video tokens a call) and judge the presets on it.

    python -m training.train_video_large --out DIR --seed 0 [--time-budget 500]
    python -m training.train_video_large --out DIR --micro      # the plumbing, on a CPU

One run, written for one H100/H200 and at most 9 minutes (``scripts/gpu_train_video_large.sh``):
renders a pool of moving-shape clips (`accel.pipelines.ref.data`) in worker processes, trains the autoencoder,
then the transformer and text encoder (bf16 autocast, torch SDPA) for what the time budget leaves,
saves the pipeline into ``--out`` (safetensors, every file <= ``--shard-mb``, all <= 30 MB; the run
fails if not), scores 40 held-out prompts into ``training.json``, and judges every preset and
technique part on it (`judge_video`: ``judge.md`` / ``judge.json``). The training is `train_video`'s
(autoencoder with object-weighted loss and latent channels anchored to the pooled clip; flow
matching, shifted sigmas, 10% empty prompts, EMA) at this size. Reproducible from ``--seed`` on one
device: the budget fixes the number of steps after a timed probe (`components.fit`), and
``training.json`` records them; ``--vae-steps N --steps M`` repeats a run without a budget.

Design, and why:

* 17 frames of 64 px through ref-video's autoencoder design at 2x spatial / 2x temporal compression:
  9 latent frames of 32 x 32 x 4. Patch (1, 1, 1) keeps every latent pixel a token: 9 x 32 x 32 =
  9,216 video tokens a call (>= 8,192), on Wan's 3-D rotary positions (frames, rows, columns). A 4x
  autoencoder with patch (1, 2, 2) would need 256 px frames for the same count: 16x the pixels to
  render, encode, decode and check, for clips the checker reads at 32-64 px.
* Transformer: width 256 (4 heads of 64), 8 blocks, FFN 1536: 11.1M parameters, saved in bf16 but for
  the 0.1M diffusers keeps in float32 (22.5 MB, two shards); the autoencoder (0.12M) and the text
  encoder (0.09M) stay float32: 23.3 MB in all.
* FLOP a clip: forward, the blocks' linear layers 2 x 8 x (6 x 256^2 + 2 x 256 x 1536) x 9,216 =
  1.7e11, attention 4 x 9,216^2 x 256 x 8 = 7.0e11: 8.7e11; a training clip (forward + backward)
  ~2.6e12. At 150-250 TFLOP/s of bf16 on an H200 (small GEMMs, flash attention at head dim 64) that is
  10-17 ms a clip: ~200 s of transformer training is 12-20k clips, 750-1250 steps of 16 (ref-video's
  batch; more steps of fewer clips, since the budget, not the data, is what is short).
* A sampled clip, 20 steps with classifier-free guidance: 40 calls, 3.5e13 FLOP (~0.15 s); the judge
  runs ~20 rows x 24 prompts x 3 seeds, most rows cheaper than the baseline.
* Time plan (``--time-budget``, default 500 s of this process): pool ~15 s, autoencoder `VAE_SECONDS`,
  latent pool ~10 s, transformer what is left before ``--judge-reserve`` (200 s: ~10 baseline-equivalent
  rows x 3 seeds x ~4 s a 24-prompt call) and `EVAL_SECONDS`, then the judge until the budget ends (it
  stops between rows and says how many seeds each row got).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from accel.pipelines.ref import call_defaults, checker
from accel.pipelines.ref import data as shapes

from . import components as C
from . import train_video as V

NAME = "ref-video-large"
VAE_SECONDS = 30  # autoencoder training budget on the GPU (a few hundred steps of 16 windows)
EVAL_SECONDS = 30  # saving, reloading and scoring 40 held-out prompts
MAX_TOTAL_MB = 30.0


@dataclasses.dataclass(frozen=True)
class Design:
    """What the model is: the call it is made for, the autoencoder's compression, the transformer."""

    call: dict  # WanPipeline call: size, frames, steps, guidance
    spatial: int  # autoencoder's spatial compression (temporal: 2x)
    transformer: dict  # fields of `train_video.TRANSFORMER` replaced
    pool: int  # rendered training clips
    batch: int
    vae_batch: int

    @property
    def size(self) -> int:
        return self.call["height"]

    @property
    def frames(self) -> int:
        return self.call["num_frames"]

    @property
    def tokens(self) -> int:
        """Video tokens per transformer call at the design's call size."""
        pt, ph, pw = self.transformer["patch_size"]
        latent = self.size // self.spatial
        return ((self.frames - 1) // 2 + 1) // pt * (latent // ph) * (latent // pw)


FULL = Design(
    call=call_defaults(NAME), spatial=2, pool=4000, batch=16, vae_batch=16,
    transformer=dict(patch_size=(1, 1, 1), num_attention_heads=4, attention_head_dim=64, ffn_dim=1536, num_layers=8,
                     freq_dim=128, rope_max_seq_len=64),
)  # fmt: skip
# Tiny and fast on a CPU: 5 frames of 16 px (3 x 8 x 8 = 192 tokens), 4 sampling steps.
MICRO = Design(
    call={**call_defaults(NAME), "num_inference_steps": 4, "height": 16, "width": 16, "num_frames": 5},
    spatial=2, pool=8, batch=2, vae_batch=2,
    transformer=dict(patch_size=(1, 1, 1), num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2,
                     freq_dim=32, rope_max_seq_len=16),
)  # fmt: skip


def build(design: Design, tok):
    """(autoencoder, text encoder, transformer) of ``design``, untrained."""
    return V.build_vae(design.spatial), V.build_text_encoder(tok), V.build_transformer(**design.transformer)


def saved_in_bf16(transformer, name: str) -> bool:
    """Whether the transformer's parameter ``name`` is saved in bf16: all but the modules diffusers keeps
    in float32 (its ``_keep_in_fp32_modules``: norms, time embedding, modulation table)."""
    return not any(k in name.split(".") for k in transformer._keep_in_fp32_modules or ())


def saved_bytes(modules: dict) -> int:
    """Bytes of the parameters as saved: the transformer in bf16 (`saved_in_bf16`), the others float32."""
    return sum(p.numel() * (2 if key == "transformer" and saved_in_bf16(m, n) else 4)
               for key, m in modules.items() for n, p in m.named_parameters())


# --- the clip pool -------------------------------------------------------------------------------


def _render(clip, size: int):
    """(uint8 video (F, H, W, 3), bool object mask (F, H, W)) of one clip (a worker process's job)."""
    video = shapes.render_clip(clip, size)
    mask = np.stack([checker.foreground(f)[0] for f in video])
    return np.round(video * 255).astype(np.uint8), mask


def render_pool(clips, size: int, workers: int):
    """Every clip rendered, with its object mask: uint8 (N, F, H, W, 3), bool (N, F, H, W)."""
    if workers:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            done = list(ex.map(_render, clips, [size] * len(clips), chunksize=32))
    else:
        done = [_render(c, size) for c in clips]
    return np.stack([v for v, _ in done]), np.stack([m for _, m in done])


def as_input(videos: torch.Tensor) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) -> float (B, 3, F, H, W) in [-1, 1]."""
    return videos.permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def window_sampler(videos: torch.Tensor, masks: torch.Tensor, window: int):
    """`train_video.train_vae`'s sampler over the rendered pool: random clips, a random window of each."""
    def sample(rng, batch: int):
        idx = torch.from_numpy(rng.integers(len(videos), size=batch)).to(videos.device)
        start = int(rng.integers(videos.shape[1] - window + 1))
        return as_input(videos[idx, start : start + window]), masks[idx, start : start + window][:, None].float()

    return sample


@torch.no_grad()
def encode_pool(vae, videos: torch.Tensor, masks: torch.Tensor, spatial: int, chunk: int = 64, autocast=None):
    """Posterior means and loss weights of the whole pool (`train_video.encode_clips`, chunk by chunk)."""
    means, weights = [], []
    for i in range(0, len(videos), chunk):
        with torch.autocast(videos.device.type, dtype=autocast, enabled=autocast is not None):
            m, w = V.encode_clips(vae, as_input(videos[i : i + chunk]), masks[i : i + chunk][:, None].float(), spatial)
        means.append(m.float())
        weights.append(w)
    return torch.cat(means), torch.cat(weights)


# --- saving ----------------------------------------------------------------------------------------


def check_files(folder: Path, shard_mb: float, total_mb: float = MAX_TOTAL_MB) -> dict:
    """Sizes of the saved weights; RuntimeError if a file is over ``shard_mb`` or all over ``total_mb``."""
    files = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*.safetensors"))}
    total = sum(files.values())
    over = [f"{k} ({v / 1e6:.2f} MB)" for k, v in files.items() if v > shard_mb * 1e6]
    if over or total > total_mb * 1e6:
        raise RuntimeError(f"weights in {folder} break the size limits (each file <= {shard_mb} MB, all <= "
                           f"{total_mb} MB): {', '.join(over) or f'{total / 1e6:.2f} MB in all'}")
    return {"files": files, "total_mb": round(total / 1e6, 3)}


def save(pipe, folder: Path, shard_mb: float) -> dict:
    """The transformer cast to bf16 (`saved_in_bf16`), the pipeline saved in shards under ``shard_mb``
    (safetensors headers take the margin); the files checked."""
    for name, p in pipe.transformer.named_parameters():
        if saved_in_bf16(pipe.transformer, name):
            p.data = p.data.to(torch.bfloat16)
    C.save(pipe, folder, max_shard_size=int(shard_mb * 0.9e6))
    return check_files(folder, shard_mb)


# --- the run ---------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=C.MODELS_DIR / NAME,
                    help="folder for the weights, training.json and the tables (default: where load() finds it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=500.0,
                    help="seconds for the whole run, judging included (the transformer gets what is left)")
    ap.add_argument("--judge-reserve", type=float, default=200.0, help="seconds kept for judging")
    ap.add_argument("--micro", action="store_true",
                    help="a tiny model, a few steps, 2 prompts x 1 seed, lowered gates: the plumbing on a CPU")
    ap.add_argument("--vae-steps", type=int, help="autoencoder steps (default: what VAE_SECONDS allows)")
    ap.add_argument("--steps", type=int, help="transformer steps (default: what the budget allows)")
    ap.add_argument("--eval", type=int, default=40, help="held-out prompts scored into training.json")
    ap.add_argument("--judge-prompts", type=int, default=24)
    ap.add_argument("--judge-seeds", type=int, default=3)
    ap.add_argument("--shard-mb", type=float, default=15.0, help="largest weight file, MB")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes rendering and scoring clips (default: all but two cores on CUDA, 0 on a CPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    args = ap.parse_args(argv)
    t_start = time.time()
    deadline = t_start + args.time_budget
    design = MICRO if args.micro else FULL
    if args.micro:
        args.eval, args.judge_prompts, args.judge_seeds = min(args.eval, 2), min(args.judge_prompts, 2), 1
        args.shard_mb = min(args.shard_mb, 0.06)  # small enough that the transformer is sharded
        args.vae_steps, args.steps = args.vae_steps or 2, args.steps or 3
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if args.workers is None:
        args.workers = max((os.cpu_count() or 1) - 2, 0) if cuda else 0
    autocast = torch.bfloat16 if cuda else None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    C.setup(args.threads, args.seed)
    rng, tok = np.random.default_rng(args.seed), C.word_tokenizer()
    print(f"{NAME}: {design.tokens} video tokens a call, device {dev}, budget {args.time_budget:.0f}s", flush=True)

    clips = V.training_clips(rng, design.pool, frames=design.frames)
    videos, masks = (torch.from_numpy(a).to(dev) for a in render_pool(clips, design.size, args.workers))
    print(f"pool: {len(clips)} clips rendered ({time.time() - t_start:.0f}s)", flush=True)

    vae, text_encoder, transformer = (m.to(dev) for m in build(design, tok))
    vae_info: dict = {}
    window = min(V.VAE_WINDOW, design.frames)
    vae_loss = V.train_vae(vae, rng, args.vae_steps or 100_000, design.vae_batch, 2e-3,
                           sample=window_sampler(videos, masks, window), spatial=design.spatial,
                           seconds=None if args.vae_steps else VAE_SECONDS, autocast=autocast, record=vae_info)
    ceiling = V.round_trip(vae, min(args.eval, 24), design.size, design.frames) if args.eval else {}
    print(f"VAE round trip of held-out clips: {ceiling}", flush=True)
    means, weights = encode_pool(vae, videos, masks, design.spatial, autocast=autocast)
    del videos, masks
    pool, std = V.normalise_pool(vae, (means, weights, [c.prompt for c in clips]), fit=True)
    print(f"latent pool {tuple(pool[0].shape)} ({time.time() - t_start:.0f}s)", flush=True)

    train_s = deadline - args.judge_reserve - EVAL_SECONDS - time.time()
    if args.steps is None and train_s < 30:
        raise SystemExit(f"--time-budget {args.time_budget:.0f}s leaves {train_s:.0f}s for the transformer; "
                         "raise it or lower --judge-reserve")
    info: dict = {}
    loss = V.train_transformer(transformer, text_encoder, tok, pool, args.steps or 100_000, design.batch, 1e-3,
                               args.seed, latent_noise=V.LATENT_NOISE / std, autocast=autocast, record=info,
                               seconds=None if args.steps else train_s)
    del pool

    from diffusers import WanPipeline

    from accel.pipelines.load import load

    pipe = WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=V.scheduler())
    files = save(pipe, args.out, args.shard_mb)
    del pipe, vae, text_encoder, transformer
    pipe = load(str(args.out), device=str(dev))  # what was saved, as users load it (bf16 on CUDA)
    pipe.set_progress_bar_config(disable=True)
    call = design.call
    scores = V.evaluate(pipe, args.eval, steps=call["num_inference_steps"], guidance=call["guidance_scale"],
                        batch=args.eval if cuda else 8, size=design.size, frames=design.frames) if args.eval else {}
    t_train = time.time() - t_start
    record = {"seed": args.seed, "micro": args.micro, "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
              "call": call, "video_tokens": design.tokens, "spatial_compression": design.spatial,
              "transformer": {k: list(v) if isinstance(v, tuple) else v for k, v in design.transformer.items()},
              "parameters": {k: sum(p.numel() for p in getattr(pipe, k).parameters())
                             for k in ("transformer", "text_encoder", "vae")},
              "weights": files, "pool": design.pool, "batch": design.batch,
              "vae_steps": vae_info["steps"], "vae_seconds": vae_info["seconds"], "vae_loss": vae_loss,
              "vae_round_trip": ceiling,
              "steps": info["steps"], "train_seconds": info["seconds"], "loss": loss, "held_out": scores,
              "eval": f"{args.eval} held-out prompts, {call['num_inference_steps']} steps, guidance "
                      f"{call['guidance_scale']}, seed 0; colour/shape of the middle frame",
              "seconds_to_judging": round(t_train)}
    C.finish(args.out, record, t_train, "train_video_large", argv)

    from . import judge_video

    judge_video.judge(pipe, args.out, prompts=args.judge_prompts, seeds=args.judge_seeds, call=call,
                      device=str(dev), deadline=deadline - 5, workers=args.workers, low_gates=args.micro)
    print(f"done in {time.time() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
