"""The web app end to end through gradio_client: generate, compare, limits, bad input, stop, files.

Each server binds 127.0.0.1 on a free port, serves a tiny random-weight pipeline, and is closed by
its fixture. Requests use the API in the page's own input order (`demo.accel_inputs`).
"""

import dataclasses
import importlib
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the web app needs gradio: pip install 'diffusers-accel[app]'")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import accel  # noqa: E402
from accel.app import web_controls  # noqa: E402
from accel.app.gradio_app import build_app, serve  # noqa: E402
from accel.app.web_limits import Limits  # noqa: E402
from accel.config_base import ConfigBase, spec  # noqa: E402

LIMITS = Limits(max_width=64, max_height=64, max_steps=400, max_frames=9, max_batch=2, max_queue=4)


class Server:
    def __init__(self, demo):
        self.demo, self.engine = demo, demo.accel_engine
        self.url = serve(demo, port=None, block=False, quiet=True)
        self.client = Client(self.url, verbose=False)

    def args(self, **changes):
        values = {**self.demo.accel_defaults, **changes}
        unknown = set(changes) - set(values)
        assert not unknown, unknown
        return [values[name] for name in self.demo.accel_inputs]

    def off(self) -> dict:
        """Knob values of preset off: the page opens on the default preset (balanced), these undo it."""
        knob_list = web_controls.knobs(hide=("parallel",))
        values = web_controls.values_from_config(knob_list, accel.Config())
        return {"preset": "off", **{f"{k.section}.{k.name}": v for k, v in zip(knob_list, values, strict=True)}}

    def call(self, api="/generate", **changes):
        keys = ("seed", "baseline", "result", "summary", "metrics", "stats", "files", "history")
        return dict(zip(keys, self.client.predict(*self.args(**changes), api_name=api)[:len(keys)], strict=True))

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
    # the page opens on the default preset, balanced, and the sidecar's config loads as that Config
    assert accel.Config.from_dict(side["config"]) == accel.preset("balanced", "sd15")
    assert (image_app.engine.out_dir / names[0]).is_file()
    assert r["history"] and "s5" in r["history"][0]["caption"]


def test_compare_image_returns_both_outputs_and_metrics(image_app):
    r = image_app.call("/compare", prompt="a blue dog", steps=2, seed=3, **image_app.off())
    (base,), (acc,) = r["baseline"], r["result"]
    m = r["metrics"]
    assert m["baseline_s"] > 0 and m["accelerated_s"] > 0 and m["speedup"] > 0
    # "off" changes nothing: the accelerated output is the baseline, bit for bit.
    assert np.array_equal(_pixels(base["image"]), _pixels(acc["image"]))
    assert m["psnr"] is None and m["ssim"] == 1.0
    # nothing engaged: no speed-up is claimed (a time difference between identical runs is noise)
    assert "nothing engaged" in r["summary"] and "speedup" not in r["summary"] and m["engaged"] == []
    assert m["repeats"] == 2 and m["baseline_range"][0] <= m["baseline_s"] <= m["baseline_range"][1]
    assert len(r["files"]) == 4  # two outputs, two sidecars
    side = _sidecar_of(image_app.engine.out_dir, Path(acc["image"]).name)
    assert side["mode"] == "compare" and side["compare"]["ssim"] == 1.0


def test_compare_lossy_setting_shows_reuse_and_fidelity(image_app):
    cfg = {"cache.method": "deepcache", "cache.interval": 2}
    if not hasattr(importlib.import_module("accel.cache"), "apply_technique"):
        pytest.skip("this tree has no step caching yet")
    r = image_app.call("/compare", prompt="a blue dog", steps=4, seed=3, **cfg)
    (base,), (acc,) = r["baseline"], r["result"]
    assert r["stats"]["cache"]["reused"] == 2  # every other step reuses the deep features
    diff = np.abs(_pixels(base["image"]).astype(int) - _pixels(acc["image"]).astype(int))
    assert diff.max() > 0 and r["metrics"]["psnr"] is not None
    # Fidelity floor on a random-weight model (real models do far better): the image is still close.
    assert r["metrics"]["psnr"] > 10 and r["metrics"]["ssim"] > 0.3


