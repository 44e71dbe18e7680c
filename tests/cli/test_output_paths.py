"""Every path a command writes is checked before a model loads; a write that fails at the end loses nothing."""

from __future__ import annotations

import json
import types

import pytest

import accel
from accel import cli
from accel.io import outputs


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model is a failure of the test: the path must be refused first."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the bad path was refused")

    import accel.batch.driver
    import accel.cli.bench
    import accel.cli.generate

    monkeypatch.setattr(accel.cli.bench, "load", refuse)
    monkeypatch.setattr(accel.cli.generate, "load", refuse)
    monkeypatch.setattr(accel.batch.driver, "run_worker", refuse)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("accel: error: "), err
    return err[0]


def _prompts(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a red circle\n")
    return p


def test_tune_refuses_an_out_that_is_a_folder_before_loading(tmp_path, capsys, no_model):
    (tmp_path / "outdir.yaml").mkdir()
    rc = cli.main(["tune", "--model", "tiny-sd15", "--prompts", str(_prompts(tmp_path)),
                   "--out", str(tmp_path / "outdir.yaml")])
    assert rc == 2 and "--out: " in (line := _error(capsys)) and "outdir.yaml' is a folder" in line


def test_tune_refuses_a_json_under_a_file_before_loading(tmp_path, capsys, no_model):
    (tmp_path / "afile").write_text("x")
    rc = cli.main(["tune", "--model", "tiny-sd15", "--prompts", str(_prompts(tmp_path)),
                   "--out", str(tmp_path / "t.yaml"), "--json", str(tmp_path / "afile" / "r.json")])
    assert rc == 2 and "afile' is a file, not a folder" in _error(capsys)


def test_bench_json_folder_is_created_or_refused_before_loading(tmp_path, capsys, no_model):
    (tmp_path / "afile").write_text("x")
    assert cli.main(["bench", "--model", "tiny-sd15", "--json", str(tmp_path / "afile" / "r.json")]) == 2
    assert "afile' is a file, not a folder" in _error(capsys)
    # a missing folder is made at the start (then the mocked load stops the run)
    assert cli.main(["bench", "--model", "tiny-sd15", "--json", str(tmp_path / "no" / "such" / "r.json")]) == 2
    assert "a model was loaded" in _error(capsys) and (tmp_path / "no" / "such").is_dir()


@pytest.mark.parametrize("flag", ["--approx-cache", "--out"])
def test_batch_refuses_a_file_for_a_folder_before_loading(tmp_path, capsys, no_model, flag):
    (tmp_path / "a-file.txt").write_text("x")
    args = {"--out": str(tmp_path / "out"), flag: str(tmp_path / "a-file.txt")}
    rc = cli.main(["batch", str(_prompts(tmp_path)), "--model", "tiny-sd15", *[x for kv in args.items() for x in kv],
                   "--no-progress"])
    line = _error(capsys)
    assert rc == 2 and f"{flag}: " in line and "a-file.txt' is a file, not a folder" in line


def test_generate_refuses_an_approx_dir_that_is_a_file_before_loading(tmp_path, capsys, no_model):
    (tmp_path / "cache").write_text("x")
    rc = cli.main(["generate", "--prompt", "x", "--model", "tiny-sd15", "--out", str(tmp_path / "o.png"),
                   "--set", f"approx.dir={tmp_path / 'cache'}"])
    assert rc == 2 and "approx.dir: " in _error(capsys)


def test_a_write_that_fails_at_the_end_goes_beside_then_to_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    said = []
    gone = tmp_path / "gone"
    gone.write_text("the folder became a file while the run went on")
    where = outputs.keep_text(gone / "r.json", '{"rows": 3}', say=said.append)
    assert where == tmp_path / where.name and where.read_text() == '{"rows": 3}'
    assert len(said) == 1 and "could not write" in said[0] and str(where) in said[0]
    # nowhere takes it: printed whole on standard output, and said so
    monkeypatch.setattr(outputs, "spare_paths", lambda path: [gone / "a", gone / "b"])
    said.clear()
    assert outputs.keep_text(gone / "r.json", "the report", say=said.append) is None
    assert "standard output" in said[-1]


def test_tune_keeps_its_config_when_the_out_folder_breaks_during_the_run(tmp_path, monkeypatch, capsys):
    """The search runs (faked here), then the folder is gone: the tuned config is written in the current folder."""
    import accel.eval.tune as tune_engine
    from accel.cli import tune as tune_cmd

    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "results"
    work = types.SimpleNamespace(random_weights=False, family="sd15", calls=[1], steps=4, device="cpu")
    monkeypatch.setattr(tune_cmd, "prepare", lambda args: work)

    def search(*a, **k):
        out_dir.rmdir()
        out_dir.write_text("a file now")
        return tune_engine.Outcome(pick=None, pick_config=accel.Config(), best_preset=None, screened=[], final=[],
                                   thresholds=[], stopped=None)

    monkeypatch.setattr(tune_engine, "search", search)
    rc = cli.main(["tune", "--model", "tiny-sd15", "--prompts", str(_prompts(tmp_path)),
                   "--out", str(out_dir / "tuned.json")])
    captured = capsys.readouterr()
    kept = list(tmp_path.glob("tuned.kept-*.json"))
    assert rc == 0 and len(kept) == 1 and f"wrote it to '{kept[0]}'" in captured.err
    assert accel.Config.load(kept[0]) == accel.Config() and json.loads(kept[0].read_text())
