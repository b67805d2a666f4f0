"""Function-preserving transforms. Each module here defines one with its config class:

    hadamard   randomized Hadamard rotations (residual stream, per-head value path, online o/down)
    equalize   per-input-channel scales s_i = H_ii^alpha folded into the previous op
    spinquant  hadamard's residual and per-head rotations learned by Cayley SGD for the arm's quantizers
    awq        activation-aware scales s = mean|x|^alpha, alpha searched by output error after quantization
"""
from __future__ import annotations

from typing import Any

from quantatlas.quant.config import TransformConfig, build, registry
from quantatlas.quant.transforms.base import Transform


def make_transform(name: str, options: dict[str, Any] | None = None) -> Transform:
    """Build a transform by name; a ValueError names an unknown transform or a bad option."""
    return build("transform", {name: options or {}})


def transform_names() -> list[str]:
    return sorted(registry("transform"))


__all__ = ["Transform", "TransformConfig", "make_transform", "transform_names"]
