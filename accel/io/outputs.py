"""Writing results so that a kill at any moment leaves only whole files.

Every file is written to a hidden temporary name in the same folder and renamed into place
(``os.replace`` is atomic on one filesystem). Images are PNG or WebP; videos are H.264 MP4 in
yuv420p (what browsers play), via imageio-ffmpeg, whose wheel carries its own ffmpeg.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".mp4", ".gif")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path`` (same suffix); rename it onto ``path`` on success."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_json(path, data: dict) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    return Path(path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_image(image: np.ndarray, path) -> Path:
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"{path}: an image needs one of {', '.join(IMAGE_SUFFIXES)}")
    with atomic_path(path) as tmp:
        Image.fromarray(to_uint8(image)).save(tmp, format=_pil_format(path.suffix))
    return path


def _pil_format(suffix: str) -> str:
    return {".png": "PNG", ".webp": "WEBP", ".jpg": "JPEG", ".jpeg": "JPEG"}[suffix.lower()]


def save_video(frames: np.ndarray, path, fps: int = 8) -> Path:
    """(F, H, W, 3) in [0, 1] to MP4 (H.264, yuv420p) or GIF. Odd sizes are padded to even for H.264."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: a video needs one of {', '.join(VIDEO_SUFFIXES)}")
    data = to_uint8(frames)
    with atomic_path(path) as tmp:
        if suffix == ".gif":
            from PIL import Image

            imgs = [Image.fromarray(f) for f in data]
            imgs[0].save(tmp, format="GIF", save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
        else:
            _write_mp4(data, tmp, fps)
    return path


def _write_mp4(data: np.ndarray, path: Path, fps: int) -> None:
    try:
        import imageio_ffmpeg
    except ImportError:
        raise RuntimeError("writing MP4 needs imageio-ffmpeg: pip install 'diffusers-accel[video]' "
                           "(or give an output path ending in .gif)") from None
    h, w = data.shape[1:3]
    ph, pw = h % 2, w % 2
    if ph or pw:
        data = np.pad(data, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    writer = imageio_ffmpeg.write_frames(str(path), (w + pw, h + ph), fps=fps, codec="libx264",
                                         pix_fmt_out="yuv420p", macro_block_size=1,
                                         output_params=["-movflags", "+faststart"], ffmpeg_log_level="error")
    writer.send(None)
    for frame in data:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def save_output(frames: np.ndarray, path, fps: int = 8) -> Path:
    """An image (H, W, 3) or a video (F, H, W, 3), by the array's shape; the suffix must fit."""
    return save_video(frames, path, fps) if frames.ndim == 4 else save_image(frames, path)


def slug(text: str, max_len: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (s[:max_len].rstrip("-")) or "untitled"


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + ".json")


def check_folder(folder: Path) -> None:
    """Fail before any work, not after: ``folder`` must be a folder (or creatable as one) and writable."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OSError(f"{str(folder)!r} is a file, not a folder; give a folder (or a name not in use)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the folder {str(folder)!r}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK):
        raise OSError(f"the folder {str(folder)!r} is not writable")


def check_writable(path: Path) -> None:
    """Fail before generating, not after: the file's folder must exist (or be creatable) and be writable, and the
    path must not be a folder."""
    path = Path(path)
    if path.is_dir():
        raise OSError(f"{str(path)!r} is a folder; give a file name")
    check_folder(path.parent)


def spare_paths(path: Path) -> list[Path]:
    """Where a result goes when ``path`` cannot be written: beside it, in the current folder, in the temporary
    folder (each under a name no other process uses)."""
    import tempfile

    name = f"{path.stem}.kept-{os.getpid()}{path.suffix}"
    return [path.with_name(name), Path.cwd() / name, Path(tempfile.gettempdir()) / name]


def keep(path: Path, write, say=print) -> Path | None:
    """``write(path)``; when that fails at the end of a run (a full disk, a permission changed since the start),
    the result is not lost: ``write`` is tried on each of `spare_paths` and ``say`` gets one line naming where it
    went. Returns the path written (None: nowhere could take it, also said)."""
    path = Path(path)
    error = None
    for i, where in enumerate([path, *spare_paths(path)]):
        try:
            write(where)
        except OSError as e:
            error = error or e
            continue
        if i:
            say(f"accel: could not write {str(path)!r} ({error.strerror or error}); wrote it to {str(where)!r}")
        return where
    say(f"accel: could not write {str(path)!r} ({error.strerror or error}), nor beside it, in the current folder "
        "or in the temporary folder")
    return None


def keep_text(path: Path, text: str, say=print) -> Path | None:
    """`keep` for a text result (a report, a config): written atomically, else printed to standard output."""

    def write(where):
        with atomic_path(where) as tmp:
            tmp.write_text(text)

    where = keep(path, write, say)
    if where is None:
        say("accel: here it is, on standard output:")
        print(text)
    return where
