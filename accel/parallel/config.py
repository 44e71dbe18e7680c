"""`ParallelConfig`: which parallel strategies run, at which degree, in which mode.

Each integer is that strategy's degree (1 = off). The world size must equal
``cfg * max(sequence, patch, clip)``: CFG parallelism composes with one of sequence, patch or
clip parallelism (they all split the same token axis). `vae` decodes latent tiles on every rank
of the group. `accel.parallelize` checks the degrees against the model (heads divisible, world
size) before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config_base import ConfigBase, ConfigError, spec

PATCH_MODES = ("sync", "async", "corrected_async_gn", "sync_gn", "stale_gn")
# "async" is DistriFusion's default: stale K/V and halos, GroupNorm with corrected stale statistics.
ASYNC_ALIASES = {"async": "corrected_async_gn"}
# components: how a part's stale input (the previous step's hand-over) is brought to the current step.
CORRECTIONS = ("auto", "none", "extrapolate", "residual", "residual_extrapolate")


@dataclass(frozen=True)
class ParallelConfig(ConfigBase):
    """Multi-process parallel inference (torch.distributed: NCCL on CUDA, gloo on CPU).

    Important:
        cfg: 2 runs the conditional and unconditional branches on different ranks (one
            all-gather per step). Exact.
        sequence: Ulysses degree for DiTs (all-to-all over heads); exact.
        patch: DistriFusion displaced patch degree (row patches), UNets and Flux.
        patch_mode: ``sync`` (exact), ``async`` (= ``corrected_async_gn``: stale K/V, halos and
            GroupNorm statistics from the previous step, communication overlapped), ``sync_gn``
            (stale K/V and halos, synchronous GroupNorm), ``stale_gn`` (stale statistics, no
            local correction).
        clip: clip parallel degree for video DiTs (Wan, CogVideoX, LTX; Video-Infinity): the
            latent frames are cut into that many contiguous clips, one per rank.
        vae: decode latent tiles across all ranks.
        components: AsyncDiff: the denoiser is cut at block boundaries into that many components of
            equal measured cost, one per rank; after the warm-up every component runs at once on the
            previous step's hand-over from the component before it. Lossy; UNets and DiTs.
    Tinkering:
        warmup_steps: fully synchronous steps before displaced (stale) communication starts (patch)
            or before the components run asynchronously (components; every rank then computes the
            whole denoiser, so a warm-up covering every step equals one process).
        component_stride: components run and hand over every that many steps; the steps between
            reuse the last prediction (AsyncDiff's stride: less communication and compute, more loss).
        component_correction: how a part's stale input is brought to the current step: ``none``
            (AsyncDiff as published), ``extrapolate`` (one step ahead along the last two hand-overs),
            ``residual`` (DiTs: the stale hand-over minus the embedded input it was computed from, plus
            this step's embedded input, which every rank computes), ``residual_extrapolate`` (that, with
            the residual one step ahead along the last two), ``auto`` (extrapolate for UNets,
            residual_extrapolate for image DiTs, residual for video DiTs: the best of each on the
            trained models).
        patch_kv_fraction: PCPP, the fraction of the other patches' K/V tokens each rank attends
            to in async steps (1.0 = all).
        sequence_backend: ``auto`` (diffusers' context parallelism where the model has
            ``_cp_plan``, ours elsewhere), ``diffusers`` or ``ulysses`` (ours everywhere).
        clip_neighbour_frames: dual-scope attention, local scope: frames of each adjacent clip
            whose keys/values a clip attends to (0 with clip_global_tokens=0: independent clips).
        clip_global_tokens: dual-scope attention, global scope: tokens of every other clip
            (evenly strided) that each clip attends to.
        timeout_s: collective timeout: a dead rank makes the others fail after this long.
    """

    section = "parallel"

    cfg: int = spec(1, choices=(1, 2), help="CFG parallel degree: 2 splits cond/uncond across ranks")
    sequence: int = spec(1, min=1, help="Ulysses sequence-parallel degree (DiTs)")
    sequence_backend: str = spec("auto", choices=("auto", "diffusers", "ulysses"),
                                 help="diffusers' context parallelism where the model has _cp_plan, or ours")
    patch: int = spec(1, min=1, help="displaced patch (DistriFusion) degree")
    patch_mode: str = spec("sync", choices=PATCH_MODES, help="sync is exact; the others reuse stale activations")
    warmup_steps: int = spec(1, min=0, help="fully synchronous steps before stale communication")
    patch_kv_fraction: float = spec(1.0, min=0.0, max=1.0, min_exclusive=True,
                                    help="PCPP: fraction of other patches' K/V tokens used in async steps")
    components: int = spec(1, min=1, help="AsyncDiff: the denoiser split into this many components, one per rank")
    component_stride: int = spec(1, min=1, help="components run every that many steps; the steps between reuse")
    component_correction: str = spec("auto", choices=CORRECTIONS,
                                     help="how a stale hand-over is brought to the current step (auto: by family)")
    clip: int = spec(1, min=1, help="clip parallel degree for video DiTs: frames split into clips across ranks")
    clip_neighbour_frames: int = spec(1, min=0, help="frames of each adjacent clip every clip attends to")
    clip_global_tokens: int = spec(8, min=0, help="strided tokens of every other clip every clip attends to")
    vae: bool = spec(False, help="decode latent tiles across all ranks")
    backend: str = spec("auto", choices=("auto", "nccl", "gloo"), help="auto: nccl on CUDA, gloo on CPU")
    timeout_s: float = spec(300.0, min=1.0, help="collective timeout in seconds")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.vae

    @property
    def inner(self) -> int:
        """Degree of the strategy inside a CFG branch (sequence, patch, clip or components)."""
        return max(self.sequence, self.patch, self.clip, self.components)

    @property
    def world_size(self) -> int:
        return self.cfg * self.inner

    @property
    def refused_sections(self) -> tuple[str, ...]:
        """Technique sections these strategies cannot run with (components: the step cache, whose reuse
        decisions would differ between ranks); a preset leaves them off (`accel.layering.layered`)."""
        return ("cache",) if self.components > 1 else ()

    @property
    def gn_mode(self) -> str:
        return ASYNC_ALIASES.get(self.patch_mode, self.patch_mode)

    def validate(self) -> None:
        on = [n for n in ("sequence", "patch", "clip", "components") if getattr(self, n) > 1]
        if len(on) > 1:
            what = ("the denoiser by blocks while the other splits its tokens" if "components" in on[:2]
                    else "the same token axis")
            raise ConfigError(f"parallel.{on[1]}: {getattr(self, on[1])!r} cannot be combined with "
                              f"{on[0]}={getattr(self, on[0])}; one splits {what}. "
                              "Use one of sequence, patch, clip or components (each composes with cfg=2)")


PRESETS: dict = {}  # parallel degrees depend on the machine, not on a quality/speed preset
