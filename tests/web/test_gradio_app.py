"""The web app end to end through gradio_client: generate, compare, limits, bad input, stop, files.

Each server binds 127.0.0.1 on a free port, serves a tiny random-weight pipeline, and is closed by
its fixture. Requests use the API's named parameters (``prompt=...``, ``preset=...``, knobs as
``cache_interval=...``); a knob left out keeps the preset's value.
"""

import asyncio
import dataclasses
import importlib
import json
import math
import re
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the web app needs gradio: pip install 'diffusers-accel[app]'")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import accel  # noqa: E402
from accel.config_base import ConfigBase, spec  # noqa: E402
from accel.eval.compare import within_noise  # noqa: E402
from accel.web import controls as web_controls  # noqa: E402
from accel.web.limits import Limits  # noqa: E402
from accel.web.page import build_app, serve  # noqa: E402

LIMITS = Limits(max_width=64, max_height=64, max_steps=400, max_frames=9, max_batch=2, max_queue=4)


class Server:
    def __init__(self, demo):
        self.demo, self.engine = demo, demo.accel_engine
        self.url = serve(demo, port=None, block=False, quiet=True)
        self.client = Client(self.url, verbose=False)

    @staticmethod
    def params(**changes) -> dict:
        """API parameters: knobs may be written as their config keys ("cache.interval")."""
        return {k.replace(".", "_"): v for k, v in changes.items()}

    def call(self, api="/generate", **changes):
        keys = ("seed", "baseline", "result", "summary", "metrics", "stats", "files", "history")
        return dict(zip(keys, self.client.predict(api_name=api, **self.params(**changes))[:len(keys)], strict=True))

    def close(self):
        self.client.close()
        self.demo.close()


@pytest.fixture(scope="module")
def image_app(tmp_path_factory, tiny_cache):
    yield from _serving(tiny_cache("sd15"), "tiny-sd15", tmp_path_factory)


@pytest.fixture(scope="module")
def video_app(tmp_path_factory, tiny_cache):
    yield from _serving(tiny_cache("wan"), "tiny-wan", tmp_path_factory)


def _serving(pipe, name, tmp_path_factory):
    srv = Server(build_app(pipe, name, limits=LIMITS, out_dir=tmp_path_factory.mktemp(name)))
    try:
        yield srv
    finally:
        srv.close()
        accel.remove(pipe)  # the session's shared pipeline goes back as it came


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _sidecar_of(out_dir: Path, name: str) -> dict:
    return json.loads((out_dir / (name + ".json")).read_text())


def test_generate_image_writes_output_sidecar_and_history(image_app):
    r = image_app.call(prompt="a red cat", steps=2, seed=5)
    assert r["seed"] == 5 and not r["baseline"]
    (item,) = r["result"]
    assert _pixels(item["image"]).shape == (32, 32, 3)
    assert r["stats"]["applied"] and r["stats"]["steps"] == 2 and r["stats"]["family"] == "sd15"
    assert "2 steps" in r["summary"]
    # Downloads: the output and its sidecar, which records what made it.
    names = sorted(Path(f).name for f in r["files"])
    assert len(names) == 2 and names[1] == names[0] + ".json"
    side = _sidecar_of(image_app.engine.out_dir, names[0])
    assert side["prompt"] == "a red cat" and side["seed"] == 5 and side["model"] == "tiny-sd15"
    assert side["mode"] == "generate" and side["call"]["num_inference_steps"] == 2
    # no preset named: the default, balanced, which the sidecar records with its config
    assert accel.Config.from_dict(side["config"]) == accel.preset("balanced", "sd15")
    assert side["preset"] == "balanced" and "preset `balanced`" in r["summary"]
    assert (image_app.engine.out_dir / names[0]).is_file()
    assert r["history"] and "s5" in r["history"][0]["caption"]


def test_compare_image_returns_both_outputs_and_metrics(image_app):
    r = image_app.call("/compare", prompt="a blue dog", steps=2, seed=3, preset="off")
    (base,), (acc,) = r["baseline"], r["result"]
    m = r["metrics"]
    assert m["baseline_s"] > 0 and m["accelerated_s"] > 0
    # "off" changes nothing: the accelerated output is the baseline, bit for bit.
    assert np.array_equal(_pixels(base["image"]), _pixels(acc["image"]))
    assert m["psnr"] is None and m["ssim"] == 1.0
    # nothing engaged: no speed-up is claimed, in the summary or the JSON (a time difference between identical
    # runs is noise), and the reason given is the preset, not the size
    assert m["engaged"] == [] and m["speedup"] is None and isinstance(m["within_noise"], bool)
    assert "preset `off` turns every technique off" in r["summary"] and "at this size" not in r["summary"]
    assert "speedup" not in r["summary"] and "no speed-up is claimed" in r["summary"]
    assert m["repeats"] == 2 and m["baseline_range"][0] <= m["baseline_s"] <= m["baseline_range"][1]
    assert base["caption"] == "baseline · seed 3" and acc["caption"] == "accelerated · seed 3"  # not "compare s3"
    assert len(r["files"]) == 4  # two outputs, two sidecars
    side = _sidecar_of(image_app.engine.out_dir, Path(acc["image"]).name)
    assert side["mode"] == "compare" and side["compare"]["ssim"] == 1.0 and side["preset"] == "off"
    assert _sidecar_of(image_app.engine.out_dir, Path(base["image"]).name)["side"] == "baseline"


