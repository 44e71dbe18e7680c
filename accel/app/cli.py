"""The `accel` command: ``accel models``, ``accel generate``.

Every user-facing failure (unknown model, bad size, bad config, unwritable path) ends as one
``accel: error: ...`` line and exit status 2; set ``ACCEL_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


class UsageError(Exception):
    """A bad argument value the user can fix; printed as one line."""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


def row_field(name: str):
    """An argparse type checking a value as a prompt-file row's ``name`` is checked (`accel.app.prompts.check`),
    so a default given on the command line or in a config file meets the same bounds as a row's own value."""

    def typ(text: str):
        from .prompts import check

        try:
            return check(name, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    typ.__name__ = name  # argparse names the type in its messages
    return typ


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, the usage hint on the same line
        self.exit(2, f"accel: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from ..pipelines.load import DEFAULT_MODEL, DEFAULT_VIDEO_MODEL

    p = _Parser(prog="accel", description="Make diffusers pipelines fast without retraining.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    m = sub.add_parser("models", help="list supported families and built-in models")
    m.set_defaults(func=cmd_models)

    g = sub.add_parser("generate", help="generate one image or video")
    g.add_argument("--model", default=None,
                   help=f"hub id, local folder or built-in name (default {DEFAULT_MODEL}; "
                        f"{DEFAULT_VIDEO_MODEL} when --frames or a video --out asks for video)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--preset", default=None, help="preset name (see `accel models`); default balanced; off turns "
                                                  "acceleration off")
    g.add_argument("--config", default=None,
                   help="config file (.json, .yaml, .toml) or an output's sidecar .json: its cache/tokens/attention "
                        "sections apply on top of the preset")
    g.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field on top of both, e.g. --set cache.interval=3 (repeatable)")
    g.add_argument("--steps", type=row_field("steps"), default=None, help="denoising steps")
    g.add_argument("--height", type=row_field("height"), default=None)
    g.add_argument("--width", type=row_field("width"), default=None)
    g.add_argument("--frames", type=row_field("frames"), default=None, help="video models: number of frames")
    g.add_argument("--fps", type=_positive_int, default=8, help="video models: frames per second of the MP4")
    g.add_argument("--guidance", type=row_field("guidance"), default=None, help="guidance scale")
    g.add_argument("--seed", type=row_field("seed"), default=0)
    g.add_argument("--compare", action="store_true",
                   help="also run the pipeline without acceleration (same seed), side by side: the speed-up over "
                        "--repeats alternating runs after a warm-up, PSNR/SSIM, and what engaged; writes both outputs")
    g.add_argument("--repeats", type=_positive_int, default=2, help="--compare: timed runs of each side")
    g.add_argument("--out", default=None, help="output file (.png/.webp for images, .mp4/.gif for video); "
                                                "default outputs/<prompt>_s<seed>.<ext>")
    g.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if present)")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    g.add_argument("--parallel", default=None, metavar="FIELD=VALUE,...",
                   help="multi-process parallel strategies, e.g. cfg=2,sequence=2 or patch=2,vae=true (fields of "
                        "accel.ParallelConfig; also a [parallel] table of --config); needs that many processes")
    g.add_argument("--gpus", type=_positive_int, default=None,
                   help="spawn N worker processes (one per GPU; gloo on CPU) sharing one image by --parallel; "
                        "default: the --parallel degrees' product. Under torchrun/accelerate launch, omit it")
    g.set_defaults(func=cmd_generate)

    # Other subcommands live with their feature; each module offers add_parser(subparsers).
    import importlib

    for module in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            if e.name != module:  # the module exists but a dependency is missing: say so, don't hide it
                raise
            continue
        mod.add_parser(sub)
    return p


# Modules that add subcommands (batch, app, run, bench, tune); missing ones are skipped.
SUBCOMMAND_MODULES = ("accel.app.batch", "accel.app.run", "accel.app.gradio_app", "accel.eval.bench",
                      "accel.eval.tune")


def cmd_models(args) -> int:
    from .. import available_presets
    from ..families import FAMILIES
    from ..pipelines.load import DEFAULT_MODEL, DEFAULT_VIDEO_MODEL, builtin_models

    print("Supported families:")
    for f in FAMILIES.values():
        kind = "video" if f.video else "image"
        print(f"  {f.name:<13} {f.label} [{kind}; {', '.join(f.classes)}]")
    print("Built-in models (offline):")
    for name, what in builtin_models().items():
        mark = {DEFAULT_MODEL: "  (default)", DEFAULT_VIDEO_MODEL: "  (default for video)"}.get(name, "")
        print(f"  {name:<19} {what}{mark}")
    print(f"Presets: {', '.join(available_presets())}")
    for name in available_presets():
        print(f"  {name:<9} {PRESET_NOTES.get(name, '')}".rstrip())
    print("  Each preset's settings per family: accel.preset(NAME, FAMILY); the rules and tables: BENCHMARKS.md")
    return 0


# What each preset promises: the fidelity floors its settings were picked by (PSNR against the unaccelerated
# output of the same seed; BENCHMARKS.md has each technique's table and rule)
PRESET_NOTES = {
    "off": "no acceleration: the pipeline as it is",
    "safe": "the most faithful settings that still gain: step cache >= 40 dB, light token reduction "
            "(sparse attention instead for video DiTs)",
    "balanced": "the fastest settings at >= 32 dB (step cache) and >= 35 dB (token reduction)",
    "fast": "the fastest settings at >= 26 dB (step cache) and >= 30 dB (token reduction)",
}


def _preset(args) -> str:
    from .generation import DEFAULT_PRESET

    return args.preset or DEFAULT_PRESET


def _config_from_args(args, family: str):
    """The preset for ``family``, then the ``--config`` file's sections, then ``--set`` (as `accel batch` does)."""
    from .batch import config_for, read_sections

    return config_for(_preset(args), read_sections(args.config, args.sets)[1], family)


def cmd_generate(args) -> int:
    import accel

    from . import generation, outputs

    if args.out and Path(args.out).suffix.lower() not in outputs.IMAGE_SUFFIXES + outputs.VIDEO_SUFFIXES:
        raise UsageError(f"--out {args.out!r}: use a .png/.webp/.jpg (image) or .mp4/.gif (video) file name")
    if args.out:
        outputs.check_writable(Path(args.out))
    if args.model is None:  # the built-in default: the video one when the call asks for video
        from ..pipelines.load import DEFAULT_MODEL, DEFAULT_VIDEO_MODEL

        wants_video = args.frames is not None or (args.out and Path(args.out).suffix.lower() in outputs.VIDEO_SUFFIXES)
        args.model = DEFAULT_VIDEO_MODEL if wants_video else DEFAULT_MODEL
    if args.config and not Path(args.config).is_file():
        raise UsageError(f"--config {args.config!r}: no such file")
    if args.preset:
        names = accel.available_presets()
        if args.preset not in names:
            raise UsageError(f"--preset {args.preset!r}: choose one of {', '.join(names)}")

    pcfg = generation.parallel_config(args.parallel, args.config)
    n = args.gpus or (pcfg.world_size if pcfg else 1)
    if os.environ.get("WORLD_SIZE", "1") == "1" and n > 1:  # no launcher: spawn our own worker group
        if pcfg is None:
            raise UsageError(f"--gpus {n}: say how the processes share the image with --parallel, e.g. "
                             f"--parallel cfg=2 (CFG branches) or sequence={n} (DiT tokens)")
        if n != pcfg.world_size:
            raise UsageError(f"--gpus {n}: --parallel {args.parallel or '(from --config)'} needs {pcfg.world_size} "
                             "processes (cfg x sequence/patch); make the two agree")
        from ..parallel import spawn

        backend = "gloo" if args.device == "cpu" else pcfg.backend
        spawn(_generate_rank, n, (args, pcfg), backend=backend, timeout_s=pcfg.timeout_s)
        return 0
    return _generate(args, pcfg)


def _generate_rank(rank: int, args, pcfg) -> None:
    """One worker of `accel generate --gpus N` (rank 0 writes and prints)."""
    _generate(args, pcfg)


def _generate(args, pcfg) -> int:
    import accel

    from ..pipelines.call import call_kwargs, family_name, is_video, to_frames
    from ..pipelines.load import load
    from . import generation, outputs

    t0 = time.perf_counter()
    pipe = load(args.model, device=args.device, dtype=args.dtype, seed=0)
    load_s = time.perf_counter() - t0
    family = family_name(pipe)
    video = is_video(pipe)
    if args.frames and not video:
        raise UsageError(f"--frames: {args.model} makes images, not video")
    cfg = _config_from_args(args, family)
    accel.apply(pipe, cfg)
    seed, speaks = args.seed, True
    if pcfg is not None:
        from .. import parallel

        accel.parallelize(pipe, pcfg)
        seed, speaks = parallel.shared_seed(args.seed), parallel.is_main()
        if not speaks:
            pipe.set_progress_bar_config(disable=True)  # rank 0 alone prints

    out = Path(args.out) if args.out else Path("outputs") / (
        f"{outputs.slug(args.prompt)}_s{args.seed}{'.mp4' if video else '.png'}")
    if video != (out.suffix.lower() in outputs.VIDEO_SUFFIXES):
        kind = "video (.mp4/.gif)" if video else "image (.png/.webp/.jpg)"
        raise UsageError(f"--out {str(out)!r}: {args.model} makes a {kind}")
    if speaks:
        outputs.check_writable(out)

    def make_kw():  # a fresh generator per call: every run starts from the same noise
        return call_kwargs(pipe, prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                           height=args.height, width=args.width, frames=args.frames, guidance=args.guidance,
                           seed=seed, defaults=generation.generation_defaults(args.model))

    kw = make_kw()
    if args.compare:
        if pcfg is not None:
            raise UsageError("--compare runs on one process: leave out --gpus and --parallel")
        return _compare(args, pipe, cfg, family, make_kw, out, load_s)
    t1 = time.perf_counter()
    try:
        result = pipe(**kw)
    except (ValueError, TypeError) as e:  # pipelines check sizes and arguments with these
        raise UsageError(str(e).strip().splitlines()[0]) from e
    generate_s = time.perf_counter() - t1
    frames = to_frames(result)
    if not speaks:
        return 0

    t2 = time.perf_counter()
    outputs.save_output(frames, out, fps=args.fps)
    save_s = time.perf_counter() - t2
    sidecar = generation.sidecar(
        pipe, output=out.name, model=args.model, family=family, prompt=args.prompt,
        negative_prompt=args.negative_prompt, seed=args.seed, kw=kw,
        preset=_preset(args), config=cfg,
        timings={"load_s": load_s, "generate_s": generate_s, "save_s": save_s})
    if pcfg is not None:
        sidecar["parallel"] = accel.parallel.parallel_stats(pipe)
    outputs.write_json(outputs.sidecar_path(out), sidecar)
    print(f"wrote {out} ({'video' if video else 'image'} {frames.shape[-2]}x{frames.shape[-3]}"
          f"{f', {frames.shape[0]} frames' if video else ''}) in {generate_s:.2f}s; "
          f"sidecar {outputs.sidecar_path(out)}")
    return 0


def _compare(args, pipe, cfg, family, make_kw, out: Path, load_s: float) -> int:
    """`generate --compare`: the baseline (accel removed) and the accelerated pipeline, same seed, timed side by side
    (eval/compare.py), both outputs written; a speed-up is claimed only when some technique engaged."""
    import accel

    from ..config import Config
    from ..eval.compare import report, timed_pair
    from ..pipelines.call import to_frames
    from . import generation, outputs

    stats: dict = {}
    pipe.set_progress_bar_config(disable=True)  # six runs: one report at the end instead of six bars
    if cfg.approx.enabled:  # the repeats would hit the entry the warm-up stored: a speed-up of a self-match
        print("accel: --compare runs without the approximate cache (approx.dir): it measures one call's techniques")
        cfg = cfg.replace(approx={"dir": ""})

    def run():
        try:
            return to_frames(pipe(**make_kw()))
        except (ValueError, TypeError) as e:  # pipelines check sizes and arguments with these
            raise UsageError(str(e).strip().splitlines()[0]) from e

    def accelerated():
        frames = run()
        stats.update(accel.stats(pipe))
        return frames

    pair = timed_pair(run, accelerated, args.repeats,
                      prepare={"baseline": lambda: accel.remove(pipe), "accelerated": lambda: accel.apply(pipe, cfg)})
    base, frames, metrics = report(pair, stats)
    did = metrics["engaged"]
    base_out = out.with_name(f"{out.stem}-baseline{out.suffix}")
    kw = make_kw()
    for path, data, preset, config, st, seconds in (
            (out, frames, _preset(args), cfg, stats, pair["accelerated_s"]),
            (base_out, base, "off", Config(), {"applied": False}, pair["baseline_s"])):
        outputs.save_output(data, path, fps=args.fps)
        side = generation.sidecar(pipe, output=path.name, model=args.model, family=family, prompt=args.prompt,
                                  negative_prompt=args.negative_prompt, seed=args.seed, kw=kw, preset=preset,
                                  config=config, timings={"load_s": load_s, "generate_s": seconds}, stats=st)
        outputs.write_json(outputs.sidecar_path(path), {**side, "compare": metrics})
    runs = f"over {args.repeats} run{'s' if args.repeats > 1 else ''}"
    (b0, b1), (a0, a1) = pair["baseline_range"], pair["accelerated_range"]
    print(f"baseline     {pair['baseline_s']:.3f} s ({b0:.3f}-{b1:.3f} {runs})")
    if did:
        print(f"accelerated  {pair['accelerated_s']:.3f} s ({a0:.3f}-{a1:.3f} {runs}): "
              f"{pair['speedup']:.2f}x faster (preset {_preset(args)})")
        psnr = "identical" if metrics["psnr"] is None else f"PSNR {metrics['psnr']:.1f} dB"
        print(f"fidelity     {psnr}, SSIM {metrics['ssim']:.4f} against the baseline of the same seed")
        for line in did:
            print(f"engaged      {line}")
    else:
        print(f"accelerated  {pair['accelerated_s']:.3f} s ({a0:.3f}-{a1:.3f} {runs}): nothing engaged at this size "
              f"with preset {_preset(args)}, so the outputs are identical and any time difference is noise")
    print(f"wrote {out} and {base_out}, with sidecars")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("accel: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("ACCEL_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"accel: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
