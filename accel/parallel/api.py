"""`parallelize` / `unparallelize`: put the parallel strategies on a pipeline, and take them off.

    accel.parallelize(pipe, accel.ParallelConfig(cfg=2, sequence=2))   # under torchrun, 4 processes
    accel.parallelize(pipe, accel.ParallelConfig(components=2))         # AsyncDiff, 2 processes
    out = pipe(**kwargs)                    # same call on every rank, same seed; rank 0 saves
    accel.parallel.unparallelize(pipe)      # restores the pipeline exactly

Every change goes through an `accel.patching.Ledger` kept on the pipeline (separate from
`accel.apply`'s, so the two can be added and removed independently); `accel.remove` does not
touch parallelism, `unparallelize` does. Degrees, world size and head counts are checked before
any hook is installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config_base import ConfigError
from ..families import Adapter, denoisers_of
from ..loop import observe
from ..patching import Ledger
from ..roles import Role, set_role
from . import runtime
from .config import ParallelConfig
from .context import Groups, LoopState
from .runtime import ParallelError

_STATE_ATTR = "_accel_parallel"


@dataclass
class ParallelHandle:
    config: ParallelConfig
    ledger: Ledger
    groups: Groups | None
    plan: dict = field(default_factory=dict)  # component -> strategy names
    stats: dict = field(default_factory=dict)  # bytes communicated, waits
    cfg_hooks: list = field(default_factory=list)


def _as_config(config: Any, overrides: dict) -> ParallelConfig:
    if config is None:
        config = ParallelConfig()
    if isinstance(config, dict):
        config = ParallelConfig.from_dict(config)
    if not isinstance(config, ParallelConfig):
        raise ConfigError(f"parallel: expected an accel.ParallelConfig or a dict, got {type(config).__name__}")
    return config.replace(**overrides) if overrides else config


def _sequence_backend(cfg: ParallelConfig, module) -> str:
    if cfg.sequence_backend != "auto":
        return cfg.sequence_backend
    return "diffusers" if getattr(module, "_cp_plan", None) else "ulysses"


def check(pipe, cfg: ParallelConfig) -> list[str]:
    """Raise ConfigError/ParallelError if ``cfg`` cannot run on ``pipe``; returns the strategy names."""
    from .sharding import PLANS

    names = []
    pairs = denoisers_of(pipe)
    if cfg.cfg > 1:
        if isinstance(pipe, torch.nn.Module):
            raise ConfigError("parallel.cfg: CFG parallelism needs the pipeline (it reads how the pipeline "
                              "runs guidance); pass the pipeline, not its denoiser")
        names.append("cfg")
    for component, module in pairs:
        fam = Adapter(module, component).family
        if cfg.sequence > 1:
            backend = _sequence_backend(cfg, module)
            if fam.kind != "dit" or (backend == "ulysses" and fam.name not in PLANS):
                raise ConfigError(f"parallel.sequence: {cfg.sequence} is not available for {fam.name}; sequence "
                                  f"parallelism supports the DiT families {', '.join(PLANS)} (use patch= for UNets)")
            if backend == "diffusers" and not getattr(module, "_cp_plan", None):
                raise ConfigError(f"parallel.sequence_backend: 'diffusers' needs a model with _cp_plan; "
                                  f"{type(module).__name__} has none, use 'ulysses'")
            for site in Adapter(module, component).attention():
                heads = getattr(site.module, "heads", None)
                if heads and heads % cfg.sequence:
                    raise ConfigError(f"parallel.sequence: {cfg.sequence} does not divide the {heads} attention heads "
                                      f"of {fam.name} ({site.name}); use a degree that divides {heads}")
            names.append(f"sequence:{backend}")
        if cfg.patch > 1:
            if fam.name not in ("sd15", "sdxl") and fam.name not in PLANS:
                raise ConfigError(f"parallel.patch: {cfg.patch} is not available for {fam.name}; displaced patch "
                                  f"parallelism supports sd15, sdxl and {', '.join(PLANS)}")
            names.append(f"patch:{cfg.patch_mode}")
        if cfg.clip > 1:
            from .clip import check_clip

            check_clip(fam, cfg)
            names.append("clip")
        if cfg.components > 1:
            from .components import check_components

            check_components(Adapter(module, component), cfg.components)
            names.append(f"components:{cfg.components}")
    if cfg.vae:
        if isinstance(pipe, torch.nn.Module) or getattr(pipe, "vae", None) is None:
            raise ConfigError("parallel.vae: the pipeline has no vae component to decode in parallel")
        names.append("vae")
    return names


def parallelize(pipe, config: ParallelConfig | dict | None = None, *, replicas: int = 1, **overrides):
    """Run ``pipe`` across the ranks of the process group; returns ``pipe``.

    Call it on every rank, after `accel.parallel.init()` / under ``torchrun`` (it initialises the
    default group from the launcher's environment when needed). Every rank then calls the
    pipeline with the same arguments and the same seed; every rank gets the full output, rank 0
    writes it. Parallelizing again replaces the previous configuration.

    Args:
        pipe: a diffusers pipeline (or a bare denoiser, for the sequence and patch strategies).
        config: an `accel.ParallelConfig` or a dict of its fields; None means the defaults.
        replicas: the world holds that many copies of the pipeline, each on ``config.world_size``
            consecutive ranks with inputs of its own (data parallel x the strategies; ``accel batch
            --parallel``); the ranks of one copy call the pipeline together, and its first rank writes
            (`accel.roles.writes_files` says which process that is, for the techniques that write).
        overrides: fields replaced in ``config``.

    Returns:
        ``pipe``.
    """
    cfg = _as_config(config, overrides)
    unparallelize(pipe)
    strategies = check(pipe, cfg)
    need = cfg.world_size * replicas
    if need > 1 or cfg.vae:
        device = getattr(pipe, "device", None)
        rank, world = runtime.init(cfg.backend, cfg.timeout_s, str(device) if device is not None else None)
        if world == 1 and need > 1:
            raise ParallelError(f"parallel: degrees need {need} processes but this is a single process; "
                                f"launch with torchrun --nproc-per-node {need} or use accel.parallel.spawn")
    groups = Groups(cfg, replicas) if cfg.world_size > 1 else None
    ledger = Ledger()
    handle = ParallelHandle(cfg, ledger, groups, {"strategies": strategies})
    try:
        view = observe(pipe, ledger) if groups is not None else None
        for component, module in denoisers_of(pipe):
            _parallelize_denoiser(pipe, Adapter(module, component), cfg, groups, ledger, handle, replicas, view)
        if cfg.vae:
            from .vae import apply_vae

            apply_vae(ledger, pipe.vae, cfg, handle.stats, groups, replicas)
        if view is not None:
            view.attach()  # its hook outside ours, so every parallel hook reads this forward's step and branch
            set_role(pipe, Role(writes_files=groups.local_rank == 0, decide=groups.decide), ledger)
    except BaseException:
        ledger.undo_all()
        raise
    pipe.__dict__[_STATE_ATTR] = handle
    return pipe


def _parallelize_denoiser(pipe, adapter: Adapter, cfg, groups, ledger, handle, replicas: int = 1,
                          view=None) -> None:
    from . import attention
    from .sharding import PLANS, apply_plan

    module, fam = adapter.module, adapter.family
    if groups is None:
        return
    state = LoopState(view, module)
    if cfg.sequence > 1 and _sequence_backend(cfg, module) == "diffusers":
        _diffusers_context_parallel(module, cfg, ledger, replicas)
    elif cfg.components > 1:
        from .components import apply_components

        apply_components(ledger, adapter, groups, state, cfg, handle.stats)
    elif cfg.clip > 1:
        from .clip import apply_clip

        apply_clip(ledger, pipe, adapter, groups, state, cfg, handle.stats)
    elif cfg.sequence > 1 or (cfg.patch > 1 and fam.kind == "dit"):
        plan = PLANS[fam.name]
        apply_plan(ledger, module, plan, groups, state, handle.stats)
        for site in adapter.attention():
            if site.role not in ("self", "joint"):
                continue  # cross-attention: local queries against whole text, nothing to exchange
            if cfg.sequence > 1:
                proc = attention.wrap(attention.Ulysses, site.module.processor, site.name, groups, state,
                                      plan["text"], handle.stats)
            else:
                proc = attention.wrap(attention.DisplacedKV, site.module.processor, site.name, groups, state,
                                      plan["text"], handle.stats, cfg.patch_mode, cfg.warmup_steps,
                                      cfg.patch_kv_fraction)
            ledger.set_processor(site.module, proc)
    elif cfg.patch > 1:
        from .displaced_patch import apply_unet

        class _Site:
            def __init__(self, module, processor):
                self.module, self.processor = module, processor

        sites = [_Site(s.module, attention.wrap(attention.DisplacedKV, s.module.processor, s.name, groups, state,
                                                None, handle.stats, cfg.patch_mode, cfg.warmup_steps,
                                                cfg.patch_kv_fraction))
                 for s in adapter.attention() if s.role == "self"]
        apply_unet(ledger, module, groups, state, cfg, handle.stats, sites)
    if cfg.cfg > 1:
        from .cfg_parallel import HOOK_NAME, CFGParallelHook

        hook = CFGParallelHook(pipe, groups, state)
        ledger.add_hook(module, hook, HOOK_NAME)  # outside the sharding: it slices the batch first
        handle.cfg_hooks.append(hook)


def _diffusers_context_parallel(module, cfg: ParallelConfig, ledger: Ledger, replicas: int = 1) -> None:
    """diffusers' own context parallelism (``_cp_plan`` + Ulysses in its attention dispatcher).

    ``enable_parallelism`` computes ``rank % torch.accelerator.device_count()``, which divides by
    zero on a CPU-only machine, and builds its own mesh over the whole world (no room for CFG
    ranks); so we make the same calls ourselves with a mesh of this CFG branch's ranks.
    """
    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    from diffusers.hooks.context_parallel import apply_context_parallel, remove_context_parallel
    from diffusers.models._modeling_parallel import ParallelConfig as DiffusersParallelConfig

    if getattr(module, "_parallel_config", None) is not None:
        raise ParallelError(f"{type(module).__name__} already has diffusers parallelism enabled; "
                            "load it without parallel_config to use accel.parallelize")
    on_cuda = next(module.parameters()).device.type == "cuda"
    device_type = "cuda" if on_cuda else "cpu"
    mesh = dist.device_mesh.init_device_mesh(device_type, (replicas, cfg.cfg, 1, cfg.sequence),
                                             mesh_dim_names=("replica", "cfg", "ring", "ulysses"))["ring", "ulysses"]
    cp = ContextParallelConfig(ulysses_degree=cfg.sequence, mesh=mesh, ulysses_anything=True)
    config = DiffusersParallelConfig(context_parallel_config=cp)
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=mesh)
    ledger.set_attr(module, "_parallel_config", config)
    for m in module.modules():
        proc = getattr(m, "processor", None)
        if proc is not None and hasattr(proc, "_parallel_config"):
            ledger.set_attr(proc, "_parallel_config", config)
    plan = module._cp_plan
    apply_context_parallel(module, cp, plan)
    ledger.on_undo(lambda: remove_context_parallel(module, plan))


def unparallelize(pipe):
    """Undo `parallelize` (hooks, processors, the VAE's decode); a no-op if not parallelized.

    Args:
        pipe: the pipeline (or denoiser) given to `parallelize`.

    Returns:
        ``pipe``, restored exactly.
    """
    handle = pipe.__dict__.pop(_STATE_ATTR, None)
    if handle is not None:
        handle.ledger.undo_all()
        for _, m in denoisers_of(pipe):
            for sub in m.modules():
                reg = sub.__dict__.get("_diffusers_hook")
                if reg is not None:
                    reg._child_registries_cache = None
    return pipe


def is_parallelized(pipe) -> bool:
    """Whether `parallelize` is on ``pipe``."""
    return _STATE_ATTR in pipe.__dict__


def parallel_stats(pipe) -> dict:
    """What the parallel strategies did on ``pipe``.

    Returns:
        ``{"parallel": False}`` when not parallelized; else the config, the strategies, and the bytes
        communicated and time waited since `parallelize`.
    """
    handle = pipe.__dict__.get(_STATE_ATTR)
    if handle is None:
        return {"parallel": False}
    out = {"parallel": True, "config": handle.config.to_dict(), **handle.plan, **handle.stats}
    for h in handle.cfg_hooks:
        for k, v in h.stats().items():
            out[k] = out.get(k, 0) + v
    return out