def test_compare_lossy_setting_shows_reuse_and_fidelity(image_app):
    cfg = {"cache.method": "deepcache", "cache.interval": 2}
    if not hasattr(importlib.import_module("accel.cache"), "apply_technique"):
        pytest.skip("this tree has no step caching yet")
    r = image_app.call("/compare", prompt="a blue dog", steps=4, seed=3, **cfg)
    (base,), (acc,) = r["baseline"], r["result"]
    assert r["stats"]["cache"]["reused"] == 2  # every other step reuses the deep features
    diff = np.abs(_pixels(base["image"]).astype(int) - _pixels(acc["image"]).astype(int))
    assert diff.max() > 0 and r["metrics"]["psnr"] is not None
    m = r["metrics"]  # something engaged: a speed-up, with both sides' ranges beside it, and whether it is noise
    assert m["speedup"] > 0 and m["within_noise"] == within_noise(m["baseline_range"], m["accelerated_range"])
    lo, hi = m["baseline_range"]
    assert f"({lo:.3g}-{hi:.3g} s)" in r["summary"] and "speedup **" in r["summary"]
    assert ("within noise" in r["summary"]) == m["within_noise"]
    # Fidelity floor on a random-weight model (real models do far better): the image is still close.
    assert r["metrics"]["psnr"] > 10 and r["metrics"]["ssim"] > 0.3


def test_over_limit_request_errors_and_server_keeps_serving(image_app):
    # phrased for the person at the page: what the page allows, not the server's flags
    for changes, fragment in ((dict(steps=10_000), "steps: 10000 is more than this server allows: at most 400 steps"),
                              (dict(width=4096), "width: 4096 is more than this server allows: at most 64 pixels"),
                              (dict(batch=3), "batch: 3 is more than this server allows: at most 2 outputs per run"),
                              (dict(prompt="x" * 3000), "prompt length: 3000 is more than this server allows"),
                              (dict(negative_prompt="x" * 100_000),
                               "negative prompt length: 100000 is more than this server allows: at most 2000")):
        with pytest.raises(AppError, match=fragment) as err:
            image_app.call(**{"prompt": "a cat", **changes})
        assert "restart" not in str(err.value) and "--" not in str(err.value)
    r = image_app.call(prompt="a cat", steps=1)
    assert len(r["result"]) == 1


@pytest.mark.parametrize("changes, fragment", [
    (dict(prompt="   "), "prompt: empty"),
    (dict(model="someone/other-model"), "serves only 'tiny-sd15'; it cannot load other models"),
    (dict(preset="turbo"), "preset: 'turbo' is not a preset; choose one of off, "),
    (dict(width=36), "width: 36 is not a multiple of 8; tiny-sd15 takes sizes in steps of 8"),
    (dict(steps=0), "steps: 0 must be >= 1"),
    (dict(**{"attention.density": 0.5}), "attention.density: 0.5 needs a sparse attention.pattern"),
    (dict(**{"tokens.ratio": 2.0}), "tokens.ratio: 2.0 is out of range"),
])
def test_bad_input_gets_a_clear_error(image_app, changes, fragment):
    with pytest.raises(AppError, match=fragment.replace(".", r"\.")) as err:
        image_app.call(**{"prompt": "a cat", **changes})
    assert "restart" not in str(err.value) and "--allow" not in str(err.value)


@pytest.mark.parametrize("changes, message", [
    (dict(steps="abc"), "steps: 'abc' is not a number; give a whole number >= 1"),
    (dict(steps=[4]), "steps: [4] is not a number; give a whole number >= 1"),
    (dict(steps=2.5), "steps: 2.5 is not a whole number; give a whole number >= 1"),  # not 2 steps
    (dict(steps=True), "steps: True is not a number; give a whole number >= 1"),  # not 1 step
    (dict(width="32"), "width: '32' is not a number; give a whole number >= 0"),
    (dict(height=[32]), "height: [32] is not a number"),
    (dict(seed="7"), "seed: '7' is not a number"),
    (dict(seed=1.5), "seed: 1.5 is not a whole number"),
    (dict(batch=[1, 2]), "batch: [1, 2] is not a number"),
    (dict(batch=True), "batch: True is not a number"),
    (dict(guidance="x"), "guidance: 'x' is not a number; give a number >= 0"),
    (dict(randomize_seed="abc"), "randomize_seed: 'abc' is not true or false; give true or false"),
    (dict(randomize_seed=1), "randomize_seed: 1 is not true or false"),
    (dict(prompt=["a cat"]), "prompt: ['a cat'] is not text; give a string"),
    (dict(negative_prompt=5), "negative_prompt: 5 is not text; give a string"),
    (dict(preset=["fast"]), "preset: ['fast'] is not a preset name"),
    (dict(width=7), "width: 7 is not a multiple of 8; tiny-sd15 takes sizes in steps of 8"),
    (dict(height=20), "height: 20 is not a multiple of 8"),
    # the bounds read as written, with no HTML entity (the page shows "<=" as it is)
    (dict(seed=-5), "seed: -5 must be >= 0 and <= 9223372036854775807"),
    (dict(**{"tokens.ratio": 2.0}), "tokens.ratio: 2.0 is out of range; it must be <= 0.95 and >= 0.0"),
    (dict(guidance=-1), "guidance: -1.0 must be >= 0"),
])
def test_every_bad_api_value_gets_one_clear_message(image_app, changes, message):
    with pytest.raises(AppError) as err:
        image_app.call(**{"prompt": "a cat", "steps": 1, **changes})
    text = str(err.value)
    assert text.startswith(message), text
    assert "&lt;" not in text and "&amp;" not in text and "&gt;" not in text and "show_error" not in text


