"""Procedural training and evaluation data: coloured shapes, their prompts, and moving-shape videos.

Everything is drawn from a seed, on the fly, with numpy: 1-3 shapes (``SHAPES``) in named colours
(``COLOURS``), two sizes, at named positions, on plain, gradient or textured backgrounds. Each
`Scene` knows its attributes, so the prompt is built from them ("a small red circle left of a
blue square on a gray background") and the attribute checker (`accel.pipelines.ref.checker`) can score a
generated picture against the prompt that asked for it. `Clip` adds motion over ``frames`` frames:
moving left/right/up/down, bouncing, rotating or changing colour.

Held-out prompts: `is_held_out(prompt)` marks a fixed tenth of all prompts (by a stable hash);
training samplers skip them, so evaluation prompts are never seen verbatim in training.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np

# Shape colours are far apart in RGB and from every background colour, so a nearest-colour rule
# reads them back from a blurry 64 px picture.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    "orange": (245, 135, 25),
    "purple": (135, 50, 185),
    "pink": (245, 135, 195),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235), "gray": (125, 125, 125), "black": (22, 22, 22)
}
BACKGROUND_STYLES = ("plain", "gradient", "textured")
SHAPES = ("circle", "square", "triangle", "star", "ring")
SIZES = {"small": 0.13, "big": 0.24}  # radius as a fraction of the image side
# Single-shape positions (x, y) as fractions of the side.
POSITIONS = {"center": (0.5, 0.5), "left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72)}
_POSITION_WORDS = {"center": "in the center", "left": "on the left", "right": "on the right",
                   "top": "at the top", "bottom": "at the bottom"}
MOTIONS = ("left", "right", "up", "down", "bouncing", "rotating", "changing")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

VOCABULARY = sorted(
    set(COLOURS) | set(BACKGROUNDS) | set(SHAPES) | set(SIZES) | set(POSITIONS)
    | set(" ".join(_POSITION_WORDS.values()).split())
    | set("a an and of on the background gradient textured moving bouncing rotating changing colour from to "
          "up down left right in place".split())
)


@dataclasses.dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str
    x: float  # centre, fraction of the side
    y: float
    angle: float = 0.0  # radians, counter-clockwise


@dataclasses.dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str
    style: str = "plain"
    position: str | None = None  # the named position of a single shape
    texture_seed: int = 0

    @property
    def prompt(self) -> str:
        return scene_prompt(self)


@dataclasses.dataclass(frozen=True)
class Clip:
    scene: Scene  # the first frame
    motion: str
    frames: int = 17
    to_colour: str | None = None  # for motion == "changing"

    @property
    def prompt(self) -> str:
        s = self.scene.shapes[0]
        what = f"a {s.colour} {s.shape}"
        how = {"bouncing": "bouncing", "rotating": "rotating in place",
               "changing": f"changing colour from {s.colour} to {self.to_colour}"}
        how = how.get(self.motion, f"moving {self.motion}")
        if self.motion == "changing":
            what = f"a {s.shape}"
        return f"{what} {how} on {_background_words(self.scene)}"


def _background_words(scene: Scene) -> str:
    style = {"plain": "", "gradient": " gradient", "textured": " textured"}[scene.style]
    return f"a {scene.background}{style} background"


def _object_words(s: Shape) -> str:
    return f"a {s.size} {s.colour} {s.shape}"


def scene_prompt(scene: Scene) -> str:
    objs = sorted(scene.shapes, key=lambda s: s.x)
    if len(objs) == 1:
        where = f" {_POSITION_WORDS[scene.position]}" if scene.position else ""
        body = f"{_object_words(objs[0])}{where}"
    elif len(objs) == 2:
        body = f"{_object_words(objs[0])} left of {_object_words(objs[1])}"
    else:
        body = ", ".join(_object_words(s) for s in objs[:-1]) + f" and {_object_words(objs[-1])}"
    return f"{body} on {_background_words(scene)}"


def is_held_out(prompt: str) -> bool:
    """A fixed tenth of prompts, chosen by a stable hash, never used in training."""
    return zlib.crc32(prompt.encode()) % 10 == 0


# ---------------------------------------------------------------------------
# Sampling scenes
# ---------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def random_scene(rng: np.random.Generator, n_shapes: int | None = None, style: str | None = None) -> Scene:
    """A scene of 1-3 shapes (mostly one), left to right when several."""
    if n_shapes is None:
        n_shapes = int(rng.choice([1, 2, 3], p=[0.7, 0.2, 0.1]))
    background = _pick(rng, BACKGROUNDS)
    style = style or _pick(rng, BACKGROUND_STYLES)
    colours = rng.permutation(list(COLOURS))[:n_shapes] if n_shapes > 1 else [_pick(rng, COLOURS)]
    shapes, position = [], None
    if n_shapes == 1:
        position = _pick(rng, POSITIONS)
        x, y = POSITIONS[position]
        shapes.append(Shape(_pick(rng, SHAPES), str(colours[0]), _pick(rng, SIZES), x, y))
    else:
        xs = [0.3, 0.7] if n_shapes == 2 else [0.18, 0.5, 0.82]
        for i in range(n_shapes):
            shapes.append(Shape(_pick(rng, SHAPES), str(colours[i]), "small", float(xs[i]), 0.5))
    return Scene(tuple(shapes), background, style, position, int(rng.integers(1 << 30)))


def training_scene(rng: np.random.Generator, **kwargs) -> Scene:
    """A random scene whose prompt is not held out."""
    while True:
        scene = random_scene(rng, **kwargs)
        if not is_held_out(scene.prompt):
            return scene


def held_out_scenes(n: int, seed: int = 1234, n_shapes: int = 1) -> list[Scene]:
    """``n`` scenes with distinct held-out prompts (the evaluation set)."""
    rng, seen, out = np.random.default_rng(seed), set(), []
    while len(out) < n:
        scene = random_scene(rng, n_shapes=n_shapes)
        if is_held_out(scene.prompt) and scene.prompt not in seen:
            seen.add(scene.prompt)
            out.append(scene)
    return out


def random_clip(rng: np.random.Generator, frames: int = 17, motions=MOTIONS) -> Clip:
    background = _pick(rng, BACKGROUNDS)
    style = _pick(rng, BACKGROUND_STYLES)
    motion = _pick(rng, motions)
    colour = _pick(rng, COLOURS)
    shape = Shape(_pick(rng, SHAPES), colour, "big", 0.5, 0.5)
    start = {"left": (0.65, 0.5), "right": (0.35, 0.5), "up": (0.5, 0.65), "down": (0.5, 0.35)}
    if motion in start:
        # Start point jitter along the other axis, so the data is not one fixed path per direction.
        x, y = start[motion]
        j = float(rng.uniform(-0.1, 0.1))
        vertical = motion in ("up", "down")
        shape = dataclasses.replace(shape, x=x + j * vertical, y=y + j * (not vertical))
    elif motion == "bouncing":
        shape = dataclasses.replace(shape, x=float(rng.uniform(0.3, 0.7)), y=float(rng.uniform(0.3, 0.7)))
    to = _pick(rng, [c for c in COLOURS if c != colour]) if motion == "changing" else None
    return Clip(Scene((shape,), background, style, None, int(rng.integers(1 << 30))), motion, frames, to)


def training_clip(rng: np.random.Generator, **kwargs) -> Clip:
    while True:
        clip = random_clip(rng, **kwargs)
        if not is_held_out(clip.prompt):
            return clip


def held_out_clips(n: int, seed: int = 4321, motions=tuple(DIRECTIONS), frames: int = 17) -> list[Clip]:
    rng, seen, out = np.random.default_rng(seed), set(), []
    for _ in range(100000):
        clip = random_clip(rng, frames=frames, motions=motions)
        if is_held_out(clip.prompt) and clip.prompt not in seen:
            seen.add(clip.prompt)
            out.append(clip)
            if len(out) == n:
                return out
    raise ValueError(f"only {len(out)} distinct held-out clips exist for motions {motions}; ask for fewer")


# ---------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------

_SUPERSAMPLE = 4


def _polygon(kind: str) -> np.ndarray:
    """Vertices on the unit circle scale, pointing up (y grows downwards in images)."""
    if kind == "square":
        return np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]])
    if kind == "triangle":
        a = np.deg2rad([-90, 30, 150])
        return np.stack([np.cos(a), np.sin(a)], 1) + np.array([0.0, 0.15])
    if kind == "star":
        a = np.deg2rad(-90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.05, 0.45)
        return np.stack([np.cos(a) * r, np.sin(a) * r], 1)
    raise ValueError(kind)


def _inside_polygon(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    inside = np.zeros(px.shape, bool)
    n = len(verts)
    for i in range(n):
        (x1, y1), (x2, y2) = verts[i], verts[(i + 1) % n]
        crosses = (y1 > py) != (y2 > py)
        xint = (x2 - x1) * (py - y1) / (y2 - y1 + 1e-12) + x1
        inside ^= crosses & (px < xint)
    return inside


def shape_mask(shape: str, size: int, cx: float, cy: float, radius: float, angle: float = 0.0) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape on a ``size`` x ``size`` grid (pixel units)."""
    out = np.zeros((size, size), np.float32)
    # Only the shape's bounding window is sampled (the star reaches 1.05 radii).
    x0, x1 = max(int(cx - 1.1 * radius) - 1, 0), min(int(cx + 1.1 * radius) + 2, size)
    y0, y1 = max(int(cy - 1.1 * radius) - 1, 0), min(int(cy + 1.1 * radius) + 2, size)
    if x0 >= x1 or y0 >= y1:
        return out
    ss = _SUPERSAMPLE
    px, py = np.meshgrid(x0 + (np.arange((x1 - x0) * ss) + 0.5) / ss, y0 + (np.arange((y1 - y0) * ss) + 0.5) / ss)
    dx, dy = (px - cx) / radius, (py - cy) / radius
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx - s * dy, s * dx + c * dy
    if shape == "circle":
        m = u * u + v * v <= 1.0
    elif shape == "ring":
        d2 = u * u + v * v
        m = (d2 <= 1.0) & (d2 >= 0.55**2)
    elif shape in ("square", "triangle", "star"):
        m = _inside_polygon(u, v, _polygon(shape))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    out[y0:y1, x0:x1] = m.reshape(y1 - y0, ss, x1 - x0, ss).mean((1, 3))
    return out


