"""Building blocks shared by the reference-model training scripts."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from accel.pipelines.ref import MODELS_DIR  # noqa: F401  (the training scripts save there)
from accel.pipelines.ref import data as shapes

MAX_TOKENS = 32  # the longest data prompt is about 22 words


def word_tokenizer(max_length: int = MAX_TOKENS):
    """A word-level tokenizer over the data vocabulary (every data word is one token).

    ``<s> words </s>`` then padding, as CLIP and T5 expect; unknown words map to ``<unk>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>", "<s>"]  # T5 order: pad 0, eos 1 (CLIP pools at eos)
    vocab = {w: i for i, w in enumerate([*specials, ",", *shapes.VOCABULARY])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=max_length, do_lower_case=True,
    )  # fmt: skip


def setup(threads: int, seed: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def add_common_args(ap, name: str, pool: int, what: str, n_eval: int) -> None:
    """The options every training script takes: seed, pool of ``pool`` rendered ``what``, threads,
    held-out evaluation size, output folder (``MODELS_DIR/name``)."""
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=pool, help=f"rendered training {what} (latents cached)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval", type=int, default=n_eval, help="held-out prompts scored at the end")
    ap.add_argument("--out", type=Path, default=MODELS_DIR / name)


def begin(args):
    """`setup` from the common options; returns (numpy rng, start time, word tokenizer)."""
    import numpy as np

    setup(args.threads, args.seed)
    return np.random.default_rng(args.seed), time.time(), word_tokenizer()


class EMA:
    """Exponential moving average of a module's parameters (with the usual warm-up)."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.999):
        self.decay, self.step = decay, 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.step += 1
        d = min(self.decay, (1 + self.step) / (10 + self.step))
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict(self.shadow)


def cosine_lr(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1))))


def fit(models: list, loss_fn, steps: int, lr: float, seed: int, tag: str, *, weight_decay: float = 0.01,
        ema: bool = True, seconds: float | None = None, autocast=None, record: dict | None = None) -> float:
    """The training loop the reference scripts share: AdamW over ``models`` with a cosine schedule,
    gradient clipping and (``ema``) an EMA copied back at the end; ``loss_fn(g)`` draws its batch
    (from the seeded CPU generator ``g`` where it wants one) and returns the loss. Returns the last
    loss; models end in eval mode.

    ``seconds``: a wall-time budget. The first `PROBE_STEPS` steps (inside the warm-up, whose
    learning rate does not depend on the total) are timed, then the total is fixed to what fits
    (at most ``steps``) and the cosine runs over it, so ``steps`` = that total reproduces the run
    without a budget. ``autocast``: a dtype for `torch.autocast` on the models' device (bf16 on a
    GPU). ``record``: filled with the steps run and their seconds."""
    params = [p for m in models for p in m.parameters()]
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    emas = [EMA(m) for m in models] if ema else []
    g = torch.Generator().manual_seed(seed)
    log, last, t0, total = Log(), 0.0, time.time(), steps
    t_probe = t0
    for m in models:
        m.train()
    step = 0
    while step < total:
        if seconds is not None and step == PROBE_STEPS and total > PROBE_STEPS:
            per_step = (time.time() - t_probe) / (PROBE_STEPS - PROBE_SKIP)
            total = min(steps, PROBE_STEPS + max(int((seconds - (time.time() - t0)) / per_step), 0))
            print(f"[{tag}] {per_step * 1000:.0f} ms a step: {total} steps fit {seconds:.0f}s", flush=True)
        if step == PROBE_SKIP:
            t_probe = time.time()  # the first steps pay for allocation and kernel selection
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, total, lr)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = loss_fn(g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for e, m in zip(emas, models, strict=False):
            e.update(m)
        last = loss.item()
        log(tag, step, total, last)
        step += 1
    for e, m in zip(emas, models, strict=False):
        e.copy_to(m)
    for m in models:
        m.eval()
    if record is not None:
        record.update(steps=total, seconds=round(time.time() - t0, 1))
    return last


# A budgeted `fit` times steps PROBE_SKIP..PROBE_STEPS (inside cosine_lr's 50 warm-up steps).
PROBE_SKIP, PROBE_STEPS = 5, 20


class Log:
    def __init__(self, every: int = 25):
        self.every, self.t0, self.acc, self.n = every, time.time(), 0.0, 0

    def __call__(self, tag: str, step: int, total: int, loss: float) -> None:
        self.acc, self.n = self.acc + loss, self.n + 1
        if (step + 1) % self.every == 0 or step + 1 == total:
            print(f"[{tag}] step {step + 1}/{total} loss {self.acc / self.n:.4f} "
                  f"({time.time() - self.t0:.0f}s)", flush=True)  # fmt: skip
            self.acc, self.n = 0.0, 0


def write_record(folder: Path, record: dict) -> None:
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def command(script: str, argv) -> str:
    """The command line that ran ``script`` (``argv``: what ``main`` was given; None: the process's)."""
    return " ".join([f"python -m training.{script}", *(sys.argv[1:] if argv is None else argv)])


def save(pipe, folder: Path, **kwargs) -> None:
    """The trained pipeline into ``folder`` as safetensors, loadable by path (and by name under
    ``MODELS_DIR``); ``kwargs`` go to ``save_pretrained`` (``max_shard_size``)."""
    pipe.set_progress_bar_config(disable=True)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True, **kwargs)


def finish(folder: Path, record: dict, seconds: float, script: str, argv) -> None:
    """``training.json`` beside the weights, with the command that made them, and a closing line."""
    write_record(folder, {**record, "command": command(script, argv)})
    scores = ", ".join(f"{k} {v:.2f}" for k, v in record.get("held_out", {}).items() if isinstance(v, float))
    print(f"saved {folder}; train {seconds:.0f}s; held-out {scores or 'not scored'}", flush=True)