@pytest.mark.parametrize("changes, message", [
    (dict(fps="8"), "fps: '8' is not a number; give a whole number >= 1 and <= 240"),
    (dict(fps=0), "fps: 0 must be >= 1 and <= 240"),
    (dict(frames=[5]), "frames: [5] is not a number; give a whole number >= 1"),
    (dict(frames=4.5), "frames: 4.5 is not a whole number"),
    (dict(width=24), "width: 24 is not a multiple of 16; tiny-wan takes sizes in steps of 16 (e.g. 16)"),
])
def test_bad_video_api_values_get_one_clear_message(video_app, changes, message):
    with pytest.raises(AppError) as err:
        video_app.call(**{"prompt": "a ball", "steps": 1, **changes})
    assert str(err.value).startswith(message), str(err.value)


def _raw_call(app, api: str, raw: dict) -> dict:
    """One call of ``api`` as raw JSON (``raw``: parameter -> JSON text, which may be what gradio_client cannot
    send: NaN, Infinity); the others are their defaults. Returns the queue's final message."""
    fn = next(f for f in app.demo.fns.values() if f.api_name == api)
    session = uuid.uuid4().hex
    data = ", ".join(raw.get(name, json.dumps(getattr(block, "value", None)))
                     for name, block in zip(fn.input_parameter_names, fn.inputs, strict=True))
    body = (f'{{"data": [{data}], "event_data": null, "fn_index": {fn._id}, "trigger_id": null, '
            f'"session_hash": "{session}"}}').encode()
    urllib.request.urlopen(urllib.request.Request(f"{app.url}gradio_api/queue/join", body,
                                                  {"Content-Type": "application/json"}), timeout=30).close()
    with urllib.request.urlopen(f"{app.url}gradio_api/queue/data?session_hash={session}", timeout=120) as stream:
        for line in stream:
            msg = json.loads(line[5:]) if line.startswith(b"data:") else {}
            if msg.get("msg") == "process_completed":
                return msg
    raise AssertionError("the call never completed")


@pytest.mark.parametrize("name, raw, message", [
    ("steps", "NaN", "steps: nan is not a finite number; give a whole number >= 1"),
    ("guidance", "Infinity", "guidance: inf is not a finite number; give a number >= 0"),
    ("seed", "-Infinity", "seed: -inf is not a finite number"),
    ("tokens_ratio", "NaN", "tokens.ratio: nan is not a finite number"),
])
def test_nan_and_infinity_as_raw_json_are_refused_by_name(image_app, name, raw, message):
    msg = _raw_call(image_app, "generate", {"prompt": '"a cat"', "steps": "1", name: raw})
    assert msg["success"] is False and (msg["output"].get("error") or "").startswith(message), msg


def test_frames_on_an_image_model_are_refused_and_not_offered(image_app):
    from accel.web.engine import InputError

    with pytest.raises(InputError, match="frames: tiny-sd15 makes images, not video"):  # as `accel generate --frames`
        image_app.engine.parse(prompt="a cat", frames=5)
    with pytest.raises(TypeError, match="frames"):  # the image model's API has no frames (the client says so)
        image_app.client.predict(prompt="a cat", frames=5, api_name="/generate")


def test_the_api_documents_every_parameter_and_output(image_app, video_app):
    named = image_app.client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for api in ("/generate", "/compare"):
        params, returns = named[api]["parameters"], named[api]["returns"]
        names = [p["parameter_name"] for p in params]
        assert "frames" not in names and "fps" not in names  # an image model takes neither
        undocumented = [p["parameter_name"] for p in params if not p["python_type"]["description"]]
        assert not undocumented, undocumented
        assert not [p for p in params if p["python_type"]["type"].startswith("None |")]  # the client adds "| None"
        labels = [r["label"] for r in returns]
        assert labels[3] == "Summary" and not [x for x in labels if x.startswith("value_")], labels
    by = {p["parameter_name"]: p for p in named["/generate"]["parameters"]}
    assert by["tokens_max_downsample"]["python_type"]["type"] == "int"  # number choices are numbers
    assert "one of 1, 2, 4, 8" in by["tokens_max_downsample"]["python_type"]["description"]
    assert by["steps"]["python_type"]["type"] == "int" and "1 to 400" in by["steps"]["python_type"]["description"]
    assert "a multiple of 8" in by["width"]["python_type"]["description"]
    assert "tokens.ratio of the preset when left out" in by["tokens_ratio"]["python_type"]["description"]
    text = image_app.client.view_api(print_info=False, return_format="str")
    assert "None | float | None" not in text and "value_" not in text
    video = video_app.client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]
    vby = {p["parameter_name"]: p for p in video["parameters"]}
    assert vby["frames"]["parameter_default"] == 9 and "fps" in vby
    assert "a multiple of 16" in vby["width"]["python_type"]["description"]


def test_the_page_says_which_presets_are_the_same(image_app):
    dropdown = next(b for b in image_app.demo.blocks.values() if getattr(b, "elem_id", None) == "preset")
    same = accel.preset("fast", "sd15") == accel.preset("balanced", "sd15")
    assert ("fast is the same as balanced" in (dropdown.info or "")) == same
    preset = next(p for p in image_app.client.view_api(print_info=False, return_format="dict")["named_endpoints"][
        "/generate"]["parameters"] if p["parameter_name"] == "preset")
    assert ("fast is the same as balanced" in preset["python_type"]["description"]) == same


def test_summary_says_why_a_technique_did_not_engage(image_app):
    r = image_app.call(prompt="a cat", steps=2)  # balanced: token merging, but not at this size
    tokens = math.prod(r["stats"]["grid"])
    floor = accel.preset("balanced", "sd15").tokens.min_tokens
    assert tokens < floor and f"token merging: not engaged ({tokens} tokens < min_tokens {floor})" in r["summary"]
    assert "realised ratio" not in r["summary"] and "reduced blocks 0" not in r["summary"]
    assert "step cache reused" in r["summary"]  # what did engage, in the words of Compare's "engaged" list


