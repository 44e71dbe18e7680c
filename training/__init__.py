"""Trainers of the built-in reference models (`accel.pipelines.ref`) and the GPU judge of the video presets.

They live outside the installed package: run them from a checkout, e.g. ``python -m training.train_sd``
(see each module's docstring and `scripts/gpu_train_video_large.sh`). The models' data, checker, names,
call defaults and weights are in `accel.pipelines.ref`.
"""
