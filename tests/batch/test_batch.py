"""`accel batch`: outputs, sidecars and manifest agree; resume does only what is not verifiably done;
kills leave only whole files and resuming gives the bytes of an uninterrupted run; bad rows are
reported by line before any work; a failing row is recorded while the others complete; two ranks
do every row exactly once."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from accel.batch import manifest as mf
from accel.cli import build_parser, main
from accel.io.prompts import PromptFileError, read_rows

ROWS = [
    {"prompt": "a red cat", "steps": 2},
    {"prompt": "a blue dog", "steps": 2, "seed": 11},
    {"prompt": "a green tree", "steps": 2, "id": "tree"},
    {"prompt": "a castle at night", "steps": 2, "negative_prompt": "blurry"},
    {"prompt": "a small boat on the sea", "steps": 2, "guidance": 3.0},
    {"prompt": "snow on a mountain", "steps": 2},
    {"prompt": "a yellow flower", "steps": 2, "seed": 7},
    {"prompt": "a robot dancing", "steps": 2, "id": "robot-1"},
    {"prompt": "a horse in a field", "steps": 2},
    {"prompt": "the moon over a lake", "steps": 2},
    {"prompt": "an old man reading", "steps": 2, "seed": 3},
    {"prompt": "a bird flying", "steps": 2},
]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == ".png" and not p.name.startswith(".")}


def _row_records(folder: Path, status="ok") -> list[dict]:
    return [r for r in mf.read_all(folder) if r.get("event") == "row" and r.get("status") == status]


def _batch(prompts, out, *extra) -> int:
    return main(["batch", str(prompts), "--model", "tiny-sd15", "--out", str(out), "--no-progress", *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 12-row batch, run once without interruption."""
    d = tmp_path_factory.mktemp("batch")
    prompts = _write_jsonl(d / "rows.jsonl", ROWS)
    assert _batch(prompts, d / "ref") == 0
    return prompts, d / "ref"


def test_outputs_sidecars_and_manifest_agree(reference):
    prompts, ref = reference
    outs = _outputs(ref)
    expected = {"00000_a-red-cat_s0.png", "00001_a-blue-dog_s11.png", "tree.png", "robot-1.png",
                "00010_an-old-man-reading_s3.png", "00011_a-bird-flying_s11.png"}
    assert len(outs) == 12 and expected <= set(outs)
    records = _row_records(ref)
    assert sorted(r["output"] for r in records) == sorted(outs)
    for r in records:
        size, sha = mf.file_digest(ref / r["output"])
        assert (r["size"], r["sha256"]) == (size, sha)
        side = json.loads((ref / (r["output"] + ".json")).read_text())
        row = ROWS[r["index"]]
        assert side["prompt"] == row["prompt"] and side["line"] == r["line"] == r["index"] + 1
        assert side["seed"] == row.get("seed", r["index"]) and side["call"]["num_inference_steps"] == 2
        assert side["request"] == r["request"] and side["stats"]["applied"] and side["preset"] == "balanced"
        assert side["model"] == "tiny-sd15" and side["timings"]["generate_s"] > 0
    assert json.loads((ref / "robot-1.png.json").read_text())["id"] == "robot-1"
    assert json.loads((ref / "00003_a-castle-at-night_s3.png.json").read_text())["negative_prompt"] == "blurry"
    assert not [p for p in ref.iterdir() if ".tmp" in p.name]
    assert not list(ref.glob(".accel-batch.*.lock"))  # the writer's lock goes with it


