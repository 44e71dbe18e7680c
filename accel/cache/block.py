"""Block caching for DiTs: compute the first blocks, reuse the cached residual of the rest.

Per denoiser forward (one stream step, see `state.py`):

1. the first ``compute_first_n`` blocks always run; their hidden-state residual (output of block
   N-1 minus input of block 0) is the probe; with none (``compute_first_n=0``, a fixed schedule only)
   a reused step runs no block at all, as MagCache's skipped steps do;
2. with ``threshold > 0`` the span is reused when the probe's relative L1 change since the stream's
   last full step is under the threshold (First-Block-Cache / TeaCache style); with ``threshold == 0``
   and ``interval > 1`` it is reused on a fixed schedule instead;
3. reused: every block of the span returns its inputs untouched except the last, which adds the
   cached residual (image and text streams separately), optionally extrapolated by a Taylor series
   over the last full steps (TaylorSeer); computed: the span runs and its residual is stored;
4. the last ``compute_last_n`` blocks always run (DBCache's Bn), correcting the reused span.

What the denoiser's own forward adds between two blocks (Flux's and SD3's ControlNet residuals, the
family's ``between_blocks`` inputs) is not the blocks' work: a reused step runs the forward, which
adds the current step's values again. So when such an input is given, a full step caches the sum
of the span's per-block residuals (each block's output minus its own input) rather than the span's
output minus its input, which would carry the full step's ControlNet residuals into every reused
step on top of the current ones.

Host syncs and torch.compile: a threshold decision reads one scalar per forward on the host (the
relative L1 change; skipping work is host control flow, so it cannot stay on the device); the
fixed schedule reads none (tests/cache/test_cache_compile.py counts them). Every read and write of
the per-stream state happens in ``torch.compiler.disable``d methods (`keep`, `decide`, `span_done`,
`residual`): under a compiled denoiser those are the graph breaks (measured by
benchmarks/bench_cache_compile.py), and no graph is specialised on step counters, so repeated
calls compile nothing new.
"""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook

from ..config_base import ConfigError
from ..families import Adapter, bind, block_io, forward_params
from .state import Streams, fingerprint, fixed_schedule_reuses, relative_l1, settle, state_key

HOOK_DENOISER = "accel.cache.block.denoiser"
HOOK_PROBE_START = "accel.cache.block.probe_start"
HOOK_PROBE_END = "accel.cache.block.probe_end"
HOOK_SPAN = "accel.cache.block.span"
_UNSEEN = object()


