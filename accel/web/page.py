"""`accel app`: a Gradio web app to generate, and to compare accelerated against the baseline.

``build_app(pipe_or_loader, model_name=..., limits=..., out_dir=...)`` builds the ``gr.Blocks`` (tests
inject a tiny pipeline); ``serve`` launches it. This module lays out the page and wires its events;
the technique knobs are generated from the config dataclasses (`accel.web.controls`), a run is
`accel.web.run`, stopping is `accel.web.stop`, and the work itself (limits, runs, files) is
`accel.web.engine`, which knows nothing of gradio.

The API: ``/generate`` and ``/compare`` take named parameters: ``prompt`` (required),
``negative_prompt``, ``width``, ``height``, ``steps``, ``guidance``, ``seed``, ``randomize_seed``,
``frames`` and ``fps`` (video models, or any with ``allow_model_paths``), ``batch``, ``model``,
``preset`` (default balanced), and one per technique knob
named ``section_field`` (``cache_threshold``, ``tokens_ratio``, ``attention_density``...). The rule:
the run uses ``preset``, and each knob you pass changes that field of it; a knob you leave out (None)
keeps the preset's value. The page sends all of its knobs, so it runs what its controls show.

Safe by default: the server binds 127.0.0.1, every request is checked against `Limits` (a request
over a limit gets an error and the server keeps serving), files are served only from the output
folder (gradio's cache of what the page shows is a folder inside it, and the server takes no
uploads: `accel.web.files`), and the page cannot name another model unless ``--allow-model-paths``
is given. Stop sets the stop flag of the page's run, the pipeline stops at the end of the current
step, the page says "stopped after N of M steps", and the worker is free for the next request; a
closed tab or a dropped API client stops its run the same way. History is read back from the output
folder's sidecars when a page opens.
"""

# No `from __future__ import annotations`: gradio reads the handlers' annotations (gr.SelectData)
# at run time, and gradio is imported inside build_app.
import dataclasses
import hashlib
import json
import os
import socket

from ..config import DEFAULT_PRESET, TECHNIQUES, available_presets
from ..io.outputs import write_json
from ..layering import layered
from ..pipelines.call import size_multiple
from . import history as web_history
from .controls import (
    CONFIG_PRESET,
    api_name,
    api_schema,
    config_over,
    knobs,
    section_title,
    sections,
    values_from_config,
    widget,
)
from .engine import Engine
from .examples import example_prompts, placeholder
from .files import RefuseUploads, own_cache, use_cache
from .limits import Limits
from .run import BASE_INPUTS, HISTORY_SIZE, handler
from .stop import Runs


