"""`accel app`: a Gradio web app to generate, and to compare accelerated against the baseline.

``build_app(pipe_or_loader, model_name=..., limits=..., out_dir=...)`` builds the ``gr.Blocks`` (tests
inject a tiny pipeline); ``serve`` launches it. The technique knobs are generated from the config
dataclasses (`accel.app.web_controls`), so each technique brings its own controls; the work itself
(limits, runs, files) is `accel.app.web_engine`, which knows nothing of gradio.

Safe by default: the server binds 127.0.0.1, every request is checked against `Limits` (a request
over a limit gets an error and the server keeps serving), files are served only from the output
folder, and the page cannot name another model unless ``--allow-model-paths`` is given.
Stop cancels the gradio event; the cancellation sets the run's stop flag, the pipeline stops at the
end of the current step, and the worker is free for the next request.
"""

# No `from __future__ import annotations`: gradio reads the handlers' annotations (gr.SelectData)
# at run time, and gradio is imported inside build_app.
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import socket
import threading
from pathlib import Path

from .web_controls import config_from_values, knobs, section_title, sections, values_from_config, widget
from .web_engine import Engine, InputError, Stopped
from .web_limits import FLAGS, LimitError, Limits

HISTORY_SIZE = 48
# The page's inputs in the order the API takes them (gradio_client calls use this order).
BASE_INPUTS = ("model", "prompt", "negative_prompt", "width", "height", "steps", "guidance", "seed",
               "randomize_seed", "frames", "fps", "batch", "preset")


