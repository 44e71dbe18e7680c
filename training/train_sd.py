"""Train ``ref-sd``: a small StableDiffusionPipeline (64 px) on procedural shapes.

    nice -n 19 python -m training.train_sd [--unet-steps N]

Reproducible from ``--seed``: the VAE first (reconstruction, with three latent channels anchored
to the 4x-downsampled picture), then the UNet and the text encoder together (epsilon prediction,
10% empty prompts for classifier-free guidance, EMA weights), on a pool of rendered scenes whose
prompts are never held out. Prints the losses and, at the end, the attribute checker's colour and
shape accuracy on held-out prompts, and writes both to ``training.json`` beside the weights.

Measured (BENCHMARKS.md, "Reference models"): with epsilon prediction every picture came out
mid-gray whatever the prompt; v-prediction on a zero-terminal-SNR schedule fixed backgrounds within
600 steps. Objects need several thousand UNet steps.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from accel.pipelines.ref import call_defaults, checker
from accel.pipelines.ref import data as shapes

from . import components as C

SIZE = 64
# The decoder sees the posterior mean plus this much noise (a few hundred steps would not shrink
# the posterior's own std from 1, and latents that are mostly noise are hard to model).
LATENT_NOISE = 0.1
# Autoencoder steps: 300 round-trip held-out pictures at 0.55 colour / 0.45 shape (the denoiser
# cannot do better than its autoencoder), 2000 at 0.90 / 0.82 (BENCHMARKS.md "Reference models").
VAE_STEPS = 2000


def build_vae():
    from diffusers import AutoencoderKL

    # 4x downsampling (64 px -> 16x16x4 latents); no mid-block attention: the shapes are local.
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=SIZE, mid_block_add_attention=False, shift_factor=0.0,
    )  # fmt: skip


def build_text_encoder(tok, hidden: int = 64):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tok.model_max_length,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))  # fmt: skip


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(24, 48, 48), layers_per_block=1, attention_head_dim=(2, 4, 4), norm_num_groups=8,
        cross_attention_dim=64,
    )  # fmt: skip


# v-prediction on a zero-terminal-SNR schedule, sampled with "trailing" timesteps (Lin et al. 2023,
# "Common Diffusion Noise Schedules and Sample Steps are Flawed"): with epsilon prediction and SD's
# usual schedule the last step keeps the noise's mean, so a small model cannot make a background
# black or white and every picture comes out mid-gray; v-prediction also gives the high-noise steps,
# where colour and place are decided, a strong signal.
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")


def noise_schedule():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE)


def inference_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SCHEDULE, steps_offset=1, final_sigmas_type="zero")


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() * 2 - 1


def train_vae(vae, rng, steps: int, batch: int, lr: float) -> float:
    def loss_fn(g):
        x = to_tensor(shapes.image_batch(rng, batch, SIZE)[0])
        mean = vae.encode(x).latent_dist.mean
        rec = vae.decode(mean + LATENT_NOISE * torch.randn_like(mean)).sample
        # Anchor three latent channels to the 4x-downsampled picture: the encoder converges in a
        # few hundred steps, colour and place are plain in the latent (easy for the denoiser), and
        # the decoder only has to sharpen. The fourth channel is free (edges, shape detail).
        anchor = F.mse_loss(mean[:, :3], F.avg_pool2d(x, 4))
        return F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + anchor

    return C.fit([vae], loss_fn, steps, lr, 0, "vae", weight_decay=0.0, ema=False)


# Objects cover a few percent of a picture, so a plain MSE is mostly background: a small denoiser
# learns backgrounds, places and sizes quickly and leaves every object an average orange-brown
# blob for thousands of steps. The loss weighs pixels of an object this much more.
FOREGROUND_WEIGHT = 8.0


@torch.no_grad()
def latent_pool(vae, rng, n: int, chunk: int = 256):
    """Posterior means of ``n`` training scenes, their per-latent-pixel loss weights
    (1 + FOREGROUND_WEIGHT x the object coverage), and their prompts."""
    means, weights, prompts = [], [], []
    for i in range(0, n, chunk):
        imgs, p = shapes.image_batch(rng, min(chunk, n - i), SIZE)
        mean = vae.encode(to_tensor(imgs)).latent_dist.mean
        fg = torch.from_numpy(np.stack([checker.foreground(im)[0] for im in imgs])).float()[:, None]
        cover = F.adaptive_avg_pool2d(fg, mean.shape[-2:])
        means.append(mean)
        weights.append(1.0 + FOREGROUND_WEIGHT * cover)
        prompts += p
    return torch.cat(means), torch.cat(weights), prompts


def weighted_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    w = weight.expand_as(values)
    return (values * w).sum() / w.sum()


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weighted_mean((pred - target) ** 2, weight)


def tokenize(tok, prompts) -> torch.Tensor:
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def train_unet(unet, text_encoder, tok, pool, scale: float, steps: int, batch: int, lr: float, seed: int):
    means, weights, prompts = pool
    ids = tokenize(tok, prompts)
    empty = tokenize(tok, [""])[0]
    sched = noise_schedule()

    def loss_fn(g):
        idx = torch.randint(len(means), (batch,), generator=g)
        z = (means[idx] + LATENT_NOISE * torch.randn(means[idx].shape, generator=g)) * scale
        b_ids = ids[idx].clone()
        b_ids[torch.rand(batch, generator=g) < 0.1] = empty
        cond = text_encoder(b_ids)[0]
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        pred = unet(sched.add_noise(z, noise, t), t, cond).sample
        return weighted_mse(pred, sched.get_velocity(z, noise, t), weights[idx])

    return C.fit([unet, text_encoder], loss_fn, steps, lr, seed, "unet")


@torch.no_grad()
def evaluate(pipe, n: int = 60, steps: int = 20, guidance: float | None = None, seed: int = 0, batch: int = 20,
             **call) -> dict:
    """Checker accuracy on ``n`` held-out single-shape prompts (``call``: extra pipeline arguments;
    ``guidance`` defaults to ref-sd's own, `call_defaults`)."""
    if guidance is None:
        guidance = call_defaults("ref-sd")["guidance_scale"]
    scenes = shapes.held_out_scenes(n, n_shapes=1)
    images = []
    for i in range(0, n, batch):
        part = scenes[i : i + batch]
        out = pipe([s.prompt for s in part], num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                   generator=torch.Generator().manual_seed(seed + i), **call)
        images += list(out.images)
    return checker.score_images(images, scenes)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(ap, "ref-sd", pool=6000, what="scenes", n_eval=60)
    ap.add_argument("--vae-steps", type=int, default=VAE_STEPS)
    ap.add_argument("--unet-steps", type=int, default=7000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--resume", type=Path, help="a saved ref-sd folder: keep its VAE, train its UNet + text encoder on")
    ap.add_argument("--vae-from", type=Path,
                    help="a saved ref-sd folder: keep its VAE, train a new UNet + text encoder")
    args = ap.parse_args(argv)
    from diffusers import StableDiffusionPipeline

    rng, t0, tok = C.begin(args)
    vae_loss = None
    if args.resume:
        old = StableDiffusionPipeline.from_pretrained(args.resume)
        vae, text_encoder, unet = old.vae.eval(), old.text_encoder, old.unet
    elif args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae").eval()
        text_encoder, unet = build_text_encoder(tok), build_unet()
    else:
        vae, text_encoder, unet = build_vae(), build_text_encoder(tok), build_unet()
        vae_loss = train_vae(vae, rng, args.vae_steps, args.vae_batch, lr=2e-3)
    pool = latent_pool(vae, rng, args.pool)
    if vae_loss is not None:  # trained here: fit the latent scale to unit variance
        vae.register_to_config(scaling_factor=float(1.0 / pool[0].std()))
    scale = vae.config.scaling_factor
    t_vae = time.time() - t0
    print(f"latent pool {len(pool[2])} scenes, scaling_factor {scale:.4f} ({time.time() - t0:.0f}s)", flush=True)
    unet_loss = train_unet(unet, text_encoder, tok, pool, scale, args.unet_steps, args.batch, 2e-3, args.seed)
    t_train = time.time() - t0
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=inference_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    C.save(pipe, args.out)
    scores = evaluate(pipe, args.eval) if args.eval else {}
    record = {"seed": args.seed, "resumed_from": str(args.resume) if args.resume else None,
              "vae_from": str(args.vae_from) if args.vae_from else None,
              "vae_steps": 0 if vae_loss is None else args.vae_steps, "unet_steps": args.unet_steps,
              "batch": args.batch,
              "pool": args.pool, "vae_loss": vae_loss, "unet_loss": unet_loss, "vae_seconds": round(t_vae),
              "train_seconds": round(t_train), "held_out": scores,
              "eval": f"20 steps, guidance {call_defaults('ref-sd')['guidance_scale']}, seed 0"}
    C.finish(args.out, record, t_train, "train_sd", argv)


if __name__ == "__main__":
    main()
