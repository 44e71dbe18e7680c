"""`accel bench`: the engine's measurements, the peers, the report, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

import accel
from accel import cli
from accel.eval import bench, peers
from accel.pipelines import tiny


@pytest.fixture(scope="module")
def flux_work():
    torch.set_num_threads(1)
    pipe = tiny.make("flux")
    pipe.set_progress_bar_config(disable=True)
    return bench.workload(pipe, "tiny-flux", steps=6, device="cpu")


def test_rows_measure_time_fidelity_and_what_engaged(flux_work):
    rows = [bench.Row("off (baseline)", "baseline"),
            bench.Row("block interval 2", "config", accel.Config.from_dict(
                {"cache": {"method": "block", "interval": 2, "warmup_steps": 1}})),
            bench.Row("tokens at ratio 0", "config", accel.Config.from_dict({"tokens": {"ratio": 0.0}}))]
    results, stopped = bench.run(flux_work, rows, repeats=2, progress=False)
    base, cached, noop = results
    assert not stopped and all(r.ran and r.repeats == 2 for r in results)
    assert base.speedup == 1.0
    # the cache reused steps, changed the output a measured amount, and left it close (random weights)
    assert cached.engaged and "step cache reused" in cached.engaged[0]
    assert cached.psnr is not None and 30 < cached.psnr_worst <= cached.psnr < 200
    assert len(cached.per_call_psnr) == len(flux_work.calls) == 2
    # a config that does nothing: identical output, nothing engaged, and the report says so
    assert noop.per_call_psnr == [None, None] and noop.engaged == []
    text = bench.table(results)
    assert "| tokens at ratio 0 |" in text and "identical" in text and "nothing engaged" in text
    assert accel.is_applied(flux_work.pipe) is False  # every row restored the pipeline


def test_what_engaged_is_summed_over_every_call_of_a_row(flux_work):
    """The first call reuses steps, the last (2 steps, inside the warm-up) reuses none: the row still reads
    engaged, with the counts of both calls, and its table cell is not "nothing engaged"."""
    import dataclasses

    first, last = flux_work.calls
    short = dataclasses.replace(last, kwargs={**last.kwargs, "num_inference_steps": 2})
    work = dataclasses.replace(flux_work, calls=[first, short])
    cfg = accel.Config.from_dict({"cache": {"method": "block", "interval": 2, "warmup_steps": 2}})
    accel.apply(work.pipe, cfg)
    try:
        per_call = []
        for call in work.calls:
            work.pipe(**call.kwargs, generator=torch.Generator().manual_seed(call.seed))
            per_call.append(accel.stats(work.pipe)["cache"])
    finally:
        accel.remove(work.pipe)
    assert per_call[0]["reused"] > 0 and per_call[1]["reused"] == 0  # only the first call reuses
    reused = sum(c["reused"] for c in per_call)
    total = reused + sum(c["computed"] for c in per_call)

    results, _ = bench.run(work, [bench.Row("off (baseline)", "baseline"), bench.Row("cached", "config", cfg)],
                           repeats=1, progress=False)
    row = results[1]
    assert row.per_call_psnr[0] is not None and row.per_call_psnr[1] is None  # only the first output changed
    assert row.engaged == [f"step cache reused {reused} of {total} denoiser computations over 2 calls"]
    assert "nothing engaged" not in bench.table(results)


def test_engaged_sums_calls_and_names_the_share_of_calls():
    from accel.eval.compare import Engaged, engaged

    hit = {"cache": {"reused": 3, "computed": 7}, "tokens": {"average_removed": 64.0, "realised_ratio": 0.25,
                                                             "reduced_blocks": 2},
           "attention": {"sparse_calls": 4, "dense_calls": 1, "realised_density": 0.5, "backend": "sdpa"}}
    miss = {"cache": {"reused": 0, "computed": 10}, "tokens": {"average_removed": 0.0},
            "attention": {"sparse_calls": 0, "passthrough_calls": 5}}
    assert engaged(miss) == []
    lines = Engaged().add(hit).add(miss).lines()
    assert lines == ["step cache reused 3 of 20 denoiser computations over 2 calls",
                     "token reduction removed 25% of the tokens in 2 blocks in 1 of 2 calls",
                     "sparse attention ran 4 of 10 attention calls over 2 calls at density 0.5 (sdpa)"]


def test_a_row_that_fails_is_reported_and_the_rest_still_run(flux_work):
    class Broken:
        name = "broken"

        def enable(self, pipe, steps, call=None):
            raise RuntimeError("cannot patch this pipeline\nsecond line")

        def disable(self, pipe):
            pass

    rows = [bench.Row("off (baseline)", "baseline"), bench.Row("peer broken", "peer", peer=Broken()),
            bench.Row("preset fast", "preset", accel.preset("fast", "flux"))]
    results, _ = bench.run(flux_work, rows, repeats=1, progress=False)
    assert results[1].error == "RuntimeError: cannot patch this pipeline" and not results[1].ran
    assert results[2].ran and results[2].engaged
    assert "error: RuntimeError: cannot patch this pipeline" in bench.table(results)


def test_stopping_returns_what_was_measured(flux_work):
    rows = [bench.Row("off (baseline)", "baseline"), bench.Row("preset fast", "preset", accel.preset("fast", "flux"))]
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3  # baseline and fast once, then the baseline again, then stop

    results, stopped = bench.run(flux_work, rows, repeats=5, progress=False, stop=stop)
    assert stopped and results[0].repeats == 2 and results[1].repeats == 1
    assert results[1].speedup is not None


def test_a_missing_peer_is_skipped_with_how_to_install_it(flux_work, monkeypatch):
    real = peers.importlib.util.find_spec
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None if name == "cache_dit" else real(name))
    rows = bench.peer_rows(flux_work, "cache-dit,tomesd")
    why = {r.label: r.skipped for r in rows}
    assert why["peer cache-dit DBCache F8B0"] == "not installed (pip install 'cache-dit>=1.5,<1.6')"
    assert why["peer tomesd ratio 0.5"] == "works on UNet pipelines (SD1.5, SDXL) only"
    results, _ = bench.run(flux_work, [bench.Row("off (baseline)", "baseline")] + rows, repeats=1, progress=False)
    assert "skipped: not installed (pip install 'cache-dit>=1.5,<1.6')" in bench.table(results)
    with pytest.raises(ValueError, match="no peer is called 'nope'.*cache-dit"):
        peers.select("nope")


def test_diffusers_and_cache_dit_peers_run_and_restore_the_pipeline(flux_work):
    pytest.importorskip("cache_dit")
    rows = [bench.Row("off (baseline)", "baseline")] + bench.peer_rows(flux_work,
                                                                       "diffusers taylor,cache-dit dbcache f1")
    results, _ = bench.run(flux_work, rows, repeats=1, progress=False)
    assert all(r.ran for r in results), [r.error for r in results]
    taylor = results[1]
    assert taylor.psnr is not None and taylor.psnr < 200  # TaylorSeer predicted steps: the output changed
    again, _ = bench.run(flux_work, [bench.Row("off (baseline)", "baseline")], repeats=1, progress=False)
    assert again[0].ran  # the baseline after the peers runs unpatched (checked bitwise below)
    import numpy as np

    from accel.pipelines.call import to_frames

    call = flux_work.calls[0]
    out = to_frames(flux_work.pipe(**call.kwargs, generator=torch.Generator().manual_seed(call.seed)))
    sampler = bench._Sampler(flux_work)
    sampler.sample(bench.Row("off (baseline)", "baseline"))
    assert np.array_equal(out, sampler.reference[0])


def test_cli_bench_on_a_unet_with_its_peers_writes_table_and_json(tmp_path, capsys):
    pytest.importorskip("tomesd")
    pytest.importorskip("DeepCache")
    report = tmp_path / "r.json"
    rc = cli.main(["bench", "--model", "tiny-sd15", "--presets", "off,balanced", "--peers", "all", "--repeats", "1",
                   "--steps", "4", "--threads", "1", "--json", str(report)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "| preset balanced |" in out.out and "| peer DeepCache interval 3 |" in out.out
    assert "random weights" in out.out  # fidelity on a tiny model is flagged
    data = json.loads(report.read_text())
    for key in ("device", "device_name", "torch", "diffusers", "commit", "date", "timing"):
        assert key in data
    rows = {r["label"]: r for r in data["rows"]}
    assert rows["peer tomesd ratio 0.5"]["seconds"] is not None
    assert rows["peer DeepCache interval 3"]["psnr"] is not None  # DeepCache reused UNet features
    assert "enable_cache" in rows["peer diffusers FirstBlockCache 0.05"]["skipped"]


def test_cli_bench_on_a_trained_model_reports_the_checker(capsys):
    rc = cli.main(["bench", "--model", "ref-sd", "--presets", "off,balanced", "--n-prompts", "2", "--repeats", "1",
                   "--steps", "10", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "colour / shape" in out and "random weights" not in out
    line = next(ln for ln in out.splitlines() if ln.startswith("| preset balanced |"))
    assert "step cache reused" in line


@pytest.mark.parametrize("content, words", [
    ("speed: {fast: true}\n", "unknown section 'speed'"),
    ("cache: {method: block, threshold: -1}\n", "cache.threshold"),
    ("cache: [unclosed\n", "--configs"),
])
def test_bad_configs_file_is_refused_before_anything_runs(tmp_path, capsys, content, words):
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    rc = cli.main(["bench", "--model", "tiny-sd15", "--configs", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "accel bench:" not in err  # refused before the model loaded


def test_configs_rows_and_sweeps(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text("cache: {method: block, interval: 3}\n")
    (row,) = bench.config_rows([str(good)], None)
    assert row.config.cache.interval == 3 and not row.config.tokens.enabled  # no preset under it
    labels = [r.label for r in bench.sweep_rows("flux", ["cache", "tokens.ratio=0.2,0.4"])]
    assert labels[:2] == ["cache block threshold 0.05", "cache block threshold 0.1"]
    assert labels[-2:] == ["tokens.ratio=0.2", "tokens.ratio=0.4"]
    with pytest.raises(Exception, match="cache.thresh: unknown field"):
        bench.sweep_rows("flux", ["cache.thresh=0.1"])
    with pytest.raises(ValueError, match="sparse attention is for video DiTs"):
        bench.sweep_rows("sd15", ["attention"])


WAN_REDUCED = "shape:wan-1.3b:num_layers=2,num_attention_heads=2,attention_head_dim=32,ffn_dim=64"
SD15_REDUCED = "shape:sd15:block_out_channels=(32,32,32,32),layers_per_block=1,attention_head_dim=2"


def test_bench_and_tune_run_on_shape_models_at_reduced_size(tmp_path, capsys):
    report = tmp_path / "wan.json"
    rc = cli.main(["bench", "--model", WAN_REDUCED, "--height", "64", "--width", "64", "--frames", "9", "--steps", "4",
                   "--presets", "off,balanced", "--sweep", "tokens.ratio=0.5", "--repeats", "1", "--threads", "1",
                   "--json", str(report)])
    out = capsys.readouterr().out
    assert rc == 0 and "random weights" in out
    rows = {r["label"]: r for r in json.loads(report.read_text())["rows"]}
    assert json.loads(report.read_text())["family"] == "wan"
    assert rows["tokens.ratio=0.5"]["engaged"] and rows["tokens.ratio=0.5"]["psnr"] is not None
    tuned = tmp_path / "tuned.yaml"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\na lighthouse in a storm\n")
    rc = cli.main(["tune", "--model", SD15_REDUCED, "--prompts", str(prompts), "--height", "64", "--width", "64",
                   "--steps", "8", "--min-psnr", "30", "--threads", "1", "--repeats", "1", "--out", str(tuned)])
    out = capsys.readouterr().out
    assert rc == 0 and tuned.is_file() and "### screened" in out
    assert accel.Config.from_yaml(tuned.read_text()).cache.method in ("deepcache", "none")


def test_a_peer_that_leaves_a_patch_behind_is_undone_and_late_peers_run_last(flux_work):
    order = []

    class Leaky:
        name, late = "leaky", False

        def enable(self, pipe, steps, call=None):
            order.append("leaky")
            import functools

            # a wrapper (here one that changes nothing), as peers install them
            pipe.transformer.forward = functools.partial(type(pipe.transformer).forward, pipe.transformer)

        def disable(self, pipe):
            pass  # forgets to remove its instance forward

    class Late(Leaky):
        name, late = "late", True

        def enable(self, pipe, steps, call=None):
            order.append("late")

    rows = [bench.Row("off (baseline)", "baseline"), bench.Row("peer late", "peer", peer=Late()),
            bench.Row("peer leaky", "peer", peer=Leaky())]
    sampler = bench._Sampler(flux_work)
    results, _ = bench.run(flux_work, rows, repeats=2, progress=False, warmup=False, sampler=sampler)
    assert all(r.ran for r in results)
    assert "forward" not in flux_work.pipe.transformer.__dict__ and sampler.left_behind == {"peer leaky"}
    assert order == ["leaky", "leaky", "late", "late"]  # the late peer's rounds come after the others'
