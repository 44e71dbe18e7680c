"""The built-in pipelines' small components, built offline: tokenizers over a word list, text encoders,
autoencoders, a UNet and schedulers. `accel.pipelines.tiny` builds whole tiny pipelines from them and
`accel.pipelines.sized` the text encoders and autoencoders of its released-size denoisers.

Tokenizers are the real transformers classes built in code: listed words are single tokens, anything
else falls back to characters (or bytes), so prompts give short, realistic sequences.
"""

from __future__ import annotations

import itertools
import math

# Words outside this list still tokenize, just into more (character) tokens.
WORDS = """
a an the of in on at with and by from to for under over near into is are
photo photograph picture painting drawing sketch illustration portrait landscape close up view shot
scene render art style cat cats dog dogs horse bird birds fish monkey squirrel fox wolf bear lion
astronaut man woman girl boy person people child robot knight wizard car boat ship train plane
house castle city street road bridge tower tree trees forest flower flowers garden grass field
mountain mountains hill river lake ocean sea beach wave waves sky cloud clouds sun moon star stars
space planet snow rain storm fire smoke water light lights shadow red blue green yellow white black
orange purple pink golden silver gray big small tall old young beautiful cute happy sad dark bright
colorful riding walking running sitting standing flying dancing eating playing swimming jumping
reading holding looking night day sunset sunrise morning evening winter summer autumn spring
high quality detailed realistic cinematic lighting soft sharp focus masterpiece professional studio
dramatic vivid epic low bad blurry ugly worst deformed noisy grainy distorted text watermark
video camera slow motion moving static pan zoom burger pizza apple coffee cake bread
""".split()


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(itertools.pairwise(symbols)))
        if rank == math.inf:
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _word_merges(prefix: str = "", suffix: str = "") -> tuple[list[str], list[tuple[str, str]]]:
    """BPE tokens and merges under which every word of ``WORDS`` is one token.

    Each word is segmented with the merges so far and only the missing merges
    are appended. Appended merges rank below all earlier ones, so words that
    already collapse to a single token keep doing so.
    """
    ranks: dict[tuple[str, str], int] = {}
    tokens = []
    for word in sorted(set(WORDS), key=lambda w: (-len(w), w)):
        symbols = list(prefix + word)
        symbols[-1] += suffix
        pieces = _bpe(symbols, ranks)
        for piece in pieces[1:]:
            ranks[(pieces[0], piece)] = len(ranks)
            pieces[0] += piece
            tokens.append(pieces[0])
    return tokens, list(ranks)


def _vocab(tokens) -> dict[str, int]:
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def clip_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    words, merges = _word_merges(suffix="</w>")
    # bos=0, eos=1: CLIPTextModel pools at the first eos_token_id, except when
    # eos_token_id == 2, where it falls back to the legacy argmax over ids.
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = _vocab([*specials, *chars, *(c + "</w>" for c in chars), *words])
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer():
    from transformers import T5Tokenizer

    # Unigram picks the best-scoring segmentation: a whole word (-1) beats
    # spelling it out from characters (-5 each).
    chars = [chr(c) for c in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in chars] + [("\u2581" + c, -5.0) for c in chars]
    pieces += [("\u2581" + w, -1.0) for w in WORDS if len(w) > 1]  # "\u2581a" is already a character piece
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def llama_tokenizer():
    from transformers import LlamaTokenizer

    words, merges = _word_merges(prefix="\u2581")
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]  # byte fallback for unseen characters
    chars = ["\u2581", *(chr(c) for c in range(33, 127))]
    vocab = _vocab(["<unk>", "<s>", "</s>", "<pad>", *bytes_, *chars, *words])
    return LlamaTokenizer(vocab=vocab, merges=merges, pad_token="<pad>", padding_side="right", model_max_length=2048)


# ---------------------------------------------------------------------------
# Text encoders: 2 layers, 2 heads, vocabulary matching the tokenizer.
# ---------------------------------------------------------------------------


def _special_ids(tok) -> dict[str, int]:
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def clip_text(tok, projection: bool = False, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tok.model_max_length,
        **_special_ids(tok),
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_text(tok, umt5: bool = False, d_model: int = 32, d_kv: int | None = None, d_ff: int | None = None):
    """``d_kv``/``d_ff`` (default ``d_model // 2`` and ``2 * d_model``) set the cost: a wide output
    (``d_model``) can have narrow attention and feed-forward layers."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=len(tok), d_model=d_model, d_kv=d_kv or d_model // 2, d_ff=d_ff or 2 * d_model, num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
    )  # fmt: skip
    return model_cls(config)


def llama_text(tok, hidden: int = 32):
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=tok.model_max_length,
        **_special_ids(tok),
    )  # fmt: skip
    return LlamaModel(config)


# ---------------------------------------------------------------------------
# Shared image components
# ---------------------------------------------------------------------------


def image_vae(seeded, latent_channels: int, block_out_channels: tuple[int, ...] = (32, 64), **kwargs):
    """One block per entry of ``block_out_channels``: the pipelines' spatial compression is
    ``2 ** (len(block_out_channels) - 1)`` (the released VAEs: 4 blocks, 8x)."""
    from diffusers import AutoencoderKL

    blocks = len(block_out_channels)
    return seeded(
        AutoencoderKL, down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=block_out_channels, layers_per_block=1, latent_channels=latent_channels, sample_size=32,
        **kwargs,
    )  # fmt: skip


def flow_vae(seeded, shift_factor: float, scaling_factor: float, **kwargs):
    """The 16-channel VAE of Flux / SD3 (no quant convs, shifted latents)."""
    return image_vae(
        seeded, 16, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=shift_factor, scaling_factor=scaling_factor, **kwargs,
    )  # fmt: skip


def sd_unet(seeded):
    from diffusers import UNet2DConditionModel

    # SD 1.5 ordering: cross-attention at high resolution, plain blocks at the
    # lowest. ``attention_head_dim`` is really the head count in this class.
    return seeded(
        UNet2DConditionModel, sample_size=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
        attention_head_dim=2, cross_attention_dim=32,
    )  # fmt: skip


def sd_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip


def sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)



def wan_vae(seeded):
    """The released Wan 2.1 VAE's compression (16 channels, 8x spatial, 4x temporal) at width 8."""
    from diffusers import AutoencoderKLWan

    return seeded(
        AutoencoderKLWan, base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )  # fmt: skip