def test_stop_ends_a_long_run_promptly_and_the_next_request_works(image_app):
    before = set(image_app.engine.out_dir.glob("*.png"))
    job = image_app.client.submit(prompt="a long run", steps=400, api_name="/generate")
    deadline = time.monotonic() + 120
    while True:  # wait until the pipeline is really denoising
        progress = job.status().progress_data
        if progress and (progress[-1].index or 0) >= 2:
            break
        assert time.monotonic() < deadline and not job.done(), "the long run never reported progress"
        time.sleep(0.05)
    job.cancel()
    _stopped_and_the_worker_is_free(image_app, before)


def _stopped_and_the_worker_is_free(app, before: set) -> None:
    """The 400-step run stopped early and wrote nothing, and the only worker serves the next request."""
    r = app.call(prompt="after the stop", steps=1)
    assert len(r["result"]) == 1
    stopped = [e for e in app.engine.log if e["steps"] == 400]
    assert stopped and stopped[-1]["stopped"] and 2 <= stopped[-1]["steps_done"] < 400
    assert len(set(app.engine.out_dir.glob("*.png")) - before) == 1  # only the next request's output


def test_a_client_that_goes_away_stops_its_run_and_frees_the_worker(image_app):
    # A client joins the queue, reads its event stream until the run is denoising, then drops the
    # connection (a killed script, a closed tab's stream): the run stops at its next step, writes
    # nothing, and the only worker serves the next request.
    before = set(image_app.engine.out_dir.glob("*.png"))
    fn = next(f for f in image_app.demo.fns.values() if f.api_name == "generate")
    given = {"prompt": "a run nobody waits for", "steps": 400}
    data = [given.get(name, getattr(block, "value", None)) for name, block in zip(fn.input_parameter_names, fn.inputs,
                                                                                   strict=True)]
    session = uuid.uuid4().hex
    body = json.dumps({"data": data, "event_data": None, "fn_index": fn._id, "trigger_id": None,
                       "session_hash": session}).encode()
    urllib.request.urlopen(urllib.request.Request(f"{image_app.url}gradio_api/queue/join", body,
                                                  {"Content-Type": "application/json"}), timeout=30).close()
    stream = urllib.request.urlopen(f"{image_app.url}gradio_api/queue/data?session_hash={session}", timeout=120)
    for line in stream:  # server-sent events, until the pipeline is really denoising
        msg = json.loads(line[5:]) if line.startswith(b"data:") else {}
        assert msg.get("msg") != "process_completed", msg
        if msg.get("msg") == "progress" and ((msg.get("progress_data") or [{}])[-1].get("index") or 0) >= 2:
            break
    stream.close()  # the client goes away
    _stopped_and_the_worker_is_free(image_app, before)


def test_compare_stop_says_which_pass_it_ended(image_app):
    from accel.web.run import OUTPUTS, handler
    from accel.web.stop import Runs

    runs = Runs()
    run = handler("compare", image_app.engine, web_controls.knobs(hide=("parallel",)), "sd15", runs)

    def progress(step, desc="", **_):
        if desc.startswith("baseline") and step[0] >= 2:
            runs.stop("page-2")

    answer = asyncio.run(run([], SimpleNamespace(session_hash="page-2"), progress, prompt="a long run", steps=400))
    text = answer[OUTPUTS.index("summary")]
    assert re.search(r"Stopped the baseline warm-up after [23] of 400 steps\*\*; nothing was written", text), text


def test_stop_answers_how_far_the_run_got(image_app):
    # The page's Stop sets its session's stop flag; the run answers in the summary, not with an error.
    from accel.web.run import OUTPUTS, handler
    from accel.web.stop import Runs

    runs = Runs()
    run = handler("generate", image_app.engine, web_controls.knobs(hide=("parallel",)), "sd15", runs)

    def progress(step, **_):
        if step[0] >= 3:
            runs.stop("page-1")  # what the Stop button does for its page's session

    answer = asyncio.run(run([], SimpleNamespace(session_hash="page-1"), progress, prompt="a long run", steps=400))
    text = answer[OUTPUTS.index("summary")]
    assert re.search(r"Stopped after [34] of 400 steps\*\*; nothing was written", text), text
    after = asyncio.run(run([], SimpleNamespace(session_hash="page-1"), progress, prompt="x", steps=2))
    assert "Stopped" not in after[OUTPUTS.index("summary")]  # a later run is not stopped by an old Stop


def test_api_takes_named_parameters_and_honours_the_preset(image_app):
    params = image_app.client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]
    names = [p["parameter_name"] for p in params["parameters"]]
    assert {"prompt", "negative_prompt", "width", "height", "steps", "guidance", "seed", "preset", "cache_threshold",
            "cache_interval", "tokens_ratio", "attention_density"} <= set(names)
    assert not [n for n in names if n.startswith("param_")]
    knob = next(p for p in params["parameters"] if p["parameter_name"] == "cache_interval")
    assert knob["parameter_has_default"] and knob["parameter_default"] is None  # None: the preset's value
    fast = accel.preset("fast", "sd15")
    r = image_app.call(prompt="a red cat", steps=2, preset="fast")
    side = _sidecar_of(image_app.engine.out_dir, Path(r["result"][0]["image"]).name)
    assert side["preset"] == "fast" and accel.Config.from_dict(side["config"]) == fast
    assert "preset `fast`," in r["summary"] and r["stats"]["cache"]["method"] == fast.cache.method
    # a knob beside the preset changes that one field of it
    r = image_app.call(prompt="a red cat", steps=2, preset="fast", cache_interval=2)
    side = _sidecar_of(image_app.engine.out_dir, Path(r["result"][0]["image"]).name)
    assert accel.Config.from_dict(side["config"]) == fast.replace(cache={"interval": 2})
    assert side["preset"] == "fast" and "preset `fast` with cache.interval 2" in r["summary"]


