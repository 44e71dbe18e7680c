"""Build .venv-floor: this package's requirements at the lowest declared diffusers and transformers.

Run with .venv's python (scripts/floor.sh does): ``python scripts/floor_env.py .venv-floor scripts/floor-pins.txt``.

The floor venv holds, in its own site-packages, the pinned packages of ``floor-pins.txt`` and whatever the
closure needs that .venv lacks or has at a version the closure rejects (e.g. ``huggingface_hub<2`` for the
older diffusers); they are installed with ``pip --no-deps``, at the newest version every requirer accepts. Every other
distribution of the closure (torch first of all) is shared from .venv: its top-level files are symlinked into
``.venv-floor/shared``, which a ``.pth`` puts after the floor's own site-packages. Nothing else of .venv is
visible there (no torchao, peft, gradio ...), so the floor run sees what ``pip install diffusers-accel`` plus
the test tools would give at the pinned versions.

The closure: this package's core requirements (its extras left out) read from pyproject.toml, the test tools
below, and recursively the requirements of each distribution in it, with environment markers evaluated.
pip runs only while ``shared`` is empty, so it can never uninstall a distribution of .venv through a link.
Idempotent: a rerun with nothing to install only relinks ``shared`` (about a second).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
TEST_TOOLS = ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100"]
SELF = "diffusers-accel"


def site_of(prefix: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))


def dists(site: Path) -> dict[str, md.Distribution]:
    found: dict[str, md.Distribution] = {}
    for d in md.distributions(path=[str(site)]):
        name = d.metadata["Name"]
        if name:  # the first one wins, as on sys.path
            found.setdefault(canonicalize_name(name), d)
    return found


def marker_ok(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    env = default_environment()
    return any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""}))


def closure(floor: dict, pool: dict, roots: list[Requirement], pinned: set[str]):
    """Walk the requirements from ``roots``: the floor's own distributions first, then ``pool`` (.venv's), never
    a pinned one from the pool. Returns (dists to share, {name: SpecifierSet} to install, conflicts)."""
    specs: dict[str, SpecifierSet] = {}
    wanted_extras: dict[str, set[str]] = {}
    share: dict[str, md.Distribution] = {}
    conflicts: list[str] = []
    walked: set[str] = set()
    todo = [(r, "(root)") for r in roots]
    while todo:
        req, by = todo.pop()
        name = canonicalize_name(req.name)
        if name == SELF:
            continue
        specs[name] = specs.get(name, SpecifierSet()) & req.specifier
        extras = wanted_extras.setdefault(name, set())
        new_extras = set(req.extras) - extras
        extras |= set(req.extras)
        spec = specs[name]
        dist = floor.get(name)
        if dist is not None and not spec.contains(dist.version, prereleases=True):
            if name in pinned:
                conflicts.append(f"{by} needs {req}, pinned {name}=={dist.version}")
            continue  # not pinned: reinstalled in the floor at a version that fits (see `missing` below)
        if dist is None and name not in pinned:
            cand = pool.get(name)
            if cand is not None and spec.contains(cand.version, prereleases=True):
                dist = share[name] = cand
            else:
                share.pop(name, None)  # shared at first, rejected by a later requirer
        if dist is None or (name in walked and not new_extras):
            continue  # unmet ones are installed in the next round
        walked.add(name)
        for line in dist.requires or []:
            sub = Requirement(line)
            if marker_ok(sub, extras):
                todo.append((sub, f"{name} {dist.version}"))
    missing = {}
    for name, spec in specs.items():
        have = floor.get(name) if name in floor else share.get(name)
        if have is None or not spec.contains(have.version, prereleases=True):
            missing[name] = spec
    return share, missing, conflicts


def top_levels(dist: md.Distribution) -> set[str]:
    tops = set()
    for f in dist.files or []:
        parts = Path(f).parts
        if parts and parts[0] not in ("..", "__pycache__") and not parts[0].endswith(".pth"):
            tops.add(parts[0])
    tops.add(Path(dist._path).name)  # the .dist-info folder itself (importlib.metadata.PathDistribution)
    return tops


def floor_mismatches(declared: list[Requirement], pins: list[Requirement]) -> list[str]:
    """A pin of a declared requirement must be its lower bound: the floor run tests what pyproject.toml says."""
    bounds = {canonicalize_name(r.name): r for r in declared}
    bad = []
    for pin in pins:
        req = bounds.get(canonicalize_name(pin.name))
        exact = [s.version for s in pin.specifier if s.operator == "=="]
        if req is None or not exact:
            continue
        lows = [s.version for s in req.specifier if s.operator == ">="]
        if not lows or Version(exact[0]) != max(Version(v) for v in lows):
            bad.append(f"scripts/floor-pins.txt pins {pin} but pyproject.toml declares {req}: pin the floor")
    return bad


def pip(py: Path, *args: str) -> None:
    cmd = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", *args]
    print("floor env: pip install --no-deps", " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    env_dir = Path(sys.argv[1]).resolve()
    pins_file = Path(sys.argv[2])
    lines = (line.split("#")[0].strip() for line in pins_file.read_text().splitlines())
    pins = [Requirement(line) for line in lines if line]
    pinned = {canonicalize_name(r.name) for r in pins}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    if bad := floor_mismatches(declared, pins):
        print("floor env: " + "; ".join(bad), file=sys.stderr)
        return 1
    roots = declared + [Requirement(r) for r in TEST_TOOLS] + pins

    floor_py = env_dir / "bin" / "python"
    floor_site = site_of(env_dir)
    main_site = site_of(Path(sys.prefix))
    shared = env_dir / "shared"
    shared.mkdir(exist_ok=True)
    for p in shared.iterdir():  # pip must not see .venv's distributions through a link
        if p.is_symlink() or p.is_file():
            p.unlink()
    (floor_site / "accel-floor-shared.pth").write_text(str(shared) + "\n")

    pool = dists(main_site)
    for r in pins:  # the pins first, exactly
        d = dists(floor_site).get(canonicalize_name(r.name))
        if d is None or not r.specifier.contains(d.version, prereleases=True):
            pip(floor_py, str(r))
    for _ in range(6):
        share, missing, conflicts = closure(dists(floor_site), pool, roots, pinned)
        if conflicts:
            print("floor env: the pins conflict:\n  " + "\n  ".join(conflicts), file=sys.stderr)
            return 1
        if not missing:
            break
        pip(floor_py, *(f"{n}{s}" for n, s in sorted(missing.items())))
    else:
        print(f"floor env: still unmet after 6 rounds: {missing}", file=sys.stderr)
        return 1

    linked = {}
    for name, d in sorted(share.items()):
        for top in top_levels(d):
            src, dst = main_site / top, shared / top
            if not src.exists() or top in linked:
                continue
            if (floor_site / top).exists():  # the floor's own copy wins anyway; don't expose a second one
                continue
            os.symlink(src, dst)
            linked[top] = name
    local = sorted(f"{n}=={d.version}" for n, d in dists(floor_site).items() if n not in ("pip", "setuptools"))
    print(f"floor env: own {', '.join(local)}; {len(share)} shared from .venv", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
