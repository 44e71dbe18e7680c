"""Model-family adapters: what every technique needs to know about a denoiser, in one place.

A `Family` is plain data plus a few functions: which denoiser classes it covers, where its
transformer blocks and attention modules are, where text tokens sit in joint attention, and how
to read the token grid (frames x height x width, after patching) from a forward call's inputs.
`adapter_for(module)` binds a family to a denoiser instance. Techniques ask the adapter; they never
test class names themselves.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # torch is imported where it is used: `accel models` lists the families without it
    import torch


class UnsupportedModelError(TypeError):
    """The model is not a denoiser of a supported family."""


@dataclass(frozen=True)
class AttentionSite:
    """One attention module and the role it plays.

    ``role``: ``self`` (image/video tokens attend to themselves), ``cross`` (to text tokens held
    apart), ``joint`` (text and image tokens in one sequence, text at the family's
    ``text_position``) or ``temporal`` (per-pixel attention over frames, AnimateDiff).
    """

    name: str
    module: torch.nn.Module
    role: str
    layer: int  # position among all attention sites of the denoiser, in execution order


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    classes: tuple[str, ...]
    kind: str  # "unet" or "dit"
    video: bool
    block_stacks: tuple[str, ...] = ()  # DiT: ModuleList attributes holding the blocks, in order
    text_position: str | None = None  # joint attention: "first" or "last"; None: text kept apart
    grid: Callable = field(default=None, repr=False)  # (module, inputs) -> (frames, height, width)
    pipelines: tuple[str, ...] = ()  # pipeline classes tested with this family
    # DiT: forward inputs the denoiser adds to the hidden states between its blocks (ControlNet residuals).
    # A step cache that reuses a span of blocks must keep them out of what it caches: the forward adds
    # the current step's values again when the span is skipped.
    between_blocks: tuple[str, ...] = ()


def _tokens_grid_4d(patch_attr: str = "patch_size"):
    """(B, C, H, W) latents patchified by ``config.<patch_attr>``."""

    def grid(module, inputs):
        x = inputs["hidden_states"]
        p = getattr(module.config, patch_attr) or 1
        return (1, x.shape[-2] // p, x.shape[-1] // p)

    return grid


def _grid_unet(module, inputs):
    x = inputs["sample"]
    frames = x.shape[2] if x.ndim == 5 else 1
    return (frames, x.shape[-2], x.shape[-1])


# The last img_ids tensor read and the grid read from it: a pipeline passes the same ids to every
# forward of a call, so the host reads them once per call, not once per forward.
_flux_ids_seen: list = [lambda: None, None, None]  # [weakref to the ids tensor, its _version, grid]


def _grid_flux(module, inputs):
    ids = inputs.get("img_ids")
    if ids is not None:
        seen = _flux_ids_seen
        if seen[0]() is ids and seen[1] == ids._version:
            return seen[2]
        rows = ids[0] if ids.ndim == 3 else ids
        # Documented host sync (once per img_ids tensor): the grid sets shapes, and only the ids hold it.
        # Coordinate 0 numbers the images in the sequence: Flux Kontext appends its reference image's
        # tokens with 0 -> 1, so an output and a same-size reference read as two frames of one grid (a
        # reference of another size matches no grid, and the techniques leave those calls whole).
        f, h, w = (int(v) + 1 for v in rows[:, 0:3].amax(0).tolist())
        seen[:] = [weakref.ref(ids), ids._version, (f, h, w)]
        return (f, h, w)
    n = inputs["hidden_states"].shape[1]
    side = int(round(n ** 0.5))
    return (1, side, n // side)


def _grid_cogvideox(module, inputs):
    x = inputs["hidden_states"]  # (B, F, C, H, W)
    p, pt = module.config.patch_size, module.config.patch_size_t or 1
    return ((x.shape[1] + pt - 1) // pt, x.shape[-2] // p, x.shape[-1] // p)


def _grid_5d(patch: Callable):
    """(B, C, F, H, W) latents; ``patch(config)`` gives (pt, ph, pw)."""

    def grid(module, inputs):
        x = inputs["hidden_states"]
        pt, ph, pw = patch(module.config)
        return (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)

    return grid


def _grid_ltx(module, inputs):
    # the latent grid as host ints the pipeline passes (a tensor here would be a host sync per forward)
    return (int(inputs["num_frames"]), int(inputs["height"]), int(inputs["width"]))


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd15", "Stable Diffusion 1.x / 2.x", ("UNet2DConditionModel",), "unet", False,
           grid=_grid_unet, pipelines=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                                         "StableDiffusionInpaintPipeline", "StableDiffusionControlNetPipeline")),
    Family("sdxl", "Stable Diffusion XL", ("UNet2DConditionModel",), "unet", False,
           grid=_grid_unet, pipelines=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                                         "StableDiffusionXLInpaintPipeline")),
    Family("animatediff", "AnimateDiff (motion UNet)", ("UNetMotionModel",), "unet", True,
           grid=_grid_unet, pipelines=("AnimateDiffPipeline", "AnimateDiffVideoToVideoPipeline")),
    Family("flux", "Flux.1", ("FluxTransformer2DModel",), "dit", False,
           ("transformer_blocks", "single_transformer_blocks"), "first", _grid_flux,
           ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxKontextPipeline", "FluxFillPipeline",
            "FluxControlNetPipeline"),
           between_blocks=("controlnet_block_samples", "controlnet_single_block_samples")),
    Family("sd3", "Stable Diffusion 3 / 3.5", ("SD3Transformer2DModel",), "dit", False,
           ("transformer_blocks",), "last", _tokens_grid_4d(),
           ("StableDiffusion3Pipeline", "StableDiffusion3ControlNetPipeline"),
           between_blocks=("block_controlnet_hidden_states",)),
    Family("pixart", "PixArt-Sigma / Alpha", ("PixArtTransformer2DModel",), "dit", False,
           ("transformer_blocks",), None, _tokens_grid_4d(), ("PixArtSigmaPipeline",)),
    Family("cogvideox", "CogVideoX", ("CogVideoXTransformer3DModel",), "dit", True,
           ("transformer_blocks",), "first", _grid_cogvideox, ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline")),
    Family("wan", "Wan 2.1 / 2.2", ("WanTransformer3DModel",), "dit", True,
           ("blocks",), None, _grid_5d(lambda c: tuple(c.patch_size)), ("WanPipeline", "WanImageToVideoPipeline")),
    Family("ltx", "LTX-Video", ("LTXVideoTransformer3DModel",), "dit", True,
           ("transformer_blocks",), None, _grid_ltx, ("LTXPipeline",)),
    Family("hunyuanvideo", "HunyuanVideo", ("HunyuanVideoTransformer3DModel",), "dit", True,
           ("transformer_blocks", "single_transformer_blocks"), "last",
           _grid_5d(lambda c: (c.patch_size_t, c.patch_size, c.patch_size)), ("HunyuanVideoPipeline",)),
)}

# Pipeline component names that hold denoisers, in the order pipelines call them.
DENOISER_COMPONENTS = ("unet", "transformer", "transformer_2")


def supported() -> str:
    return "; ".join(f"{f.name} ({f.label}: {', '.join(f.classes)})" for f in FAMILIES.values())


def family_of(module: torch.nn.Module) -> Family:
    """The family of a denoiser module, or UnsupportedModelError listing what is supported."""
    names = {c.__name__ for c in type(module).__mro__}
    for fam in FAMILIES.values():
        if names.intersection(fam.classes):
            if fam.name in ("sd15", "sdxl"):
                is_xl = getattr(module.config, "addition_embed_type", None) == "text_time"
                return FAMILIES["sdxl" if is_xl else "sd15"]
            return fam
    raise UnsupportedModelError(
        f"{type(module).__name__} is not a supported denoiser. Supported families: {supported()}. "
        "Pass a diffusers pipeline or its unet/transformer.")


def denoisers_of(target) -> list[tuple[str, torch.nn.Module]]:
    """(component name, module) for every denoiser in a pipeline, or [("", module)] for a bare denoiser."""
    import torch

    if isinstance(target, torch.nn.Module):
        family_of(target)  # raises with the supported list
        return [("", target)]
    components = getattr(target, "components", None)
    if not isinstance(components, dict):
        raise UnsupportedModelError(
            f"{type(target).__name__} is neither a diffusers pipeline nor a denoiser module. "
            f"Supported families: {supported()}.")
    found = [(n, components[n]) for n in DENOISER_COMPONENTS if isinstance(components.get(n), torch.nn.Module)]
    if not found:
        raise UnsupportedModelError(
            f"{type(target).__name__} has no unet or transformer component. Supported families: {supported()}.")
    for _, m in found:
        family_of(m)
    return found


@functools.lru_cache(maxsize=None)
def forward_params(cls) -> tuple[str, ...]:
    """The names of ``cls.forward``'s parameters (without self). Look them up once, outside a
    compiled forward: inspecting a signature there is a graph break."""
    params = list(inspect.signature(cls.forward).parameters)
    return tuple(params[1:])  # drop self


def bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    """Name a forward call's positional arguments with ``names`` (from `forward_params`)."""
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