def build_app(pipe_or_loader, model_name: str = "tiny-sd15", *, limits: Limits | None = None,
              out_dir: str | os.PathLike = "outputs/app", workers: int = 1, allow_model_paths: bool = False,
              group=None, approx_cache: str | None = None, config_sections: dict | None = None,
              parallel=None):
    """The web app as a ``gr.Blocks`` (queued; call `serve` or ``.launch`` on it).

    Args:
        pipe_or_loader: a pipeline, a list of pipelines (one per GPU group), or
            ``loader(model, worker_index) -> pipeline`` (which also lets ``--allow-model-paths`` load others).
        model_name: the served model's name (shown, and recorded in sidecars).
        limits: per-request ceilings (`accel.web.limits.Limits`); defaults suit one large GPU.
        out_dir: where outputs, sidecars and configs go; the only folder the server reads files from.
        workers: pipelines to load with a loader; the queue runs one request per pipeline.
        group: rank 0's `accel.web.group.Leader` when a parallel worker group serves the one pipeline.
        approx_cache: the approximate cache's folder (`accel.ApproxCacheConfig.dir`) every Generate uses.
        parallel: the served pipeline's `accel.ParallelConfig`: the presets leave out what its strategies
            cannot run with (the step cache under ``components``), as `accel.layering.layered` does.
        config_sections: the cache/tokens/attention sections of ``accel app --config FILE`` (an `accel tune`
            output, a config file or a sidecar's config): offered as preset ``config`` (over the default preset,
            as `accel generate --config` layers it), which the page and the API then start from.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    from gradio.components.api_component import Api

    engine = Engine(pipe_or_loader, model_name, limits=limits, out_dir=out_dir, workers=workers, group=group,
                    allow_model_paths=allow_model_paths, approx_cache=approx_cache)
    cache = own_cache(engine.out_dir)  # gradio's copies go inside the output folder, not the shared temp folder
    lim = engine.limits
    d = engine.defaults()
    family, video = engine.primary.family, engine.primary.video
    # the page opens on the default preset for this family (or the --config file's config): its knobs start there

    served = None if config_sections is None else layered(DEFAULT_PRESET, config_sections, family, parallel)
    default_preset = DEFAULT_PRESET if served is None else CONFIG_PRESET
    preset_names = tuple(available_presets()) + (() if served is None else (CONFIG_PRESET,))

    def preset_config(name):
        return served if served is not None and name == CONFIG_PRESET else layered(name, {}, family, parallel)

    start = preset_config(default_preset)
    knob_list = [dataclasses.replace(k, default=getattr(getattr(start, k.section), k.name))
                 # the techniques whose record says the page has no controls for them (the approximate cache's
                 # folder is the server's: `accel app --approx-cache DIR`)
                 for k in knobs(hide=tuple(t.section for t in TECHNIQUES if not t.web))]
    concurrency = len(engine.workers)
    runs = Runs()
    multiple = size_multiple(engine.primary.pipe)
    same = _same_presets(preset_names, preset_config)
    preset_info = f"fills the knobs below with the preset for {family}" + (
        f" (for {family}, {'; '.join(f'{a} is the same as {b}' for a, b in same.items())})" if same else "")
    # frames and fps: for video models (and for any model the page may load); an image model's API has neither
    has_frames = video or allow_model_paths

    # gradio's copies of the outputs it shows leave its cache a day after they were last shown, and all of them
    # when the server stops
    with gr.Blocks(title=f"accel: {model_name}", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"## accel — {model_name} ({family}, {'video' if video else 'image'})  \n"
                    "Generate with the acceleration below, or **Compare** to run the unaccelerated baseline "
                    "with the same seed beside it.")
        with gr.Row():
            with gr.Column(scale=2):
                model = gr.Textbox(model_name, label="Model (hub id, local folder or built-in name)",
                                   visible=allow_model_paths, interactive=allow_model_paths, elem_id="model")
                prompt = gr.Textbox(label="Prompt", lines=2, max_length=lim.max_prompt_chars, elem_id="prompt",
                                    placeholder=placeholder(model_name, video),
                                    info=f"at most {lim.max_prompt_chars} characters")
                examples = example_prompts(model_name, video)
                if examples:
                    gr.Examples([[p] for p in examples], inputs=[prompt], label="Example prompts (words this "
                                "built-in model knows)", api_visibility="private", elem_id="examples")
                negative = gr.Textbox(d["negative_prompt"], label="Negative prompt", max_length=lim.max_prompt_chars,
                                      info=f"at most {lim.max_prompt_chars} characters", elem_id="negative_prompt")
                # Whole numbers pass to the run unrounded (precision None): the run refuses 2.5 steps with a
                # message naming the field instead of running 2 (`Engine.parse` checks every value).
                with gr.Row():
                    width = gr.Number(d["width"], label="Width (0: model default)", step=multiple,
                                      info=f"a multiple of {multiple}, at most {lim.max_width}", elem_id="width")
                    height = gr.Number(d["height"], label="Height (0: model default)", step=multiple,
                                       info=f"a multiple of {multiple}, at most {lim.max_height}", elem_id="height")
                with gr.Row():
                    steps = gr.Number(d["steps"], label="Steps", step=1, info=f"at most {lim.max_steps}",
                                      elem_id="steps")
                    guidance = gr.Number(d["guidance"], label="Guidance", step=0.5, elem_id="guidance")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", step=1, elem_id="seed")
                    randomize = gr.Checkbox(False, label="Random seed each run", elem_id="randomize_seed")
                with gr.Row(visible=has_frames):
                    # an image model takes no frames: empty (the model's default) unless the served model is video
                    frames = gr.Number(d["frames"] if video else None, step=1, elem_id="frames",
                                       label="Frames (video models; empty: the model's default)",
                                       info=f"at most {lim.max_frames}")
                    fps = gr.Number(8, label="FPS of the MP4", step=1, elem_id="fps")
                batch = gr.Number(1, label="Outputs per run", step=1, info=f"at most {lim.max_batch}", elem_id="batch")
                preset = gr.Dropdown(list(preset_names), value=default_preset, label="Preset", info=preset_info,
                                     elem_id="preset")
                knob_widgets, field_errors, section_errors = [], {}, {}
                for section, cls in sections():
                    own = [k for k in knob_list if k.section == section]
                    if own:
                        with gr.Accordion(section_title(cls), open=False, elem_id=f"section-{section}"):
                            # a config error shows right under the field it names; one naming only the
                            # section, at the top of the section
                            section_errors[section] = gr.Markdown(visible=False, elem_id=f"config_error-{section}")
                            for k in own:
                                knob_widgets.append(widget(k))
                                field_errors[k.key] = gr.Markdown(visible=False,
                                                                  elem_id=f"config_error-{section}-{k.name}")
                config_error = gr.Markdown(elem_id="config_error")  # errors that name no section
                config_code = gr.Code(start.to_json(), language="json", interactive=False, max_lines=14,
                                      label=CONFIG_LABEL, elem_id="config_json")
                config_file = gr.DownloadButton("Download config", value=_config_file(engine, start))
            with gr.Column(scale=3):
                with gr.Row():
                    gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    cmp_btn = gr.Button("Compare with baseline", elem_id="compare")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                summary = gr.Markdown(label="Summary", show_label=False, elem_id="summary")
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
        # The API's inputs: the page's base inputs, and for each knob a value that defaults to None
        # (the preset's value), so a call names only what it changes (see the module docstring).
        # The API's inputs are their own (hidden) components, not the page's: each documents its type and
        # what it takes, and hands its value to the run untouched, so every value meets the run's one check
        # (a string for steps gets "steps: 'abc' is not a number ...", not a gradio traceback).
        with gr.Group(visible=False):
            api_trigger = gr.Button(visible=False)
            api_knobs = [Api(None, api_schema(k), label=k.key) for k in knob_list]
            api_base = {name: Api(default, schema, label=name) for name, (default, schema) in _api_base(
                model_name, allow_model_paths, d, lim, multiple, has_frames, video, preset_names, default_preset,
                same, family).items()}

        base = dict(zip(BASE_INPUTS, [model, prompt, negative, width, height, steps, guidance, seed, randomize,
                                      frames, fps, batch, preset], strict=True))
        page_inputs = {**base, **{api_name(k): w for k, w in zip(knob_list, knob_widgets, strict=True)}}
        api_inputs = {**api_base, **{api_name(k): w for k, w in zip(knob_list, api_knobs, strict=True)}}
        outputs = [seed, baseline, result, summary, metrics, stats, files, history, history_gallery]
        run_kw = {"inputs": [history], "outputs": outputs, "concurrency_limit": concurrency,
                  "concurrency_id": "pipelines"}
        api_doc = ("{what}. Pass prompt and what you change: preset (default " + default_preset + "), and any "
                   "knob as section_field (cache_threshold=...); a knob left out keeps the preset's value.")
        for mode, button, what in (("generate", gen_btn, "Generate with the acceleration"),
                                   ("compare", cmp_btn, "The baseline and the accelerated run, timed side by side")):
            fn = handler(mode, engine, knob_list, family, runs, preset_config, default_preset)
            # the page: one progress bar, on the main output; the API: named parameters
            button.click(fn, inputs_kwargs=page_inputs, show_progress="full", show_progress_on=[result],
                         api_name=f"page_{mode}", api_visibility="private", **run_kw)
            api_trigger.click(fn, inputs_kwargs=api_inputs, api_name=mode, api_description=api_doc.format(what=what),
                              **run_kw)

        ui = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}

        def stop(request: gr.Request):
            runs.stop(request.session_hash)

        stop_btn.click(stop, **ui)

        def show_config(preset_name, *values):
            boxes = dict.fromkeys([*field_errors, *section_errors], "")
            try:
                cfg = config_over(knob_list, values, preset_config(preset_name))
            except ValueError as e:
                message = f"**Config error:** {str(e).replace('<', '&lt;')}"
                key = str(e).split(":", 1)[0].strip()  # "cache.interval: ..." -> the field, else its section
                where = key if key in field_errors else key.split(".", 1)[0]
                if where in boxes:
                    boxes[where], message = message, ""
                # the JSON and the download keep the last valid config, and say so
                return (gr.update(label=CONFIG_LABEL_STALE), gr.update(label="Download config (the last valid one)"),
                        *_boxes(boxes), message)
            return (gr.update(value=cfg.to_json(), label=CONFIG_LABEL),
                    gr.update(value=_config_file(engine, cfg), label="Download config"), *_boxes(boxes), "")

        gr.on([w.change for w in knob_widgets], show_config, inputs=[preset, *knob_widgets],
              outputs=[config_code, config_file, *field_errors.values(), *section_errors.values(), config_error], **ui)

        def apply_preset(name):
            return values_from_config(knob_list, preset_config(name))

        preset.change(apply_preset, inputs=preset, outputs=knob_widgets, **ui)

        def select_history(items, evt: gr.SelectData):
            return items[evt.index]["record"] if 0 <= evt.index < len(items) else None

        history_gallery.select(select_history, inputs=history, outputs=history_record, **ui)

        def load_history():
            entries = web_history.load(engine.out_dir, HISTORY_SIZE)
            return entries, web_history.gallery(entries)

        demo.load(load_history, outputs=[history, history_gallery], **ui)

    demo.queue(max_size=lim.max_queue, default_concurrency_limit=concurrency)
    demo.accel_engine, demo.accel_cache = engine, cache
    return demo


CONFIG_LABEL = "Config (sidecar-compatible: `accel generate --config FILE`)"
CONFIG_LABEL_STALE = "Config: the last valid one, not what the controls show (fix the config error above)"


def _boxes(messages: dict) -> list:
    """The error boxes' updates: a box with a message shows it, the others hide."""
    import gradio as gr

    return [gr.update(value=m, visible=bool(m)) for m in messages.values()]