def build_app(pipe_or_loader, model_name: str = "tiny-sd15", *, limits: Limits | None = None,
              out_dir: str | os.PathLike = "outputs/app", workers: int = 1, allow_model_paths: bool = False,
              group=None):
    """The web app as a ``gr.Blocks`` (queued; call `serve` or ``.launch`` on it).

    Args:
        pipe_or_loader: a pipeline, a list of pipelines (one per GPU group), or
            ``loader(model, worker_index) -> pipeline`` (which also lets ``--allow-model-paths`` load others).
        model_name: the served model's name (shown, and recorded in sidecars).
        limits: per-request ceilings (`accel.app.web_limits.Limits`); defaults suit one large GPU.
        out_dir: where outputs, sidecars and configs go; the only folder the server reads files from.
        workers: pipelines to load with a loader; the queue runs one request per pipeline.
        group: rank 0's `accel.app.web_group.Leader` when a parallel worker group serves the one pipeline.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    import accel

    engine = Engine(pipe_or_loader, model_name, limits=limits, out_dir=out_dir, workers=workers, group=group,
                    allow_model_paths=allow_model_paths)
    lim = engine.limits
    d = engine.defaults()
    family, video = engine.primary.family, engine.primary.video
    from .generation import DEFAULT_PRESET

    # the page opens on the default preset for this family: its knobs start at the preset's values
    start = accel.preset(DEFAULT_PRESET, family)
    knob_list = [dataclasses.replace(k, default=getattr(getattr(start, k.section), k.name))
                 for k in knobs(hide=("parallel",))]  # multi-process parallelism is `accel generate`'s, not the page's
    concurrency = len(engine.workers)

    with gr.Blocks(title=f"accel: {model_name}", analytics_enabled=False) as demo:
        gr.Markdown(f"## accel — {model_name} ({family}, {'video' if video else 'image'})  \n"
                    "Generate with the acceleration below, or **Compare** to run the unaccelerated baseline "
                    "with the same seed beside it.")
        with gr.Row():
            with gr.Column(scale=2):
                model = gr.Textbox(model_name, label="Model (hub id, local folder or built-in name)",
                                   visible=allow_model_paths, interactive=allow_model_paths, elem_id="model")
                prompt = gr.Textbox(label="Prompt", lines=2, max_length=lim.max_prompt_chars, elem_id="prompt",
                                    placeholder="a photo of a cat riding a horse on the moon")
                negative = gr.Textbox(d["negative_prompt"], label="Negative prompt", elem_id="negative_prompt")
                with gr.Row():
                    width = gr.Number(d["width"], label="Width (0: model default)", precision=0, step=8,
                                      info=f"at most {lim.max_width}", elem_id="width")
                    height = gr.Number(d["height"], label="Height (0: model default)", precision=0, step=8,
                                       info=f"at most {lim.max_height}", elem_id="height")
                with gr.Row():
                    steps = gr.Number(d["steps"], label="Steps", precision=0, info=f"at most {lim.max_steps}",
                                      elem_id="steps")
                    guidance = gr.Number(d["guidance"], label="Guidance", step=0.5, elem_id="guidance")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
                    randomize = gr.Checkbox(False, label="Random seed each run", elem_id="randomize_seed")
                with gr.Row(visible=video or allow_model_paths):
                    frames = gr.Number(d["frames"], label="Frames (video models)", precision=0,
                                       info=f"at most {lim.max_frames}", elem_id="frames")
                    fps = gr.Number(8, label="FPS of the MP4", precision=0, elem_id="fps")
                batch = gr.Number(1, label="Outputs per run", precision=0,
                                  info=f"at most {lim.max_batch}", elem_id="batch")
                preset = gr.Dropdown(list(accel.available_presets()), value=DEFAULT_PRESET, label="Preset",
                                     info=f"fills the knobs below with the preset for {family}", elem_id="preset")
                knob_widgets = []
                for section, cls in sections():
                    own = [k for k in knob_list if k.section == section]
                    if own:
                        with gr.Accordion(section_title(cls), open=False):
                            knob_widgets += [widget(k) for k in own]
                config_error = gr.Markdown(elem_id="config_error")
                config_code = gr.Code(accel.Config().to_json(), language="json", interactive=False, max_lines=14,
                                      label="Config (sidecar-compatible: `accel generate --config FILE`)")
                config_file = gr.DownloadButton("Download config", value=_config_file(engine, accel.Config()))
            with gr.Column(scale=3):
                with gr.Row():
                    gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    cmp_btn = gr.Button("Compare with baseline", elem_id="compare")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                summary = gr.Markdown(elem_id="summary")
                with gr.Row():
                    baseline = gr.Gallery(label="Baseline (accel removed)", columns=1, height="auto",
                                          elem_id="baseline")
                    result = gr.Gallery(label="Accelerated", columns=1, height="auto", elem_id="result")
                metrics = gr.JSON(label="Speed and fidelity (compare)", elem_id="metrics")
                stats = gr.JSON(label="accel.stats", max_height=320, elem_id="stats")
                files = gr.File(label="Downloads: outputs and their sidecar JSON", file_count="multiple",
                                interactive=False, elem_id="files")
                history_gallery = gr.Gallery(label="History (select one for its config)", columns=8, rows=1,
                                             height=200, object_fit="contain", elem_id="history")
                history_record = gr.JSON(label="Selected run", max_height=320, elem_id="history_record")
        history = gr.State([])

        base_inputs = [model, prompt, negative, width, height, steps, guidance, seed, randomize, frames, fps,
                       batch, preset]
        outputs = [seed, baseline, result, summary, metrics, stats, files, history, history_gallery]
        handler_args = (engine, knob_list, family)
        run_kw = {"inputs": [*base_inputs, *knob_widgets, history], "outputs": outputs,
                  "concurrency_limit": concurrency, "concurrency_id": "pipelines"}
        gen_evt = gen_btn.click(_handler("generate", *handler_args), api_name="generate", **run_kw)
        cmp_evt = cmp_btn.click(_handler("compare", *handler_args), api_name="compare", **run_kw)
        stop_btn.click(None, cancels=[gen_evt, cmp_evt])

        ui = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}

        def show_config(*values):
            try:
                cfg = config_from_values(knob_list, values)
            except ValueError as e:
                return gr.update(), gr.update(), f"**Config error:** {e}"
            return cfg.to_json(), _config_file(engine, cfg), ""

        gr.on([w.change for w in knob_widgets], show_config, inputs=knob_widgets,
              outputs=[config_code, config_file, config_error], **ui)

        def apply_preset(name):
            return values_from_config(knob_list, accel.preset(name, family))

        preset.change(apply_preset, inputs=preset, outputs=knob_widgets, **ui)

        def select_history(items, evt: gr.SelectData):
            return items[evt.index]["record"] if 0 <= evt.index < len(items) else None

        history_gallery.select(select_history, inputs=history, outputs=history_record, **ui)

    demo.queue(max_size=lim.max_queue, default_concurrency_limit=concurrency)
    demo.accel_engine = engine
    demo.accel_inputs = [*BASE_INPUTS, *(f"{k.section}.{k.name}" for k in knob_list)]
    demo.accel_defaults = {"model": model_name, "prompt": "", "negative_prompt": d["negative_prompt"],
                           "width": d["width"], "height": d["height"], "steps": d["steps"],
                           "guidance": d["guidance"], "seed": 0, "randomize_seed": False, "frames": d["frames"],
                           "fps": 8, "batch": 1, "preset": DEFAULT_PRESET,
                           **{f"{k.section}.{k.name}": v for k, v in
                              zip(knob_list, values_from_config(knob_list, start), strict=True)}}
    return demo


def _handler(mode: str, engine: Engine, knob_list, family: str):
    import gradio as gr

    n_base = len(BASE_INPUTS)

    async def run(*values, progress=gr.Progress()):
        raw = dict(zip(BASE_INPUTS, values[:n_base], strict=True))
        knob_values, history = values[n_base:-1], values[-1] or []
        seed = random.randrange(2**31) if raw.pop("randomize_seed") else raw["seed"]
        preset = raw.pop("preset")
        try:
            req = engine.parse(**{**raw, "seed": seed})
            cfg = config_from_values(knob_list, knob_values)
        except (InputError, LimitError, ValueError) as e:
            raise _error(e) from None

        def on_step(phase, i, n):
            progress((i, n or None), desc=f"{phase}: denoising", unit="steps")

        cancel = threading.Event()
        task = asyncio.ensure_future(asyncio.to_thread(engine.run, req, cfg, mode, on_step, cancel))
        try:
            res = await asyncio.shield(task)
        except asyncio.CancelledError:
            # Stop button or client cancel: stop the pipeline at the end of its step, and keep this
            # event (and its worker) busy until it has, so the next request finds the worker free.
            cancel.set()
            with contextlib.suppress(Exception):
                await task  # ends with Stopped, or with whatever the last step raised
            raise
        except (InputError, LimitError, Stopped) as e:
            raise _error(e) from None
        except Exception as e:  # a failure of the model or the machine: say so, keep serving
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise _error(f"generation failed: {type(e).__name__}: {first}", log=True) from None

        preset_used = preset if cfg == _preset_config(preset, family) else None
        items = [(str(p), f"baseline s{req.seed}") for p in res.baseline] + \
                [(str(p), f"{mode} s{req.seed}") for p in res.outputs]
        m = res.metrics
        if m:
            entry_caption = (f"{m['speedup']}x, PSNR {'∞' if m['psnr'] is None else m['psnr']}" if m.get("engaged")
                             else "nothing engaged")
        else:
            entry_caption = f"{res.seconds['accelerated']:.2f}s"
        entry_caption += f" · s{req.seed}"
        record = {**res.record, "preset": preset_used}
        history = ([{"path": str(res.outputs[0]), "caption": entry_caption, "record": record}] + history)[:HISTORY_SIZE]
        return (req.seed, items[:len(res.baseline)] or None, items[len(res.baseline):],
                _summary(res, preset_used), res.metrics or None, res.stats,
                [str(p) for p in (*res.outputs, *res.baseline, *res.sidecars)],
                history, [(h["path"], h["caption"]) for h in history])

    run.__name__ = mode
    return run


def _error(e, log: bool = False):
    """A ``gr.Error`` for the page and the API. The page shows the message as HTML, so no tag may
    start in it (a prompt or model name echoed back); ">" alone is harmless and keeps ">= 1" readable."""
    import gradio as gr

    return gr.Error(str(e).replace("&", "&amp;").replace("<", "&lt;"), print_exception=log)


def _preset_config(name: str, family: str):
    import accel

    try:
        return accel.preset(name, family)
    except ValueError:
        return None


def _summary(res, preset) -> str:
    acc = res.seconds["accelerated"]
    steps = res.stats.get("steps", "?")
    setting = f"preset `{preset}`" if preset else "custom config"
    if not res.metrics:
        line = f"**{acc:.2f} s** ({steps} step{'' if steps == 1 else 's'}, {setting}, seed {res.seed})"
    elif not res.metrics.get("engaged"):  # identical outputs: a time difference is noise, not a speed-up
        m = res.metrics
        line = (f"nothing engaged at this size ({setting}): the outputs are identical and any time difference is "
                f"noise · baseline {m['baseline_s']:.2f} s · accelerated {m['accelerated_s']:.2f} s (seed {res.seed})")
    else:
        m = res.metrics
        psnr = "identical (PSNR ∞)" if m["psnr"] is None else f"PSNR {m['psnr']:.2f} dB"
        line = (f"baseline **{m['baseline_s']:.2f} s** · accelerated **{m['accelerated_s']:.2f} s** · "
                f"speedup **{m['speedup']:.2f}x** (medians of {m['repeats']} runs each after a warm-up) · {psnr} · "
                f"SSIM {m['ssim']:.4f} ({setting}, seed {res.seed})")
    return "  \n".join([line, *_technique_lines(res.stats)])


def _technique_lines(stats: dict) -> list[str]:
    """One line per technique that ran: the numbers at the top of its stats (reused, merged, density...)."""
    from .web_controls import sections

    lines = []
    for section, _ in sections():
        part = stats.get(section)
        if isinstance(part, dict) and part:
            nums = [f"{k.replace('_', ' ')} {v:g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
                    for k, v in part.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
            if nums:
                lines.append(f"{section}: " + ", ".join(nums[:6]))
    return lines


def _config_file(engine: Engine, cfg) -> str:
    """The config as a JSON file in the output folder (named by its content, so edits don't pile up)."""
    from .outputs import write_json

    text = cfg.to_json()
    folder = engine.out_dir / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"accel-config-{hashlib.sha1(text.encode()).hexdigest()[:10]}.json"
    if not path.exists():
        write_json(path, json.loads(text))
    return str(path)


def serve(demo, host: str = "127.0.0.1", port: int | None = None, *, block: bool = True, quiet: bool = False):
    """Launch ``demo`` (from `build_app`) on ``port`` (None: a free one); with ``block=False`` return
    its URL once it serves (stop it with ``demo.close()``)."""
    engine: Engine = demo.accel_engine
    if port is None:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    _, url, _ = demo.launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, quiet=quiet, share=False,
        allowed_paths=[str(engine.out_dir)], show_error=False, ssr_mode=False, mcp_server=False, pwa=False,
        enable_monitoring=False, max_file_size="1mb",
    )
    return url