def test_one_progress_bar_on_the_main_output(image_app):
    demo = image_app.demo
    result = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "result")
    page_runs = [fn for fn in demo.fns.values() if fn.api_name in ("page_generate", "page_compare")]
    assert len(page_runs) == 2
    for fn in page_runs:
        assert fn.show_progress == "full" and list(fn.show_progress_on) == [result]


def test_history_is_read_back_from_the_output_folder(image_app):
    image_app.call(prompt="a green bird", steps=1, seed=11)
    image_app.call(prompt="a pink fish", steps=1, seed=12, batch=2)
    # a new page (or a restarted server) on the same folder opens with that history, newest first
    demo = build_app(image_app.engine.primary.pipe, "tiny-sd15", limits=LIMITS, out_dir=image_app.engine.out_dir)
    load = next(fn for fn in demo.fns.values() if any(event == "load" for _, event in fn.targets))
    entries, gallery = load.fn()
    assert [e["record"]["seed"] for e in entries[:2]] == [12, 11]  # one entry per run, not per output
    assert all(e["record"]["side"] == "accelerated" and Path(path).is_file() for e, (path, _) in zip(entries, gallery,
                                                                                                      strict=True))
    assert gallery[0][1].endswith("s12") and len(entries) <= 48


@pytest.mark.parametrize("model, video", [("ref-sd", False), ("ref-dit", False), ("ref-video", True),
                                          ("tiny-sd15", False), ("tiny-wan", True)])
def test_example_prompts_use_words_the_built_in_model_knows(model, video):
    from accel.pipelines.ref.data import VOCABULARY
    from accel.pipelines.parts import WORDS
    from accel.web.examples import example_prompts, placeholder

    words = set(VOCABULARY if model.startswith("ref-") else WORDS)
    prompts = example_prompts(model, video)
    # the placeholder reads as a hint, not as a prompt already typed in (the first Generate would say "empty")
    hint = placeholder(model, video)
    assert prompts and hint.startswith("Type a prompt") and f"“{prompts[0]}”" in hint and hint not in prompts
    for p in prompts:
        assert not [w for w in p.replace(",", " ").split() if w not in words], p


def test_the_page_shows_examples_and_a_placeholder_the_model_knows(image_app):
    from accel.web.examples import example_prompts

    blocks = image_app.demo.blocks.values()
    prompt = next(b for b in blocks if getattr(b, "elem_id", None) == "prompt")
    hint = prompt.placeholder
    assert hint.startswith("Type a prompt") and example_prompts("tiny-sd15", False)[0] in hint
    (examples,) = [b for b in blocks if type(b).__name__ == "Dataset"]
    assert [row[0] for row in examples.raw_samples] == example_prompts("tiny-sd15", False)


def test_a_config_error_shows_under_its_field_and_the_json_says_it_is_stale(image_app):
    demo = image_app.demo
    show = next(fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "show_config")
    widgets = show.inputs[1:]
    interval = [w.elem_id for w in widgets].index("knob-cache-interval")
    values = [w.value for w in widgets]
    values[interval] = 0
    out = dict(zip([o.elem_id for o in show.outputs], show.fn("balanced", *values), strict=True))
    box = out["config_error-cache-interval"]
    assert box["visible"] and "cache.interval: 0 is out of range" in box["value"]  # right under the field
    assert not out["config_error-cache"]["visible"] and out["config_error"] == ""
    shown = [k for k, v in out.items() if (k or "").startswith("config_error-") and isinstance(v, dict)
             and v["visible"]]
    assert shown == ["config_error-cache-interval"], shown
    assert "last valid" in out["config_json"]["label"]  # the JSON keeps the last valid config, and says so
    values[interval] = 2
    out = dict(zip([o.elem_id for o in show.outputs], show.fn("balanced", *values), strict=True))
    assert not out["config_error-cache-interval"]["visible"] and "last valid" not in out["config_json"]["label"]
    assert json.loads(out["config_json"]["value"])["cache"]["interval"] == 2


def test_files_are_served_only_from_the_output_folder(image_app, tmp_path):
    r = image_app.call(prompt="a cat", steps=1)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the browser")

    def status(path):
        try:
            with urllib.request.urlopen(f"{image_app.url}gradio_api/file={path}") as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code

    assert status(image_app.engine.out_dir / Path(r["files"][0]).name) == 200
    assert status(secret) in (403, 404)
    assert status("/etc/passwd") in (403, 404)
    assert status(Path(accel.__file__)) in (403, 404)


