"""Codec registry: `make_codec({"uniform": {"bits": 4, "group": 128}})` builds a codec by name."""
from __future__ import annotations

from typing import Any

from quantatlas.quant.codecs.base import Codec, Packed, pack_bits, unpack_bits

CODECS: dict[str, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    CODECS[cls.name] = cls
    return cls


def make_codec(name: str, options: dict[str, Any] | None = None) -> Codec:
    """Build a registered codec; a ValueError names an unknown codec or a bad option."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}")
    try:
        return CODECS[name](**(options or {}))
    except TypeError as e:
        raise ValueError(f"codec {name!r}: {e}") from None


# Each module registers its codecs on import.
from quantatlas.quant.codecs import uniform  # noqa: E402,F401
from quantatlas.quant.codecs.ggml import q8_0  # noqa: E402,F401
from quantatlas.quant.codecs.ggml import q4_0  # noqa: E402,F401
from quantatlas.quant.codecs.ggml import q4_1  # noqa: E402,F401
from quantatlas.quant.codecs.ggml import q5_0  # noqa: E402,F401
from quantatlas.quant.codecs.ggml import q5_1  # noqa: E402,F401
from quantatlas.quant.codecs.ggml import q2_k  # noqa: E402,F401
from quantatlas.quant.codecs.ggml import q3_k  # noqa: E402,F401
from quantatlas.quant.codecs.ggml import q4_k  # noqa: E402,F401
from quantatlas.quant.codecs.ggml import q5_k  # noqa: E402,F401
from quantatlas.quant.codecs.ggml import q6_k  # noqa: E402,F401
from quantatlas.quant.codecs.ggml import iq4_nl  # noqa: E402,F401
from quantatlas.quant.codecs.ggml import iq4_xs  # noqa: E402,F401

__all__ = ["CODECS", "Codec", "Packed", "make_codec", "pack_bits", "register", "unpack_bits"]
from quantatlas.quant.codecs import turbo  # noqa: E402,F401  (registers turbo and lloyd_max)
