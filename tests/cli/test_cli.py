"""The `accel` command: models, generate (image and video), and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import accel
from accel.cli import main


def _run(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "accel", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_models_lists_families_and_builtins(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for word in ("sd15", "flux", "wan", "tiny-sd15", "tiny-wan", "Presets: off", "ref-video", "(default for video)"):
        assert word in out
    for name in accel.available_presets():  # each preset described on its own line
        assert any(line.split()[:1] == [name] and len(line.split()) > 3 for line in out.splitlines()), name


def test_generate_image_writes_png_and_sidecar(tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "--model", "tiny-sd15", "--prompt", "a red circle", "--seed", "3",
                 "--out", str(out)]) == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (32, 32, 3) or img.ndim == 3
    side = json.loads((tmp_path / "img.png.json").read_text())
    assert side["model"] == "tiny-sd15" and side["seed"] == 3 and side["prompt"] == "a red circle"
    # accelerated by default: the balanced preset for the family, recorded with its config
    assert side["preset"] == "balanced" and side["config"] == accel.preset("balanced", "sd15").to_dict()
    assert side["stats"]["applied"] and side["stats"]["steps"] == side["call"]["num_inference_steps"]
    assert side["timings"]["generate_s"] > 0
    assert "wrote" in capsys.readouterr().out
    # Same seed, same bytes: the output is a function of the arguments.
    out2 = tmp_path / "img2.png"
    assert main(["generate", "--model", "tiny-sd15", "--prompt", "a red circle", "--seed", "3",
                 "--out", str(out2)]) == 0
    assert out.read_bytes() == out2.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_generate_video_writes_mp4(tmp_path):
    import imageio.v3 as iio

    out = tmp_path / "clip.mp4"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cache: {method: none}\n")
    assert main(["generate", "--model", "tiny-wan", "--prompt", "a ball moving right", "--config", str(cfg),
                 "--out", str(out)]) == 0
    frames = iio.imread(out, plugin="pyav") if _has_pyav() else None
    assert out.stat().st_size > 0 and out.read_bytes()[4:8] == b"ftyp"
    if frames is not None:
        assert frames.ndim == 4
    side = json.loads((tmp_path / "clip.mp4.json").read_text())
    assert side["preset"] == "balanced" and side["call"]["num_frames"] >= 1


def test_generate_layers_preset_config_file_and_set_and_takes_a_sidecar_back(tmp_path):
    """--preset, then the --config file's sections, then --set (as batch does); the sidecar records the preset and
    the config once, holds only plain values, and is itself a valid --config that reproduces the config."""
    cfg = tmp_path / "c.json"
    cfg.write_text('{\n\t"cache": {"interval": 4}\n}')  # tab-indented JSON
    first = tmp_path / "a.png"
    assert main(["generate", "--model", "tiny-sd15", "--prompt", "a red circle", "--steps", "3", "--preset", "fast",
                 "--config", str(cfg), "--set", "tokens.ratio=0.4", "--out", str(first)]) == 0
    side = json.loads((tmp_path / "a.png.json").read_text())
    fast = accel.preset("fast", "sd15")
    assert side["preset"] == "fast" and "config" not in side["stats"]
    assert side["config"]["cache"] == {**fast.cache.to_dict(), "interval": 4}  # the file on top of the preset
    assert side["config"]["tokens"] == {**fast.tokens.to_dict(), "ratio": 0.4}  # --set on top of both
    assert all(isinstance(v, (str, int, float, bool, list, type(None))) for v in side["call"].values())
    again = tmp_path / "b.png"
    assert main(["generate", "--model", "tiny-sd15", "--prompt", "a red circle", "--steps", "3",
                 "--config", str(tmp_path / "a.png.json"), "--out", str(again)]) == 0
    assert json.loads((tmp_path / "b.png.json").read_text())["config"] == side["config"]


def test_the_readme_example_config_loads():
    root = Path(__file__).resolve().parents[2]
    assert "--config examples/accel.yaml" in (root / "README.md").read_text()
    cfg = accel.Config.load(root / "examples" / "accel.yaml")
    assert cfg.cache.enabled and cfg.attention.enabled


def test_without_model_the_trained_defaults_are_used_for_pictures_and_for_video(tmp_path):
    # no --model: ref-sd for a picture, ref-video when the call asks for video (an .mp4 --out)
    for out, model in [(tmp_path / "p.png", "ref-sd"), (tmp_path / "v.mp4", "ref-video")]:
        assert main(["generate", "--prompt", "a big red circle in the center on a white background",
                     "--steps", "2", "--out", str(out)]) == 0
        assert json.loads(out.with_name(out.name + ".json").read_text())["model"] == model


def _has_pyav():
    try:
        import av  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("args, fragment", [
    (["--model", "tiny-nope"], "unknown built-in model 'tiny-nope'"),
    (["--model", "no_such_thing"], "unknown model 'no_such_thing'"),
    (["--height", "-8"], "must be positive"),
    (["--steps", "many"], "is not a whole number"),
    (["--height", "36"], "divisible by 8"),
    (["--preset", "warp9"], "--preset 'warp9': choose one of off"),
    (["--config", "missing.toml"], "no such file"),
    (["--out", "/dev/null/x/y.png"], "--out: cannot create the folder"),
    (["--out", "picture.bmp"], "use a .png"),
    (["--model", "tiny-sd15", "--frames", "9"], "makes images, not video"),
    (["--guidance", "nan"], "nan is not a finite number"),
    (["--guidance", "inf"], "inf is not a finite number"),
    (["--guidance", "-1"], "--guidance: -1.0 is negative"),  # as a batch row's guidance is refused
    (["--seed", "-1"], "--seed: -1 is out of range; it must be >= 0"),
])
def test_bad_arguments_exit_nonzero_with_one_line(args, fragment, tmp_path, monkeypatch, capsys):
    # In process (`main` is what the `accel` script runs); the subprocess test below checks the script.
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(["generate", "--prompt", "x", *args])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    _assert_one_error_line(rc, capsys.readouterr().err, fragment)


def test_the_accel_script_prints_one_error_line(tmp_path):
    r = _run("generate", "--prompt", "x", "--model", "tiny-nope", cwd=tmp_path)
    _assert_one_error_line(r.returncode, r.stderr, "unknown built-in model 'tiny-nope'")


def _assert_one_error_line(rc, stderr, fragment):
    assert rc == 2
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(("WARNING", "["))]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("accel: error:") and fragment in lines[0], lines[0]
    assert "Traceback" not in stderr


def test_help_models_and_dry_run_answer_without_importing_torch(tmp_path):
    """`accel --help`, `accel models`, `accel batch --dry-run` and `import accel` load neither torch nor diffusers
    (they took 4-13 s before a word was printed); the names `import accel` offers load their modules on first use."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n{"prompt": "a blue square", "steps": 3}\n')
    code = ("import sys, contextlib, io\n"
            "import accel\n"
            "from accel.cli import main\n"
            "for argv in (['--help'], ['generate', '--help'], ['batch', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main(argv)\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    assert main(['models']) == 0\n"
            f"    assert main(['batch', {str(prompts)!r}, '--out', {str(tmp_path / 'o')!r}, '--dry-run',\n"
            "                 '--preset', 'fast', '--set', 'cache.interval=3']) == 0\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
            "accel.CacheConfig(method='block'); print('torch' in sys.modules)\n"
            "print(out.getvalue())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:2] == ["[]", "False"], r.stdout
    assert "tiny-sd15" in r.stdout and "(default)" in r.stdout  # models listed its built-ins
    assert "2 rows, 0 done, 2 to generate" in r.stdout  # the dry run read both rows


def test_compare_times_both_sides_and_claims_a_speed_up_only_when_something_engaged(tmp_path, capsys):
    for preset, engages in (("balanced", True), ("off", False)):
        out = tmp_path / f"{preset}.png"
        assert main(["generate", "--model", "tiny-sd15", "--prompt", "a red circle", "--steps", "6", "--preset", preset,
                     "--compare", "--repeats", "2", "--out", str(out)]) == 0
        text = capsys.readouterr().out
        side = json.loads((tmp_path / f"{preset}.png.json").read_text())
        base = json.loads((tmp_path / f"{preset}-baseline.png.json").read_text())
        cmp = side["compare"]
        assert base["compare"] == cmp and base["preset"] == "off" and side["preset"] == preset
        assert cmp["repeats"] == 2 and cmp["baseline_s"] > 0 and cmp["accelerated_s"] > 0
        assert cmp["baseline_range"][0] <= cmp["baseline_s"] <= cmp["baseline_range"][1]
        assert bool(cmp["engaged"]) == engages
        if engages:  # the cache reused steps: lossy, above its floor on this tiny model
            assert "faster" in text and "engaged      step cache reused" in text
            assert cmp["psnr"] is not None and cmp["psnr"] > 25 and side["stats"]["cache"]["reused"] > 0
        else:  # identical outputs: no speed-up is claimed
            assert "nothing engaged" in text and "faster" not in text and cmp["psnr"] is None
            assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "off-baseline.png")))


def test_loading_a_model_prints_no_library_import_noise(tmp_path):
    """With torchao installed (the dev extra), importing diffusers logs "Failed to load ..." lines, torch pytree
    deprecations and "Unable to import `torchao` Tensor objects"; the CLI loads models quietly, so its output
    is its own. (Without torchao this passes trivially; CI installs it.)"""
    r = _run("generate", "--model", "ref-sd", "--prompt", "a red circle", "--steps", "2", "--out",
             str(tmp_path / "a.png"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    noise = [ln for ln in r.stderr.splitlines() if any(w in ln for w in ("torchao", "_pytree", "Failed to load"))]
    assert not noise, noise
