"""Train ``ref-video``: a small WanPipeline (32 px, 17 frames) on moving-shape clips.

    python -m training.train_video --threads 1

runs two stages: 3000 transformer steps, saved, then ``--then-steps`` 2500 more resumed from the
saved model (a second cosine cycle). This one command made the shipped ref-video (v4, about an
hour on one core). Before the autoencoder's loss was weighted towards objects it rebuilt v3, made
as two commands, bit for bit. A single 5500-step cycle is untried.

Reproducible from ``--seed``: a small AutoencoderKLWan first (4x spatial, 2x temporal
compression: 17 frames of 32x32 -> 9 latent frames of 8x8; three latent channels anchored to the
pooled clip, as ``train_sd`` does for pictures; reconstruction weighted towards object pixels),
then a WanTransformer3DModel and a small UMT5 text encoder together with the flow-matching
objective Wan uses (velocity = noise - data, shifted sigmas; the sampler's last step reaches sigma
0), the loss weighted towards the moving object (``train_sd.FOREGROUND_WEIGHT``), 10% empty
prompts for guidance, EMA weights. Prints the losses, the autoencoder's own round trip of held-out
clips (the ceiling) and, at the end, the checker's motion-direction accuracy (and colour / shape
of the middle frame) on held-out prompts; writes them to ``training.json`` beside the weights.

Measured (BENCHMARKS.md, "Reference models"): an autoencoder trained on 5-frame windows only ever
runs the encoder's first two 4-frame chunks, and its later chunks (the causal cache of a cached
chunk) wash every clip out to white after frame 5: held-out clips round-tripped at 0.17-0.29
direction whatever the steps. Windows of 9 frames train the steady state: 0.92 direction / 0.75
colour / 0.67 shape at 2000 steps, and 0.92 / 1.00 / 0.50 with the object-weighted loss (the
denoiser's ceiling). The shipped model: 0.93 direction / 0.90 colour / 0.30 shape on 40 held-out
prompts (v3, before the weighting: 0.85 / 0.48 / 0.38).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from accel.pipelines.ref import checker
from accel.pipelines.ref import data as shapes

from . import components as C
from .train_sd import FOREGROUND_WEIGHT, weighted_mean, weighted_mse

SIZE, FRAMES = 32, 17
LATENT_NOISE = 0.1
VAE_WINDOW = 9  # frames per autoencoder training clip: the first chunk, one cached chunk, one steady chunk
VAE_STEPS = 2000


def build_vae(spatial: int = 4):
    """``spatial``x spatial (a power of 2), 2x temporal compression to 4 latent channels."""
    from diffusers import AutoencoderKLWan

    levels = spatial.bit_length() - 1  # one downsampling level per factor 2; the last also halves time
    # scale_factor_*: what WanPipeline sizes its latents by (the defaults are the released 4x / 8x).
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1] + [2] * levels, num_res_blocks=1,
                            temperal_downsample=[False] * (levels - 1) + [True], latents_mean=[0.0] * 4,
                            latents_std=[1.0] * 4, scale_factor_temporal=2, scale_factor_spatial=spatial)


def build_text_encoder(tok, d_model: int = 64):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(
        vocab_size=len(tok), d_model=d_model, d_kv=d_model // 2, d_ff=2 * d_model, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
        dropout_rate=0.0,
    ))  # fmt: skip


TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=32, in_channels=4, out_channels=4,
    text_dim=64, freq_dim=64, ffn_dim=192, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)  # fmt: skip


def build_transformer(**sizes):
    """ref-video's WanTransformer3DModel; ``sizes`` replace fields of `TRANSFORMER`."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**{**TRANSFORMER, **sizes})


def scheduler():
    from diffusers import UniPCMultistepScheduler

    # Flow sigmas shifted by 3 (as trained), ending at sigma 0 (final_sigmas_type "zero").
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def to_video_tensor(videos: np.ndarray) -> torch.Tensor:
    """(B, F, H, W, 3) in [0, 1] -> (B, 3, F, H, W) in [-1, 1]."""
    return torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float() * 2 - 1


def to_latent_grid(x: torch.Tensor, spatial: int = 4) -> torch.Tensor:
    """(B, C, 1 + 2k, H, W) -> (B, C, 1 + k, H/s, W/s): averaged as the causal VAE groups frames (the
    first alone, then pairs) and ``spatial`` x ``spatial`` pixels."""
    s = spatial
    return torch.cat([F.avg_pool3d(x[:, :, :1], (1, s, s)), F.avg_pool3d(x[:, :, 1:], (2, s, s))], 2)


