"""Attribute checker: does a generated picture (or clip) show what its prompt asked for?

Deliberately simple, so that a score means something without a learned judge:

* background: a plane per colour channel fitted to the border pixels (plain and gradient
  backgrounds fit exactly; textures are low-amplitude), foreground = pixels far from it;
* objects: connected components of the foreground, biggest first, read left to right;
* colour: the median colour of an object's core pixels, nearest of `shapes.COLOURS`;
* shape: the object's outline at half its contrast, matched by intersection-over-union against a
  template of every shape in `shapes.SHAPES` placed on its centroid, sized from its area, sharp or
  blurred as much as a soft generated picture is (`shape_scores`);
* motion direction: the track of the foreground centroid over frames, fitted with a line.

Inputs are float arrays in [0, 1], channels last: (H, W, 3) images, (F, H, W, 3) clips.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from . import data as S

FOREGROUND_DISTANCE = 0.2  # RGB distance in [0, 1] units from the fitted background


def _border(h: int, w: int, width: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[:width], m[-width:], m[:, :width], m[:, -width:] = True, True, True, True
    return m


def background_model(img: np.ndarray, border: int = 2) -> np.ndarray:
    """The fitted background (H, W, 3): a least-squares plane per channel over the border."""
    h, w, _ = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    design = np.stack([np.ones_like(xx), xx / w, yy / h], -1)
    keep = _border(h, w, border)
    a, b = design[keep], img[keep].astype(np.float64)
    for _ in range(2):  # refit without border pixels a shape overlaps
        coef, *_ = np.linalg.lstsq(a, b, rcond=None)
        resid = np.linalg.norm(a @ coef - b, axis=1)
        ok = resid < max(np.percentile(resid, 80) * 2, 0.05)
        a, b = a[ok], b[ok]
    return design @ coef


def foreground(img: np.ndarray, threshold: float = FOREGROUND_DISTANCE) -> tuple[np.ndarray, np.ndarray]:
    """(mask, distance): pixels farther than ``threshold`` from the fitted background."""
    dist = np.linalg.norm(img.astype(np.float64) - background_model(img), axis=-1)
    return dist > threshold, dist


def components(mask: np.ndarray, min_pixels: int = 6) -> list[np.ndarray]:
    """Connected components (8-neighbourhood) of ``mask``, biggest first, small specks dropped."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    big = h * w + 1
    while True:
        # Each foreground pixel takes the smallest label among its neighbours until nothing changes.
        padded = np.pad(np.where(mask, labels, big), 1, constant_values=big)
        neigh = np.min([padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
                        for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)  # fmt: skip
        new = np.where(mask, np.minimum(labels, neigh), 0)
        if np.array_equal(new, labels):
            break
        labels = new
    ids, counts = np.unique(labels[mask], return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return [labels == ids[i] for i in order if counts[i] >= min_pixels]


def nearest_colour(rgb) -> str:
    rgb = np.asarray(rgb, np.float64)
    names = list(S.COLOURS)
    table = np.array([S.COLOURS[n] for n in names], np.float64) / 255.0
    return names[int(np.argmin(np.linalg.norm(table - rgb, axis=1)))]


def object_colour(img: np.ndarray, mask: np.ndarray, dist: np.ndarray) -> str:
    """Named colour of an object: median of its pixels farthest from the background (its core)."""
    d = dist[mask]
    core = mask & (dist >= np.percentile(d, 50))
    return nearest_colour(np.median(img[core], axis=0))


# Generated pictures are softer than renders. A blurred shape's half-level outline has rounded
# corners, thinner points and a smaller hole, so every template is also tried blurred by these
# Gaussian radii (pixels) and cut at half level, at a few scales around the size the object's area
# implies, and the best fit counts. Sharp renders still match their own template exactly.
_BLURS = (0.0, 1.0, 1.5, 2.0)
_SCALES = (0.85, 0.92, 1.0, 1.08, 1.16)


@functools.lru_cache(maxsize=1)
def _unit_shapes() -> dict[str, tuple[float, float, float]]:
    """(area, centroid x, centroid y) of every shape at radius 1 around the origin."""
    out = {}
    ys, xs = np.mgrid[0:256, 0:256] + 0.5
    for s in S.SHAPES:
        m = S.shape_mask(s, 256, 128, 128, 100).astype(np.float64)
        out[s] = (m.sum() / 1e4, ((xs * m).sum() / m.sum() - 128) / 100, ((ys * m).sum() / m.sum() - 128) / 100)
    return out


@functools.lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) Gaussian blur along one axis, zero outside (callers leave a margin)."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    k = np.exp(-0.5 * (d / sigma) ** 2) * (np.abs(d) <= 3 * sigma + 0.5)
    return k / k.sum(1, keepdims=True).max()


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """Intersection-over-union of the object's mask (at the picture's resolution) with the best-fitting
    template of every shape: centred on the object's centroid, sized from its area, sharp or blurred."""
    m = mask > 0.5
    ys, xs = np.nonzero(m)
    cx, cy, area = xs.mean() + 0.5, ys.mean() + 0.5, float(len(xs))
    units = _unit_shapes()
    # Work in a window that holds every candidate template and its blur.
    reach = 1.2 * max(_SCALES) * max((area / u[0]) ** 0.5 for u in units.values()) + 3 * max(_BLURS) + 2
    x0, y0 = int(min(cx - reach, xs.min())) - 1, int(min(cy - reach, ys.min())) - 1
    n = int(2 * reach + max(xs.max() - xs.min(), ys.max() - ys.min())) + 4
    obs = np.zeros((n, n), bool)
    obs[ys - y0, xs - x0] = True
    blurs = [_blur_matrix(n, sigma) for sigma in _BLURS if sigma]
    scores = {}
    for name, (unit_area, ox, oy) in units.items():
        r0, best = (area / unit_area) ** 0.5, 0.0
        for k in _SCALES:
            r = r0 * k
            cover = S.shape_mask(name, n, cx - x0 - ox * r, cy - y0 - oy * r, r)
            for t in (cover, *(b @ cover @ b.T for b in blurs)):
                t = t >= 0.5
                best = max(best, (t & obs).sum() / max((t | obs).sum(), 1))
        scores[name] = float(best)
    return scores


def half_level(comp: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """The part of a component at least half as far from the background as its core: the outline a
    blurred object's fixed-threshold mask fattens (and whose ring hole it fills)."""
    half = comp & (dist >= 0.5 * np.percentile(dist[comp], 90))
    return half if half.sum() >= 3 else comp


def classify_shape(mask: np.ndarray) -> str:
    scores = shape_scores(mask)
    return max(scores, key=scores.get)


@dataclasses.dataclass
class Found:
    colour: str
    shape: str
    x: float  # centroid, fraction of the width
    y: float
    pixels: int


def detect(img: np.ndarray, max_objects: int = 3) -> list[Found]:
    """The biggest ``max_objects`` objects in the picture, left to right."""
    img = np.asarray(img, np.float32)[..., :3]
    mask, dist = foreground(img)
    h, w = mask.shape
    found = []
    for comp in components(mask)[:max_objects]:
        ys, xs = np.nonzero(comp)
        shape = classify_shape(half_level(comp, dist))
        found.append(Found(object_colour(img, comp, dist), shape, xs.mean() / w, ys.mean() / h, len(xs)))
    return sorted(found, key=lambda f: f.x)


def check_scene(img: np.ndarray, scene: S.Scene) -> list[dict[str, bool]]:
    """Per requested object (left to right): was its colour / shape found in its place?"""
    wanted = sorted(scene.shapes, key=lambda s: s.x)
    found = detect(img, max_objects=len(wanted))
    if len(found) != len(wanted):
        return [{"colour": False, "shape": False} for _ in wanted]
    return [{"colour": f.colour == s.colour, "shape": f.shape == s.shape} for f, s in zip(found, wanted, strict=True)]


def score_images(images, scenes) -> dict[str, float]:
    """Colour and shape accuracy over all requested objects of all scenes."""
    results = [r for img, sc in zip(images, scenes, strict=True) for r in check_scene(np.asarray(img), sc)]
    n = max(len(results), 1)
    return {"colour": sum(r["colour"] for r in results) / n, "shape": sum(r["shape"] for r in results) / n,
            "objects": len(results)}


def track(frames: np.ndarray) -> np.ndarray:
    """Centroid (x, y) in pixels of the biggest object in each frame; NaN where none is found."""
    out = []
    for f in np.asarray(frames, np.float32)[..., :3]:
        comps = components(foreground(f)[0], min_pixels=3)
        if comps:
            ys, xs = np.nonzero(comps[0])
            out.append((xs.mean(), ys.mean()))
        else:
            out.append((np.nan, np.nan))
    return np.array(out)


def motion_direction(frames: np.ndarray, min_travel: float = 0.08) -> str:
    """"left", "right", "up", "down" or "static": the dominant axis of the centroid's fitted line."""
    pts = track(frames)
    t = np.arange(len(pts), dtype=np.float64)
    ok = ~np.isnan(pts[:, 0])
    if ok.sum() < 3:
        return "static"
    slope = np.polyfit(t[ok], pts[ok], 1)[0] * (len(pts) - 1)  # travel over the clip, (dx, dy) pixels
    size = np.asarray(frames).shape[2]
    if np.abs(slope).max() < min_travel * size:
        return "static"
    dx, dy = slope
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def score_clips(videos, clips) -> dict[str, float]:
    """Motion-direction accuracy over clips whose motion is a direction."""
    pairs = [(v, c) for v, c in zip(videos, clips, strict=True) if c.motion in S.DIRECTIONS]
    hits = [motion_direction(v) == c.motion for v, c in pairs]
    return {"direction": sum(hits) / max(len(hits), 1), "clips": len(hits)}


def middle_scene(clip) -> S.Scene:
    """The clip's scene as its middle frame shows it."""
    x, y, angle = S.clip_positions(clip)[clip.frames // 2]
    s = dataclasses.replace(clip.scene.shapes[0], x=x, y=y, angle=angle)
    return dataclasses.replace(clip.scene, shapes=(s,))


def clip_verdicts(video, clip) -> dict[str, bool]:
    """The checker's verdicts on one clip: did it move as asked (direction), and does its middle frame
    show the asked colour / shape."""
    video = np.asarray(video)
    still = check_scene(video[clip.frames // 2], middle_scene(clip))[0]
    return {"direction": motion_direction(video) == clip.motion, **still}


def score_videos(videos, clips) -> dict:
    """Direction accuracy of ``videos`` (over the clips whose motion is a direction), and colour / shape
    of their middle frame."""
    found = [clip_verdicts(v, c) for v, c in zip(videos, clips, strict=True)]
    moving = [f["direction"] for f, c in zip(found, clips, strict=True) if c.motion in S.DIRECTIONS]
    n = max(len(found), 1)
    return {"direction": sum(moving) / max(len(moving), 1), "clips": len(moving),
            "colour": sum(f["colour"] for f in found) / n, "shape": sum(f["shape"] for f in found) / n}
