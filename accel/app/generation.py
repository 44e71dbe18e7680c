"""What `accel generate` and `accel batch` share: a built-in model's call defaults, the sidecar record,
and the parallel config of ``--parallel``."""

from __future__ import annotations


def generation_defaults(model: str) -> dict:
    """A built-in model's call: a tiny model's fast defaults (few steps, small size), a reference model's
    trained call, a shape model's released call; other models keep their pipeline's."""
    if model.startswith("tiny-"):
        from ..pipelines import tiny

        d = tiny.example_inputs(model[len("tiny-"):])
        return {k: v for k, v in d.items() if k not in ("prompt", "negative_prompt", "generator", "output_type")}
    if model.startswith("ref-"):
        from ..pipelines import ref

        return ref.call_defaults(model)
    if model.startswith("shape:"):  # the released model's own call (size, steps, guidance)
        from ..pipelines import shape

        return shape.call_defaults(shape.parse(model)[0])
    return {}


def versions() -> dict:
    import diffusers
    import torch

    import accel

    return {"accel": accel.__version__, "diffusers": diffusers.__version__, "torch": torch.__version__}


# The preset `accel generate`, `accel batch` and `accel app` use when none is given: an acceleration tool
# accelerates by default (`--preset off` turns it off). `accel run` makes the same choice (zero_code.py).
DEFAULT_PRESET = "balanced"


def sidecar(pipe, *, output: str, model: str, family: str, prompt: str, negative_prompt, seed: int, kw: dict,
            preset, config, timings: dict, stats: dict | None = None) -> dict:
    """The JSON written next to every output: what made it (model, prompt, seed, call, config) and how fast.

    ``stats`` defaults to `accel.stats` of the pipeline's last call; a caller that made the output
    some other way (the web app's baseline, run with accel removed) passes its own."""
    import accel

    denoiser = next(iter(pipe.components[n] for n in ("unet", "transformer") if n in pipe.components))
    stats = accel.stats(pipe) if stats is None else stats
    return {
        "output": output, "model": model, "family": family, "prompt": prompt,
        "negative_prompt": negative_prompt, "seed": seed,
        # plain values only: a callback or a tensor in the call would be written as its repr
        "call": {k: v for k, v in kw.items() if k not in ("generator", "prompt", "negative_prompt") and _plain(v)},
        "preset": preset, "config": config.to_dict(),
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "stats": {k: v for k, v in stats.items() if k != "config"},  # the config is recorded once, above
        "versions": versions(), "device": str(pipe.device), "dtype": str(denoiser.dtype),
    }


def _plain(v) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    return v is None or isinstance(v, (str, int, float, bool))


def config_mapping(path) -> dict:
    """The mapping of a ``--config`` file: a config file as it is, or an output's sidecar JSON (its ``config``)."""
    from ..config_base import read_mapping

    data = read_mapping(path)
    if isinstance(data.get("config"), dict) and "output" in data and "model" in data:  # a sidecar
        return dict(data["config"])
    return data


def parallel_config(spec: str | None, config_file=None):
    """The `accel.ParallelConfig` of ``--parallel cfg=2,sequence=2`` over a config file's ``parallel``
    table; None when neither gives one. Values are YAML scalars (``vae=true``, ``patch_mode=async``)."""
    import yaml

    from ..config_base import ConfigError
    from ..parallel import ParallelConfig
    from .cli import UsageError

    fields = {}
    if config_file:
        section = config_mapping(config_file).get("parallel")
        if section is not None and not isinstance(section, dict):
            raise UsageError(f"--config {str(config_file)!r}: parallel must be a table of ParallelConfig fields")
        fields.update(section or {})
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--parallel {spec!r}: write FIELD=VALUE pairs separated by commas, e.g. cfg=2,sequence=2")
        fields[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    if not fields:
        return None
    try:
        return ParallelConfig.from_dict(fields)
    except ConfigError as e:
        raise UsageError(f"--parallel: {e}") from None