def training_clips(rng, n: int, frames: int = FRAMES) -> list:
    # Directions are what the checker scores: 60% of clips, the other motions share the rest.
    clips = []
    for _ in range(n):
        motions = tuple(shapes.DIRECTIONS) if rng.random() < 0.6 else ("bouncing", "rotating", "changing")
        clips.append(shapes.training_clip(rng, frames=frames, motions=motions))
    return clips


def clip_batch(rng, n: int, window: int | None = None):
    clips = training_clips(rng, n)
    videos = np.stack([shapes.render_clip(c, SIZE) for c in clips])
    if window:  # the causal VAE takes any 1 + 4k frames; shorter windows train it cheaper
        start = int(rng.integers(FRAMES - window + 1))
        videos = videos[:, start : start + window]
    return videos, [c.prompt for c in clips]


def rendered_window(rng, batch: int):
    """Training clips rendered now, a `VAE_WINDOW`-frame window of each: (video tensor, object mask)."""
    videos = clip_batch(rng, batch, window=VAE_WINDOW)[0]
    return to_video_tensor(videos), foreground_mask(videos)


def train_vae(vae, rng, steps: int, batch: int, lr: float, sample=rendered_window, spatial: int = 4,
              **fit_options) -> float:
    """``sample(rng, batch)`` -> (clips (B, 3, F, H, W) in [-1, 1], object masks (B, 1, F, H, W));
    ``fit_options`` go to `components.fit` (a time budget, autocast)."""
    def loss_fn(g):
        x, mask = sample(rng, batch)
        # The posterior mean plus a little fixed noise: a few hundred steps do not shrink the
        # posterior's own std (it starts at 1), and latents that are mostly noise are hard to model.
        mean = vae.encode(x).latent_dist.mean
        rec = vae.decode(mean + LATENT_NOISE * torch.randn_like(mean)).sample
        # Three channels anchored to the pooled clip: colour and place are plain in the latent.
        anchor = F.mse_loss(mean[:, :3], to_latent_grid(x, spatial))
        # A small object's colour is mixed with the background in that pooled grid; a plain loss
        # left the decoder returning the mix (held-out round trip 0.75 colour, blue read as teal),
        # the loss weighted towards object pixels unmixes it (1.00).
        w = 1.0 + FOREGROUND_WEIGHT * mask
        return weighted_mean((rec - x) ** 2, w) + 0.5 * weighted_mean((rec - x).abs(), w) + anchor

    return C.fit([vae], loss_fn, steps, lr, 0, "vae", weight_decay=0.0, ema=False, **fit_options)


def foreground_mask(videos: np.ndarray) -> torch.Tensor:
    """(B, 1, F, H, W): 1 where clips (B, F, H, W, 3) show an object (the checker's foreground)."""
    return torch.from_numpy(np.stack([[checker.foreground(f)[0] for f in v] for v in videos])).float()[:, None]