def test_second_run_does_nothing_and_a_deleted_output_alone_is_redone(reference, tmp_path, capsys):
    prompts, ref = reference
    work = tmp_path / "out"
    shutil.copytree(ref, work)
    before = {p.name: p.stat().st_mtime_ns for p in work.iterdir() if p.name != "manifest.jsonl"}
    n_records = len(mf.read_all(work))
    capsys.readouterr()
    assert _batch(prompts, work) == 0
    assert "0 generated, 12 already done, 0 failed" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in work.iterdir() if p.name in before} == before
    assert [r["event"] for r in mf.read_all(work)[n_records:]] == ["start", "end"]  # no row was touched

    (work / "tree.png").unlink()
    (work / "00005_snow-on-a-mountain_s5.png").write_bytes(b"not the recorded bytes")
    assert main(["batch", str(prompts), "--model", "tiny-sd15", "--out", str(work), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "2 to generate" in listing and "tree  [recorded but file gone" in listing
    assert _batch(prompts, work) == 0
    assert "2 generated, 10 already done" in capsys.readouterr().out
    assert _outputs(work) == _outputs(ref)
    changed = {p.name for p in work.iterdir() if p.name in before and p.stat().st_mtime_ns != before[p.name]}
    assert changed <= {"tree.png", "tree.png.json", "00005_snow-on-a-mountain_s5.png",
                       "00005_snow-on-a-mountain_s5.png.json", "manifest.jsonl", ".accel-batch.rank0.lock"}

    # --overwrite redoes everything, with the same bytes (the output is a function of the row).
    assert _batch(prompts, work, "--overwrite") == 0
    assert "12 generated" in capsys.readouterr().out
    assert _outputs(work) == _outputs(ref)


def _spawn_batch(prompts, out):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, "-m", "accel", "batch", str(prompts), "--model", "tiny-sd15",
                             "--out", str(out), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_after(proc, out: Path, rows_done: int, sig) -> int:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and len(_row_records(out)) >= rows_done:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the batch ended before it could be killed: {proc.communicate()}"
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    return proc.returncode


def test_sigterm_and_sigkill_leave_whole_files_and_resume_bitwise(reference, tmp_path, capsys):
    prompts, ref = reference
    reference_bytes = _outputs(ref)
    out = tmp_path / "out"

    assert _kill_after(_spawn_batch(prompts, out), out, 2, signal.SIGTERM) == 128 + signal.SIGTERM
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # SIGTERM cleans up after itself
    done = _outputs(out)
    assert 2 <= len(done) < 12 and all(reference_bytes[n] == b for n, b in done.items())
    assert any(r.get("event") == "interrupted" for r in mf.read_all(out))

    assert _kill_after(_spawn_batch(prompts, out), out, len(done) + 2, signal.SIGKILL) == -signal.SIGKILL
    # A kill -9 cannot clean up: at most hidden temporaries remain, never a partial output under its name.
    done = _outputs(out)
    assert len(done) < 12 and all(reference_bytes[n] == b for n, b in done.items())

    # A kill in the middle of a manifest line leaves it torn; that line is ignored and work resumes.
    with open(out / "manifest.jsonl", "ab") as f:
        f.write(b'{"event": "row", "status": "ok", "na')
    capsys.readouterr()
    assert _batch(prompts, out) == 0
    assert "torn last line" in capsys.readouterr().err
    assert _outputs(out) == reference_bytes
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    assert {r["name"] for r in _row_records(out)} == {r["name"] for r in _row_records(ref)}


def test_bad_rows_are_reported_by_line_before_any_work(tmp_path, capsys):
    prompts = _write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "fine", "id": "a"},
        {"prompt": "a cat", "colour": "red"},
        {"prompt": "a dog", "steps": -2},
        {"prompt": "a tree", "seed": "lucky"},
        '{"prompt": "unterminated',
        {"prompt": "   "},
        {"prompt": "again", "id": "a"},
        {"prompt": "ok", "preset": "warp9"},
    ])
    out = tmp_path / "out"
    assert _batch(prompts, out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"accel: error: {prompts}: 7 problems")
    for fragment in ("line 2: unknown field 'colour'", "line 3: steps: -2 is out of range",
                     "line 4: seed: 'lucky' is not a whole number", "line 5: not valid JSON",
                     "line 6: prompt: empty", "line 7: duplicate id 'a' (first on line 1)",
                     "line 8: preset: 'warp9' is not a preset"):
        assert fragment in err, err
    assert not out.exists()  # nothing started


