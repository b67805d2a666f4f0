"""Codecs: inner quantizers. Each module here defines a codec with its config class (see
`quantatlas.quant.config`); `make_codec("uniform", {"bits": 4})` builds one by name."""
from __future__ import annotations

from typing import Any

from quantatlas.quant.codecs.base import Codec, Packed, Quantized, pack_bits, unpack_bits
from quantatlas.quant.config import CodecConfig, build, registry


def make_codec(name: str, options: dict[str, Any] | None = None) -> Codec:
    """Build a codec by name; a ValueError names an unknown codec or a bad option."""
    return build("codec", {name: options or {}})


def codec_names() -> list[str]:
    return sorted(registry("codec"))


__all__ = ["Codec", "CodecConfig", "Packed", "Quantized", "codec_names", "make_codec", "pack_bits", "unpack_bits"]
