"""One run of the web app, for the page and the API alike: read the inputs, run them, answer.

The page's buttons and the API endpoints (``/generate``, ``/compare``) call the same function with
named values: the base inputs (`BASE_INPUTS`) and one value per technique knob, named as
`accel.web.controls.api_name` names it (``cache_threshold`` for ``cache.threshold``).

The config is the named ``preset`` with every knob that is not None on top
(`accel.web.controls.config_over`). The page sends every knob, so it runs what its controls show;
an API call sends only the knobs it names (the endpoints' knob parameters default to None), so
``predict(prompt=..., preset="fast", api_name="/generate")`` runs preset fast as it is, and
``cache_threshold=0.2`` beside it changes that one field of fast. The summary and the sidecars name
the preset, and the summary lists the fields that differ from it.

The answer is the page's outputs in `OUTPUTS` order. A stopped run (Stop, or a client that went
away: `accel.web.stop`) answers "stopped after N of M steps" in the summary and leaves the other
outputs as they were.
"""

# No `from __future__ import annotations`: gradio reads the handler's annotations (gr.Request) at run time.
import asyncio
import contextlib
import inspect
import random
import threading

from ..config import DEFAULT_PRESET
from ..config import preset as preset_of
from . import history as web_history
from .controls import api_name, changes, config_over, sections
from .engine import Engine, InputError, Stopped
from .limits import LimitError
from .stop import Runs, client_watch

# The base inputs, named as the API takes them; the knobs follow (`web_controls.api_name`).
BASE_INPUTS = ("model", "prompt", "negative_prompt", "width", "height", "steps", "guidance", "seed",
               "randomize_seed", "frames", "fps", "batch", "preset")
# What a run answers, in order (the page's output components, and the API's return values).
OUTPUTS = ("seed", "baseline", "result", "summary", "metrics", "stats", "files", "history", "history_gallery")
HISTORY_SIZE = 48
_PARSED = ("model", "negative_prompt", "width", "height", "steps", "guidance", "frames", "fps", "batch")


def handler(mode: str, engine: Engine, knob_list, family: str, runs: Runs, preset_config=None,
            default_preset: str | None = None):
    """The run function of ``mode`` (generate or compare) for gradio: ``run(history, request, progress,
    **values)``, with a signature naming every value, so the API's parameters have those names.
    ``preset_config(name)``: the Config of a preset name (default `accel.preset` for ``family``; the app
    adds ``config`` for its --config file); ``default_preset``: the preset of a call that names none."""
    import gradio as gr

    preset_config = preset_config or (lambda name: preset_of(name, family))
    default_preset = default_preset or DEFAULT_PRESET

    names = [api_name(k) for k in knob_list]
    progress_marker = gr.Progress()

    async def run(history, request: gr.Request, progress=progress_marker, **values):
        gone, queued_at = client_watch()
        seed = random.randrange(2**31) if values.get("randomize_seed") else values.get("seed")
        preset = values.get("preset") or default_preset
        try:
            given = {k: values[k] for k in _PARSED if values.get(k) is not None}
            req = engine.parse(prompt=values.get("prompt"), **given, **({"seed": seed} if seed is not None else {}))
            base = preset_config(preset)
            cfg = config_over(knob_list, [values.get(n) for n in names], base)
        except (InputError, LimitError, ValueError) as e:
            raise _error(e) from None

        cancel = threading.Event()

        def on_step(phase, i, n):
            if gone():  # the tab closed or the client dropped: stop at the end of this step
                cancel.set()
            progress((i, n or None), desc=f"{phase}: denoising", unit="steps")

        with runs.track(getattr(request, "session_hash", None) or "", cancel, queued_at):
            if cancel.is_set():
                return _stopped("stopped before it started")
            task = asyncio.ensure_future(asyncio.to_thread(engine.run, req, cfg, mode, on_step, cancel, preset))
            try:
                res = await asyncio.shield(task)
            except asyncio.CancelledError:
                # a client's cancel(): stop the pipeline at the end of its step, and keep this event
                # (and its worker) busy until it has, so the next request finds the worker free.
                cancel.set()
                with contextlib.suppress(Exception):
                    await task  # ends with Stopped, or with whatever the last step raised
                raise
            except Stopped as e:
                return _stopped(str(e))
            except (InputError, LimitError) as e:
                raise _error(e) from None
            except Exception as e:  # a failure of the model or the machine: say so, keep serving
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise _error(f"generation failed: {type(e).__name__}: {first}", log=True) from None

        changed = changes(knob_list, cfg, base)
        setting = f"preset `{preset}`" + (f" with {', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''}"
                                          if changed else "")
        items = [(str(p), f"baseline s{req.seed}") for p in res.baseline] + \
                [(str(p), f"{mode} s{req.seed}") for p in res.outputs]
        history = ([web_history.entry(res.record, res.outputs[0])] + (history or []))[:HISTORY_SIZE]
        return (req.seed, items[:len(res.baseline)] or None, items[len(res.baseline):], summary(res, setting),
                res.metrics or None, res.stats, [str(p) for p in (*res.outputs, *res.baseline, *res.sidecars)],
                history, web_history.gallery(history))

    P = inspect.Parameter
    run.__signature__ = inspect.Signature([
        P("history", P.POSITIONAL_OR_KEYWORD),
        P("request", P.POSITIONAL_OR_KEYWORD, annotation=gr.Request),
        P("progress", P.POSITIONAL_OR_KEYWORD, default=progress_marker),
        P("prompt", P.KEYWORD_ONLY),
        *(P(n, P.KEYWORD_ONLY, default=None) for n in (*BASE_INPUTS, *names) if n != "prompt"),
    ])
    run.__name__ = mode
    return run


