"""Train ``ref-video``: a small WanPipeline (32 px, 17 frames) on moving-shape clips.

    nice -n 19 python -m accel.pipelines.ref.train_video

Reproducible from ``--seed``: a small AutoencoderKLWan first (4x spatial, 2x temporal
compression: 17 frames of 32x32 -> 9 latent frames of 8x8; trained on 5-frame windows), then a
WanTransformer3DModel and a small UMT5 text encoder together with the flow-matching objective Wan
uses (velocity = noise - data, shifted sigmas), 10% empty prompts for guidance, EMA weights.
Prints the losses and, at the end, the checker's motion-direction accuracy on held-out prompts;
writes both to ``training.json`` beside the weights.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from ...eval import checker, shapes
from . import components as C

SIZE, FRAMES = 32, 17
LATENT_NOISE = 0.1


def build_vae():
    from diffusers import AutoencoderKLWan

    # scale_factor_*: what WanPipeline sizes its latents by (the defaults are the released 4x / 8x).
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
                            scale_factor_temporal=2, scale_factor_spatial=4)


def build_text_encoder(tok, d_model: int = 64):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(
        vocab_size=len(tok), d_model=d_model, d_kv=d_model // 2, d_ff=2 * d_model, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
        dropout_rate=0.0,
    ))  # fmt: skip


def build_transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=64, freq_dim=64, ffn_dim=128, num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )  # fmt: skip


def scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def to_video_tensor(videos: np.ndarray) -> torch.Tensor:
    """(B, F, H, W, 3) in [0, 1] -> (B, 3, F, H, W) in [-1, 1]."""
    return torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float() * 2 - 1


def clip_batch(rng, n: int, window: int | None = None):
    # Directions are what the checker scores: 60% of clips, the other motions share the rest.
    clips = []
    for _ in range(n):
        motions = tuple(shapes.DIRECTIONS) if rng.random() < 0.6 else ("bouncing", "rotating", "changing")
        clips.append(shapes.training_clip(rng, frames=FRAMES, motions=motions))
    videos = np.stack([shapes.render_clip(c, SIZE) for c in clips])
    if window:  # the causal VAE takes any 1 + 4k frames; short windows train it 3x cheaper
        start = int(rng.integers(FRAMES - window + 1))
        videos = videos[:, start : start + window]
    return videos, [c.prompt for c in clips]


def train_vae(vae, rng, steps: int, batch: int, lr: float) -> float:
    def loss_fn(g):
        x = to_video_tensor(clip_batch(rng, batch, window=5)[0])
        # The posterior mean plus a little fixed noise: a few hundred steps do not shrink the
        # posterior's own std (it starts at 1), and latents that are mostly noise are hard to model.
        mean = vae.encode(x).latent_dist.mean
        rec = vae.decode(mean + LATENT_NOISE * torch.randn_like(mean)).sample
        return F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * mean.pow(2).mean()

    return C.fit([vae], loss_fn, steps, lr, 0, "vae", weight_decay=0.0, ema=False)


@torch.no_grad()
def latent_pool(vae, rng, n: int, chunk: int = 32):
    means, stds, prompts = [], [], []
    for i in range(0, n, chunk):
        vids, p = clip_batch(rng, min(chunk, n - i))
        mean = vae.encode(to_video_tensor(vids)).latent_dist.mean
        means.append(mean)
        stds.append(torch.full_like(mean, LATENT_NOISE))
        prompts += p
    return torch.cat(means), torch.cat(stds), prompts


def encode_text(text_encoder, tok, prompts, length: int) -> torch.Tensor:
    """As WanPipeline does: encode with the mask, keep the real tokens, zero-pad to ``length``."""
    t = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    emb = text_encoder(t.input_ids, t.attention_mask).last_hidden_state
    return emb * t.attention_mask[..., None]


def train_transformer(transformer, text_encoder, tok, pool, steps: int, batch: int, lr: float, seed: int,
                      shift: float = 3.0) -> float:
    means, stds, prompts = pool

    def loss_fn(g):
        idx = torch.randint(len(means), (batch,), generator=g)
        x0 = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)
        texts = ["" if float(torch.rand((), generator=g)) < 0.1 else prompts[i] for i in idx.tolist()]
        # Mostly the short padding the tests and CLI use, sometimes the pipeline's default 512.
        length = 512 if float(torch.rand((), generator=g)) < 0.2 else C.MAX_TOKENS
        cond = encode_text(text_encoder, tok, texts, length)
        u = torch.rand(batch, generator=g)
        sigma = shift * u / (1 + (shift - 1) * u)
        noise = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        pred = transformer(xt, sigma * 1000, cond).sample
        return F.mse_loss(pred, noise - x0)

    return C.fit([transformer, text_encoder], loss_fn, steps, lr, seed, "transformer")


@torch.no_grad()
def evaluate(pipe, n: int = 24, steps: int = 20, guidance: float = 5.0, seed: int = 0, batch: int = 8) -> dict:
    """Motion-direction accuracy on ``n`` held-out prompts (moving left/right/up/down)."""
    clips = shapes.held_out_clips(n, frames=FRAMES)
    videos = []
    for i in range(0, n, batch):
        part = clips[i : i + batch]
        out = pipe([c.prompt for c in part], num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=steps,
                   guidance_scale=guidance, max_sequence_length=C.MAX_TOKENS, output_type="np",
                   generator=torch.Generator().manual_seed(seed + i))
        videos += list(out.frames)
    return checker.score_clips(videos, clips)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(ap, "ref-video", pool=800, what="clips", n_eval=24)
    ap.add_argument("--vae-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=350, help="transformer steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vae-batch", type=int, default=4)
    args = ap.parse_args(argv)
    from diffusers import WanPipeline

    rng, t0, tok = C.begin(args)
    vae, text_encoder, transformer = build_vae(), build_text_encoder(tok), build_transformer()
    vae_loss = train_vae(vae, rng, args.vae_steps, args.vae_batch, lr=2e-3)
    t_vae = time.time() - t0
    pool = latent_pool(vae, rng, args.pool)
    mean = pool[0].mean(dim=(0, 2, 3, 4))
    std = pool[0].std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    view = (1, -1, 1, 1, 1)
    pool = ((pool[0] - mean.view(view)) / std.view(view), pool[1] / std.view(view), pool[2])
    print(f"latent pool {len(pool[2])} clips ({time.time() - t0:.0f}s)", flush=True)
    loss = train_transformer(transformer, text_encoder, tok, pool, args.steps, args.batch, 1e-3, args.seed)
    t_train = time.time() - t0
    pipe = WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=scheduler())
    pipe.set_progress_bar_config(disable=True)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    scores = evaluate(pipe, args.eval) if args.eval else {}
    record = {"seed": args.seed, "vae_steps": args.vae_steps, "steps": args.steps, "batch": args.batch,
              "pool": args.pool, "vae_loss": vae_loss, "loss": loss, "vae_seconds": round(t_vae),
              "train_seconds": round(t_train), "held_out": scores,
              "eval": f"20 steps, guidance 5.0, {FRAMES} frames {SIZE} px, seed 0"}
    C.write_record(args.out, record)
    print(f"saved {args.out}; train {t_train:.0f}s; held-out direction {scores.get('direction', float('nan')):.2f}",
          flush=True)


if __name__ == "__main__":
    main()