def _status(url: str, method: str = "GET", data: bytes | None = None, headers: dict | None = None):
    """The HTTP status and body of one request to the app."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_gradio_keeps_its_copies_inside_the_output_folder(image_app, tmp_path, monkeypatch):
    """Gradio copies what the page shows into its cache: that cache is a folder inside --out-dir, so a file
    another gradio app left in gradio's shared default folders is not served."""
    import tempfile

    cache = image_app.engine.out_dir / ".gradio-cache"
    assert Path(image_app.demo.server_app.uploaded_file_dir) == cache
    raw = Client(image_app.url, verbose=False, download_files=False)  # the server's paths, not local copies
    try:
        answer = raw.predict(prompt="a cat", steps=1, api_name="/generate")
    finally:
        raw.close()
    (item,) = answer[2]
    shown = Path(item["image"]["path"])
    assert shown.parent.parent == cache and shown.name == Path(answer[6][0]["path"]).name
    assert _status(f"{image_app.url}gradio_api/file={shown}")[0] == 200
    # another app's files in gradio's defaults: the shared temp folder, and the examples cache under the cwd
    other = Path(tempfile.gettempdir()) / "gradio" / uuid.uuid4().hex / "other-app.png"
    other.parent.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    examples = tmp_path / ".gradio" / "cached_examples" / "other-app.png"
    examples.parent.mkdir(parents=True)
    try:
        for path in (other, examples):
            Image.new("RGB", (8, 8)).save(path)
            assert _status(f"{image_app.url}gradio_api/file={path}")[0] in (403, 404)
    finally:
        other.unlink()
        other.parent.rmdir()
    # gradio would fetch a URL for the caller: refused, the server reads only its output folder
    assert _status(f"{image_app.url}gradio_api/file=https://example.com/a.png")[0] == 403
    assert _status(f"{image_app.url}gradio_api/runs")[0] == 404  # gradio's run history: History is the app's


def test_gradio_cache_is_emptied_when_the_app_starts(image_app, tmp_path):
    stale = tmp_path / ".gradio-cache" / "0123abcd" / "from-an-earlier-run.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    demo = build_app(image_app.engine.primary.pipe, "tiny-sd15", limits=LIMITS, out_dir=tmp_path)
    try:
        assert not stale.exists() and not stale.parent.exists()
        assert demo.accel_cache == tmp_path.resolve() / ".gradio-cache" and demo.accel_cache.is_dir()
    finally:
        demo.close()
        from accel.web.files import use_cache

        use_cache(image_app.demo.accel_cache)  # the module's app goes on with its own cache


def test_uploads_are_refused_and_the_server_keeps_serving(image_app):
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"page.html\"\r\n"
            f"Content-Type: text/html\r\n\r\n<b>not from this app</b>\r\n--{boundary}--\r\n").encode()
    form = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    for route in ("upload", "upload?upload_id=x", "process_recording", "component_server"):
        code, text = _status(f"{image_app.url}gradio_api/{route}", "POST", body, form)
        assert code == 403 and text == b"this app takes no file uploads", route
    assert not list(image_app.engine.out_dir.rglob("page.html"))  # stored nowhere
    assert image_app.call(prompt="a cat", steps=1)["result"]


def test_video_generate_and_compare(video_app):
    r = video_app.call(prompt="a ball moving right", steps=2, frames=5, fps=4)
    (item,) = r["result"]
    data = Path(item["video"]).read_bytes()
    assert data[4:8] == b"ftyp" and b"avc1" in data[:4096]  # H.264 MP4: what browsers play
    assert r["stats"]["family"] == "wan"
    side = _sidecar_of(video_app.engine.out_dir, Path(item["video"]).name)
    assert side["call"]["num_frames"] == 5 and side["fps"] == 4 and side["frames"] == 5
    # Wan makes 4k+1 frames: asked for 8, it makes 9, and the sidecar says what it made beside what was asked
    r = video_app.call(prompt="a ball moving right", steps=1, frames=8)
    side = _sidecar_of(video_app.engine.out_dir, Path(r["result"][0]["video"]).name)
    assert side["call"]["num_frames"] == 8 and side["frames"] == 9

    r = video_app.call("/compare", prompt="a ball moving right", steps=2, frames=5)
    (base,), (acc,) = r["baseline"], r["result"]
    assert base["video"].endswith(".mp4") and acc["video"].endswith(".mp4")
    m = r["metrics"]
    assert m["ssim"] == 1.0 and (m["speedup"] > 0 if m["engaged"] else m["speedup"] is None)
    with pytest.raises(AppError, match="frames: 33 is more than this server allows: at most 9 frames"):
        video_app.call(prompt="a ball", frames=33)


# --- pieces without a server ----------------------------------------------------------------------


def test_every_config_field_gets_a_control_and_round_trips():
    knobs = web_controls.knobs()
    for section, cls in web_controls.sections():
        fields = [f.name for f in dataclasses.fields(cls)]
        assert [k.name for k in knobs if k.section == section] == fields
    by_key = {k.key: k for k in knobs}
    assert by_key["cache.method"].kind == "choice" and by_key["tokens.ratio"].kind == "float"
    assert by_key["cache.interval"].kind == "int"
    for name in accel.available_presets():
        for family in accel.FAMILIES:
            cfg = accel.preset(name, family)
            assert web_controls.config_from_values(knobs, web_controls.values_from_config(knobs, cfg)) == cfg


def test_knobs_change_the_preset_and_none_keeps_its_value():
    knobs = web_controls.knobs(hide=("parallel",))
    fast = accel.preset("fast", "sd15")
    assert web_controls.config_over(knobs, [None] * len(knobs), fast) == fast
    cfg = web_controls.config_over(knobs, [2 if k.key == "cache.interval" else None for k in knobs], fast)
    assert cfg == fast.replace(cache={"interval": 2})
    assert web_controls.changes(knobs, cfg, fast) == ["cache.interval 2"]
    every = web_controls.values_from_config(knobs, accel.Config())  # the page sends every knob: they win
    assert web_controls.config_over(knobs, every, fast) == accel.Config()