@pytest.mark.parametrize("option, value, fragment", [
    ("guidance", "-1", "guidance: -1.0 is negative; it must be >= 0"),
    ("guidance", "nan", "guidance: nan is not a finite number"),
    ("seed", "-1", "seed: -1 is out of range; it must be >= 0"),
    ("steps", "0", "steps: 0 is out of range; it must be positive"),
    ("width", "1.5", "width: '1.5' is not a whole number"),
])
def test_defaults_for_rows_are_checked_as_row_values(option, value, fragment, tmp_path, capsys):
    """A default given on the command line or in the config's [batch] table meets a row's own bounds (a row with
    ``guidance: -1`` was refused while ``--guidance -1`` ran every row with it)."""
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a cat"}])
    with pytest.raises(PromptFileError) as row:  # the same value in a row: the same words
        read_rows(_write_jsonl(tmp_path / "row.jsonl", [{"prompt": "a cat", option: value}]))
    [(line, problem)] = row.value.problems
    assert line == 1 and problem.startswith(fragment)
    with pytest.raises(SystemExit) as e:
        main(["batch", str(prompts), "--out", str(tmp_path / "o"), "--dry-run", f"--{option}", value])
    assert e.value.code == 2 and f"--{option}: {fragment.split(': ', 1)[1]}" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"batch:\n  {option}: {value}\n")
    assert main(["batch", str(prompts), "--out", str(tmp_path / "o"), "--dry-run", "--config", str(cfg)]) == 2
    assert f"batch.{fragment}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_csv_and_txt_rows(tmp_path):
    csv_file = tmp_path / "p.csv"
    csv_file.write_text('prompt,seed,steps,id\n"a cat, sitting",3,2,cat\n\nplain dog,,,\nx,notaseed,2,\n')
    with pytest.raises(PromptFileError) as e:
        read_rows(csv_file)
    assert e.value.problems == [(5, "seed: 'notaseed' is not a whole number")]
    csv_file.write_text('prompt,seed,steps,id\n"a cat, sitting",3,2,cat\n\nplain dog,,,\n')
    rows = read_rows(csv_file)
    assert [(r.line, r.prompt, r.seed, r.steps, r.id) for r in rows] == [
        (2, "a cat, sitting", 3, 2, "cat"), (4, "plain dog", None, None, None)]
    txt = tmp_path / "p.txt"
    txt.write_text("# a comment\nfirst prompt\n\n  second prompt  \n")
    assert [(r.index, r.line, r.prompt) for r in read_rows(txt)] == [(0, 2, "first prompt"), (1, 4, "second prompt")]
    bad_header = tmp_path / "h.csv"
    bad_header.write_text("prompt,colour\nx,red\n")
    with pytest.raises(PromptFileError, match="line 1: unknown column 'colour'"):
        read_rows(bad_header)


def test_config_file_with_command_line_overrides(tmp_path):
    from accel.cli.batch import settings_from_args
    from accel.layering import layered as config_for

    cfg = tmp_path / "job.toml"
    cfg.write_text('[batch]\nmodel = "tiny-sd15"\nout = "from-file"\nsteps = 5\nimage_format = "webp"\n'
                   '[cache]\nmethod = "none"\n')
    args = build_parser().parse_args(["batch", "p.txt", "--config", str(cfg), "--steps", "2",
                                      "--set", "cache.warmup_steps=2"])
    s = settings_from_args(args)
    assert (s.model, s.out, s.steps, s.image_format, s.preset, s.seed) == ("tiny-sd15", "from-file", 2, "webp",
                                                                            "balanced", 0)
    assert s.sections == {"cache": {"method": "none", "warmup_steps": 2}}
    assert config_for(s.preset, s.sections, "sd15").cache.warmup_steps == 2
    cfg.write_text("[batch]\nsteps = -1\n")
    with pytest.raises(Exception, match="batch.steps"):
        settings_from_args(build_parser().parse_args(["batch", "p.txt", "--config", str(cfg), "--out", "x"]))


