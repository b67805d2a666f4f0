"""torch, imported on first use.

A technique family is one file: its pydantic config and its object. The atlas server validates
specs with those configs and must run without torch, so family modules reach torch through
these proxies; the first attribute read imports the real module and later reads are plain
attribute lookups (each value is cached on the proxy).
"""
from __future__ import annotations

import functools
import importlib


class LazyModule:
    def __init__(self, name: str):
        self.__dict__["_name"] = name

    def __getattr__(self, attr: str):
        value = getattr(importlib.import_module(self._name), attr)
        self.__dict__[attr] = value
        return value

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


torch = LazyModule("torch")
nn = LazyModule("torch.nn")


def no_grad(fn):
    """`@torch.no_grad()` without importing torch at definition time."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)
    return wrapper
