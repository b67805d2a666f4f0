"""Function-preserving transforms, built by name: `make_transform("hadamard", {"block": 128})`.

    hadamard   randomized Hadamard rotations (residual stream, per-head value path, online o/down)
    equalize   per-input-channel scales s_i = H_ii^alpha folded into the previous op
    awq        activation-aware scales s = mean|x|^alpha, alpha searched by output error after quantization
"""
from __future__ import annotations

from typing import Any

from quantatlas.quant.transforms.base import Transform

TRANSFORMS: dict[str, type[Transform]] = {}


def register(cls: type[Transform]) -> type[Transform]:
    TRANSFORMS[cls.name] = cls
    return cls


def make_transform(name: str, options: dict[str, Any] | None = None) -> Transform:
    """Build a registered transform; a ValueError names an unknown transform or a bad option."""
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; known: {', '.join(sorted(TRANSFORMS))}")
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"transform {name!r}: options must be a mapping, got {type(options).__name__}")
    try:
        return TRANSFORMS[name](**(options or {}))
    except TypeError as e:
        raise ValueError(f"transform {name!r}: {e}") from None


# Each module registers its transform on import.
from quantatlas.quant.transforms import rotation  # noqa: E402,F401
from quantatlas.quant.transforms import equalize  # noqa: E402,F401
from quantatlas.quant.transforms import awq  # noqa: E402,F401

__all__ = ["TRANSFORMS", "Transform", "make_transform", "register"]
