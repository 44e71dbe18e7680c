"""Reference models: small real diffusers pipelines trained offline on `accel.pipelines.ref.data` data.

``python -m training.train_sd`` (``train_dit``, ``train_video``, ``train_video_large``)
trains ``ref-sd`` (``ref-dit``, ``ref-video``, ``ref-video-large``) from a seed and saves it with
``save_pretrained`` (safetensors) under ``accel/pipelines/ref/weights/<name>/``, which ships with the
package; `accel.pipelines.load` finds it by name (``load("ref-sd")``, ``--model ref-sd``) or by path.
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "weights"

# name -> (what it is, the command that trains it)
MODELS: dict[str, tuple[str, str]] = {
    "ref-sd": ("StableDiffusionPipeline, 64 px, trained on procedural shapes (offline)",
               "python -m training.train_sd"),
    "ref-dit": ("FluxPipeline (MMDiT), 64 px, trained on procedural shapes (offline)",
                "python -m training.train_dit"),
    "ref-video": ("WanPipeline, 17 frames of 32 px, trained on moving procedural shapes (offline)",
                  "python -m training.train_video"),
    # 9,216 video tokens a call (9 x 32 x 32, patch 1): sized where token reduction and sparse attention
    # engage; trained in one 9-minute run on one H100/H200 (scripts/gpu_train_video_large.sh)
    "ref-video-large": ("WanPipeline, 17 frames of 64 px, 9,216 video tokens a call, trained on moving "
                        "procedural shapes on a GPU (offline)", "python -m training.train_video_large"),
}

# The call each model was trained and measured for (the pipelines' own defaults are sized for the
# released checkpoints: Wan would render 81 frames of 480x832).
_CALL_DEFAULTS: dict[str, dict] = {
    # guidance 2.0: on 60 held-out prompts (20 steps) 0.88 colour / 0.95 shape (1.5: 0.90 / 0.93; 3.0:
    # 0.85 / 0.93); docs/reference-models.md has the measurements
    "ref-sd": {"num_inference_steps": 25, "guidance_scale": 2.0, "height": 64, "width": 64},
    # FluxPipeline's true classifier-free guidance (the model has no distilled guidance embedding).
    "ref-dit": {"num_inference_steps": 20, "true_cfg_scale": 5.0, "negative_prompt": "", "height": 64, "width": 64,
                "max_sequence_length": 32},
    "ref-video": {"num_inference_steps": 25, "guidance_scale": 5.0, "height": 32, "width": 32, "num_frames": 17,
                  "max_sequence_length": 32},
    "ref-video-large": {"num_inference_steps": 20, "guidance_scale": 5.0, "height": 64, "width": 64,
                        "num_frames": 17, "max_sequence_length": 32},
}


def shipped() -> dict[str, str]:
    """Reference models whose weights are present: name -> description."""
    return {name: what for name, (what, _) in MODELS.items() if (MODELS_DIR / name / "model_index.json").is_file()}


def call_defaults(name: str) -> dict:
    """Keyword arguments for a good call of reference model ``name`` (steps, size, guidance)."""
    return dict(_CALL_DEFAULTS.get(name, {}))


def model_path(name: str) -> Path:
    """The folder of reference model ``name``; ValueError saying how to get it if it is missing."""
    if name not in MODELS:
        raise ValueError(f"unknown reference model {name!r}; reference models: {', '.join(MODELS)}")
    folder = MODELS_DIR / name
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"reference model {name!r} is not in this installation ({folder}); "
                         f"train it with `{MODELS[name][1]}`")
    return folder