def _same_presets(names, preset_config) -> dict:
    """``{preset: an earlier preset with the same config}`` (on a family where, say, fast is balanced)."""
    seen, same = {}, {}
    for name in names:
        text = preset_config(name).to_json()
        if text in seen:
            same[name] = seen[text]
        else:
            seen[text] = name
    return same


def _api_base(model_name, allow_model_paths, d, lim, multiple, has_frames, video, preset_names, default_preset,
              same, family) -> dict:
    """The API's base parameters as ``{name: (default, JSON schema with its description)}``, in
    `BASE_INPUTS` order; frames and fps only where the model may be video (``has_frames``)."""
    def typed(kind, text, **more):
        return {"type": kind, "additional_description": text, **more}

    size = "pixels, a multiple of {m}, at most {top}; 0: the model's default"
    alike = "; ".join(f"{a} is the same as {b} for {family}" for a, b in same.items())
    out = {
        "model": (model_name, typed("string", "the served model" + (
            "; or a hub id, local folder or built-in name to load" if allow_model_paths
            else "; this server loads no other"))),
        "prompt": (None, typed("string", f"what to generate, at most {lim.max_prompt_chars} characters")),
        "negative_prompt": (d["negative_prompt"], typed(
            "string", f"what to steer away from, at most {lim.max_prompt_chars} characters")),
        "width": (d["width"], typed("integer", size.format(m=multiple, top=lim.max_width))),
        "height": (d["height"], typed("integer", size.format(m=multiple, top=lim.max_height))),
        "steps": (d["steps"], typed("integer", f"denoising steps, 1 to {lim.max_steps}")),
        "guidance": (d["guidance"], typed("number", "guidance scale")),
        "seed": (0, typed("integer", f"0 to {2**63 - 1}; the same seed and inputs give the same output")),
        "randomize_seed": (False, typed("boolean", "true: a new random seed (the answer's seed says which)")),
        "frames": (d["frames"] if video else None, typed("integer", f"video frames, 1 to {lim.max_frames}" + (
            "" if video else "; video models only (the model's default when left out)"))),
        "fps": (8, typed("integer", "frames per second of the MP4, 1 to 240")),
        "batch": (1, typed("integer", f"outputs per run, 1 to {lim.max_batch}")),
        "preset": (default_preset, {"enum": list(preset_names), "additional_description": (
            "the acceleration the knobs below change" + (f"; {alike}" if alike else ""))}),
    }
    if not has_frames:
        del out["frames"], out["fps"]
    return out


