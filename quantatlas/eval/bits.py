"""Bits and bytes, counted from what is stored.

A quantized model's artifact is every quantized matrix's packed bytes plus every other
parameter (embeddings, head, norms, biases) as fp16, each tensor once (tied weights are
stored once). Bits per weight covers the quantized matrices; bits per parameter covers
the whole model. Artifact sizes are the packed bytes and the same bytes after zstd
level 22 and brotli quality 11.
"""
from __future__ import annotations

from dataclasses import dataclass

import brotli
import torch
import zstandard

from quantatlas.quant.codecs.base import Packed


@dataclass
class Artifact:
    packed: dict[str, Packed]       # quantized matrices by parameter name ("...k_proj.weight")
    rest: dict[str, torch.Tensor]   # everything else, stored as fp16

    @property
    def quantized_params(self) -> int:
        return sum(p.shape[0] * p.shape[1] for p in self.packed.values())

    @property
    def total_params(self) -> int:
        return self.quantized_params + sum(t.numel() for t in self.rest.values())

    def to_bytes(self) -> bytes:
        parts = [self.packed[k].to_bytes() for k in sorted(self.packed)]
        parts += [self.rest[k].detach().to(torch.float16).cpu().contiguous().view(torch.uint8).numpy().tobytes()
                  for k in sorted(self.rest)]
        return b"".join(parts)

    def measure(self, compress: bool = True) -> dict[str, float]:
        qbytes = sum(p.nbytes for p in self.packed.values())
        blob = self.to_bytes()
        out = {
            "bits_per_weight": 8.0 * qbytes / self.quantized_params if self.packed else 16.0,
            "bits_per_param": 8.0 * len(blob) / self.total_params,
            "bytes_packed": len(blob),
        }
        if compress:
            out["bytes_zstd"] = len(zstandard.ZstdCompressor(level=22).compress(blob))
            out["bytes_brotli"] = len(brotli.compress(blob, quality=11))
        return out


def artifact_of(model: torch.nn.Module, packed: dict[str, Packed]) -> Artifact:
    """Split a model's parameters into the quantized ones (`packed`, by param name) and the rest."""
    rest, seen = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if name not in packed:
            rest[name] = p
    return Artifact(packed, rest)
