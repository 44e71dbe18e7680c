"""What the app's server reads and serves: files in the output folder, nothing else.

Gradio serves a file when it is in ``allowed_paths`` (the output folder) or in folders it counts as its
own: its cache (``GRADIO_TEMP_DIR``, by default a folder under the system temp directory that every
gradio app on the machine shares) and its examples cache (``GRADIO_EXAMPLES_CACHE``, by default under
the current directory). It also copies every output it shows into that cache. `own_cache` points both
at ``OUT_DIR/.gradio-cache``, emptied when an app is built, so every file the server can serve is
inside the output folder and no copy outlives the next start.

The page takes no files, so `RefuseUploads` (an ASGI middleware) answers 403 to every request that
brings one (``/gradio_api/upload``, ``/gradio_api/process_recording``, any multipart body), and to a
``/gradio_api/file=`` that names a URL (gradio would fetch it for the caller).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

CACHE = ".gradio-cache"
# gradio's routes that store a file a request brings (under its API prefix, /gradio_api)
UPLOAD_ROUTES = ("/gradio_api/upload", "/gradio_api/process_recording")
FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/")
NO_UPLOADS = "this app takes no file uploads"


def own_cache(out_dir: str | os.PathLike) -> Path:
    """Make ``out_dir/.gradio-cache`` gradio's cache, emptied first; returns it.

    Call it before the ``gr.Blocks`` is built (its components copy their files into the cache then).
    """
    cache = Path(out_dir).resolve() / CACHE
    if cache.is_symlink() or cache.is_file():
        cache.unlink()
    elif cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True)
    use_cache(cache)
    return cache


def use_cache(cache: Path) -> None:
    """Point gradio's cache and examples cache at ``cache`` (gradio reads both from the environment when it
    builds a component and when it launches, so one process serves one app's cache)."""
    os.environ["GRADIO_TEMP_DIR"] = str(cache)
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(cache / "examples")


def refused(path: str, headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why a request is refused (None: it is not): it brings a file, or asks ``/file=`` for a URL."""
    if path.rstrip("/").endswith(UPLOAD_ROUTES):
        return NO_UPLOADS
    content_type = dict(headers).get(b"content-type", b"").decode("latin-1").lower()
    if content_type.startswith("multipart/"):
        return NO_UPLOADS
    for prefix in FILE_ROUTES:
        _, found, rest = path.partition(prefix)
        if found and re.match(r"[a-z][a-z0-9+.-]*:", rest, re.IGNORECASE):
            return "this app serves files from its output folder only"
    return None


class RefuseUploads:
    """ASGI middleware: answers 403 with the reason to what `refused` refuses, passes the rest on."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        reason = refused(scope["path"], scope["headers"]) if scope["type"] == "http" else None
        if reason is None:
            return await self.app(scope, receive, send)
        body = reason.encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
