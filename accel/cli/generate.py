"""`accel generate`: one image or video, optionally compared side by side with the unaccelerated pipeline."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ..config import DEFAULT_PRESET, available_presets
from ..io import outputs
from ..layering import layered, parallel_config, read_sections
from ..pipelines.load import DEFAULT_MODEL, DEFAULT_VIDEO_MODEL, call_defaults, load, quiet_loading
from .args import UsageError, check_approx_dir, check_output, positive_int, row_field


def add_parser(sub) -> None:
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
    g.add_argument("--fps", type=positive_int, default=8, help="video models: frames per second of the MP4")
    g.add_argument("--guidance", type=row_field("guidance"), default=None, help="guidance scale")
    g.add_argument("--seed", type=row_field("seed"), default=0)
    g.add_argument("--compare", action="store_true",
                   help="also run the pipeline without acceleration (same seed), side by side: the speed-up over "
                        "--repeats alternating runs after a warm-up, PSNR/SSIM, and what engaged; writes both outputs")
    g.add_argument("--repeats", type=positive_int, default=2, help="--compare: timed runs of each side")
    g.add_argument("--out", default=None, help="output file (.png/.webp for images, .mp4/.gif for video); "
                                                "default outputs/<prompt>_s<seed>.<ext>")
    g.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if present)")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    g.add_argument("--parallel", default=None, metavar="FIELD=VALUE,...",
                   help="multi-process parallel strategies, e.g. cfg=2,sequence=2 or patch=2,vae=true (fields of "
                        "accel.ParallelConfig; also a [parallel] table of --config); needs that many processes")
    g.add_argument("--gpus", type=positive_int, default=None,
                   help="spawn N worker processes (one per GPU; gloo on CPU) sharing one image by --parallel; "
                        "default: the --parallel degrees' product. Under torchrun/accelerate launch, omit it")
    g.set_defaults(func=cmd_generate)


def _preset(args) -> str:
    return args.preset or DEFAULT_PRESET


def cmd_generate(args) -> int:
    if args.out and Path(args.out).suffix.lower() not in outputs.IMAGE_SUFFIXES + outputs.VIDEO_SUFFIXES:
        raise UsageError(f"--out {args.out!r}: use a .png/.webp/.jpg (image) or .mp4/.gif (video) file name")
    if args.out:
        check_output("--out", args.out)
    if args.model is None:  # the built-in default: the video one when the call asks for video
        wants_video = args.frames is not None or (args.out and Path(args.out).suffix.lower() in outputs.VIDEO_SUFFIXES)
        args.model = DEFAULT_VIDEO_MODEL if wants_video else DEFAULT_MODEL
    if args.config and not Path(args.config).is_file():
        raise UsageError(f"--config {args.config!r}: no such file")
    if args.preset:
        names = available_presets()
        if args.preset not in names:
            raise UsageError(f"--preset {args.preset!r}: choose one of {', '.join(names)}")
    sections = read_sections(args.config, args.sets)[1]  # a bad file or --set is refused before the model loads
    check_approx_dir(sections)

    pcfg = parallel_config(args.parallel, args.config)
    n = args.gpus or (pcfg.world_size if pcfg else 1)
    if os.environ.get("WORLD_SIZE", "1") == "1" and n > 1:  # no launcher: spawn our own worker group
        if pcfg is None:
            raise UsageError(f"--gpus {n}: say how the processes share the image with --parallel, e.g. "
                             f"--parallel cfg=2 (CFG branches) or sequence={n} (DiT tokens)")
        if n != pcfg.world_size:
            raise UsageError(f"--gpus {n}: --parallel {args.parallel or '(from --config)'} needs {pcfg.world_size} "
                             "processes (cfg x sequence/patch); make the two agree")
        with quiet_loading():
            from ..parallel import spawn

        backend = "gloo" if args.device == "cpu" else pcfg.backend
        spawn(_generate_rank, n, (args, pcfg, sections), backend=backend, timeout_s=pcfg.timeout_s)
        return 0
    return _generate(args, pcfg, sections)


def _generate_rank(rank: int, args, pcfg, sections) -> None:
    """One worker of `accel generate --gpus N` (rank 0 writes and prints)."""
    _generate(args, pcfg, sections)


def _generate(args, pcfg, sections: dict) -> int:
    with quiet_loading():  # the engine's first import of diffusers says nothing to a user
        from .. import parallel
        from ..io import generate as once
        from ..pipelines.call import call_kwargs, family_name, is_video

    t0 = time.perf_counter()
    pipe = load(args.model, device=args.device, dtype=args.dtype, seed=0)
    load_s = time.perf_counter() - t0
    family = family_name(pipe)
    video = is_video(pipe)
    if args.frames and not video:
        raise UsageError(f"--frames: {args.model} makes images, not video")
    cfg = layered(_preset(args), sections, family, pcfg)
    once.apply_config(pipe, cfg)
    seed, speaks = args.seed, True
    if pcfg is not None:
        parallel.parallelize(pipe, pcfg)
        seed, speaks = parallel.shared_seed(args.seed), parallel.is_main()
        if not speaks:
            pipe.set_progress_bar_config(disable=True)  # rank 0 alone prints

    out = Path(args.out) if args.out else Path("outputs") / (
        f"{outputs.slug(args.prompt)}_s{args.seed}{'.mp4' if video else '.png'}")
    if video != (out.suffix.lower() in outputs.VIDEO_SUFFIXES):
        kind = "video (.mp4/.gif)" if video else "image (.png/.webp/.jpg)"
        raise UsageError(f"--out {str(out)!r}: {args.model} makes a {kind}")
    if speaks:
        check_output("--out", out)

    def make_kw():  # a fresh generator per call: every run starts from the same noise
        return call_kwargs(pipe, prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                           height=args.height, width=args.width, frames=args.frames, guidance=args.guidance,
                           seed=seed, defaults=call_defaults(args.model))

    record = dict(model=args.model, family=family, prompt=args.prompt, negative_prompt=args.negative_prompt,
                  seed=args.seed)
    if args.compare:
        if pcfg is not None:
            raise UsageError("--compare runs on one process: leave out --gpus and --parallel")
        return _compare(args, pipe, cfg, make_kw, out, load_s, record)
    kw = make_kw()
    try:
        frames, generate_s = once.call(pipe, kw)
    except once.CallError as e:
        raise UsageError(str(e)) from e
    if not speaks:
        return 0
    extra = {"parallel": parallel.parallel_stats(pipe)} if pcfg is not None else None
    sides = []
    out = outputs.keep(out, lambda where: sides.append(once.save(
        pipe, frames, where, fps=args.fps, kw=kw, preset=_preset(args), config=cfg, extra=extra,
        timings={"load_s": load_s, "generate_s": generate_s}, **record)), say=_say)
    if out is None:
        return 1
    side = sides[-1]
    print(f"wrote {out} ({'video' if video else 'image'} {frames.shape[-2]}x{frames.shape[-3]}"
          f"{f', {frames.shape[0]} frames' if video else ''}) in {side['timings']['generate_s']:.2f}s; "
          f"sidecar {outputs.sidecar_path(out)}")
    return 0


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def _compare(args, pipe, cfg, make_kw, out: Path, load_s: float, record: dict) -> int:
    """`generate --compare`: the baseline (accel removed) and the accelerated pipeline, same seed, timed side by side
    (`accel.eval.compare`), both outputs written; a speed-up is claimed only when some technique engaged."""
    from .. import api
    from ..config import Config
    from ..eval.compare import report, timed_pair, within_noise
    from ..io import generate as once

    stats: dict = {}
    pipe.set_progress_bar_config(disable=True)  # six runs: one report at the end instead of six bars
    if cfg.approx.enabled:  # the repeats would hit the entry the warm-up stored: a speed-up of a self-match
        print("accel: --compare runs without the approximate cache (approx.dir): it measures one call's techniques")
        cfg = cfg.replace(approx={"dir": ""})

    def run():
        try:
            return once.call(pipe, make_kw())[0]
        except once.CallError as e:
            raise UsageError(str(e)) from e

    def accelerated():
        frames = run()
        stats.update(api.stats(pipe))
        return frames

    pair = timed_pair(run, accelerated, args.repeats,
                      prepare={"baseline": lambda: api.remove(pipe), "accelerated": lambda: api.apply(pipe, cfg)})
    base, frames, metrics = report(pair, stats)
    did = metrics["engaged"]
    base_out = out.with_name(f"{out.stem}-baseline{out.suffix}")
    kw = make_kw()
    for path, data, preset, config, st, seconds in (
            (out, frames, _preset(args), cfg, stats, pair["accelerated_s"]),
            (base_out, base, "off", Config(), {"applied": False}, pair["baseline_s"])):
        once.save(pipe, data, path, fps=args.fps, kw=kw, preset=preset, config=config, stats=st,
                  timings={"load_s": load_s, "generate_s": seconds}, extra={"compare": metrics}, **record)
    runs = f"over {args.repeats} run{'s' if args.repeats > 1 else ''}"
    (b0, b1), (a0, a1) = pair["baseline_range"], pair["accelerated_range"]
    print(f"baseline     {pair['baseline_s']:.3f} s ({b0:.3f}-{b1:.3f} {runs})")
    if did:
        noise = " (within noise: the ranges overlap)" if within_noise(pair["baseline_range"],
                                                                       pair["accelerated_range"]) else ""
        print(f"accelerated  {pair['accelerated_s']:.3f} s ({a0:.3f}-{a1:.3f} {runs}): "
              f"{pair['speedup']:.2f}x faster{noise} (preset {_preset(args)})")
        psnr = "identical" if metrics["psnr"] is None else f"PSNR {metrics['psnr']:.1f} dB"
        print(f"fidelity     {psnr}, SSIM {metrics['ssim']:.4f} against the baseline of the same seed")
        for line in did:
            print(f"engaged      {line}")
    else:
        print(f"accelerated  {pair['accelerated_s']:.3f} s ({a0:.3f}-{a1:.3f} {runs}): nothing engaged at this size "
              f"with preset {_preset(args)}, so the outputs are identical and any time difference is noise")
    print(f"wrote {out} and {base_out}, with sidecars")
    return 0
