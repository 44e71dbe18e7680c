"""The sampler section (scheduler and step count) and the fitted OLSS scheduler, on the real diffusers pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import accel
from accel import cli
from accel.eval import bench, space, tune
from accel.eval.metrics import compare
from accel.pipelines import tiny
from accel.solver import OLSSScheduler, fit_olss, record_trajectories

PROMPTS = ("a red circle", "a blue square", "a green star")


def _kw(pipe, prompt, steps):
    return {"prompt": prompt, "num_inference_steps": steps, "height": 64, "width": 64, "output_type": "np",
            **({"guidance_scale": 3.5} if "Flux" in type(pipe).__name__ else {})}


def _run(pipe, prompt, steps, seed=0):
    return pipe(**_kw(pipe, prompt, steps), generator=torch.Generator().manual_seed(seed)).images[0]


@pytest.fixture(params=["sd15", "flux"])
def pipe(request, tiny_cache):
    p = tiny_cache(request.param)
    p.set_progress_bar_config(disable=True)
    yield p
    accel.remove(p)


def test_olss_given_every_step_reproduces_the_teacher(pipe, tmp_path):
    """The teacher's own update lies in OLSS's subspace: fitted on all its steps, the fitted scheduler gives the
    teacher's output (here to float32 rounding; a prompt and seed it was not fitted on included)."""
    steps = 6
    traj = record_trajectories(pipe, [(_kw(pipe, p, steps), 0) for p in PROMPTS[:2]])
    sch = fit_olss(traj, steps)
    assert sch.config.teacher["path"] == list(range(steps))
    sch.save_pretrained(tmp_path / "olss")
    accel.apply(pipe, {"solver": {"scheduler": "olss", "olss": str(tmp_path / "olss")}})
    for prompt, seed in ((PROMPTS[0], 0), (PROMPTS[2], 5)):
        accel.remove(pipe)
        want = _run(pipe, prompt, steps, seed)
        accel.apply(pipe, {"solver": {"scheduler": "olss", "olss": str(tmp_path / "olss")}})
        got = _run(pipe, prompt, steps, seed)
        assert type(pipe.scheduler).__name__ == "OLSSScheduler"
        assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()


def test_olss_at_fewer_steps_saves_loads_and_runs_its_own_count(tiny_cache, tmp_path):
    pipe = tiny_cache("sd15")
    pipe.set_progress_bar_config(disable=True)
    traj = record_trajectories(pipe, [(_kw(pipe, p, 10), 0) for p in PROMPTS])
    sch = fit_olss(traj, 4)
    path = sch.config.teacher["path"]
    assert len(path) == 4 and path[0] == 0 and path == sorted(set(path))
    sch.save_pretrained(tmp_path / "o")
    back = OLSSScheduler.from_pretrained(tmp_path / "o")
    assert back.config.timesteps == sch.config.timesteps and back.config.we == sch.config.we
    try:
        # the call asks 10 steps; the config runs the fitted 4, and stats say both
        accel.apply(pipe, {"solver": {"scheduler": "olss", "olss": str(tmp_path / "o")}})
        out = _run(pipe, PROMPTS[0], 10)
        st = accel.stats(pipe)
        assert st["solver"] == {"scheduler": "OLSSScheduler", "steps": 4, "asked_steps": 10, "changed": True}
        assert st["total_steps"] == 4 and st["denoiser_forwards"] == 4
        assert np.isfinite(out).all()
        with pytest.raises(accel.ConfigError, match="fitted for 4 steps"):
            accel.apply(pipe, {"solver": {"scheduler": "olss", "olss": str(tmp_path / "o"), "steps": 6}})
    finally:
        accel.remove(pipe)


def test_a_solver_at_fewer_steps_is_applied_and_removed_exactly(pipe):
    original, config = pipe.scheduler, dict(pipe.config)
    want = _run(pipe, PROMPTS[0], 4)
    name = "flow-euler" if "Flux" in type(pipe).__name__ else "dpm++2m"
    method = "block" if "Flux" in type(pipe).__name__ else "deepcache"
    accel.apply(pipe, {"solver": {"scheduler": name, "steps": 3}, "cache": {"method": method, "interval": 2}})
    assert pipe.scheduler is not original
    out = _run(pipe, PROMPTS[0], 4)
    st = accel.stats(pipe)
    assert st["solver"]["steps"] == 3 and st["solver"]["asked_steps"] == 4 and st["total_steps"] == 3
    assert st["cache"]["computed"] + st["cache"]["reused"] == 3 and st["cache"]["reused"] >= 1  # follows 3 steps
    assert compare(want, out)["psnr"] is not None  # a different sampler: a different output
    accel.remove(pipe)
    assert pipe.scheduler is original and dict(pipe.config) == config
    assert np.array_equal(_run(pipe, PROMPTS[0], 4), want)


