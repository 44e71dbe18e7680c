"""Lazy package attributes (PEP 562), so that ``import accel`` and the CLI's ``--help`` do not import torch and
diffusers: a package names what it exports and from which submodule, and each is imported on first use."""

from __future__ import annotations

import importlib
import importlib.util
import sys


def lazy(package: str, exports: dict[str, str]):
    """(``__getattr__``, ``__dir__``) for ``package``: ``exports`` maps a name to the relative module that defines
    it; any other name that is a submodule of the package is imported as one."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module, package), name)
        elif importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