def _config_file(engine: Engine, cfg) -> str:
    """The config as a JSON file in the output folder (named by its content, so edits don't pile up)."""
    text = cfg.to_json()
    folder = engine.out_dir / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"accel-config-{hashlib.sha1(text.encode()).hexdigest()[:10]}.json"
    if not path.exists():
        write_json(path, json.loads(text))
    return str(path)


def serve(demo, host: str = "127.0.0.1", port: int | None = None, *, block: bool = True, quiet: bool = False):
    """Launch ``demo`` (from `build_app`) on ``port`` (None: a free one); with ``block=False`` return
    its URL once it serves (stop it with ``demo.close()``). Gradio's own start-up lines stay out (their
    hints are about ``launch()`` and a share link this app never makes); unless ``quiet``, one line says
    where it serves. A port in use is an `OSError` naming the port."""
    from starlette.middleware import Middleware  # gradio's web framework, imported with it

    engine: Engine = demo.accel_engine
    if port is None:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    use_cache(demo.accel_cache)  # the server's own cache folder is this app's (`accel.web.files`)
    try:
        _, url, _ = demo.launch(
            server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, share=False,
            allowed_paths=[str(engine.out_dir)], show_error=False, ssr_mode=False, mcp_server=False, pwa=False,
            enable_monitoring=False, max_file_size="1mb", run_history=False,
            app_kwargs={"middleware": [Middleware(RefuseUploads)]},
        )
    except OSError as e:
        if "Cannot find empty port" not in str(e):
            raise
        raise OSError(f"port {port} on {host} is in use (another server?); choose another port") from None
    if not quiet:
        print(f"accel app: serving on {url} (Ctrl+C stops it)", flush=True)
    if block:
        demo.block_thread()
    return url