def _stopped(message: str) -> tuple:
    """The answer of a stopped run: the summary says how far it got; the other outputs stay as they were."""
    import gradio as gr

    text = f"**{message[:1].upper()}{message[1:]}**; nothing was written."
    return tuple(text if name == "summary" else gr.skip() for name in OUTPUTS)


def _error(e, log: bool = False):
    """A ``gr.Error`` for the page and the API. The page shows the message as HTML, so no tag may
    start in it (a prompt or model name echoed back); ">" alone is harmless and keeps ">= 1" readable."""
    import gradio as gr

    return gr.Error(str(e).replace("&", "&amp;").replace("<", "&lt;"), print_exception=log)


def summary(res, setting: str) -> str:
    """The page's summary of a run: time (or the compare's speed-up and fidelity), the setting, the seed."""
    acc = res.seconds["accelerated"]
    steps = res.stats.get("steps", "?")
    m = res.metrics
    if not m:
        line = f"**{acc:.2f} s** ({steps} step{'' if steps == 1 else 's'}, {setting}, seed {res.seed})"
    elif not m.get("engaged"):  # identical outputs: a time difference is noise, not a speed-up
        line = (f"nothing engaged at this size ({setting}): the outputs are identical and any time difference is "
                f"noise · baseline {m['baseline_s']:.2f} s · accelerated {m['accelerated_s']:.2f} s (seed {res.seed})")
    else:
        psnr = "identical (PSNR ∞)" if m["psnr"] is None else f"PSNR {m['psnr']:.2f} dB"
        line = (f"baseline **{m['baseline_s']:.2f} s** · accelerated **{m['accelerated_s']:.2f} s** · "
                f"speedup **{m['speedup']:.2f}x** (medians of {m['repeats']} runs each after a warm-up) · {psnr} · "
                f"SSIM {m['ssim']:.4f} ({setting}, seed {res.seed})")
    return "  \n".join([line, *_technique_lines(res.stats)])


def _technique_lines(stats: dict) -> list[str]:
    """One line per technique that ran: the numbers at the top of its stats (reused, merged, density...)."""
    lines = []
    for section, _ in sections():
        part = stats.get(section)
        if isinstance(part, dict) and part:
            nums = [f"{k.replace('_', ' ')} {v:g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
                    for k, v in part.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
            if nums:
                lines.append(f"{section}: " + ", ".join(nums[:6]))
    return lines