class BlockCache:
    """The block cache on one denoiser. Created by `apply_block_cache`."""

    def __init__(self, adapter: Adapter, cfg, tracker, streams: Streams):
        self.adapter, self.cfg, self.tracker, self.streams = adapter, cfg, tracker, streams
        blocks = adapter.blocks()
        n, m = cfg.compute_first_n, cfg.compute_last_n
        if n + m >= len(blocks):
            raise ConfigError(
                f"cache.compute_first_n: {n} plus compute_last_n {m} leave no block to cache in this "
                f"{adapter.family.name} denoiser of {len(blocks)} blocks; lower them so that "
                f"compute_first_n + compute_last_n < {len(blocks)}")
        for name, block in blocks:
            if block_io(block) is None:
                raise ConfigError(f"cache.method: block caching does not know how {type(block).__name__} "
                                  f"({name}) returns its outputs; use method 'diffusers.first_block' if the "
                                  "model supports it")
        self.first = blocks[:n]
        self.span = blocks[n:len(blocks) - m]
        self.part = f"{adapter.component or 'denoiser'}.{self.span[0][0]}..{self.span[-1][0]}"
        self.current = None  # (key, StreamState) of the forward in flight
        # True while the forward in flight was given a `between_blocks` input: residuals kept per block
        self.per_block = False

    def install(self, ledger) -> None:
        ledger.add_hook(self.adapter.module, _BeginForward(self), HOOK_DENOISER)
        if self.cfg.threshold > 0:
            ledger.add_hook(self.first[0][1], _ProbeStart(self), HOOK_PROBE_START)
        if self.first:
            ledger.add_hook(self.first[-1][1], _ProbeEnd(self), HOOK_PROBE_END)
        last = len(self.span) - 1
        for i, (_, block) in enumerate(self.span):
            ledger.add_hook(block, _SpanHook(self, block, first=i == 0, last=i == last), HOOK_SPAN)

    # --- decision ---------------------------------------------------------------------------
    @torch.compiler.disable  # host-side counters: no graph specialised on them
    def begin_forward(self, per_block: bool = False) -> None:
        key = state_key(self.tracker.state)
        self.current = (key, self.streams.begin(key))
        self.per_block = per_block

    # Everything that reads or writes the per-stream state runs on the host, outside torch.compile
    # graphs (each is a graph break): dynamo would otherwise replay these dict mutations against the
    # state it saw when tracing, and specialise graphs on the step counters.
    @torch.compiler.disable
    def keep(self, name: str, value) -> None:
        self.current[1].data[name] = value

    @torch.compiler.disable
    def decide(self, hidden: torch.Tensor | None) -> None:
        """Reuse decision for the forward in flight; ``hidden``: the probe blocks' output (threshold)."""
        key, st = self.current
        cfg = self.cfg
        probe = None if hidden is None else hidden - st.data.pop("h0")
        ready = "res" in st.data and st.step >= cfg.warmup_steps
        if not ready:
            reuse = False
        elif cfg.threshold > 0:
            if cfg.max_skip and st.reused_in_row >= cfg.max_skip:
                reuse = False
            else:
                # Documented host sync, one per decided forward: skipping the span is host control flow.
                change = float(relative_l1(probe, st.probe)) if st.probe is not None and \
                    st.probe.shape == probe.shape else float("inf")
                reuse = change < cfg.threshold
                self.streams.record(key, st.step, "change", change)
        else:
            reuse = fixed_schedule_reuses(st, self.tracker.state.total_steps, cfg)
        if not reuse and probe is not None:
            st.probe = probe
        settle(st, reuse)
        self.streams.count(self.part, key, reuse)

    # --- residual of the span -----------------------------------------------------------------
    @torch.compiler.disable
    def span_done(self, h_out: torch.Tensor, e_out: torch.Tensor | None) -> None:
        """A full step's span ran: keep its residual (output minus the input kept by `keep`)."""
        key, st = self.current
        h_in, e_in = st.data.pop("span_in")
        e_res = None if e_out is None or e_in is None else e_out - e_in
        self.store(st, (h_out - h_in, e_res))
        if self.streams.trace is not None:
            self.streams.record(key, st.step, "store", fingerprint(h_out - h_in))

    @torch.compiler.disable
    def block_done(self, h_in, e_in, h_out, e_out, last: bool) -> None:
        """Per-block mode (see the module docstring): add one span block's own residual to the sum; the
        span's last block stores the sum as the span's residual."""
        key, st = self.current
        h_res = h_out - h_in
        e_res = None if e_out is None or e_in is None else e_out - e_in
        acc = st.data.pop("acc", None)
        if acc is not None:
            h_res = acc[0] + h_res
            e_res = None if e_res is None or acc[1] is None else acc[1] + e_res
        if not last:
            st.data["acc"] = (h_res, e_res)
            return
        self.store(st, (h_res, e_res))
        if self.streams.trace is not None:
            self.streams.record(key, st.step, "store", fingerprint(h_res))

    @torch.compiler.disable
    def residual(self) -> tuple:
        """The residual a reused step adds (plain or Taylor-extrapolated)."""
        key, st = self.current
        res = self.predicted(st)
        if self.streams.trace is not None:
            self.streams.record(key, st.step, "reuse", fingerprint(res[0]))
        return res

    def store(self, st, res: tuple) -> None:
        """Keep the span's residual of a full step, with its Taylor factors when asked for."""
        order = self.cfg.taylor_order
        old = st.data.get("res")
        if order and old is not None:
            dt = st.step - st.data["res_step"]
            factors = []
            for now, prev in zip(res, old, strict=True):
                if now is None or prev is None or prev[0].shape != now.shape:
                    factors.append(None if now is None else (now,))
                    continue
                f = [now, (now - prev[0]) / dt]
                if order >= 2 and len(prev) >= 2:
                    f.append((f[1] - prev[1]) / dt)
                factors.append(tuple(f))
            st.data["res"] = tuple(factors)
        else:
            st.data["res"] = tuple(None if r is None else (r,) for r in res)
        st.data["res_step"] = st.step

    def predicted(self, st) -> tuple:
        dt = st.step - st.data["res_step"]
        out = []
        for factors in st.data["res"]:
            if factors is None:
                out.append(None)
                continue
            r = factors[0]
            if len(factors) > 1:
                r = r + factors[1] * dt
            if len(factors) > 2:
                r = r + factors[2] * (dt * dt / 2)
            out.append(r)
        return tuple(out)