def bind_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """Name a forward call's positional arguments, so families read inputs by name."""
    return bind(forward_params(type(module)), args, kwargs)


class Adapter:
    """A family bound to one denoiser instance."""

    def __init__(self, module: torch.nn.Module, component: str = ""):
        self.module = module
        self.component = component
        self.family = family_of(module)

    def __repr__(self):
        return f"Adapter({self.family.name}, {type(self.module).__name__}, component={self.component!r})"

    # --- structure ----------------------------------------------------------------------------
    def blocks(self) -> list[tuple[str, torch.nn.Module]]:
        """Transformer blocks in execution order (DiT stacks; UNet BasicTransformerBlocks down, mid, up)."""
        if self.family.kind == "dit":
            out = []
            for stack in self.family.block_stacks:
                for i, b in enumerate(getattr(self.module, stack, None) or ()):
                    out.append((f"{stack}.{i}", b))
            return out
        return [(n, m) for n, m in _unet_ordered(self.module) if type(m).__name__ == "BasicTransformerBlock"]

    def stages(self) -> list[tuple[str, torch.nn.Module, bool]]:
        """The denoiser's sequential stages, in execution order, to split it into components.

        (name, module, skip): DiT blocks; a UNet's ``conv_in``, the resnets, attentions and resamplers of
        its down and up blocks, and its mid block (a UNet block is too coarse a unit: one up block can
        hold a quarter of the work). ``skip`` marks a stage whose output is also read by later stages
        than the next one (a UNet's skip connections: ``conv_in`` and each down block's outputs).
        Everything outside the stages (embeddings, the blocks' concatenations, final norm and
        projection) is cheap and runs wherever the denoiser runs.
        """
        if self.family.kind == "dit":
            return [(n, m, False) for n, m in self.blocks()]
        m = self.module
        out = [("conv_in", m.conv_in, True)]
        for i, b in enumerate(m.down_blocks):
            out += _block_stages(f"down_blocks.{i}", b, True)
        if getattr(m, "mid_block", None) is not None:
            out.append(("mid_block", m.mid_block, False))
        for i, b in enumerate(m.up_blocks):
            out += _block_stages(f"up_blocks.{i}", b, False)
        return out

    def attention(self) -> list[AttentionSite]:
        """Attention modules in execution order with their roles."""
        sites = []
        modules = _unet_ordered(self.module) if self.family.kind == "unet" else self._dit_ordered()
        for name, m in modules:
            if not hasattr(m, "processor") or not hasattr(m, "set_processor"):
                continue
            sites.append(AttentionSite(name, m, self._role(name, m), len(sites)))
        return sites

    def _dit_ordered(self):
        for stack_name, block in self.blocks():
            for n, m in block.named_modules():
                if n:
                    yield f"{stack_name}.{n}", m

    def _role(self, name: str, m) -> str:
        leaf = name.rsplit(".", 1)[-1]
        if self.family.kind == "unet":
            if ".motion_modules." in f".{name}":
                return "temporal"
            return "cross" if getattr(m, "is_cross_attention", leaf == "attn2") else "self"
        is_cross = getattr(m, "is_cross_attention", None)
        if is_cross if is_cross is not None else leaf == "attn2":
            return "cross"
        if leaf == "attn2":  # SD3.5's second, image-only attention in a joint block
            return "self"
        if self.family.text_position is not None:
            return "joint"
        return "self"

    # --- per-call facts -----------------------------------------------------------------------
    def grid(self, inputs: dict) -> tuple[int, int, int]:
        """Token grid (frames, height, width) of this call, at the denoiser's top resolution."""
        return tuple(int(v) for v in self.family.grid(self.module, inputs))

    def text_len(self, inputs: dict) -> int:
        ehs = inputs.get("encoder_hidden_states")
        return int(ehs.shape[1]) if getattr(ehs, "ndim", 0) == 3 else 0

    def batch_size(self, inputs: dict) -> int:
        x = inputs.get("sample", inputs.get("hidden_states"))
        return int(x.shape[0]) if getattr(x, "ndim", 0) >= 1 else 0

    def grid_for_tokens(self, grid: tuple[int, int, int], n_tokens: int) -> tuple[int, int, int]:
        """The grid of a UNet level holding ``n_tokens`` per frame (each level halves H and W).

        Odd sizes round up at each downsampling, as the UNet's strided convolutions do.
        """
        f, h, w = grid
        while h * w > n_tokens and h > 1:
            h, w = (h + 1) // 2, (w + 1) // 2
        if h * w != n_tokens:
            raise ValueError(f"{n_tokens} tokens do not match any level of grid {grid}")
        return (f, h, w)