def test_over_limit_request_errors_and_server_keeps_serving(image_app):
    for changes, fragment in ((dict(steps=10_000), "steps: 10000 is over this server's limit of 400"),
                              (dict(width=4096), "width: 4096 is over this server's limit of 64"),
                              (dict(batch=3), "batch: 3 is over this server's limit of 2"),
                              (dict(prompt="x" * 3000), "prompt length: 3000")):
        with pytest.raises(AppError, match=fragment.replace("(", r"\(")):
            image_app.call(**{"prompt": "a cat", **changes})
    r = image_app.call(prompt="a cat", steps=1)
    assert len(r["result"]) == 1


@pytest.mark.parametrize("changes, fragment", [
    (dict(prompt="   "), "prompt: empty"),
    (dict(model="someone/other-model"), "only serves 'tiny-sd15'"),
    (dict(width=36), "divisible by 8"),
    (dict(steps=0), "steps: 0 must be >= 1"),
    (dict(**{"attention.density": 0.5}), "attention.density: 0.5 needs a sparse attention.pattern"),
    (dict(**{"tokens.ratio": 2.0}), "tokens.ratio: 2.0 is out of range"),
])
def test_bad_input_gets_a_clear_error(image_app, changes, fragment):
    with pytest.raises(AppError, match=fragment.replace(".", r"\.")):
        image_app.call(**{"prompt": "a cat", **changes})


def test_stop_ends_a_long_run_promptly_and_the_next_request_works(image_app):
    out = image_app.engine.out_dir
    before = set(out.glob("*.png"))
    job = image_app.client.submit(*image_app.args(prompt="a long run", steps=400), api_name="/generate")
    deadline = time.monotonic() + 120
    while True:  # wait until the pipeline is really denoising
        progress = job.status().progress_data
        if progress and (progress[-1].index or 0) >= 2:
            break
        assert time.monotonic() < deadline and not job.done(), "the long run never reported progress"
        time.sleep(0.05)
    job.cancel()
    r = image_app.call(prompt="after the stop", steps=1)  # the worker is free again
    assert len(r["result"]) == 1
    stopped = [e for e in image_app.engine.log if e["steps"] == 400]
    assert stopped and stopped[-1]["stopped"] and 2 <= stopped[-1]["steps_done"] < 400
    assert len(set(out.glob("*.png")) - before) == 1  # the stopped run wrote nothing


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


def test_video_generate_and_compare(video_app):
    r = video_app.call(prompt="a ball moving right", steps=2, frames=5, fps=4)
    (item,) = r["result"]
    data = Path(item["video"]).read_bytes()
    assert data[4:8] == b"ftyp" and b"avc1" in data[:4096]  # H.264 MP4: what browsers play
    assert r["stats"]["family"] == "wan"
    side = _sidecar_of(video_app.engine.out_dir, Path(item["video"]).name)
    assert side["call"]["num_frames"] == 5 and side["fps"] == 4

    r = video_app.call("/compare", prompt="a ball moving right", steps=2, frames=5)
    (base,), (acc,) = r["baseline"], r["result"]
    assert base["video"].endswith(".mp4") and acc["video"].endswith(".mp4")
    assert r["metrics"]["ssim"] == 1.0 and r["metrics"]["speedup"] > 0
    with pytest.raises(AppError, match="frames: 33 is over this server's limit of 9"):
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
    from accel.app.gradio_app import _config_file

    cfg = accel.Config.from_dict({"tokens": {"ratio": 0.25}})
    path = Path(_config_file(image_app.engine, cfg))
    assert path.parent.parent == image_app.engine.out_dir and accel.Config.load(path) == cfg


def test_cli_help_works_without_gradio(monkeypatch, capsys):
    # `accel --help` and `accel app --help` must not need gradio: it is imported when the app starts.
    from accel.app.cli import build_parser

    for name in ("gradio", "gradio_client"):
        monkeypatch.setitem(sys.modules, name, None)  # `import gradio` now fails
    for name in [m for m in sys.modules if m.startswith(("accel.app.gradio_app", "accel.app.web_"))]:
        monkeypatch.delitem(sys.modules, name)  # imported afresh, with gradio unavailable
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["app", "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "--allow-model-paths" in out and "127.0.0.1" in out and "--max-steps" in out


def test_limits_from_flags_and_file(tmp_path):
    from accel.app.cli import build_parser
    from accel.app.gradio_app import limits_from_args

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
    from accel.app.web_engine import Engine, InputError
    from accel.pipelines.load import load

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
