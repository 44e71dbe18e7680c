"""Sparse attention on one CUDA GPU: kernels vs dense SDPA, a Wan2.1-1.3B-size pipeline end to end, and a
Wan2.1-14B-shape forward at 720p.

    python benchmarks/bench_attention_gpu.py --out results/        # the default parts, ~2.5 min on an H200
    python benchmarks/bench_attention_gpu.py --parts kernels:wan1.3b-480p --backends triton
    python benchmarks/bench_attention_gpu.py --parts sweep --sweep-configs all --sweep-shape cogvideox5b
    python benchmarks/bench_attention_gpu.py --parts e2e --e2e-rows off,triton:tile:0.25,preset:fast
    python benchmarks/bench_attention_gpu.py --device cpu --smoke  # tiny shapes: every code path in < 1 min

Parts (``--parts``, run in the order given; default ``PARTS``):

- ``env``: device, torch / triton / CUDA / cuDNN / diffusers versions, a bf16 8192^3 matmul's TFLOP/s.
- ``kernels`` (``kernels:SHAPE[+SHAPE]``): one attention call at Wan 1.3B 480p (21x30x52 = 32,760 tokens,
  12 heads of 128), Wan 14B 720p (21x45x80 = 75,600 tokens, 40 heads of 128) and CogVideoX-5B 720x480x49
  (13x30x45 = 17,550 tokens, 48 heads of 64), bf16, random-normal q/k/v. Dense SDPA (the default backend,
  cuDNN on an H200, and FLASH_ATTENTION forced) vs patterns tile/radial at densities 0.5/0.25/0.1
  (block 128) on backends triton and flex (compiled): through the engine (`SparseAttention.attend` on
  model-order q/k/v: what a pipeline runs) and the kernel alone (`backends.run` on tiled tensors). Relative
  L2 error against a masked dense fp32 reference (`backends.run("sdpa")`, per head group) where affordable.
- ``sweep``: launch settings of our Triton kernel (`kernels.block_sparse.configs()`, indices
  ``--sweep-configs``) at one shape, tile d=0.25 and d=0.1, on tiled and on model-order q/k/v.
- ``e2e``: the shape model ``shape:wan-1.3b`` (a diffusers WanPipeline with Wan2.1-1.3B's transformer: 30
  layers, 12x128 heads, FFN 8960, random weights, bf16; small text encoder and VAE), 480x832x81
  frames (21x30x52 latent tokens), 8 steps, CFG 5.0, latents out: seconds per call, speed-up and
  PSNR of the latents vs dense, and what ran (accel.stats). Rows: ``--e2e-rows``.
- ``fwd14b``: a Wan2.1-14B-shape transformer (``shape:wan-1.3b`` with 14B's widths) at reduced depth
  (``--fwd14b-layers``), one forward at 720p x 81 frames, dense vs sparse.

Timing: `accel.eval.clock.measure` (CUDA events; process CPU time on a CPU), median over repeats after warm-up
calls (the first call, which compiles flex / JITs triton, is reported apart, by its wall time). End-to-end
rows run round-robin after one warm-up each, so clock and thermal drift hit every row alike. Each part (and
each row) is wrapped: a failure prints its traceback and the run goes on. Every table is rewritten under
``--out`` after each row (``<table>.md``, all of them in ``results.md``, raw rows in ``results.json``), so a
run stopped by a time limit keeps what it measured. ``--budget-s`` bounds the whole run: later rows, rounds
and parts are skipped (and say so) rather than overrun it.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's accel, also when the package is not installed

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from accel.eval.clock import measure  # noqa: E402
from accel.pipelines import sized  # noqa: E402

SHAPES = {  # name: grid (F, H, W) of video tokens, heads, head size, timed calls, warm-up calls, fp32 reference
    "wan1.3b-480p": dict(grid=(21, 30, 52), heads=12, dim=128, reps=10, warmup=3, ref=True),
    "wan14b-720p": dict(grid=(21, 45, 80), heads=40, dim=128, reps=5, warmup=2, ref=False),
    # CogVideoX-5B at 720x480 x 49 frames: heads of 64 (LTX's size too)
    "cogvideox5b": dict(grid=(13, 30, 45), heads=48, dim=64, reps=10, warmup=3, ref=True),
}
SMOKE_SHAPES = {
    "smoke-512": dict(grid=(4, 8, 16), heads=2, dim=64, reps=3, warmup=1, ref=True),
    "smoke-256": dict(grid=(2, 8, 16), heads=2, dim=64, reps=3, warmup=1, ref=False),
}
E2E_ROWS = "off,triton:radial:0.25,triton:tile:0.1,tokens:0.3,preset:safe,preset:balanced,preset:fast"
PARTS = "env,sweep,kernels:wan1.3b-480p,e2e,fwd14b,kernels:wan14b-720p+cogvideox5b"
SWEEP_CONFIGS = "2,7,8,11,12"  # the leaders of the full sweep (--sweep-configs all) on an H200
SMOKE_E2E_ROWS = "off,gather:tile:0.25,flex:radial:0.25,triton:tile:0.25,preset:balanced,preset:fast"
RANDOM_WEIGHTS_WARNING = ("WARNING: random weights: PSNR here shows the outputs differ, not how a trained model's "
                          "videos would look; fidelity on random weights is not meaningful.")

_refs: dict = {}  # (shape, pattern, density) -> masked dense fp32 reference, model token order
_dense_ms: dict = {}  # shape -> dense SDPA (default backend) median ms


# --------------------------------------------------------------------------------------------- output


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isinf(x) or math.isnan(x):
            return str(x)
        return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x)


class Report:
    """Markdown tables, rewritten under ``out`` after every update so that a stopped run keeps them."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tables: dict = {}

    def table(self, key: str, title: str, header, rows, notes=()) -> str:
        self.tables[key] = dict(title=title, header=list(header), rows=[list(r) for r in rows], notes=list(notes))
        text = self._render(key)
        (self.out / f"{key}.md").write_text(text)
        (self.out / "results.md").write_text("\n".join(self._render(k) for k in self.tables))
        (self.out / "results.json").write_text(json.dumps(self.tables, indent=1, default=str))
        return text

    def _render(self, key: str) -> str:
        t = self.tables[key]
        lines = [f"### {t['title']}", ""]
        lines += [f"- {n}" for n in t["notes"]]
        if t["notes"]:
            lines.append("")
        lines.append("| " + " | ".join(t["header"]) + " |")
        lines.append("|" + "---|" * len(t["header"]))
        lines += ["| " + " | ".join(_fmt(x) for x in r) + " |" for r in t["rows"]]
        return "\n".join(lines) + "\n"

    def show(self, key: str) -> None:
        print("\n" + self._render(key), flush=True)


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.total = time.perf_counter(), seconds

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.t0)


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:160] if s else ''}"


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- timing


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, warmup: int, reps: int):
    """(first call ms, [ms of each timed call], last output): ``warmup`` untimed calls (the first
    timed alone, by its wall time: compile / JIT), then ``reps`` calls each timed by `accel.eval.clock.measure`
    (CUDA events on CUDA, process CPU time on a CPU)."""
    first = measure(fn, device)
    out = first.out
    for _ in range(max(0, warmup - 1)):
        out = fn()
    times = []
    for _ in range(reps):
        sample = measure(fn, device)
        times.append(sample.seconds * 1e3)
        out = sample.out
    return first.wall_s * 1e3, times, out