@pytest.mark.parametrize("fields, words", [
    ({"scheduler": "heun9"}, "choose one of ddim"),
    ({"scheduler": "olss"}, "needs the folder"),
    ({"olss": "x"}, "set solver.scheduler: olss"),
    ({"steps": -1}, "solver.steps"),
])
def test_bad_solver_fields_say_what_to_do(fields, words):
    with pytest.raises(accel.ConfigError, match=words):
        accel.Config.from_dict({"solver": fields})


def test_a_solver_for_another_kind_of_model_is_refused(tiny_cache, tmp_path):
    pipe = tiny_cache("sd15")
    with pytest.raises(accel.ConfigError, match="not for a noise- or v-prediction model"):
        accel.apply(pipe, {"solver": {"scheduler": "flow-euler"}})
    with pytest.raises(accel.ConfigError, match="holds no scheduler_config.json"):
        accel.apply(pipe, {"solver": {"scheduler": "olss", "olss": str(tmp_path)}})
    assert not accel.is_applied(pipe)


def test_a_tuned_file_with_a_fitted_scheduler_round_trips_through_generate(tiny_cache, tmp_path, monkeypatch):
    """accel tune writes tuned.yaml and tuned.olss/ side by side; generate reads them from another folder and
    makes what the config makes in code."""
    pipe = tiny.make("sd15")  # the one `accel generate --model tiny-sd15` loads (seed 0)
    pipe.set_progress_bar_config(disable=True)
    traj = record_trajectories(pipe, [(_kw(pipe, p, 8), 0) for p in PROMPTS])
    fitted = tmp_path / "fit"
    fit_olss(traj, 3).save_pretrained(fitted)
    cfg = accel.Config.from_dict({"solver": {"scheduler": "olss", "olss": str(fitted)}})
    outcome = tune.Outcome(pick=None, pick_config=cfg, best_preset=None, screened=[], final=[], thresholds=[],
                           stopped=None)
    from accel.cli.tune import _keep_olss

    out = tmp_path / "results" / "tuned.yaml"
    out.parent.mkdir()
    kept = _keep_olss(outcome, out)
    assert kept.pick_config.solver.olss == "tuned.olss"
    assert (out.parent / "tuned.olss" / "scheduler_config.json").is_file()
    out.write_text(tune.config_text(kept, model="tiny-sd15", floor=30, calls=3))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["generate", "--model", "tiny-sd15", "--prompt", PROMPTS[0], "--steps", "8", "--height", "64",
                     "--width", "64", "--seed", "0", "--config", str(out), "--out", "o.png"]) == 0
    from PIL import Image

    made = np.asarray(Image.open(elsewhere / "o.png")).astype(np.float32) / 255
    accel.apply(pipe, str(out))  # the library reads the same file, the folder relative to it
    want = _run(pipe, PROMPTS[0], 8)
    assert accel.stats(pipe)["solver"]["steps"] == 3
    accel.remove(pipe)
    assert np.abs(made - want).max() <= 1 / 255 + 1e-6


def test_the_step_axis_is_left_out_with_the_reason_when_the_call_takes_no_step_count(tiny_cache):
    base = tiny_cache("sd15")

    class FixedSteps(type(base)):
        def __call__(self, prompt, height=64, width=64, output_type="np", generator=None, **kw):
            return super().__call__(prompt, height=height, width=width, num_inference_steps=3,
                                    output_type=output_type, generator=generator)

    pipe = FixedSteps(**base.components)
    pipe.set_progress_bar_config(disable=True)
    rows, why = space.solver_settings(pipe, 3)
    assert rows == [] and "takes no num_inference_steps" in why
    work = bench.workload(pipe, "tiny-sd15", prompts=["a red circle"], device="cpu")
    work.calls = [bench.Call({k: v for k, v in c.kwargs.items() if k != "num_inference_steps"}, c.seed)
                  for c in work.calls]
    outcome = tune.search(work, 20.0, progress=False, repeats=1, log=lambda m: None)
    assert any("step axis: left out" in n and "num_inference_steps" in n for n in outcome.notes)
    assert not any("steps" in r.label and "olss" in r.label for r in outcome.screened)


