"""The work counted beside every time (`accel.eval.work.StageWork`) and the frontier against the peers."""

import accel
from accel.eval.bench import Result, frontier
from accel.eval.work import StageWork
from accel.families import Adapter
from accel.pipelines import tiny


def test_a_full_call_computes_every_stage_it_calls():
    pipe = tiny.make("sd15")
    stages = len(Adapter(pipe.unet, "unet").stages())
    with StageWork(pipe) as work:
        pipe(**tiny.example_inputs("sd15", num_inference_steps=3))
    assert work.entered == work.computed == 3 * stages  # one batched forward per step


def test_a_step_cache_skips_stages_and_the_count_sees_it_for_ours_and_a_peer():
    from diffusers import FirstBlockCacheConfig

    pipe = tiny.make("sd15")
    accel.apply(pipe, {"cache": {"method": "deepcache", "interval": 3}})
    with StageWork(pipe) as ours:
        pipe(**tiny.example_inputs("sd15", num_inference_steps=6))
    reused = accel.stats(pipe)["cache"]["reused"]
    accel.remove(pipe)
    assert reused > 0 and 0 < ours.computed < ours.entered  # the deep stages did not run in reused steps

    flux = tiny.make("flux")
    flux.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    with StageWork(flux) as peer:
        flux(**tiny.example_inputs("flux", num_inference_steps=6))
    flux.transformer.disable_cache()
    assert 0 < peer.computed < peer.entered  # diffusers' hook returned cached blocks without running them
    with StageWork(flux) as after:
        flux(**tiny.example_inputs("flux", num_inference_steps=6))
    assert after.computed == after.entered  # counting changes nothing: the peer off, every block runs


def test_the_frontier_names_the_row_that_dominates_each_peer_or_what_is_missing():
    def row(label, kind, speed, worst, colour):
        return Result(label, kind, seconds=1.0, speedup=speed, psnr_worst=worst, scores={"colour": colour})

    results = [row("off", "baseline", 1.0, None, 0.88), row("ours fast", "sweep", 1.6, 30.0, 0.88),
               row("ours safe", "sweep", 1.2, 40.0, 0.88), row("peer mag", "peer", 1.5, 26.5, 0.75),
               row("peer quick", "peer", 2.0, 25.0, 0.88), row("peer exact", "peer", 1.1, None, 0.88)]
    by_peer = {f["peer"]: f for f in frontier(results)}
    assert by_peer["peer mag"] == {"peer": "peer mag", "by": "ours fast", "dominated": True}
    quick = by_peer["peer quick"]
    assert not quick["dominated"] and quick["by"] == "ours fast" and abs(quick["speed_short"] - 0.4) < 1e-9
    assert not by_peer["peer exact"]["dominated"] and by_peer["peer exact"]["by"] is None  # identical: none of ours
