"""The procedural data and the attribute checker, on pictures whose attributes are known."""

import dataclasses

import numpy as np
import pytest

from accel.pipelines.ref import checker
from accel.pipelines.ref import data as shapes


def test_scenes_are_seeded_and_prompts_name_the_attributes():
    a = shapes.random_scene(np.random.default_rng(7), n_shapes=2)
    b = shapes.random_scene(np.random.default_rng(7), n_shapes=2)
    assert a == b
    np.testing.assert_array_equal(shapes.render(a), shapes.render(b))
    left, right = sorted(a.shapes, key=lambda s: s.x)
    assert a.prompt.startswith(f"a small {left.colour} {left.shape} left of a small {right.colour} {right.shape} on ")
    assert a.background in a.prompt


def test_training_data_never_uses_held_out_prompts():
    rng = np.random.default_rng(0)
    train = {shapes.training_scene(rng).prompt for _ in range(300)}
    held = {s.prompt for s in shapes.held_out_scenes(20)}
    assert not train & held
    assert all(shapes.is_held_out(p) for p in held)


def test_rendered_images_are_in_range_with_the_asked_background():
    scene = shapes.Scene((shapes.Shape("circle", "red", "small", 0.5, 0.5),), "gray", "plain", "center")
    img = shapes.render(scene)
    assert img.shape == (64, 64, 3) and img.dtype == np.float32
    assert img.min() >= 0 and img.max() <= 1
    np.testing.assert_allclose(img[0, 0], np.array(shapes.BACKGROUNDS["gray"]) / 255, atol=1e-6)
    np.testing.assert_allclose(img[32, 32], np.array(shapes.COLOURS["red"]) / 255, atol=1e-6)


@pytest.mark.parametrize("n_shapes", [1, 2, 3])
def test_checker_reads_back_every_attribute_of_procedural_scenes(n_shapes):
    scenes = shapes.held_out_scenes(40, seed=n_shapes, n_shapes=n_shapes)
    score = checker.score_images([shapes.render(s) for s in scenes], scenes)
    assert score == {"colour": 1.0, "shape": 1.0, "objects": 40 * n_shapes}


@pytest.mark.parametrize("style", shapes.BACKGROUND_STYLES)
@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_checker_tells_every_shape_apart_on_every_background(shape, style):
    for colour, bg in [("pink", "white"), ("purple", "gray"), ("blue", "black")]:
        scene = shapes.Scene((shapes.Shape(shape, colour, "small", 0.4, 0.6),), bg, style, texture_seed=3)
        (found,) = checker.detect(shapes.render(scene), max_objects=1)
        assert (found.shape, found.colour) == (shape, colour)
        assert abs(found.x - 0.4) < 0.03 and abs(found.y - 0.6) < 0.05


def test_checker_rejects_wrong_colour_wrong_shape_and_empty_pictures():
    scene = shapes.Scene((shapes.Shape("star", "green", "big", 0.5, 0.5),), "white", "gradient", "center")
    wrong = dataclasses.replace(scene, shapes=(shapes.Shape("square", "orange", "big", 0.5, 0.5),))
    assert checker.check_scene(shapes.render(wrong), scene) == [{"colour": False, "shape": False}]
    blank = np.full((64, 64, 3), 0.5, np.float32)
    assert checker.check_scene(blank, scene) == [{"colour": False, "shape": False}]
    # Blur and noise, as a small generator produces, do not fool it.
    img = shapes.render(scene)
    blurred = (img + np.roll(img, 1, 0) + np.roll(img, 1, 1) + np.roll(img, -1, 0) + np.roll(img, -1, 1)) / 5
    noisy = np.clip(blurred + np.random.default_rng(0).normal(0, 0.03, img.shape), 0, 1)
    assert checker.check_scene(noisy, scene) == [{"colour": True, "shape": True}]


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    from PIL import Image, ImageFilter

    u8 = Image.fromarray((img * 255).round().astype(np.uint8))
    return np.asarray(u8.filter(ImageFilter.GaussianBlur(sigma)), np.float32) / 255


@pytest.mark.parametrize("sigma", [1.0, 1.5])
def test_checker_reads_shapes_through_the_blur_of_a_soft_generated_picture(sigma):
    # A 64 px generator (or its autoencoder) draws shapes soft: corners round, star points thin, a
    # ring's hole shrinks. Matching the object's mask against sharp templates alone (the checker's first
    # version) read 6% of 100 held-out renders as other shapes at sigma 1 and 20% at sigma 1.5,
    # mostly small stars, rings and triangles as circles; the blurred templates read every one.
    scenes = shapes.held_out_scenes(40, seed=5, n_shapes=1)
    blurred = [_gaussian_blur(shapes.render(s), sigma) for s in scenes]
    assert checker.score_images(blurred, scenes) == {"colour": 1.0, "shape": 1.0, "objects": 40}


def test_blur_tolerance_does_not_make_a_blob_every_shape():
    # A heavily blurred disc stays a circle, and no shape's template wins on another shape's blur.
    for shape in shapes.SHAPES:
        scene = shapes.Scene((shapes.Shape(shape, "green", "big", 0.5, 0.5),), "white", "plain", "center")
        mask, dist = checker.foreground(_gaussian_blur(shapes.render(scene), 1.5))
        scores = checker.shape_scores(checker.half_level(checker.components(mask)[0], dist))
        assert max(scores, key=scores.get) == shape, scores
        others = [v for k, v in scores.items() if k != shape]
        assert scores[shape] - max(others) > 0.1, scores


def test_clips_move_as_their_prompts_say_and_the_checker_tracks_them():
    clips = shapes.held_out_clips(12)
    assert {c.motion for c in clips} <= set(shapes.DIRECTIONS)
    videos = [shapes.render_clip(c) for c in clips]
    assert videos[0].shape == (17, 32, 32, 3)
    assert all(f"moving {c.motion}" in c.prompt for c in clips)
    assert checker.score_clips(videos, clips) == {"direction": 1.0, "clips": 12}
    # Reversed in time, every clip reads as the opposite direction.
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    assert [checker.motion_direction(v[::-1]) for v in videos] == [opposite[c.motion] for c in clips]


def test_other_motions_render_and_a_still_clip_is_static():
    rng = np.random.default_rng(3)
    for motion in ("bouncing", "rotating", "changing"):
        clip = shapes.random_clip(rng, motions=(motion,))
        video = shapes.render_clip(clip)
        assert not np.array_equal(video[0], video[-1]), motion
        assert motion.split()[0] in clip.prompt
    still = np.repeat(shapes.render(shapes.random_scene(rng, n_shapes=1), 32)[None], 17, 0)
    assert checker.motion_direction(still) == "static"