# --- `accel app` --------------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    from .cli import _positive_int

    p = subparsers.add_parser("app", help="web app: generate, and compare accelerated against the baseline")
    p.add_argument("--model", default=None, help="hub id, local folder or built-in name (default ref-sd)")
    p.add_argument("--gpus", type=_positive_int, default=1,
                   help="load one pipeline per GPU; the queue runs one request per GPU at a time")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_positive_int, default=7860)
    p.add_argument("--out-dir", default="outputs/app", help="outputs, sidecars and configs; the only folder served")
    p.add_argument("--allow-model-paths", action="store_true",
                   help="let the page load other models (hub ids, local folders); off by default")
    p.add_argument("--limits", default=None, help="limits file (.json/.yaml/.toml) with the --max-* fields")
    for flag, name in FLAGS.items():
        p.add_argument(flag, type=_positive_int, default=None, dest=name,
                       help=f"{Limits.field_help()[name]} (default {getattr(Limits(), name)})")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if present)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    p.add_argument("--parallel", default=None, metavar="FIELD=VALUE,...",
                   help="serve one pipeline on a parallel worker group, e.g. cfg=2 (accel.ParallelConfig): spawns "
                        "the degrees' product of processes; rank 0 serves the page, the others follow")
    p.set_defaults(func=cmd_app)