def test_failing_rows_are_recorded_and_the_others_complete(tmp_path, capsys):
    prompts = _write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a red cat", "steps": 2},
        {"prompt": "odd size", "steps": 2, "height": 36},        # the pipeline raises
        {"prompt": "overflow", "steps": 2, "guidance": 1e30},    # NaN output
        {"prompt": "a clip", "steps": 2, "frames": 9},            # an image model
        {"prompt": "a blue dog", "steps": 2},
    ])
    out = tmp_path / "out"
    assert _batch(prompts, out) == 1
    text = capsys.readouterr().out
    assert "2 generated, 0 already done, 3 failed" in text
    failed = {r["line"]: r["error"] for r in _row_records(out, "failed")}
    assert set(failed) == {2, 3, 4}
    assert "divisible by 8" in failed[2] and "NaN" in failed[3] and "makes images, not video" in failed[4]
    for line in (2, 3, 4):
        assert f"failed: line {line} " in text
    assert sorted(_outputs(out)) == ["00000_a-red-cat_s0.png", "00004_a-blue-dog_s4.png"]


def test_two_ranks_do_every_row_exactly_once(tmp_path, capfd):
    prompts = _write_jsonl(tmp_path / "p.jsonl", ROWS[:5])
    out = tmp_path / "out"
    assert _batch(prompts, out, "--gpus", "2") == 0
    ok = _row_records(out)
    assert sorted(r["index"] for r in ok) == list(range(5))  # each once
    for rank in (0, 1):  # each rank did exactly its own rows
        assert {r["index"] for r in ok if r["rank"] == rank} == {i for i in range(5) if i % 2 == rank}
    assert len(_outputs(out)) == 5 and not list(out.glob("manifest.rank*.jsonl"))  # merged into manifest.jsonl
    assert "5 rows: 5 generated, 0 already done, 0 failed" in capfd.readouterr().out  # rank 0 sums all ranks


def test_approx_cache_rows_record_hits_and_resume_keeps_its_guarantees(tmp_path):
    """`--approx-cache DIR`: a row repeating an earlier row's prompt starts from its stored latent; the manifest
    line and the sidecar say so. Without the flag the same rows run fully, and a resume skips the done rows."""
    rows = [{"prompt": "a red cat", "steps": 5}, {"prompt": "a blue dog", "steps": 5},
            {"prompt": "a red cat", "steps": 5, "seed": 9}]
    prompts = _write_jsonl(tmp_path / "rows.jsonl", rows)
    out, cache = tmp_path / "out", tmp_path / "cache"
    on = ("--approx-cache", str(cache), "--preset", "off", "--set", "approx.similarity=[0.999]",
          "--set", "approx.skip=[0.4]")  # the random tiny text encoder finds every prompt alike: exact matches only
    assert _batch(prompts, out, *on) == 0
    recs = sorted(_row_records(out), key=lambda r: r["index"])
    assert [r["approx"]["hit"] for r in recs] == [False, False, True]
    assert recs[2]["approx"]["skipped_steps"] == 2 and recs[2]["approx"]["similarity"] == pytest.approx(1.0)
    assert recs[0]["approx"]["stored"] and recs[2]["approx"]["entry"] == recs[0]["approx"]["entry"]
    side = json.loads((out / f"{recs[2]['output']}.json").read_text())
    assert side["config"]["approx"]["dir"] == str(cache) and side["stats"]["approx"]["hit"]
    assert len(list(cache.glob("*.safetensors"))) == 2
    # a resume generates nothing: every row is verifiably done for the same request (cache on)
    assert _batch(prompts, out, *on) == 0
    assert len(_row_records(out)) == 3
    # without the cache the request differs (its config), so the rows run again, fully
    plain = tmp_path / "plain"
    assert _batch(prompts, plain, "--preset", "off") == 0
    assert all("approx" not in r for r in _row_records(plain))
