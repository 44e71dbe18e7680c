"""ref-video-large: its training-and-judging script at micro size on a CPU, the full design's size from its
config, and the rule that re-derives the video-DiT tiers from the judging table."""

import json

import pytest
import torch

from accel.pipelines import ref
from accel.pipelines.load import ModelLoadError, load
from training import judge_video as J
from training import train_video_large as L

NAME = "ref-video-large"


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """The one command at micro size: a tiny model, 3 training steps, 2 prompts x 1 seed judged."""
    root = tmp_path_factory.mktemp("ref_models")
    L.main(["--micro", "--out", str(root / NAME)])
    return root / NAME


def test_micro_run_saves_sharded_weights_that_load_by_path_and_by_name(micro, monkeypatch):
    files = sorted(micro.rglob("*.safetensors"))
    record = json.loads((micro / "training.json").read_text())
    assert all(f.stat().st_size <= 0.06e6 for f in files), [(f.name, f.stat().st_size) for f in files]
    assert len(list((micro / "transformer").glob("*.safetensors"))) >= 2  # the size limit made it shard
    assert record["weights"]["total_mb"] == pytest.approx(sum(f.stat().st_size for f in files) / 1e6, abs=1e-3)
    assert record["command"] == f"python -m training.train_video_large --micro --out {micro}"
    assert set(record["held_out"]) >= {"direction", "colour", "shape"} and record["steps"] == 3
    pipe = load(str(micro), device="cpu")
    assert type(pipe).__name__ == "WanPipeline"
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["hidden_states"].shape),
                                               with_kwargs=True)
    call = {**record["call"], "num_inference_steps": 2}
    video = pipe(["a red circle moving left on a white background"], output_type="np",
                 generator=torch.Generator().manual_seed(0), **call).frames
    assert video.shape == (1, call["num_frames"], call["height"], call["width"], 3)
    _, _, f, h, w = seen[0]  # patch (1, 1, 1): every latent pixel is a token
    assert f * h * w == L.MICRO.tokens == record["video_tokens"]
    monkeypatch.setattr(ref, "MODELS_DIR", micro.parent)
    assert type(load(NAME, device="cpu")).__name__ == "WanPipeline"


def test_full_design_has_enough_tokens_and_fits_30_mb():
    from training import components as C

    assert ref.call_defaults(NAME) == L.FULL.call and NAME in ref.MODELS
    assert L.FULL.tokens >= 8192  # 9 latent frames x 32 x 32
    with torch.device("meta"):  # the real sizes, no memory
        vae, text_encoder, transformer = L.build(L.FULL, C.word_tokenizer())
    assert vae.config.scale_factor_spatial == L.FULL.spatial and tuple(transformer.config.patch_size) == (1, 1, 1)
    assert 10e6 <= sum(p.numel() for p in transformer.parameters()) <= 15e6
    size = L.saved_bytes({"transformer": transformer, "text_encoder": text_encoder, "vae": vae})
    assert size <= L.MAX_TOTAL_MB * 1e6, size
    # the micro model is smaller in every part, so its tokens are fewer
    assert L.MICRO.tokens < 1024


def test_oversized_weights_fail_loudly(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "a.safetensors").write_bytes(b"\0" * 2000)
    with pytest.raises(RuntimeError, match="each file <= 0.001 MB"):
        L.check_files(tmp_path, shard_mb=0.001)
    with pytest.raises(RuntimeError, match="all <= 0.0015 MB"):
        L.check_files(tmp_path, shard_mb=1, total_mb=0.0015)
    assert L.check_files(tmp_path, shard_mb=0.002)["total_mb"] == 0.002


def test_micro_judging_has_every_row_and_every_technique_engaged(micro):
    table = json.loads((micro / "judge.json").read_text())
    rows = {r["label"]: r for r in table["rows"]}
    expected = J.rows("wan")
    assert set(expected) <= set(rows)
    assert len([k for k in expected if k != "off" and " preset: " not in k]) == 16  # the technique parts
    assert [k.split(" preset")[0] for k in expected if " preset: " in k] == ["safe", "balanced", "fast"]
    fields = {"direction", "colour", "shape", "differ", "lost", "psnr", "ssim", "seconds", "speedup", "engaged"}
    for label in expected:
        assert fields <= set(rows[label]), label
        assert rows[label]["seeds"] == 1
    assert rows["off"]["psnr"] is None and rows["off"]["lost"] == 0  # the baseline against itself
    for label, row in rows.items():
        counts, parts = row.get("engaged_counts", {}), row["parts"]
        if parts == ["tokens"]:
            assert counts["tokens_removed"] > 0, label
        if parts == ["attention"]:
            assert counts["sparse_calls"] > 0, label
        if " preset: " in label:  # the lowered gates let the presets engage on 192 tokens
            assert row["engaged"] != ["nothing engaged"], label
    assert rows["block interval 2"]["engaged_counts"]["cache_reused"] > 0
    assert set(table["tiers"]) == {"safe", "balanced", "fast"}
    md = (micro / "judge.md").read_text()
    assert all(f"| {label} |" in md for label in expected) and "Re-derived tiers" in md


