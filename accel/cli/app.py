"""`accel app`: the web app's command; the app is `accel.web`."""

from __future__ import annotations

import errno
import importlib.util
import socket

from ..config import DEFAULT_PRESET
from ..layering import layered, parallel_config, read_sections
from ..pipelines.load import DEFAULT_MODEL, quiet_loading
from ..web.controls import CONFIG_PRESET
from ..web.limits import FLAGS, Limits
from .args import UsageError, check_approx_dir, check_output, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("app", help="web app: generate, and compare accelerated against the baseline")
    p.add_argument("--model", default=None, help=f"hub id, local folder or built-in name (default {DEFAULT_MODEL})")
    p.add_argument("--gpus", type=positive_int, default=1,
                   help="load one pipeline per GPU; the queue runs one request per GPU at a time")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=positive_int, default=7860)
    p.add_argument("--out-dir", default="outputs/app", help="outputs, sidecars and configs; the only folder served")
    p.add_argument("--allow-model-paths", action="store_true",
                   help="let the page load other models (hub ids, local folders); off by default")
    p.add_argument("--limits", default=None, help="limits file (.json/.yaml/.toml) with the --max-* fields")
    for flag, name in FLAGS.items():
        p.add_argument(flag, type=positive_int, default=None, dest=name,
                       help=f"{Limits.field_help()[name]} (default {getattr(Limits(), name)})")
    p.add_argument("--approx-cache", default=None, metavar="DIR",
                   help="approximate cache folder (NIRVANA): Generate starts a prompt close to an earlier one from "
                        "its stored latent and skips its first steps (Compare runs without it)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="acceleration config file (.yaml/.json/.toml, e.g. from accel tune, or an output's sidecar): "
                        f"offered as preset '{CONFIG_PRESET}', which the page and the API start from")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if present)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    p.add_argument("--parallel", default=None, metavar="FIELD=VALUE,...",
                   help="serve one pipeline on a parallel worker group, e.g. cfg=2 (accel.ParallelConfig): spawns "
                        "the degrees' product of processes; rank 0 serves the page, the others follow")
    p.set_defaults(func=cmd_app)


def app_config(args) -> dict | None:
    """The cache/tokens/attention sections of ``--config`` (None without one); a bad file raises the same
    one-line error as `accel generate --config`."""
    if not getattr(args, "config", None):
        return None
    sections = read_sections(args.config, [])[1]
    layered(DEFAULT_PRESET, sections, None)  # a bad field is refused now, not on the first run
    return sections


def limits_from_args(args) -> Limits:
    base = Limits.load(args.limits) if args.limits else Limits()
    changes = {name: getattr(args, name) for name in FLAGS.values() if getattr(args, name, None) is not None}
    return base.replace(**changes) if changes else base


def check_port(host: str, port: int) -> None:
    """Refuse, before anything loads, an address the server could not listen on (a port in use)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except (socket.gaierror, UnicodeError):
        raise UsageError(f"--host {host}: not an address of this machine; give an IP address or a host name") from None
    except OverflowError:
        raise UsageError(f"--port {port}: ports go up to 65535") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closing socket is no user
        try:
            s.bind((host, port))
        except OverflowError:
            raise UsageError(f"--port {port}: ports go up to 65535") from None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UsageError(f"--port {port}: {host}:{port} is in use (another server?); give another --port, "
                                 "or stop the other server") from None
            if e.errno == errno.EACCES:
                raise UsageError(f"--port {port}: not allowed to listen there (ports below 1024 need root); "
                                 "give another --port") from None
            raise UsageError(f"--host {host}: cannot listen on {host}:{port}: {e.strerror or e}") from None


def cmd_app(args) -> int:
    # Everything that can be refused is refused first, in a moment, before the minutes of imports and loading.
    if importlib.util.find_spec("gradio") is None:
        raise RuntimeError("the web app needs gradio: pip install 'diffusers-accel[app]'")
    limits = limits_from_args(args)
    sections = app_config(args)  # a bad --config is refused before the model loads
    pcfg = parallel_config(args.parallel)
    if pcfg is not None and pcfg.world_size > 1 and args.gpus not in (1, pcfg.world_size):
        raise UsageError(f"--gpus {args.gpus}: --parallel {args.parallel} serves one pipeline on "
                         f"{pcfg.world_size} processes; give --gpus {pcfg.world_size} or leave it out")
    check_output("--out-dir", args.out_dir, folder=True)
    if args.approx_cache:
        check_approx_dir({"approx": {"dir": args.approx_cache}}, "--approx-cache")
    if sections:
        check_approx_dir(sections)
    check_port(args.host, args.port)
    model = args.model or DEFAULT_MODEL
    print(f"accel app: loading {model} (importing torch, diffusers and gradio, then the model) ...", flush=True)
    with quiet_loading():  # the app loads torch and diffusers; diffusers' first import says nothing to a user
        from ..web.serve import Options, serve_model

    opts = Options(model=model, out_dir=args.out_dir, limits=limits, gpus=args.gpus,
                   device=args.device, dtype=args.dtype, host=args.host, port=args.port,
                   allow_model_paths=args.allow_model_paths, approx_cache=args.approx_cache,
                   config_sections=sections)
    return serve_model(opts, pcfg)