def limits_from_args(args) -> Limits:
    base = Limits.load(args.limits) if args.limits else Limits()
    changes = {name: getattr(args, name) for name in FLAGS.values() if getattr(args, name, None) is not None}
    return base.replace(**changes) if changes else base


def cmd_app(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise RuntimeError("the web app needs gradio: pip install 'diffusers-accel[app]'") from None
    from ..pipelines.load import DEFAULT_MODEL, load

    model = args.model or DEFAULT_MODEL
    limits = limits_from_args(args)
    from .generation import parallel_config

    pcfg = parallel_config(args.parallel)
    if pcfg is not None and pcfg.world_size > 1:
        if args.gpus not in (1, pcfg.world_size):
            raise RuntimeError(f"--gpus {args.gpus}: --parallel {args.parallel} serves one pipeline on "
                               f"{pcfg.world_size} processes; give --gpus {pcfg.world_size} or leave it out")
        from ..parallel import spawn

        backend = "gloo" if args.device == "cpu" else pcfg.backend
        spawn(_app_rank, pcfg.world_size, (args, pcfg, model, limits), backend=backend, timeout_s=pcfg.timeout_s)
        return 0
    if args.gpus > 1:
        import torch

        if torch.cuda.device_count() < args.gpus:
            raise RuntimeError(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} CUDA device(s)")

    def loader(name: str, index: int):
        device = f"cuda:{index}" if args.gpus > 1 else args.device
        pipe = load(name, device=device, dtype=args.dtype, seed=0)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return _serve_app(args, loader, model, limits, args.gpus)


def _app_rank(rank: int, args, pcfg, model: str, limits) -> None:
    """One process of `accel app --parallel`: rank 0 serves the page, the others follow it."""
    import accel

    from ..pipelines.load import load
    from .web_group import Leader, follow, message_group

    group = message_group()

    def loader(name: str, index: int):
        pipe = load(name, device=args.device, dtype=args.dtype, seed=0)
        pipe.set_progress_bar_config(disable=True)
        return accel.parallelize(pipe, pcfg)

    if rank:
        return follow(loader, model, group)
    leader = Leader(group)
    try:
        _serve_app(args, loader, model, limits, 1, leader)
    finally:
        leader.close()


def _serve_app(args, loader, model: str, limits, workers: int, group=None) -> int:
    out_dir = Path(args.out_dir)
    from .outputs import check_writable

    check_writable(out_dir / "x.png")
    demo = build_app(loader, model, limits=limits, out_dir=out_dir, workers=workers,
                     allow_model_paths=args.allow_model_paths, group=group)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"accel app: serving on {args.host}: anyone who can reach this address can generate "
              "(limits still apply)")
    print(f"accel app: {model} on {workers} worker(s){' (a parallel group)' if group else ''}; "
          f"outputs in {out_dir.resolve()}")
    serve(demo, args.host, args.port, block=True)
    return 0