class _BeginForward(ModelHook):
    """On the denoiser: a forward starts; says whether it was given a `between_blocks` input."""

    def __init__(self, cache: BlockCache):
        super().__init__()
        self.cache = cache
        self.names = cache.adapter.family.between_blocks
        self.params = forward_params(type(cache.adapter.module)) if self.names else ()

    def pre_forward(self, module, *args, **kwargs):
        per_block = False
        if self.names:
            inputs = bind(self.params, args, kwargs)
            per_block = any(inputs.get(n) is not None for n in self.names)
        self.cache.begin_forward(per_block)
        if not self.cache.first:  # no probe (a fixed schedule): decide before the first block
            self.cache.decide(None)
        return args, kwargs


class _ProbeStart(ModelHook):
    def __init__(self, cache: BlockCache):
        super().__init__()
        self.cache = cache
        self.params = forward_params(type(cache.first[0][1]))

    def pre_forward(self, module, *args, **kwargs):
        self.cache.keep("h0", bind(self.params, args, kwargs)["hidden_states"])
        return args, kwargs


class _ProbeEnd(ModelHook):
    def __init__(self, cache: BlockCache):
        super().__init__()
        self.cache = cache
        self.io = block_io(cache.first[-1][1])

    def post_forward(self, module, output):
        hidden = None
        if self.cache.cfg.threshold > 0:
            hidden = output[self.io[0]] if isinstance(output, tuple) else output
        self.cache.decide(hidden)
        return output


class _SpanHook(ModelHook):
    """On a block of the cached span: run it (remembering the span's input/residual) or pass through."""

    def __init__(self, cache: BlockCache, block, first: bool, last: bool):
        super().__init__()
        self.cache, self.first, self.last = cache, first, last
        self.io = block_io(block)
        self.params = forward_params(type(block))
        # (tuple length, encoder output was None) seen at the last full step; None: a bare tensor.
        self.layout = _UNSEEN

    def new_forward(self, module, *args, **kwargs):
        inputs = bind(self.params, args, kwargs)
        hidden, encoder = inputs["hidden_states"], inputs.get("encoder_hidden_states")
        if not self.cache.current[1].reuse or self.layout is _UNSEEN:
            per_block = self.cache.per_block
            if self.first and not per_block:
                self.cache.keep("span_in", (hidden, encoder))
            output = self.fn_ref.original_forward(*args, **kwargs)
            self.layout = (len(output), self.io[1] is None or output[self.io[1]] is None) \
                if isinstance(output, tuple) else None
            if per_block:
                self.cache.block_done(hidden, encoder, *self._split(output), last=self.last)
            elif self.last:
                self.cache.span_done(*self._split(output))
            return output
        if self.last:
            h_res, e_res = self.cache.residual()
            hidden = hidden + h_res
            if e_res is not None and encoder is not None:
                encoder = encoder + e_res
        return self._join(hidden, encoder)

    def _split(self, output):
        if not isinstance(output, tuple):
            return output, None
        enc = None if self.io[1] is None else output[self.io[1]]
        return output[self.io[0]], enc

    def _join(self, hidden, encoder):
        if self.layout is None:
            return hidden
        n, encoder_was_none = self.layout
        out = [None] * n
        out[self.io[0]] = hidden
        if self.io[1] is not None and not encoder_was_none:
            out[self.io[1]] = encoder
        return tuple(out)


def apply_block_cache(adapter: Adapter, cfg, tracker, ledger, streams: Streams) -> BlockCache:
    cache = BlockCache(adapter, cfg, tracker, streams)
    cache.install(ledger)
    return cache