def _row(label, speedup, psnr, lost=0, engaged=("x",), config=None):
    """A judged row; ``label`` names a row of `judge_video.rows` (its config) or anything (a token part)."""
    config = config or J.rows("wan").get(label) or {"tokens": {"ratio": 0.5}}
    return {"label": label, "setting": J.describe(config), "config": config, "parts": list(J.parts_of(config)),
            "seeds": 3, "speedup": speedup, "psnr": psnr, "lost": lost, "engaged": list(engaged)}


def test_pick_takes_the_fastest_row_that_keeps_the_checker_within_one_prompt():
    rows = [_row("loses two", 2.0, 38, lost=2), _row("idle", 3.0, None, engaged=["nothing engaged"]),
            _row("fast", 1.5, 36, lost=1), _row("faithful", 1.2, 40), _row("rough", 1.8, 33), _row("slower", 0.9, 50)]
    assert J.pick(rows, 35)["label"] == "fast"  # the faster row lost 2 prompts; idle did nothing
    assert J.pick(rows, 30)["label"] == "rough"
    assert J.pick(rows, 45) is None  # only the slower-than-baseline row reaches 45 dB
    assert J.pick(rows, min_speedup=1.2, most_faithful=True)["label"] == "faithful"
    near = [*rows, _row("near tie", 1.45, 39)]  # within 10% of the fastest: the higher PSNR wins
    assert J.pick(near, 35)["label"] == "near tie"
    assert J.why_not(rows[0]) == "lost 2 prompts" and J.why_not(rows[5]) == "not faster (0.90x)"


def test_derive_stacks_the_per_technique_picks_and_settles_on_the_measured_stack():
    table = [_row("block interval 2", 1.6, 33), _row("block threshold 0.1", 1.1, 41), _row("merge 0.3", 1.7, 38),
             _row("merge 0.5", 2.2, 33), _row("radial 0.25", 1.3, 50), _row("tile 0.1", 3.0, 45, lost=2),
             _row("prune 0.5", 2.5, 31),  # the fastest at >= 30 dB, but never picked for a video DiT
             _row("kv_downsample 0.5", 1.1, 60)]  # safe's part must be >= 1.2x: the most faithful but too slow
    picks = J.derive(table)
    assert (picks["safe"]["cache"], picks["safe"]["reduction"]) == ("block threshold 0.1", "radial 0.25")
    assert (picks["balanced"]["cache"], picks["balanced"]["reduction"]) == ("block interval 2", "merge 0.3")
    assert (picks["fast"]["cache"], picks["fast"]["reduction"]) == ("block interval 2", "merge 0.5")
    assert picks["fast"]["label"] == "block interval 2 + merge 0.5"
    stacks = [_row(f"measured {p['label']}", speed, 30, lost=lost, config=p["config"])
              for p, speed, lost in ((picks["balanced"], 2.6, 0), (picks["fast"], 3.5, 2))]
    settled = J.settle(picks, table + stacks)
    assert settled["balanced"]["setting"] == picks["balanced"]["label"]  # the stack keeps the checker
    assert settled["fast"]["setting"] == "merge 0.5"  # the stack lost 2 prompts: the faster part alone
    assert "lost 2 prompts" in settled["fast"]["why"]
    assert "not measured" in J.settle(picks, table)["safe"]["why"]


def test_named_model_without_weights_says_how_to_train_it():
    if NAME in ref.shipped():
        pytest.skip(f"{NAME} is trained in this checkout")
    how = "train it with `python -m training.train_video_large`"
    with pytest.raises(ModelLoadError, match=f"{NAME}.*{how}"):
        load(NAME, device="cpu")


def test_a_budgeted_fit_fixes_its_steps_after_a_timed_probe_and_that_many_steps_repeat_it():
    from training import components as C

    def run(steps, seconds):
        torch.manual_seed(0)
        model, info = torch.nn.Linear(4, 1), {}

        def loss_fn(g):
            x = torch.randn(8, 4, generator=g)
            return ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()

        C.fit([model], loss_fn, steps, 1e-2, 0, "probe", seconds=seconds, record=info)
        return model, info

    budgeted, info = run(10**6, 0.2)
    assert C.PROBE_STEPS <= info["steps"] < 10**6  # the cap was not what stopped it
    again, _ = run(info["steps"], None)
    assert torch.equal(budgeted.weight, again.weight) and torch.equal(budgeted.bias, again.bias)