def _block_stages(prefix: str, block: torch.nn.Module, down: bool) -> list[tuple[str, torch.nn.Module, bool]]:
    """A UNet block's submodules in the order its forward runs them: (resnet, attention) pairs, then the
    resampler; in a down block each pair's last module and the resampler are skip connections."""
    resnets, attentions = list(block.resnets), list(getattr(block, "attentions", None) or ())
    out = []
    for j, resnet in enumerate(resnets):
        out.append((f"{prefix}.resnets.{j}", resnet, down and j >= len(attentions)))
        if j < len(attentions):
            out.append((f"{prefix}.attentions.{j}", attentions[j], down))
    for kind in ("downsamplers", "upsamplers"):
        for j, sampler in enumerate(getattr(block, kind, None) or ()):
            out.append((f"{prefix}.{kind}.{j}", sampler, down))
    return out


def _unet_ordered(module):
    """UNet submodules in execution order: registration order puts mid_block after up_blocks in some models."""
    rank = {"conv_in": 0, "time_embedding": 0, "down_blocks": 1, "mid_block": 2, "up_blocks": 3}
    items = [(n, m) for n, m in module.named_modules() if n]
    return sorted(items, key=lambda nm: rank.get(nm[0].split(".", 1)[0], 4))  # stable within a part


def block_io(block: torch.nn.Module) -> tuple[int, int | None] | None:
    """Where a DiT block returns its image and text streams: (hidden index, encoder index or None).

    A block returning a bare tensor has (0, None). Read from diffusers' own block registry (the
    one its cache hooks use), so a new diffusers block class is covered when diffusers registers
    it; None for a block class it does not know.
    """
    from diffusers.hooks._helpers import TransformerBlockRegistry

    try:
        meta = TransformerBlockRegistry.get(type(block))
    except ValueError:
        return None
    return (meta.return_hidden_states_index, meta.return_encoder_hidden_states_index)