def test_tune_screens_the_step_axis_with_solvers_and_olss(tiny_cache):
    pipe = tiny_cache("sd15")
    pipe.set_progress_bar_config(disable=True)
    work = bench.workload(pipe, "tiny-sd15", prompts=list(PROMPTS[:2]), steps=10, device="cpu")
    outcome = tune.search(work, 10.0, progress=False, repeats=1, log=lambda m: None)
    labels = [r.label for r in outcome.screened]
    assert "steps 8 (DDIMScheduler)" in labels and "steps 8 dpm++2m" in labels and "steps 8 olss" in labels
    olss = next(r for r in outcome.screened if r.label == "steps 8 olss")
    assert olss.ran and any("sampler OLSSScheduler ran 8 steps (the call asked 10)" in e for e in olss.engaged)
    assert not accel.is_applied(pipe) and type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_refitting_on_the_students_own_outputs_keeps_exactness_and_closes_the_gap():
    """Given every step, the refit is still the teacher. At 8 of 20 steps on the trained ref-dit (random weights
    barely react to the latent, so only a trained model shows it), fitted against what the model returned at the
    student's own latents, the worst prompt is much closer to the teacher than with the plain fit."""
    from accel.pipelines.load import load
    from accel.solver import refit_olss

    pipe = load("ref-dit", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    work = bench.workload(pipe, "ref-dit", n_prompts=3, device="cpu")
    runs = [(c.kwargs, c.seed) for c in work.calls]
    traj = record_trajectories(pipe, runs)
    teacher = [pipe(**kw, generator=torch.Generator().manual_seed(seed)).images[0] for kw, seed in runs]

    def worst(sch):
        original, pipe.scheduler = pipe.scheduler, sch
        try:
            outs = [pipe(**{**kw, "num_inference_steps": len(sch)}, generator=torch.Generator().manual_seed(seed))
                    .images[0] for kw, seed in runs]
        finally:
            pipe.scheduler = original
        return min(compare(np.asarray(t), np.asarray(o))["psnr"] or 200.0 for t, o in zip(teacher, outs, strict=True))

    full = refit_olss(pipe, runs, traj, fit_olss(traj, traj.steps))
    assert full.config.teacher["refit"] and worst(full) > 60
    plain = fit_olss(traj, 8)
    refit = refit_olss(pipe, runs, traj, plain)
    assert refit.config.timesteps == plain.config.timesteps  # the same path, other weights
    assert worst(refit) > worst(plain) + 6


def test_batch_runs_every_row_with_the_configs_sampler(tmp_path):
    """A tuned file's solver section reaches accel batch: each row runs the config's scheduler at its step count,
    and the sidecar says what the row asked and what ran."""
    import json

    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    (tmp_path / "tuned.yaml").write_text("solver: {scheduler: dpm++2m, steps: 3}\n")
    assert cli.main(["batch", str(tmp_path / "p.txt"), "--model", "tiny-sd15", "--steps", "6", "--height", "64",
                     "--width", "64", "--config", str(tmp_path / "tuned.yaml"), "--out", str(tmp_path / "out"),
                     "--no-progress"]) == 0
    sides = sorted((tmp_path / "out").glob("*.png.json"))
    assert len(sides) == 2
    for side in sides:
        solver = json.loads(side.read_text())["stats"]["solver"]
        assert solver == {"scheduler": "DPMSolverMultistepScheduler", "steps": 3, "asked_steps": 6, "changed": True}


def test_tune_holds_the_checkers_scores_as_well_as_the_psnr_floor(tiny_cache):
    """On a scored model a setting that changes what the checker reads is no pick, however high its PSNR."""
    pipe = tiny_cache("sd15")
    pipe.set_progress_bar_config(disable=True)
    work = bench.workload(pipe, "tiny-sd15", prompts=["a red circle"], steps=6, device="cpu")
    first = {}

    def scorer(outputs, items):  # reads the baseline right, any changed output wrong
        first.setdefault("outs", [np.asarray(o).copy() for o in outputs])
        same = all(np.array_equal(a, np.asarray(b)) for a, b in zip(first["outs"], outputs, strict=True))
        return {"colour": 1.0 if same else 0.5}

    work.scorer = scorer
    outcome = tune.search(work, 5.0, progress=False, repeats=1, log=lambda m: None, steps_axis=False)
    changed = [r for r in outcome.screened if r.kind != "baseline" and r.ran and r.psnr is not None]
    assert changed and all(r.meets(5.0) for r in changed)  # the PSNR floor alone would pass them
    assert outcome.pick is None
    assert not changed[0].keeps_scores({"colour": 1.0}) and changed[0].keeps_scores({"colour": 0.5})
