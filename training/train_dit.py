"""Train ``ref-dit``: a small FluxPipeline (64 px) on procedural shapes, the MMDiT reference model.

    python -m training.train_dit [--steps N]

Reproducible from ``--seed``. It shares ``ref-sd``'s autoencoder (4 latent channels, 4x
downsampling; trained first with `train_sd` if ``--vae-from`` has none), so only the transformer and
the two text encoders are trained: a FluxTransformer2DModel (double- and single-stream blocks,
2x2-packed latents: 64 image tokens), a CLIP text model for the pooled embedding and a T5 encoder
for the token embeddings, both over the data's word tokenizer. Flow matching as Flux: x_t =
(1 - s) x0 + s noise, the transformer predicts noise - x0; 10% empty prompts, so the pipeline's
true classifier-free guidance (``true_cfg_scale`` with ``negative_prompt=""``) works. Prints the
losses and, at the end, the attribute checker's colour and shape accuracy on held-out prompts;
writes both to ``training.json`` beside the weights.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from accel.pipelines.ref import call_defaults

from . import components as C
from . import train_sd

SIZE = train_sd.SIZE
CALL = call_defaults("ref-dit")  # what a good call of the trained model looks like


def build_text_encoders(tok, hidden: int = 64):
    from transformers import T5Config, T5EncoderModel

    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=hidden, d_kv=hidden // 2, d_ff=2 * hidden, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
        dropout_rate=0.0,
    ))  # fmt: skip
    return train_sd.build_text_encoder(tok, hidden), t5


def build_transformer(latent_channels: int = 4, text_dim: int = 64):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=2, num_single_layers=3, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=text_dim, pooled_projection_dim=text_dim, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )  # fmt: skip


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # 64 image tokens: no resolution-dependent shift; a mild fixed one (more steps at high noise,
    # where colour and place are decided).
    return FlowMatchEulerDiscreteScheduler(shift=2.0, use_dynamic_shifting=False)


def encode(clip, t5, tok, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled, tokens) as FluxPipeline.encode_prompt computes them."""
    ids = train_sd.tokenize(tok, prompts)
    return clip(ids).pooler_output, t5(ids)[0]


def train_transformer(transformer, clip, t5, tok, pool, scale: float, steps: int, batch: int, lr: float, seed: int,
                      shift: float = 2.0) -> float:
    from diffusers import FluxPipeline

    means, weights, prompts = pool
    c, h, w = means.shape[1:]
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(C.MAX_TOKENS, 3)

    def loss_fn(g):
        idx = torch.randint(len(means), (batch,), generator=g)
        x0 = (means[idx] + train_sd.LATENT_NOISE * torch.randn(means[idx].shape, generator=g)) * scale
        texts = ["" if float(torch.rand((), generator=g)) < 0.1 else prompts[i] for i in idx.tolist()]
        pooled, tokens = encode(clip, t5, tok, texts)
        u = torch.rand(batch, generator=g)
        sigma = shift * u / (1 + (shift - 1) * u)
        noise = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1)
        xt = FluxPipeline._pack_latents((1 - s) * x0 + s * noise, batch, c, h, w)
        pred = transformer(hidden_states=xt, timestep=sigma, pooled_projections=pooled, encoder_hidden_states=tokens,
                           txt_ids=txt_ids, img_ids=img_ids).sample
        weight = FluxPipeline._pack_latents(weights[idx].expand(-1, c, -1, -1), batch, c, h, w)
        return train_sd.weighted_mse(pred, FluxPipeline._pack_latents(noise - x0, batch, c, h, w), weight)

    return C.fit([transformer, clip, t5], loss_fn, steps, lr, seed, "transformer")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(ap, "ref-dit", pool=6000, what="scenes", n_eval=60)
    ap.add_argument("--steps", type=int, default=10000, help="transformer steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vae-from", type=Path, default=C.MODELS_DIR / "ref-sd",
                    help="a ref-sd folder whose autoencoder to share (trained here if it has none)")
    args = ap.parse_args(argv)
    from diffusers import AutoencoderKL, FluxPipeline

    rng, t0, tok = C.begin(args)
    shared = (args.vae_from / "vae" / "config.json").is_file()
    if shared:
        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae").eval()
    else:
        vae = train_sd.build_vae()
        train_sd.train_vae(vae, rng, train_sd.VAE_STEPS, 16, lr=2e-3)
    pool = train_sd.latent_pool(vae, rng, args.pool)
    if not shared:  # trained here: fit the latent scale to unit variance
        vae.register_to_config(scaling_factor=float(1.0 / pool[0].std()))
    scale = vae.config.scaling_factor
    clip, t5 = build_text_encoders(tok)
    transformer = build_transformer(vae.config.latent_channels)
    print(f"latent pool {len(pool[2])} scenes, scaling_factor {scale:.4f} ({time.time() - t0:.0f}s)", flush=True)
    loss = train_transformer(transformer, clip, t5, tok, pool, scale, args.steps, args.batch, 1e-3, args.seed)
    t_train = time.time() - t0
    pipe = FluxPipeline(scheduler=scheduler(), vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=tok, transformer=transformer)
    C.save(pipe, args.out)
    call = {k: v for k, v in CALL.items() if k != "num_inference_steps"}
    scores = {}
    if args.eval:
        scores = train_sd.evaluate(pipe, args.eval, steps=CALL["num_inference_steps"], guidance=0.0, **call)
    record = {"seed": args.seed, "vae_from": str(args.vae_from), "steps": args.steps, "batch": args.batch,
              "pool": args.pool, "loss": loss, "train_seconds": round(t_train), "held_out": scores,
              "eval": f"{CALL['num_inference_steps']} steps, true_cfg_scale {CALL['true_cfg_scale']}, seed 0"}
    C.finish(args.out, record, t_train, "train_dit", argv)


if __name__ == "__main__":
    main()
