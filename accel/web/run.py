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
import math
import re
import threading

from ..config import DEFAULT_PRESET
from ..config import preset as preset_of
from ..eval.compare import engaged
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
        preset = values.get("preset") or default_preset
        try:  # every value is checked before anything runs: the base inputs by the engine, the knobs by the config
            given = {k: values[k] for k in BASE_INPUTS if k != "preset" and values.get(k) is not None}
            req = engine.parse(**{"prompt": None, **given})
            if not isinstance(preset, str):
                raise InputError(f"preset: {preset!r} is not a preset name; give one as text")
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
        items = [(str(p), f"baseline · seed {req.seed}") for p in res.baseline] + \
                [(str(p), f"accelerated · seed {req.seed}") for p in res.outputs]
        history = ([web_history.entry(res.record, res.outputs[0])] + (history or []))[:HISTORY_SIZE]
        return (req.seed, items[:len(res.baseline)] or None, items[len(res.baseline):],
                summary(res, setting, cfg.enabled),
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
    """A ``gr.Error`` for the page and the API. The page shows the message as HTML, so no tag may start in
    it (a prompt or model name echoed back): ``<`` before a letter, ``/``, ``!`` or ``?`` and ``&`` before a
    letter or ``#`` become entities. Nothing else does, so the API's text reads as written ("<= 9", "< 1")."""
    import gradio as gr

    text = re.sub(r"&(?=[A-Za-z#])", "&amp;", str(e))
    return gr.Error(re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text), print_exception=log)


def summary(res, setting: str, enabled: bool = True) -> str:
    """The page's summary of a run: time (or the compare's speed-up, with each side's range, and fidelity), the
    setting, the seed, and a line per technique: what it did, or that it did not engage and why. ``enabled``:
    whether the config turns any technique on (when it does not, that is why nothing engaged)."""
    acc = res.seconds["accelerated"]
    steps = res.stats.get("steps", "?")
    m = res.metrics
    if not m:
        line = f"**{acc:.2f} s** ({steps} step{'' if steps == 1 else 's'}, {setting}, seed {res.seed})"
    else:
        runs = (f"baseline **{_s(m['baseline_s'])} s** ({_span(m['baseline_range'])}) · accelerated "
                f"**{_s(m['accelerated_s'])} s** ({_span(m['accelerated_range'])})")
        if not m.get("engaged"):  # identical outputs: a time difference is noise, not a speed-up
            why = f"{setting} turns every technique off" if not enabled else f"nothing engaged at this size ({setting})"
            line = (f"{why}: the outputs are identical and any time difference is noise, so no speed-up is claimed · "
                    f"{runs} (seed {res.seed})")
        else:
            psnr = "identical (PSNR ∞)" if m["psnr"] is None else f"PSNR {m['psnr']:.2f} dB"
            speed = (f"speedup **{m['speedup']:.2f}x, within noise** (the ranges overlap: these runs do not tell the "
                     "two apart)" if m.get("within_noise") else f"speedup **{m['speedup']:.2f}x**")
            line = (f"{runs} · {speed} (medians of {m['repeats']} runs each after a warm-up, fastest-slowest in "
                    f"brackets) · {psnr} · SSIM {m['ssim']:.4f} ({setting}, seed {res.seed})")
    return "  \n".join([line, *technique_lines(res.stats)])


def _s(seconds: float) -> str:
    return f"{seconds:.3g}"  # 3 significant digits: 12.3, 1.23, 0.0123


def _span(r) -> str:
    return f"{_s(r[0])}-{_s(r[1])} s"


def technique_lines(stats: dict) -> list[str]:
    """One line per technique that ran: what it did, in the words of Compare's "engaged" list
    (`accel.eval.compare.engaged`), or "not engaged" with the reason its stats or its config give."""
    lines = []
    for section, _ in sections():
        part = stats.get(section)
        if not isinstance(part, dict) or not part:
            continue
        did = engaged({section: part, "total_steps": stats.get("total_steps")})
        if did:
            lines += did
        elif section in _IDLE:
            name, why = _IDLE[section](part, stats)
            lines.append(f"{name}: not engaged ({why})")
        else:  # a technique this page has no words for: the numbers at the top of its stats
            nums = [f"{k.replace('_', ' ')} {v:g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
                    for k, v in part.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
            if nums:
                lines.append(f"{section}: " + ", ".join(nums[:6]))
    return lines


def _idle_cache(part: dict, stats: dict):
    cfg = (stats.get("config") or {}).get("cache") or {}
    steps, warmup = stats.get("total_steps") or 0, cfg.get("warmup_steps") or 0
    if steps and warmup >= steps:
        return "step cache", f"its {warmup} warm-up steps cover all {steps} steps"
    return "step cache", f"no step reused its cache; computed all {part.get('computed', 0)}"


def _idle_tokens(part: dict, stats: dict):
    cfg = (stats.get("config") or {}).get("tokens") or {}
    method = part.get("method") or cfg.get("method")
    name = {"merge": "token merging", "prune": "token pruning"}.get(method, f"token reduction ({method})")
    tokens, floor = math.prod(stats.get("grid") or (0,)), cfg.get("min_tokens") or 0
    if floor and tokens < floor:
        return name, f"{tokens} tokens < min_tokens {floor}"
    if not part.get("ratio"):
        return name, "ratio 0"
    return name, "no block removed any token"


def _idle_attention(part: dict, stats: dict):
    return "sparse attention", part.get("why_dense") or "every attention call ran dense"


def _idle_approx(part: dict, stats: dict):
    return "approximate cache", part.get("reason") or "no stored prompt was close enough"


_IDLE = {"cache": _idle_cache, "tokens": _idle_tokens, "attention": _idle_attention, "approx": _idle_approx}
