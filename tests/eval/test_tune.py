"""`accel tune`: calibrated thresholds, the per-prompt floor, the pick against the presets, stopping, the file."""

from __future__ import annotations

import pytest
import torch

import accel
from accel import cli
from accel.eval import bench, tune
from accel.pipelines import tiny
from accel.pipelines.load import load
from accel.pipelines.ref import data as shapes


def _prompt_file(tmp_path, n: int, seed: int):
    path = tmp_path / f"prompts{seed}.txt"
    path.write_text("\n".join(s.prompt for s in shapes.held_out_scenes(n, n_shapes=1, seed=seed)) + "\n")
    return path


def test_parse_duration():
    assert tune.parse_duration("90") == 90 and tune.parse_duration("10m") == 600 and tune.parse_duration("1.5h") == 5400
    for bad in ("soon", "-5", "0", "10 minutes"):
        with pytest.raises(ValueError, match="600, 600s, 10m or 1h"):
            tune.parse_duration(bad)


def test_thresholds_are_read_off_the_prompts():
    torch.set_num_threads(1)
    pipe = tiny.make("flux")
    pipe.set_progress_bar_config(disable=True)
    work = bench.workload(pipe, "tiny-flux", steps=8, device="cpu")
    th = tune.calibrate_thresholds(work)
    assert len(th) >= 2 and th == sorted(th) and all(t > 0 for t in th)
    assert not accel.is_applied(pipe)
    # they replace the fixed grid in the search space
    from accel.eval import space

    labels = [s.label for s in space.cache_settings("flux", th)]
    assert labels[0] == f"cache block threshold {th[0]:g}" and "cache block threshold 0.05" not in labels
    sd = tiny.make("sd15")
    assert tune.calibrate_thresholds(bench.workload(sd, "tiny-sd15", steps=2, device="cpu")) == []  # UNets: intervals


@pytest.mark.parametrize("model", ["ref-sd", "ref-dit"])
def test_the_pick_meets_the_floor_on_held_out_prompts_and_beats_no_passing_preset(model, tmp_path):
    """Tuned on 3 prompts, the pick keeps 4 other held-out prompts above the same floor; in the tuner's own
    final measurement it is at least as fast as every preset that met the floor."""
    torch.set_num_threads(1)
    floor, steps = 30.0, 12
    pipe = load(model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    prompts = [s.prompt for s in shapes.held_out_scenes(3, n_shapes=1, seed=7)]
    work = bench.workload(pipe, model, prompts=prompts, steps=steps, device="cpu")
    outcome = tune.search(work, floor, repeats=1, progress=False, log=lambda m: None)
    assert outcome.pick is not None and outcome.pick.meets(floor) and outcome.pick.speedup > 1.0
    passing_presets = [r for r in outcome.final if r.kind == "preset" and r.meets(floor)]
    assert all(outcome.pick.seconds <= p.seconds * (1 + tune.SPEED_TIE) for p in passing_presets)
    assert any(r.label.startswith("preset") for r in outcome.screened)  # the presets were candidates
    # held out: other prompts, same call
    held = bench.workload(pipe, model, n_prompts=4, prompt_seed=99, steps=steps, device="cpu")
    assert not set(c.kwargs["prompt"] for c in held.calls) & set(prompts)
    rows = [bench.Row("off (baseline)", "baseline"), bench.Row("tuned", "config", outcome.pick_config)]
    res, _ = bench.run(held, rows, repeats=1, progress=False)
    assert res[1].meets(floor), (outcome.pick.label, res[1].per_call_psnr)
    assert res[1].engaged  # the pick does something on the held-out prompts too


def test_a_floor_nothing_meets_writes_the_unaccelerated_config(tmp_path, capsys):
    out = tmp_path / "tuned.yaml"
    rc = cli.main(["tune", "--model", "tiny-sd15", "--prompts", str(_prompt_file(tmp_path, 2, 1)), "--min-psnr", "99",
                   "--steps", "4", "--threads", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "No setting kept every prompt at or above 99 dB" in text and "unaccelerated config" in text
    cfg = accel.Config.from_yaml(out.read_text())
    assert not cfg.enabled
    assert out.read_text().startswith("# accel tune --model tiny-sd15 --min-psnr 99")


def test_the_tuned_file_runs_through_generate_unchanged_by_the_default_preset(tmp_path, capsys):
    out = tmp_path / "tuned.yaml"
    rc = cli.main(["tune", "--model", "ref-sd", "--prompts", str(_prompt_file(tmp_path, 2, 3)), "--min-psnr", "30",
                   "--steps", "10", "--threads", "1", "--repeats", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "Picked " in text and "Best preset meeting the floor" in text
    tuned = accel.Config.from_yaml(out.read_text())
    assert tuned.enabled
    png = tmp_path / "x.png"
    assert cli.main(["generate", "--model", "ref-sd", "--config", str(out), "--prompt", "a red circle",
                     "--steps", "10", "--out", str(png)]) == 0
    import json

    side = json.loads(png.with_name(png.name + ".json").read_text())
    assert accel.Config.from_dict(side["config"]) == tuned  # the preset under --config changed nothing


def test_stopping_keeps_the_best_found_so_far(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    pipe = load("ref-sd", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    work = bench.workload(pipe, "ref-sd", n_prompts=2, steps=10, device="cpu")
    real = bench._Sampler.sample
    count = {"n": 0}

    def interrupting(self, row, calls=None, keep=True):
        count["n"] += 1
        if count["n"] > 8:  # baseline, two presets, one cache setting (a warm-up and a timed run each)
            raise KeyboardInterrupt
        return real(self, row, calls, keep)

    monkeypatch.setattr(bench._Sampler, "sample", interrupting)
    outcome = tune.search(work, 30.0, progress=False, log=lambda m: None)
    assert outcome.stopped == "interrupted" and not outcome.final
    assert len([r for r in outcome.screened if r.ran]) == 4
    assert outcome.pick is not None and outcome.pick.meets(30.0)
    assert not accel.is_applied(pipe)
    monkeypatch.undo()
    budget = tune.search(work, 30.0, budget_s=1e-9, progress=False, log=lambda m: None)
    assert budget.stopped == "time budget"


def test_bad_arguments_are_refused_with_what_to_do(tmp_path, capsys):
    prompts = _prompt_file(tmp_path, 1, 1)
    (tmp_path / "afile").write_text("x")
    cases = [(["--min-psnr", "-3"], "between 0 and 100"), (["--out", str(tmp_path / "t.txt")], ".yaml, .json or .toml"),
             (["--time-budget", "soon"], "10m"), (["--out", str(tmp_path / "afile" / "t.yaml")], "is a file, not a folder")]
    for extra, words in cases:
        args = ["tune", "--model", "tiny-sd15", "--prompts", str(prompts), "--out", str(tmp_path / "t.yaml"), *extra]
        assert cli.main(args) == 2
        assert words in capsys.readouterr().err
    assert cli.main(["tune", "--model", "tiny-sd15", "--prompts", str(tmp_path / "none.txt"),
                     "--out", str(tmp_path / "t.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err

pytestmark = [pytest.mark.slow]