# --------------------------------------------------------------------------------------------- helpers


def _backend_skip_reason(backend: str, device) -> str | None:
    from accel.attention.backends import unavailable_reason

    if backend == "triton" and device.type != "cuda":
        return "the triton kernel needs a CUDA device (the CPU interpreter is far too slow to time)"
    return unavailable_reason(backend, device)


def sdpa_backend_used(fn, device) -> str:
    """Which fused SDPA kernel ``fn`` dispatches to, read from the aten op names the profiler records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        _sync(device)
    names = {e.key for e in prof.key_averages()}
    for op, label in (("_scaled_dot_product_cudnn_attention", "cudnn"),
                      ("_scaled_dot_product_flash_attention_for_cpu", "flash (cpu)"),
                      ("_scaled_dot_product_flash_attention", "flash"),
                      ("_scaled_dot_product_efficient_attention", "mem-efficient"),
                      ("_scaled_dot_product_fused_attention_overrideable", "overrideable"),
                      ("_scaled_dot_product_attention_math", "math")):
        if any(op in n for n in names):
            return label
    return "unknown (" + ", ".join(sorted(n for n in names if "attention" in n)) + ")"


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.float()
    return float((out - ref).norm() / ref.norm())


def masked_reference(qb, kb, vb, mask, scale, layout, group: int):
    """Masked dense attention in fp32 via ``backends.run("sdpa")`` (it expands the block mask to a
    dense N x N one), ``group`` heads at a time to bound memory; returned in model token order."""
    from accel.attention import backends
    from accel.attention.layout import from_blocks

    outs = []
    for h in range(0, qb.shape[1], group):
        sl = slice(h, h + group)
        outs.append(backends.run("sdpa", qb[:, sl].float(), kb[:, sl].float(), vb[:, sl].float(), mask, scale))
    return from_blocks(torch.cat(outs, 1), layout)


# --------------------------------------------------------------------------------------------- env


def part_env(a, device, dtype, report: Report) -> None:
    rows = [("device", torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
            ("torch", torch.__version__), ("CUDA (torch build)", torch.version.cuda),
            ("cuDNN", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        rows += [("compute capability", f"{p.major}.{p.minor}"), ("SMs", p.multi_processor_count),
                 ("memory GiB", round(p.total_memory / 2**30, 1))]
    for mod in ("triton", "diffusers", "transformers"):
        try:
            rows.append((mod, __import__(mod).__version__))
        except Exception as e:
            rows.append((mod, f"not importable ({_short(e)})"))
    rows.append(("threads / load", f"{torch.get_num_threads()} / {os.getloadavg()[0]:.1f}"))
    n = 8192 if device.type == "cuda" else 256
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, n, generator=g, device=device, dtype=dtype)
    y = torch.randn(n, n, generator=g, device=device, dtype=dtype)
    _, times, _ = time_calls(lambda: x @ y, device, 3, 10)
    ms = statistics.median(times)
    rows.append((f"matmul {n}^3 {str(dtype).replace('torch.', '')} TFLOP/s (median of 10)",
                 round(2 * n**3 / (ms * 1e-3) / 1e12, 1)))
    report.table("env", "Environment", ["what", "value"], rows)
    report.show("env")


# --------------------------------------------------------------------------------------------- kernels


def part_kernels(name: str, spec: dict, a, device, dtype, report: Report, budget: Budget, reserve: float) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from accel.attention import backends
    from accel.attention.config import AttentionConfig
    from accel.attention.layout import build_layout, from_blocks, to_blocks
    from accel.attention.patterns import static_mask
    from accel.attention.sparse import SparseAttention

    grid, H, D = spec["grid"], spec["heads"], spec["dim"]
    B, N = 1, grid[0] * grid[1] * grid[2]
    reps, warmup = spec["reps"], spec["warmup"]
    flops = 4 * B * H * N * N * D
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g, device=device, dtype=dtype) for _ in range(3))
    scale = D ** -0.5
    key = f"kernels_{name}"
    title = (f"{name}: one attention call, B={B}, {grid[0]}x{grid[1]}x{grid[2]} = {N:,} tokens, {H} heads of {D}, "
             f"{str(dtype).replace('torch.', '')}, block {a.block}")
    header = ["backend", "path", "pattern", "target d", "realised d", "ms", "1st call ms", "speed-up vs dense",
              "frac. of ideal", "TFLOP/s eff.", "rel. L2 err"]
    timer = "CUDA-event-timed" if device.type == "cuda" else "CPU-time-timed"
    notes = [f"median of {reps} {timer} calls after {warmup} warm-up(s); '1st call' includes compile / JIT",
             "engine = SparseAttention.attend on model-order q/k/v (tile reordering included); "
             "kernel = backends.run on pre-reordered tensors",
             "speed-up vs dense = dense default SDPA ms / ms (cuDNN on an H200 in bf16: see the first row)",
             "frac. of ideal = dense ms x realised density / ms; TFLOP/s eff. = 4*B*H*N^2*D*realised / time",
             "rel. L2 err vs masked dense fp32 reference (backends.run('sdpa') per head group)" if spec["ref"]
             else "rel. L2 err: not computed at this size (the masked reference materialises N x N)"]
    rows: list = []

    def update():
        report.table(key, title, header, rows, notes)

    def row(label, fn):
        """Time ``fn``; a failing or out-of-budget row is recorded as such and the table goes on."""
        if budget.left() < reserve:
            print(f"  [{name}] {label}: skipped, {budget.left():.0f} s of budget left (reserve {reserve:.0f} s)")
            return None
        try:
            return time_calls(fn, device, warmup, reps)
        except Exception as e:  # returned as text: the exception's frames would keep this row's tensors alive
            traceback.print_exc()
            return f"error: {_short(e)}"

    # dense rows
    dense_default = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)  # noqa: E731

    def dense_flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    try:
        used = sdpa_backend_used(dense_default, device)
    except Exception as e:
        used = f"? ({_short(e)})"
    notes.insert(0, f"dense default SDPA backend here: {used}")
    dense_ms = None
    for label, fn in ((f"sdpa default ({used})", dense_default), ("sdpa FLASH_ATTENTION", dense_flash)):
        r = row(label, fn)
        if r is None:
            continue
        if isinstance(r, str):
            rows.append([label, "dense", "-", 1.0, 1.0, None, None, None, None, None, r])
        else:
            first, times, _ = r
            ms = statistics.median(times)
            dense_ms = ms if dense_ms is None else dense_ms
            rows.append([label, "dense", "-", 1.0, 1.0, ms, first, dense_ms / ms, dense_ms / ms,
                         flops / (ms * 1e-3) / 1e12, None])
            print(f"  [{name}] {label}: {ms:.3f} ms ({flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s)", flush=True)
        update()
    if dense_ms is not None:
        _dense_ms[name] = dense_ms

    layout = build_layout(tuple(grid), 0, True, a.block).to(device)
    qb, kb, vb = to_blocks(q, layout), to_blocks(k, layout), to_blocks(v, layout)
    flex_kw = {} if a.flex_compile else {"flex_compile": False}

    def reference(pattern, d, mask):
        if (name, pattern, d) not in _refs:
            _refs[(name, pattern, d)] = masked_reference(qb, kb, vb, mask, scale, layout, a.ref_heads)
        return _refs[(name, pattern, d)]

    for backend in a.backends:
        reason = _backend_skip_reason(backend, device)
        if reason:
            print(f"  [{name}] backend {backend}: skipped: {reason}", flush=True)
            notes.append(f"backend {backend} skipped: {reason}")
            update()
            continue
        for pattern in a.patterns:
            for d in a.densities:
                try:
                    mask = static_mask(layout, pattern, d, 1, 0.5)
                    realised = mask.video_density()
                except Exception as e:
                    traceback.print_exc()
                    rows.append([backend, "-", pattern, d, None, None, None, None, None, None,
                                 f"mask error: {_short(e)}"])
                    update()
                    continue
                cfg = AttentionConfig(pattern=pattern, backend=backend, density=d, block_size=a.block,
                                      flex_compile=a.flex_compile)
                eng = SparseAttention(cfg, backend)
                paths = (("engine", lambda eng=eng: eng.attend(q, k, v, scale, "site", grid, 0, True), False),
                         ("kernel", lambda b=backend, m=mask: backends.run(b, qb, kb, vb, m, scale, **flex_kw), True))
                for path, fn, tiled in paths:
                    r = row(f"{backend} {path} {pattern} d={d}", fn)
                    if r is None:
                        continue
                    if isinstance(r, str):
                        rows.append([backend, path, pattern, d, realised, None, None, None, None, None, r])
                        update()
                        continue
                    first, times, out = r
                    ms = statistics.median(times)
                    err = None
                    if spec["ref"]:
                        try:
                            err = _rel_err(from_blocks(out, layout) if tiled else out, reference(pattern, d, mask))
                        except Exception as e:
                            traceback.print_exc()
                            err = f"ref error: {_short(e)}"
                    del out
                    rows.append([backend, path, pattern, d, realised, ms, first,
                                 dense_ms / ms if dense_ms else None,
                                 dense_ms * realised / ms if dense_ms else None,
                                 flops * realised / (ms * 1e-3) / 1e12, err])
                    print(f"  [{name}] {backend:<6} {path:<6} {pattern:<6} d={d:<4} realised {realised:.3f}: "
                          f"{ms:8.3f} ms (1st {first:7.0f} ms) x{(dense_ms or math.nan) / ms:5.2f} vs dense, "
                          f"err {_fmt(err)}", flush=True)
                    update()
    update()
    report.show(key)


# --------------------------------------------------------------------------------------------- sweep


def part_sweep(name: str, spec: dict, a, device, dtype, report: Report, budget: Budget, reserve: float) -> None:
    key = "triton_sweep"
    why = _backend_skip_reason("triton", device)
    if why:
        print(f"triton sweep skipped: {why}", flush=True)
        report.table(key, "Triton kernel launch configs", ["skipped"], [[why]])
        return

    from accel.attention import backends
    from accel.attention.kernels import block_sparse as bs
    from accel.attention.layout import build_layout, from_blocks, to_blocks
    from accel.attention.patterns import static_mask

    configs = bs.configs(a.block)
    if a.sweep_configs and a.sweep_configs != "all":  # indices into configs(), to re-measure the leaders only
        configs = [configs[int(i)] for i in a.sweep_configs.split(",")]
    grid, H, D = spec["grid"], spec["heads"], spec["dim"]
    N = grid[0] * grid[1] * grid[2]
    flops = 4 * H * N * N * D
    reps, warmup = spec["reps"], 2
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, generator=g, device=device, dtype=dtype) for _ in range(3))
    scale = D ** -0.5
    layout = build_layout(tuple(grid), 0, True, a.block).to(device)
    qb, kb, vb = to_blocks(q, layout), to_blocks(k, layout), to_blocks(v, layout)
    dense_ms = _dense_ms.get(name)
    if dense_ms is None:
        _, times, _ = time_calls(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), device, 3, reps)
        dense_ms = _dense_ms[name] = statistics.median(times)
    title = f"Triton kernel launch configs, {name} ({N:,} tokens, {H} heads of {D}), tile pattern, kernel only"
    header = ["config", "target d", "realised d", "ms", "1st call ms", "vs default config", "speed-up vs dense",
              "frac. of ideal", "TFLOP/s eff.", "rel. L2 err"]
    notes = [f"backends.run('triton') with block_sparse_attention's config= fixed to each of configs(); median of "
             f"{reps} calls after {warmup} warm-ups; dense (default SDPA) {dense_ms:.3f} ms"]
    rows: list = []
    original = bs.block_sparse_attention
    try:
        for d in (0.25, 0.1):
            mask = static_mask(layout, "tile", d, 1, 0.5)
            realised = mask.video_density()
            try:
                ref = _refs.get((name, "tile", d))
                if ref is None and spec["ref"]:
                    ref = _refs[(name, "tile", d)] = masked_reference(qb, kb, vb, mask, scale, layout, a.ref_heads)
            except Exception as e:
                traceback.print_exc()
                ref, notes[:] = None, notes + [f"no reference: {_short(e)}"]
            default_ms = None
            # tiled: q/k/v already in tiled order (the copies not counted); model order: read and written through
            # the slot -> token table (what the engine runs), on model-order q/k/v
            runs = [(cfg, "tiled") for cfg in [None, *configs]]
            runs += [(cfg, order) for cfg in [None, *configs]
                     for order in ("model order", "model order, q only") if a.sweep_model_order]
            for cfg, order in runs:
                label = "default (config_for)" if cfg is None else \
                    ", ".join(f"{name_}={val}" for name_, val in cfg.items())
                label = f"{label} [{order}]"
                if budget.left() < reserve:
                    print(f"  [sweep] {label} d={d}: skipped, {budget.left():.0f} s of budget left")
                    continue
                bs.block_sparse_attention = original if cfg is None else \
                    (lambda *args, _c=cfg, **kw: original(*args, **{**kw, "config": _c}))
                if order == "tiled":
                    fn = lambda m=mask: from_blocks(backends.run("triton", qb, kb, vb, m, scale), layout)  # noqa: E731
                elif order == "model order":
                    fn = lambda m=mask: backends.triton_model_order(q, k, v, m, scale)  # noqa: E731
                else:
                    fn = lambda m=mask: backends.triton_model_order(q, kb, vb, m, scale, gather=("q",))  # noqa: E731
                try:
                    first, times, out = time_calls(fn, device, warmup, reps)
                except Exception as e:
                    traceback.print_exc()
                    rows.append([label, d, realised, None, None, None, None, None, None, f"error: {_short(e)}"])
                    report.table(key, title, header, rows, notes)
                    continue
                finally:
                    bs.block_sparse_attention = original
                ms = statistics.median(times)
                default_ms = ms if cfg is None else default_ms
                err = _rel_err(out, ref) if ref is not None else None
                del out
                rows.append([label, d, realised, ms, first, default_ms / ms if default_ms else None, dense_ms / ms,
                             dense_ms * realised / ms, flops * realised / (ms * 1e-3) / 1e12, err])
                print(f"  [sweep] d={d:<4} {label:<55} {ms:8.3f} ms  x{dense_ms / ms:5.2f} vs dense  "
                      f"err {_fmt(err)}", flush=True)
                report.table(key, title, header, rows, notes)
    finally:
        bs.block_sparse_attention = original
    report.table(key, title, header, rows, notes)
    report.show(key)


# --------------------------------------------------------------------------------------------- end to end


def _parse_rows(text: str, block: int, flex_compile: bool):
    """'off' | 'preset:NAME' | 'BACKEND:PATTERN:DENSITY' -> [(label, accel config or None, backend or None)]."""
    out = []
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        parts = item.split(":")
        if item == "off":
            out.append(("off (dense)", None, None))
        elif parts[0] == "preset" and len(parts) == 2:
            out.append((f"preset {parts[1]}", parts[1], None))
        elif parts[0] == "tokens" and len(parts) == 2:  # token merging alone, at the presets' other settings
            import accel

            fields = accel.preset("balanced", "wan").tokens.to_dict()
            out.append((f"token merging {parts[1]}", {"tokens": {**fields, "ratio": float(parts[1])}}, None))
        elif parts[0] == "part" and len(parts) == 3:  # one technique of a preset, e.g. part:balanced:tokens
            import accel

            section = getattr(accel.preset(parts[1], "wan"), parts[2])
            out.append((f"{parts[1]}'s {parts[2]} only", {parts[2]: section}, None))
        elif len(parts) == 3:
            b, p, d = parts[0], parts[1], float(parts[2])
            fields = dict(pattern=p, density=d, backend=b, block_size=block)
            if not flex_compile and b == "flex":
                fields["flex_compile"] = False
            out.append((f"{b} {p} d={d}", {"attention": fields}, b))
        else:
            raise SystemExit(f"--e2e-rows: cannot read {item!r}; use off, preset:NAME, part:PRESET:SECTION, "
                             "tokens:RATIO or BACKEND:PATTERN:DENSITY")
    return out


SMOKE_WAN = dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, freq_dim=32, text_dim=64)


def build_wan_pipeline(a, device):
    """The shape model ``shape:wan-1.3b`` (Wan2.1-1.3B's transformer, random weights; small text encoder and VAE
    at the real widths and compression) built directly on ``device`` in bf16 (smoke: 2 narrow layers in fp32)."""
    pipe = sized.make("wan-1.3b", device=device, dtype=a.e2e_dtype,
                      overrides={**SMOKE_WAN, "num_layers": 2} if a.smoke else None)
    transformer = pipe.transformer
    n_params = sum(p.numel() for p in transformer.parameters())
    return pipe, transformer, transformer.config.text_dim, n_params


def part_e2e(a, device, report: Report, budget: Budget) -> None:
    import accel

    pipe, transformer, text_dim, n_params = build_wan_pipeline(a, device)
    expect = ((a.frames - 1) // 4 + 1, a.height // 16, a.width // 16)
    seen: list = []

    def pre_hook(module, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if hs is not None:
            seen.append(tuple(hs.shape))

    hook = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    specs = _parse_rows(a.e2e_rows, a.e2e_block, a.flex_compile)
    from accel.pipelines import tiny

    ex = tiny.example_inputs("wan")
    prompt, negative = ex.get("prompt", "a cat"), ex.get("negative_prompt", "blurry")

    def call(cfg, steps):
        if cfg is not None:
            accel.apply(pipe, cfg)
        try:
            gen = torch.Generator(device=device).manual_seed(0)
            with torch.no_grad():
                sample = measure(lambda: pipe(prompt=prompt, negative_prompt=negative, height=a.height, width=a.width,
                                              num_frames=a.frames, num_inference_steps=steps,
                                              guidance_scale=a.guidance, output_type="latent", generator=gen).frames,
                                 device)
            dt, out = sample.seconds, sample.out
            st = accel.stats(pipe) if cfg is not None else {}
        finally:
            if cfg is not None:
                accel.remove(pipe)
        return dt, out.float(), st

    key = "e2e_wan"
    size = "a 2-layer narrow (smoke)" if a.smoke else "random-weight Wan2.1-1.3B-size"
    title = (f"End to end: WanPipeline, {size} transformer ({n_params / 1e6:.0f} M params, "
             f"{str(a.e2e_dtype).replace('torch.', '')}), {a.height}x{a.width}x{a.frames} frames, {a.steps} steps, "
             f"CFG {a.guidance}, latents out")
    header = ["row", "s / call", "speed-up vs off", "PSNR dB vs off", "attn sparse_calls", "attn dense_calls",
              "backend ran", "realised d", "techniques", "1st call s", "samples", "attn: why dense"]
    notes = [RANDOM_WEIGHTS_WARNING,
             f"shape:wan-1.3b's small text encoder (width {text_dim}), VAE and scheduler; transformer grid checked "
             "by a forward pre-hook", f"one warm-up call of {a.warm_steps} step(s) per row, then up to {a.rounds} "
             "round(s) round-robin (accel.eval.clock: CUDA events; CPU time on a CPU); PSNR over the dense latents' "
             "range",
             "the 'off' row's PSNR compares its second run with its first (run-to-run determinism)"]
    print(RANDOM_WEIGHTS_WARNING, flush=True)
    results = {label: dict(times=[], out=None, stats={}, first=None, err=None) for label, _, _ in specs}

    def update():
        rows = []
        off = next((results[label] for label, cfg, _ in specs if cfg is None), None)
        ref = off["out"] if off else None
        off_t = statistics.median(off["times"]) if off and off["times"] else None
        lo, hi = (float(ref.min()), float(ref.max())) if ref is not None else (0.0, 1.0)
        for label, _cfg, _ in specs:
            r = results[label]
            if r["err"]:
                rows.append([label, None, None, None, None, None, None, None, None, r["first"], r["err"], None])
                continue
            t = statistics.median(r["times"]) if r["times"] else None
            p = None
            if ref is not None and r["out"] is not None:
                if r["out"] is ref:
                    p = r.get("self_psnr", "ref")
                else:
                    mse = float(((r["out"] - ref) ** 2).mean())
                    p = math.inf if mse == 0 else 10 * math.log10((hi - lo) ** 2 / mse)
            at = r["stats"].get("attention", {}) or {}
            techniques = ",".join(s for s in ("attention", "tokens", "cache") if s in r["stats"]) or "-"
            rows.append([label, t, off_t / t if off_t and t else None, p, at.get("sparse_calls"),
                         at.get("dense_calls"), at.get("backend") if at else "sdpa (diffusers)",
                         at.get("realised_density"), techniques, r["first"], len(r["times"]), at.get("why_dense")])
        report.table(key, title, header, rows, notes)

    try:
        # warm-up: one short call per row (compiles flex, JITs triton, builds masks); a failing row is dropped
        per_step = None
        for label, cfg, backend in specs:
            r = results[label]
            reason = _backend_skip_reason(backend, device) if backend else None
            if reason:
                r["err"] = f"skipped: {reason}"
                print(f"  [e2e] {label}: skipped: {reason}", flush=True)
                continue
            need = (per_step or 0) * (a.warm_steps + a.steps) * 1.2
            if budget.left() < need + 5:
                r["err"] = "skipped: time budget"
                print(f"  [e2e] {label}: skipped, {budget.left():.0f} s of budget left", flush=True)
                continue
            try:
                dt, out, st = call(cfg, a.warm_steps)
                r["first"] = dt
                if per_step is None:
                    per_step = dt / a.warm_steps
                at = st.get("attention", {}) or {}
                print(f"  [e2e] warm-up {label}: {dt:.2f} s ({a.warm_steps} step(s)); attention "
                      f"{ {k: at.get(k) for k in ('backend', 'sparse_calls', 'dense_calls')} }", flush=True)
            except Exception as e:
                traceback.print_exc()
                r["err"] = f"error: {_short(e)}"
            update()
        if seen:
            shape = seen[-1]
            grid = (shape[2], shape[3] // 2, shape[4] // 2)
            ok = grid == expect
            notes.insert(1, f"transformer input {shape} -> token grid {grid[0]}x{grid[1]}x{grid[2]} = "
                            f"{grid[0] * grid[1] * grid[2]:,} tokens ({'as expected' if ok else f'EXPECTED {expect}'})")
            print(f"  [e2e] grid check: transformer sees hidden_states {shape} -> grid {grid}: "
                  f"{'OK' if ok else f'MISMATCH, expected {expect}'}", flush=True)
        active = [s for s in specs if not results[s[0]]["err"]]
        for rnd in range(a.rounds):
            est = sum(statistics.median(results[s[0]]["times"]) if results[s[0]]["times"]
                      else (per_step or 0) * a.steps for s in active)
            if rnd > 0 and budget.left() < est + 5:
                print(f"  [e2e] round {rnd + 1} skipped: {budget.left():.0f} s of budget left, "
                      f"a round takes ~{est:.0f} s", flush=True)
                notes.append(f"round {rnd + 1} of {a.rounds} skipped (time budget)")
                break
            for label, cfg, _ in active:
                r = results[label]
                if r["err"]:
                    continue
                if rnd == 0 and budget.left() < (per_step or 0) * a.steps + 5:
                    r["err"] = "skipped: time budget"
                    continue
                try:
                    dt, out, st = call(cfg, a.steps)
                except Exception as e:
                    traceback.print_exc()
                    r["err"] = f"error: {_short(e)}"
                    update()
                    continue
                if cfg is None and r["out"] is not None:
                    mse = float(((out - r["out"]) ** 2).mean())
                    rng = float(r["out"].max() - r["out"].min())
                    r["self_psnr"] = math.inf if mse == 0 else 10 * math.log10(rng ** 2 / mse)
                if r["out"] is None or cfg is not None:
                    r["out"] = out
                r["times"].append(dt)
                r["stats"] = st
                at = st.get("attention", {}) or {}
                print(f"  [e2e] round {rnd + 1} {label:<22} {dt:7.2f} s  attention "
                      f"{ {k: at.get(k) for k in ('backend', 'sparse_calls', 'dense_calls')} }", flush=True)
                update()
    finally:
        hook.remove()
        update()
        report.show(key)


# --------------------------------------------------------------------------------------------- 14B forward


def part_fwd14b(a, device, report: Report, budget: Budget) -> None:
    """A Wan2.1-14B-shape transformer (5120 wide, 40 heads of 128, FFN 13824) at reduced depth, one forward at
    720p x 81 frames (21 x 45 x 80 = 75,600 tokens): dense vs sparse attention. Every layer is the same, so the
    ratio is the full model's up to the share of the embeddings and the output head. The transformer is
    ``shape:wan-1.3b`` with Wan2.1-14B's widths (the two configs differ only in heads and FFN width)."""
    import accel

    layers = a.fwd14b_layers
    dims = SMOKE_WAN if a.smoke else dict(num_attention_heads=40, ffn_dim=13824)
    latent, n_text = ((3, 16, 32), 8) if a.smoke else ((21, 90, 160), 512)
    dtype = a.e2e_dtype
    model = sized.make("wan-1.3b", device=device, dtype=dtype, overrides={**dims, "num_layers": layers}).transformer
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, 16, *latent, generator=g, device=device, dtype=dtype)
    text = torch.randn(1, n_text, model.config.text_dim, generator=g, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    backend = "triton" if device.type == "cuda" else "gather"
    rows_spec = [("dense", None)] + [(f"{backend} {p} d={d}", {"attention": dict(
        pattern=p, density=d, backend=backend, block_size=a.e2e_block)}) for p, d in (("radial", 0.25), ("tile", 0.1))]
    key = "fwd_wan14b"
    title = (f"Wan2.1-14B-shape transformer, {layers} of 40 layers, one forward at 720p x 81 frames "
             "(75,600 tokens), bf16")
    header = ["row", "ms / forward", "speed-up vs dense", "rel. L2 vs dense", "sparse_calls", "backend ran"]
    rows: list = []
    dense_ms = dense_out = None
    for label, cfg in rows_spec:
        if budget.left() < 10:
            rows.append([label, None, None, None, None, "skipped: time budget"])
            continue
        if cfg is not None:
            accel.apply(model, cfg)
        try:
            with torch.no_grad():
                fn = lambda: model(hidden_states=x, timestep=t, encoder_hidden_states=text,  # noqa: E731
                                   return_dict=False)[0]
                _, times, out = time_calls(fn, device, 1, 3)
            st = accel.stats(model).get("attention", {}) if cfg is not None else {}
        finally:
            if cfg is not None:
                accel.remove(model)
        ms = statistics.median(times)
        if cfg is None:
            dense_ms, dense_out = ms, out.float()
        err = None if cfg is None else float((out.float() - dense_out).norm() / dense_out.norm())
        rows.append([label, ms, dense_ms / ms, err, st.get("sparse_calls"), st.get("backend")])
        print(f"  [fwd14b] {label:<22} {ms:9.1f} ms  x{dense_ms / ms:5.2f}", flush=True)
        report.table(key, title, header, rows, [RANDOM_WEIGHTS_WARNING])
    report.show(key)


# --------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--out", default=os.environ.get("OUT") or "./gpu_results",
                    help="folder for the markdown tables (default $OUT, else ./gpu_results)")
    ap.add_argument("--parts", default=PARTS,
                    help="comma-separated, run in this order: env, kernels (or kernels:SHAPE[+SHAPE]), sweep, e2e")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, fp32, eager flex, a 2-layer narrow Wan at 64x64x9, 2 steps: checks every "
                         "code path in under a minute on CPU")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="wall-clock budget of the whole run: later rows/rounds/parts are skipped to stay within it")
    ap.add_argument("--e2e-reserve-s", type=float, default=95.0,
                    help="seconds of the budget the kernel parts leave for the end-to-end part (when it runs)")
    g = ap.add_argument_group("kernels")
    g.add_argument("--shapes", default=None, help=f"comma-separated, of {', '.join(SHAPES)} (default: all)")
    g.add_argument("--backends", default=None, help="sparse backends (default triton,flex; smoke: "
                                                   "triton,flex,gather)")
    g.add_argument("--patterns", default="tile,radial")
    g.add_argument("--densities", default="0.5,0.25,0.1")
    g.add_argument("--block", type=int, default=None, help="tokens per block (default 128; smoke 64)")
    g.add_argument("--reps", type=int, default=None, help="timed calls per row (default 10 at 32k tokens, 5 at 75k)")
    g.add_argument("--ref-heads", type=int, default=2, help="heads per masked-reference SDPA call (memory)")
    g.add_argument("--sweep-configs", default=SWEEP_CONFIGS,
                   help="indices into configs(block) to sweep, or 'all'")
    g.add_argument("--sweep-shape", default=None, help="shape of the sweep (default: the first with a reference)")
    g.add_argument("--no-sweep-model-order", dest="sweep_model_order", action="store_false",
                   help="sweep the kernel on tiled q/k/v only (default: also on model-order q/k/v, as the engine runs)")
    g.add_argument("--fwd14b-layers", type=int, default=4, help="fwd14b part: layers of the 14B-shape transformer")
    g = ap.add_argument_group("end to end")
    g.add_argument("--e2e-rows", default=None,
                   help=f"comma-separated rows: off, preset:NAME, BACKEND:PATTERN:DENSITY (default {E2E_ROWS})")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default 8; smoke 2)")
    g.add_argument("--warm-steps", type=int, default=None, help="steps of each row's warm-up call (default 1)")
    g.add_argument("--rounds", type=int, default=2, help="timed rounds over the rows")
    g.add_argument("--guidance", type=float, default=5.0)
    g.add_argument("--e2e-block", type=int, default=None, help="block size of the e2e rows (default 128; smoke 16)")
    a = ap.parse_args(argv)

    device = torch.device(a.device)
    a.smoke = a.smoke or False
    dtype = torch.float32 if (a.smoke or device.type == "cpu") else torch.bfloat16
    a.e2e_dtype = dtype
    shapes = SMOKE_SHAPES if a.smoke else SHAPES
    if a.smoke:  # the real shapes' names and config indices mean nothing at smoke size
        a.parts = "env,sweep,kernels,e2e,fwd14b" if a.parts == PARTS else a.parts
        a.sweep_configs = "all" if a.sweep_configs == SWEEP_CONFIGS else a.sweep_configs
    if a.reps:
        shapes = {n: {**s, "reps": a.reps} for n, s in shapes.items()}
    names = [s for s in (a.shapes.split(",") if a.shapes else shapes) if s]
    unknown = [s for s in names if s not in shapes]
    if unknown:
        ap.error(f"--shapes: unknown {unknown}; choose from {', '.join(shapes)}")
    a.backends = (a.backends or ("triton,flex,gather" if a.smoke else "triton,flex")).split(",")
    a.patterns = a.patterns.split(",")
    a.densities = [float(x) for x in a.densities.split(",")]
    a.block = a.block or (64 if a.smoke else 128)
    a.flex_compile = not (a.smoke or device.type == "cpu")  # compiled flex on CPU needs a compiler and minutes
    a.e2e_rows = a.e2e_rows or (SMOKE_E2E_ROWS if a.smoke else E2E_ROWS)
    a.steps = a.steps or (2 if a.smoke else 8)
    a.warm_steps = a.warm_steps or 1
    a.e2e_block = a.e2e_block or (16 if a.smoke else 128)
    a.height, a.width, a.frames = (64, 64, 9) if a.smoke else (480, 832, 81)
    parts = [p for p in a.parts.split(",") if p]
    for p in parts:
        if p not in ("env", "kernels", "sweep", "e2e", "fwd14b") and not (p.startswith("kernels:") and all(
                n in shapes for n in p.split(":", 1)[1].split("+"))):
            ap.error(f"--parts: unknown part {p!r} (env, kernels, kernels:SHAPE[+SHAPE], sweep, e2e)")
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    try:  # every (shape, mask) may recompile flex; the default limit (8) would drop later rows to eager flex
        import torch._dynamo.config as dcfg
        for attr in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(dcfg, attr):
                setattr(dcfg, attr, max(getattr(dcfg, attr), 256))
    except Exception:
        pass

    report = Report(Path(a.out))
    budget = Budget(a.budget_s)
    reserve = a.e2e_reserve_s if "e2e" in parts else 0.0
    print(f"# bench_attention_gpu: device {device}, dtype {dtype}, parts {parts}, out {report.out}, "
          f"budget {a.budget_s:.0f} s{' (smoke)' if a.smoke else ''}", flush=True)
    summary = []

    def guarded(label, fn, *args):
        t = time.perf_counter()
        print(f"\n## part {label} ({budget.left():.0f} s of budget left)", flush=True)
        try:
            fn(*args)
            summary.append(f"{label}: ok ({time.perf_counter() - t:.0f} s)")
        except Exception as e:
            traceback.print_exc()
            print(f"!! part {label} failed: {_short(e)}", flush=True)
            summary.append(f"{label}: FAILED ({_short(e)})")
        finally:
            _free()

    try:
        for i, part in enumerate(parts):  # in the order given: put what matters most first
            reserve = a.e2e_reserve_s if "e2e" in parts[i + 1:] else 0.0  # kept for an e2e part still to come
            if part == "env":
                guarded("env", part_env, a, device, dtype, report)
            elif part == "kernels" or part.startswith("kernels:"):
                for n in (part.split(":", 1)[1].split("+") if ":" in part else names):
                    if budget.left() < reserve + 10:
                        summary.append(f"kernels {n}: skipped (time budget)")
                        print(f"\n## part kernels {n}: skipped, {budget.left():.0f} s of budget left", flush=True)
                        continue
                    guarded(f"kernels {n}", part_kernels, n, shapes[n], a, device, dtype, report, budget, reserve)
            elif part == "sweep":
                ref_shape = a.sweep_shape or next((n for n, s in shapes.items() if s["ref"]), None)
                if budget.left() < reserve + 10:
                    summary.append("sweep: skipped (time budget)")
                else:
                    guarded("sweep", part_sweep, ref_shape, shapes[ref_shape], a, device, dtype, report, budget,
                            reserve)
            elif part == "fwd14b":
                guarded("fwd14b", part_fwd14b, a, device, report, budget)
            elif part == "e2e":
                _refs.clear()
                _free()
                guarded("e2e", part_e2e, a, device, report, budget)
    except KeyboardInterrupt:
        print("!! interrupted (time limit?): the tables written so far are kept", flush=True)
        summary.append("INTERRUPTED")
    print("\n## summary", flush=True)
    for s in summary:
        print(f"[summary] {s}")
    print(f"[summary] tables in {report.out.resolve()}: {', '.join(sorted(report.tables))}", flush=True)
    return 0 if all("FAILED" not in s and s != "INTERRUPTED" for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