def test_stop_flags_the_runs_of_its_session_and_those_it_queued():
    import threading

    from accel.web.stop import Runs

    runs, mine, other = Runs(), threading.Event(), threading.Event()
    with runs.track("page-1", mine, time.monotonic()), runs.track("page-2", other, time.monotonic()):
        assert runs.stop("page-1") == 1
    assert mine.is_set() and not other.is_set()
    queued = threading.Event()  # joined the queue before Stop was pressed: stops as it starts
    with runs.track("page-1", queued, time.monotonic() - 60):
        assert queued.is_set()
    later = threading.Event()
    with runs.track("page-1", later, time.monotonic()):
        assert not later.is_set()


def test_a_new_field_appears_as_a_control_without_app_changes():
    @dataclasses.dataclass(frozen=True)
    class Extra(ConfigBase):
        """A future technique."""

        section = "extra"
        mode: str = spec("a", choices=("a", "b"), help="which")
        level: int = spec(2, min=0, max=9)
        scale: float = spec(0.5, min=0.0)
        on: bool = spec(False)
        layers: tuple[int, ...] = spec((1, 2))
        note: str | None = spec(None)

    @dataclasses.dataclass(frozen=True)
    class Root(ConfigBase):
        extra: Extra = spec(None, factory=Extra)

    knobs = web_controls.knobs(Root)
    assert [(k.name, k.kind) for k in knobs] == [("mode", "choice"), ("level", "int"), ("scale", "float"),
                                                 ("on", "bool"), ("layers", "json"), ("note", "json")]
    assert knobs[1].minimum == 0 and knobs[1].maximum == 9 and knobs[0].help == "which"
    assert web_controls.to_widget_value(knobs[4], (1, 2)) == "[1, 2]"
    assert web_controls.from_widget_value(knobs[4], "[3]") == [3]


def test_config_download_is_a_config_file(image_app):
    from accel.web.page import _config_file

    cfg = accel.Config.from_dict({"tokens": {"ratio": 0.25}})
    path = Path(_config_file(image_app.engine, cfg))
    assert path.parent.parent == image_app.engine.out_dir and accel.Config.load(path) == cfg


def test_cli_help_works_without_gradio(monkeypatch, capsys):
    # `accel --help` and `accel app --help` must not need gradio: it is imported when the app starts.
    from accel.cli import build_parser

    for name in ("gradio", "gradio_client"):
        monkeypatch.setitem(sys.modules, name, None)  # `import gradio` now fails
    for name in [m for m in sys.modules if m.startswith(("accel.web.", "accel.cli.app"))]:
        monkeypatch.delitem(sys.modules, name)  # imported afresh, with gradio unavailable
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["app", "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "--allow-model-paths" in out and "127.0.0.1" in out and "--max-steps" in out


def test_limits_from_flags_and_file(tmp_path):
    from accel.cli import build_parser
    from accel.cli.app import limits_from_args

    f = tmp_path / "limits.toml"
    f.write_text("[limits]\nmax_steps = 12\nmax_batch = 1\n")
    args = build_parser().parse_args(["app", "--limits", str(f), "--max-frames", "17"])
    assert limits_from_args(args) == Limits(max_steps=12, max_batch=1, max_frames=17)
    with pytest.raises(accel.ConfigError, match="limits.max_steps"):
        Limits(max_steps=0)


def test_queue_runs_one_request_per_pipeline_and_is_bounded(image_app, tmp_path):
    pipe = image_app.engine.primary.pipe
    demo = build_app([pipe, pipe], "tiny-sd15", limits=LIMITS, out_dir=tmp_path)  # as with --gpus 2
    runs = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name in ("generate", "compare")}
    assert {fn.concurrency_limit for fn in runs.values()} == {2}
    assert {fn.concurrency_id for fn in runs.values()} == {"pipelines"}  # one budget for both buttons
    assert demo._queue.max_size == LIMITS.max_queue and len(demo.accel_engine.workers) == 2


def test_allow_model_paths_lets_requests_load_other_models(image_app, tmp_path):
    from accel.pipelines.load import load
    from accel.web.engine import Engine, InputError

    made = []

    def loader(name, index):
        made.append(name)
        return image_app.engine.primary.pipe if name == "tiny-sd15" else load(name, device="cpu")

    engine = Engine(loader, "tiny-sd15", limits=LIMITS, out_dir=tmp_path, allow_model_paths=True)
    res = engine.run(engine.parse(prompt="a ball", model="tiny-wan", steps=1, frames=5), accel.Config())
    assert res.outputs[0].suffix == ".mp4" and res.stats["family"] == "wan" and made == ["tiny-sd15", "tiny-wan"]
    with pytest.raises(InputError, match="unknown model '/no/such/model'"):
        engine.run(engine.parse(prompt="x", model="/no/such/model"), accel.Config())
    assert made[-1] == "tiny-sd15" and engine.primary.family == "sd15"  # back to the served model


def test_approx_cache_serves_generate_and_not_compare(tiny_cache, tmp_path):
    """`accel app --approx-cache DIR`: Generate stores and then starts a repeated prompt from its entry; Compare
    runs without the cache (its repeats would hit the entry its own warm-up stored)."""
    from accel.web.engine import Engine

    pipe = tiny_cache("sd15")
    engine = Engine(pipe, "tiny-sd15", limits=LIMITS, out_dir=tmp_path / "out", approx_cache=str(tmp_path / "c"))
    config = accel.Config.from_dict({"approx": {"similarity": [0.999], "skip": [0.5]}})  # exact repeats only
    req = engine.parse(prompt="a red cat", steps=6, seed=3)
    try:
        first = engine.run(req, config)
        assert first.stats["approx"]["stored"] and not first.stats["approx"]["hit"]
        again = engine.run(req, config)
        assert again.stats["approx"]["hit"] and again.stats["approx"]["skipped_steps"] == 3
        side = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
        assert side["config"]["approx"]["dir"] == str(tmp_path / "c")
        compared = engine.run(req, config, mode="compare")
        assert "approx" not in compared.stats and compared.metrics["engaged"] == []
    finally:
        accel.remove(pipe)