@torch.no_grad()
def encode_clips(vae, x: torch.Tensor, mask: torch.Tensor, spatial: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means of clips ``x`` (B, 3, F, H, W) and their per-latent-pixel loss weights from object
    masks (B, 1, F, H, W): 1 + FOREGROUND_WEIGHT x object cover."""
    return vae.encode(x).latent_dist.mean, 1.0 + FOREGROUND_WEIGHT * to_latent_grid(mask, spatial)


@torch.no_grad()
def latent_pool(vae, rng, n: int, chunk: int = 32):
    """Posterior means of ``n`` training clips, their loss weights, their prompts."""
    means, weights, prompts = [], [], []
    for i in range(0, n, chunk):
        vids, p = clip_batch(rng, min(chunk, n - i))
        m, w = encode_clips(vae, to_video_tensor(vids), foreground_mask(vids))
        means.append(m)
        weights.append(w)
        prompts += p
    return torch.cat(means), torch.cat(weights), prompts


def normalise_pool(vae, pool, fit: bool):
    """``pool`` with its latents in the units the pipeline denoises in; ``fit``: first set the
    autoencoder's latents_mean / latents_std (which WanPipeline applies) from these latents."""
    if fit:
        vae.register_to_config(latents_mean=pool[0].mean(dim=(0, 2, 3, 4)).tolist(),
                               latents_std=pool[0].std(dim=(0, 2, 3, 4)).tolist())
    view = (1, -1, 1, 1, 1)
    mean, std = (torch.tensor(v, device=pool[0].device).view(view)
                 for v in (vae.config.latents_mean, vae.config.latents_std))
    return ((pool[0] - mean) / std, *pool[1:]), std


def encode_text(text_encoder, tok, prompts, length: int) -> torch.Tensor:
    """As WanPipeline does: encode with the mask, keep the real tokens, zero-pad to ``length``."""
    t = tok(prompts, padding="max_length", max_length=C.MAX_TOKENS, truncation=True, return_tensors="pt")
    ids, mask = (v.to(text_encoder.device) for v in (t.input_ids, t.attention_mask))
    emb = text_encoder(ids, mask).last_hidden_state * mask[..., None]
    return F.pad(emb, (0, 0, 0, length - emb.shape[1]))


def train_transformer(transformer, text_encoder, tok, pool, steps: int, batch: int, lr: float, seed: int,
                      shift: float = 3.0, latent_noise=LATENT_NOISE, **fit_options) -> float:
    """``pool``: normalised latents, loss weights, prompts (latents and weights on the models' device);
    ``latent_noise``: the decoder's noise in those units; ``fit_options`` go to `components.fit`. The
    random draws come from a CPU generator, so a run is the same on any device."""
    means, weights, prompts = pool
    dev = means.device

    def loss_fn(g):
        idx = torch.randint(len(means), (batch,), generator=g)
        x0 = means[idx.to(dev)] + latent_noise * torch.randn((batch, *means.shape[1:]), generator=g).to(dev)
        texts = ["" if float(torch.rand((), generator=g)) < 0.1 else prompts[i] for i in idx.tolist()]
        # Mostly the short padding the tests and CLI use, sometimes the pipeline's default 512.
        length = 512 if float(torch.rand((), generator=g)) < 0.2 else C.MAX_TOKENS
        cond = encode_text(text_encoder, tok, texts, length)
        u = torch.rand(batch, generator=g)
        sigma = (shift * u / (1 + (shift - 1) * u)).to(dev)
        noise = torch.randn(x0.shape, generator=g).to(dev)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        pred = transformer(xt, sigma * 1000, cond).sample
        return weighted_mse(pred.float(), noise - x0, weights[idx.to(dev)])

    return C.fit([transformer, text_encoder], loss_fn, steps, lr, seed, "transformer", **fit_options)


@torch.no_grad()
def round_trip(vae, n: int = 24, size: int = SIZE, frames: int = FRAMES) -> dict:
    """The autoencoder's own ceiling: held-out clips encoded, decoded and scored."""
    clips = shapes.held_out_clips(n, frames=frames)
    x = to_video_tensor(np.stack([shapes.render_clip(c, size) for c in clips])).to(vae.device, vae.dtype)
    rec = torch.cat([vae.decode(vae.encode(x[i : i + 8]).latent_dist.mean).sample for i in range(0, n, 8)])
    return checker.score_videos(list(((rec.float().cpu() + 1) / 2).permute(0, 2, 3, 4, 1).numpy()), clips)


@torch.no_grad()
def evaluate(pipe, n: int = 40, steps: int = 20, guidance: float = 5.0, seed: int = 0, batch: int = 8,
             size: int = SIZE, frames: int = FRAMES) -> dict:
    """Motion-direction accuracy on ``n`` held-out prompts (moving left/right/up/down)."""
    clips = shapes.held_out_clips(n, frames=frames)
    videos = []
    for i in range(0, n, batch):
        part = clips[i : i + batch]
        out = pipe([c.prompt for c in part], num_frames=frames, height=size, width=size, num_inference_steps=steps,
                   guidance_scale=guidance, max_sequence_length=C.MAX_TOKENS, output_type="np",
                   generator=torch.Generator().manual_seed(seed + i))
        videos += list(out.frames)
    return checker.score_videos(videos, clips)


# 3000 steps, saved, then 2500 more from the saved model: the loss is still falling at 3000 steps
# (0.23 direction after the first stage alone; 0.85 with the second). One command runs both.
THEN_STEPS = 2500


def _two_stages(args, argv) -> None:
    """Stage 1 into ``<out>.stage1`` (not scored), then ``--resume`` it into ``<out>``: exactly the
    two commands the shipped model came from, in one."""
    import shutil

    common = ["--seed", str(args.seed), "--pool", str(args.pool), "--threads", str(args.threads),
              "--batch", str(args.batch), "--then-steps", "0"]
    stage1 = args.out.parent / f"{args.out.name}.stage1"
    first = [*common, "--steps", str(args.steps), "--vae-steps", str(args.vae_steps), "--vae-batch",
             str(args.vae_batch), "--eval", "0", "--out", str(stage1)]
    if args.vae_from:
        first += ["--vae-from", str(args.vae_from)]
    main(first)
    main([*common, "--resume", str(stage1), "--steps", str(args.then_steps), "--eval", str(args.eval),
          "--out", str(args.out)])
    first_record = json.loads((stage1 / "training.json").read_text())
    shutil.rmtree(stage1)
    record = json.loads((args.out / "training.json").read_text())
    # One record for the whole run: the autoencoder of stage 1, the transformer steps of both.
    record.update({k: first_record[k] for k in ("vae_from", "vae_steps", "vae_loss", "vae_seconds")},
                  resumed_from=None, steps=args.steps + args.then_steps,
                  train_seconds=first_record["train_seconds"] + record["train_seconds"],
                  command=C.command("train_video", argv),
                  stages=[f"{args.steps} transformer steps (VAE {0 if args.vae_from else args.vae_steps})",
                          f"then {args.then_steps} more, resumed"])
    C.write_record(args.out, record)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(ap, "ref-video", pool=1200, what="clips", n_eval=40)
    ap.add_argument("--vae-steps", type=int, default=VAE_STEPS)
    ap.add_argument("--steps", type=int, default=3000, help="transformer steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vae-batch", type=int, default=4)
    ap.add_argument("--vae-from", type=Path,
                    help="a saved ref-video folder: keep its VAE, train a new transformer + text encoder")
    ap.add_argument("--resume", type=Path,
                    help="a saved ref-video folder: keep all of it, train its transformer + text encoder on")
    ap.add_argument("--then-steps", type=int, default=THEN_STEPS,
                    help="then resume the saved model for this many more transformer steps (a second cosine "
                         "cycle; 0: one stage)")
    args = ap.parse_args(argv)
    if args.then_steps and not args.resume:
        return _two_stages(args, argv)
    from diffusers import WanPipeline

    rng, t0, tok = C.begin(args)
    if args.resume:
        old = WanPipeline.from_pretrained(args.resume)
        vae, text_encoder, transformer, vae_loss = old.vae.eval(), old.text_encoder, old.transformer, None
    else:
        text_encoder, transformer = build_text_encoder(tok), build_transformer()
        if args.vae_from:
            from diffusers import AutoencoderKLWan

            vae, vae_loss = AutoencoderKLWan.from_pretrained(args.vae_from, subfolder="vae").eval(), None
        else:
            vae = build_vae()
            vae_loss = train_vae(vae, rng, args.vae_steps, args.vae_batch, lr=2e-3)
    t_vae = time.time() - t0
    ceiling = round_trip(vae, min(args.eval, 24)) if args.eval else {}
    print(f"VAE round trip of held-out clips: {ceiling}", flush=True)
    # trained here: fit the latent normalisation the pipeline applies
    pool, std = normalise_pool(vae, latent_pool(vae, rng, args.pool), fit=vae_loss is not None)
    if vae_loss is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        vae.save_pretrained(args.out / "vae", safe_serialization=True)  # reusable (--vae-from) if a later stage fails
    print(f"latent pool {len(pool[2])} clips ({time.time() - t0:.0f}s)", flush=True)
    loss = train_transformer(transformer, text_encoder, tok, pool, args.steps, args.batch, 1e-3, args.seed,
                             latent_noise=LATENT_NOISE / std)
    t_train = time.time() - t0
    pipe = WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=scheduler())
    C.save(pipe, args.out)
    scores = evaluate(pipe, args.eval) if args.eval else {}
    record = {"seed": args.seed, "vae_from": str(args.vae_from) if args.vae_from else None,
              "resumed_from": str(args.resume) if args.resume else None,
              "vae_steps": 0 if vae_loss is None else args.vae_steps, "steps": args.steps, "batch": args.batch,
              "pool": args.pool, "vae_loss": vae_loss, "loss": loss, "vae_seconds": round(t_vae),
              "train_seconds": round(t_train), "vae_round_trip": ceiling, "held_out": scores,
              "eval": f"20 steps, guidance 5.0, {FRAMES} frames {SIZE} px, seed 0; colour/shape of the middle frame"}
    C.finish(args.out, record, t_train, "train_video", argv)


if __name__ == "__main__":
    main()
