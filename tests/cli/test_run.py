"""`accel run -- python script.py` and `import accel.auto`: an unchanged script's pipelines are
accelerated, stats go to stderr at exit, and the script's own output and exit status are kept."""

import json
import os
import subprocess
import sys
import textwrap

import accel

SCRIPT = textwrap.dedent("""
    import sys
    from accel.pipelines import tiny

    pipe = tiny.make("sd15")  # a constructor, not from_pretrained: the patch must catch it too
    for seed in (0, 1):
        out = pipe(**tiny.example_inputs("sd15", num_inference_steps=2, generator=None))
    print("script says", sys.argv[1:], out.images.shape)
    print("to stderr", file=sys.stderr)
    sys.exit(3)
""")


def _stats_lines(stderr: str) -> list[dict]:
    return [json.loads(ln[len("accel: stats "):]) for ln in stderr.splitlines() if ln.startswith("accel: stats ")]


def _env():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("ACCEL_PRESET", None)
    env.pop("ACCEL_CONFIG", None)
    return env


def _accel_run(argv: list[str], cwd) -> subprocess.CompletedProcess:
    """``accel run ...`` in a forked copy of this process: the CLI's own code (it execs the command), without
    paying for a second import of torch and diffusers that ``python -m accel run`` would."""
    out, err = cwd / "stdout.txt", cwd / "stderr.txt"
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        rc = 125
        try:
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(_env())
            for fd, path in ((1, out), (2, err)):
                f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(f, fd)
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)  # not pytest's
            from accel.cli import main

            rc = main(["run", *argv])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    _, status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(status), out.read_text(), err.read_text())


def test_accel_run_accelerates_an_unchanged_script(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    r = _accel_run(["--", sys.executable, str(script), "a", "--b"], tmp_path)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "script says ['a', '--b'] (1, 32, 32, 3)\n"  # untouched: nothing of accel's on stdout
    assert "to stderr" in r.stderr
    (entry,) = _stats_lines(r.stderr)
    from accel.zero_code import default_preset

    preset = default_preset()
    assert entry["pipeline"] == "StableDiffusionPipeline" and entry["preset"] == preset and entry["calls"] == 2
    stats = entry["stats"]
    assert stats["applied"] and stats["family"] == "sd15" and stats["steps"] == 2
    assert stats["config"] == accel.preset(preset, "sd15").to_dict()


def test_env_var_with_import_accel_auto(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("import accel.auto\n" + SCRIPT)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       env={**_env(), "ACCEL_PRESET": "off"}, cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "script says [] (1, 32, 32, 3)\n"
    (entry,) = _stats_lines(r.stderr)
    assert entry["preset"] == "off" and entry["stats"]["applied"] and entry["stats"]["steps"] == 2
    assert entry["stats"]["config"] == accel.Config().to_dict()


def test_accel_run_reports_a_bad_preset_or_missing_command(tmp_path):
    r = _accel_run(["--preset", "warp9", "--", sys.executable, "-c", "print(1)"], tmp_path)
    assert r.returncode == 2 and "accel: error: --preset 'warp9': choose one of" in r.stderr
    r = _accel_run([], tmp_path)
    assert r.returncode == 2 and "give the command to run after --" in r.stderr
    r = _accel_run(["--", "no-such-command-here"], tmp_path)
    assert r.returncode == 2 and "'no-such-command-here': command not found" in r.stderr


def test_run_env_puts_the_hook_first_and_clears_inherited_settings():
    from accel.cli.run import SITE_DIR, run_env

    env = run_env(preset="off", base={"PYTHONPATH": "/x", "ACCEL_CONFIG": "old.yaml"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(SITE_DIR), "/x"]
    assert env["ACCEL_PRESET"] == "off" and "ACCEL_CONFIG" not in env
    assert (SITE_DIR / "sitecustomize.py").is_file()