def test_a_config_file_is_offered_as_preset_config_and_runs(tmp_path, tiny_cache, capsys):
    """`accel app --config tuned.yaml`: the page opens on it, a call that names no preset runs it, the sidecar
    says `config`; a bad file is refused before the model loads."""
    from accel import cli
    from accel.cli.app import app_config
    from accel.web.controls import CONFIG_PRESET
    from accel.web.run import OUTPUTS, handler

    good = tmp_path / "tuned.yaml"
    good.write_text("cache: {method: deepcache, interval: 3, schedule: uniform}\ntokens: {ratio: 0.0}\n")
    sections = app_config(SimpleNamespace(config=str(good)))
    pipe = tiny_cache("sd15")
    demo = build_app(pipe, "tiny-sd15", limits=LIMITS, out_dir=tmp_path / "out", config_sections=sections)
    try:
        dropdown = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "preset")
        assert dropdown.value == CONFIG_PRESET and CONFIG_PRESET in [c[0] for c in dropdown.choices]
        from accel.layering import layered as config_for

        served = config_for("balanced", sections, "sd15")  # layered as `accel generate --config` layers it
        assert served.cache.interval == 3 and not served.tokens.enabled
        fn = next(f for f in demo.fns.values() if f.api_name == "generate").fn
        answer = asyncio.run(fn([], SimpleNamespace(session_hash="t"), lambda *a, **k: None, prompt="a cat", steps=4))
        files = answer[OUTPUTS.index("files")]
        side = json.loads(Path(next(f for f in files if f.endswith(".json"))).read_text())
        assert side["preset"] == CONFIG_PRESET and accel.Config.from_dict(side["config"]) == served
        assert answer[OUTPUTS.index("stats")]["cache"]["reused"] > 0
    finally:
        demo.close()
        accel.remove(pipe)
    assert handler  # the page and the API share the run function
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache: {interval: 0}\n")
    assert cli.main(["app", "--model", "tiny-sd15", "--config", str(bad)]) == 2
    assert "cache.interval" in capsys.readouterr().err


def test_a_speed_up_within_the_noise_says_so_and_none_is_claimed_when_nothing_engaged():
    from accel.web.engine import Result
    from accel.web.history import entry
    from accel.web.run import summary

    assert within_noise([1.0, 1.4], [0.9, 1.1]) and within_noise([1.0, 1.2], [1.2, 1.3])  # ranges that overlap
    assert not within_noise([1.0, 1.2], [0.7, 0.9]) and not within_noise([0.5, 0.6], [0.7, 0.9])

    def result(engaged, accelerated_range, speedup):
        metrics = {"psnr": 30.0, "ssim": 0.95, "baseline_s": 1.2, "accelerated_s": 1.0, "repeats": 2,
                   "baseline_range": [1.1, 1.3], "accelerated_range": accelerated_range, "speedup": speedup,
                   "engaged": engaged, "within_noise": within_noise([1.1, 1.3], accelerated_range)}
        return Result("compare", 0, [], seconds={"accelerated": 1.0, "baseline": 1.2}, metrics=metrics,
                      stats={"steps": 4})

    noisy = summary(result(["step cache reused 2 of 4 denoiser computations"], [0.9, 1.14], 1.2), "preset `fast`")
    assert "speedup **1.20x, within noise**" in noisy and "(1.1-1.3 s)" in noisy and "(0.9-1.14 s)" in noisy
    clear = summary(result(["step cache reused 2 of 4 denoiser computations"], [0.9, 1.0], 1.2), "preset `fast`")
    assert "speedup **1.20x**" in clear and "noise" not in clear
    idle = summary(result([], [0.9, 1.0], None), "preset `balanced`", enabled=True)
    assert "nothing engaged at this size (preset `balanced`)" in idle and "speedup" not in idle
    off = summary(result([], [0.9, 1.0], None), "preset `off`", enabled=False)
    assert off.startswith("preset `off` turns every technique off") and "at this size" not in off
    assert entry({"compare": result([], [0.9, 1.0], None).metrics, "seed": 1}, "x.png")["caption"] == \
        "nothing engaged · s1"
    record = {"compare": result(["x"], [0.9, 1.14], 1.2).metrics, "seed": 1}
    assert entry(record, "x.png")["caption"] == "1.2x within noise, PSNR 30.0 · s1"


def test_randomize_seed_takes_true_or_false(image_app):
    r = image_app.call(prompt="a cat", steps=1, seed=5, randomize_seed=True)
    assert isinstance(r["seed"], int) and f"seed {r['seed']})" in r["summary"]
    assert image_app.call(prompt="a cat", steps=1, seed=5, randomize_seed=False)["seed"] == 5


def test_under_components_the_presets_leave_the_step_cache_out(tmp_path, tiny_cache):
    """`accel app --parallel components=2`: the page's presets are layered with the served strategies, so the
    default preset does not turn on a step cache the split would refuse."""
    from accel import ParallelConfig

    pipe = tiny_cache("flux")
    knob = {}
    for label, par in (("plain", None), ("components", ParallelConfig(components=2))):
        demo = build_app(pipe, "tiny-flux", limits=LIMITS, out_dir=tmp_path / label, parallel=par)
        try:
            knob[label] = next(b.value for b in demo.blocks.values()
                               if getattr(b, "elem_id", None) == "knob-cache-method")
        finally:
            demo.close()
    assert knob == {"plain": "block", "components": "none"}