def _background(scene: Scene, size: int) -> np.ndarray:
    base = np.array(BACKGROUNDS[scene.background], np.float32) / 255.0
    img = np.broadcast_to(base, (size, size, 3)).copy()
    rng = np.random.default_rng(scene.texture_seed)
    g = np.linspace(-1, 1, size, dtype=np.float32)
    if scene.style == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        ramp = math.cos(theta) * g[None, :] + math.sin(theta) * g[:, None]
        img += 0.09 * ramp[..., None]
    elif scene.style == "textured":
        # Low-amplitude stripes plus blocky noise: visible texture, far from any shape colour.
        f = rng.uniform(3, 7)
        theta = rng.uniform(0, math.pi)
        stripes = np.sin(f * math.pi * (math.cos(theta) * g[None, :] + math.sin(theta) * g[:, None]))
        blocks = rng.uniform(-1, 1, (size // 8, size // 8)).repeat(8, 0).repeat(8, 1)
        img += (0.04 * stripes + 0.025 * blocks)[..., None]
    return img


def render(scene: Scene, size: int = 64, colour_override: dict[int, tuple] | None = None) -> np.ndarray:
    """The scene as float32 RGB in [0, 1], shape (size, size, 3)."""
    img = _background(scene, size)
    for i, s in enumerate(scene.shapes):
        rgb = np.array(COLOURS[s.colour], np.float32) / 255.0
        if colour_override and i in colour_override:
            rgb = np.asarray(colour_override[i], np.float32)
        m = shape_mask(s.shape, size, s.x * size, s.y * size, SIZES[s.size] * size, s.angle)[..., None]
        img = img * (1 - m) + rgb * m
    return np.clip(img, 0.0, 1.0)


def clip_positions(clip: Clip) -> list[tuple[float, float, float]]:
    """(x, y, angle) of the shape in each frame."""
    s, n = clip.scene.shapes[0], clip.frames
    out = []
    for t in range(n):
        a = t / max(n - 1, 1)
        if clip.motion in DIRECTIONS:
            dx, dy = DIRECTIONS[clip.motion]
            out.append((s.x + 0.3 * a * dx, s.y + 0.3 * a * dy, 0.0))
        elif clip.motion == "bouncing":
            # A vertical bounce: falls, hits the floor, rises again.
            floor, top = 0.7, 0.3
            h = abs(math.cos(math.pi * a * 1.5))
            out.append((s.x, floor - (floor - top) * h, 0.0))
        elif clip.motion == "rotating":
            out.append((s.x, s.y, 2 * math.pi / 5 * a * 1.5))  # visible for every shape but the circle
        else:
            out.append((s.x, s.y, 0.0))
    return out


def render_clip(clip: Clip, size: int = 32) -> np.ndarray:
    """The clip as float32 RGB in [0, 1], shape (frames, size, size, 3)."""
    s0 = clip.scene.shapes[0]
    frames = []
    for t, (x, y, angle) in enumerate(clip_positions(clip)):
        scene = dataclasses.replace(clip.scene, shapes=(dataclasses.replace(s0, x=x, y=y, angle=angle),))
        override = None
        if clip.motion == "changing":
            a = t / max(clip.frames - 1, 1)
            c0, c1 = (np.array(COLOURS[c], np.float32) / 255.0 for c in (s0.colour, clip.to_colour))
            override = {0: tuple((1 - a) * c0 + a * c1)}
        frames.append(render(scene, size, override))
    return np.stack(frames)


def image_batch(rng: np.random.Generator, n: int, size: int = 64) -> tuple[np.ndarray, list[str]]:
    """``n`` training images (N, size, size, 3) in [0, 1] and their prompts."""
    scenes = [training_scene(rng) for _ in range(n)]
    return np.stack([render(s, size) for s in scenes]), [s.prompt for s in scenes]


def clip_batch(rng: np.random.Generator, n: int, size: int = 32, frames: int = 17) -> tuple[np.ndarray, list[str]]:
    clips = [training_clip(rng, frames=frames) for _ in range(n)]
    return np.stack([render_clip(c, size) for c in clips]), [c.prompt for c in clips]
