"""Bits and bytes, counted from what is stored.

A quantized model's artifact is one file (`Artifact.to_bytes`, `Artifact.write`) that a loader
(`load_artifact`) turns back into the model's tensors:

    b"QATLAS01"                      8 bytes, magic and format version
    header length                    8 bytes, unsigned little-endian
    header                           UTF-8 JSON: {"format": 1, "seed": ..., "tensors": [...]}
    data                             the tensors' bytes, back to back, in header order

Each header entry is a parameter by name, in sorted order: quantized matrices first
(`{"name", "codec", "config", "shape", "parts": [{"key", "dtype", "shape", "nbytes"}]}`: the
codec's registry name and options and the pack's stored tensors (`Packed.parts()`) by key in
sorted order, so every pack decodes from its own entry (`Packed.decode()`): a seeded codec's
config holds the run's seed, an incoherence pack is flagged `"incoherence": true` and stores its
seed as the part `incoherence_seed` (quant/incoherence.py)), then every other parameter
(embeddings, head, norms, biases) as fp16 (`{"name", "dtype": "float16", "shape", "nbytes"}`),
each tensor once (tied weights are stored once). The header's `seed` records the run that wrote
the file; nothing reads it to decode. What the file does not hold: the architecture (the model
named in the spec) and the runtime steps (KV-cache, activation hooks, online rotations), which
the spec describes.

Bits per weight covers the quantized matrices' packed bytes; bits per parameter covers every
stored tensor (`bytes_packed`, without the file's JSON header, which `bytes_file` includes). A
mixture-of-experts model is stored expert by expert (a fused 3-D expert tensor as its experts'
[out, in] matrices, `<experts>.<e>.gate_proj.weight` ..., quantized or fp16), so both count every expert;
beside them `active_bits_per_param` counts the weights one token uses: every tensor but the routed
experts, and of each MoE block's experts the top_k a token is routed to (each expert's stored bits
weighted top_k / n_experts: the expected bits of a token's experts under uniform routing, exact when
the experts of a block share a codec), over the parameters those tensors hold (`active_params`). Artifact sizes are the file's bytes and the same bytes after zstd level 22 and brotli
quality 11, measured by compressing the file, never estimated.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import brotli
import torch
import zstandard

from quantatlas.quant.codecs.base import Packed
from quantatlas.quant.incoherence import read_pack


@dataclass
class Artifact:
    packed: dict[str, Packed]       # quantized matrices by parameter name ("...k_proj.weight")
    rest: dict[str, torch.Tensor]   # everything else, stored as fp16
    #: routed MoE experts' tensors -> the fraction of a block's experts one token uses (top_k / n_experts);
    #: every other tensor is used by every token (not written to the file: the architecture says it)
    active: dict[str, float] = field(default_factory=dict)

    @property
    def quantized_params(self) -> int:
        return sum(p.shape[0] * p.shape[1] for p in self.packed.values())

    @property
    def total_params(self) -> int:
        return self.quantized_params + sum(t.numel() for t in self.rest.values())

    def to_bytes(self, seed: int | None = None) -> bytes:
        """The artifact file (format in the module docstring); `seed`, the run's, is recorded only."""
        entries, parts = [], []
        for k in sorted(self.packed):
            p = self.packed[k]
            stored = p.parts()
            e = {"name": k, "codec": p.codec, "config": p.config, "shape": list(p.shape), "parts": []}
            for key in sorted(stored):
                t = stored[key].detach().contiguous().cpu()
                raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
                e["parts"].append({"key": key, "dtype": str(t.dtype).removeprefix("torch."),
                                   "shape": list(t.shape), "nbytes": len(raw)})
                parts.append(raw)
            entries.append(e)
        for k in sorted(self.rest):
            raw = self.rest[k].detach().to(torch.float16).cpu().contiguous().view(torch.uint8).numpy().tobytes()
            entries.append({"name": k, "dtype": "float16", "shape": list(self.rest[k].shape), "nbytes": len(raw)})
            parts.append(raw)
        header = json.dumps({"format": FORMAT_VERSION, "seed": seed, "tensors": entries},
                            separators=(",", ":"), sort_keys=True).encode()
        return MAGIC + struct.pack("<Q", len(header)) + header + b"".join(parts)

    def write(self, path: str | Path, seed: int | None = None) -> int:
        """Write the artifact file; returns its size in bytes."""
        blob = self.to_bytes(seed)
        Path(path).write_bytes(blob)
        return len(blob)

    def measure(self, compress: bool = True, seed: int | None = None) -> dict[str, float]:
        """Bits per weight and per parameter from the stored tensors (`bytes_packed`; the file adds
        its header: `bytes_file`), and the file's size after zstd-22 and brotli-11."""
        qbytes = sum(p.nbytes for p in self.packed.values())
        payload = qbytes + sum(2 * t.numel() for t in self.rest.values())
        blob = self.to_bytes(seed)
        out = {
            "bits_per_weight": 8.0 * qbytes / self.quantized_params if self.packed else 16.0,
            "bits_per_param": 8.0 * payload / self.total_params,
            "bytes_packed": payload,
            "bytes_file": len(blob),
        }
        if self.active:
            sizes = {**{k: (8 * p.nbytes, p.shape[0] * p.shape[1]) for k, p in self.packed.items()},
                     **{k: (16 * t.numel(), t.numel()) for k, t in self.rest.items()}}
            bits = sum(b * self.active.get(k, 1.0) for k, (b, _) in sizes.items())
            params = sum(n * self.active.get(k, 1.0) for k, (_, n) in sizes.items())
            out["active_bits_per_param"] = bits / params
            out["active_params"] = params
        if compress:
            out["bytes_zstd"] = compressed_size(blob, "zstd-22")
            out["bytes_brotli"] = compressed_size(blob, "brotli-11")
        return out


MAGIC = b"QATLAS01"
FORMAT_VERSION = 1
COMPRESSORS = ("zstd-22", "brotli-11")
_DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
           "int64": torch.int64, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64, "bool": torch.bool}


def compress(blob: bytes, compressor: str) -> bytes:
    """`blob` compressed with zstd level 22 or brotli quality 11."""
    if compressor == "zstd-22":
        return zstandard.ZstdCompressor(level=22).compress(blob)
    if compressor == "brotli-11":
        return brotli.compress(blob, quality=11)
    raise ValueError(f"unknown compressor {compressor!r}; known: {', '.join(COMPRESSORS)}")


def compressed_size(blob: bytes, compressor: str) -> int:
    return len(compress(blob, compressor))


def cap_check(blob: bytes, max_bytes: int, compressor: str) -> dict[str, float]:
    """The artifact file's size after `compressor` and whether it exceeds `max_bytes` (the
    `artifact:` block of a spec): {"artifact_bytes", "artifact_cap", "over_cap" (1.0 or 0.0)}."""
    n = compressed_size(blob, compressor)
    return {"artifact_bytes": float(n), "artifact_cap": float(max_bytes), "over_cap": float(n > max_bytes)}


def load_artifact(blob: bytes) -> tuple[Artifact, int | None]:
    """The Artifact (packed matrices, each decoding on its own, and the fp16 rest) of an artifact
    file, and the run seed the file records (not needed to decode anything)."""
    if blob[:len(MAGIC)] != MAGIC:
        raise ValueError("not a quantatlas artifact (bad magic)")
    (n,) = struct.unpack("<Q", blob[len(MAGIC):len(MAGIC) + 8])
    start = len(MAGIC) + 8
    header = json.loads(blob[start:start + n])
    pos = start + n

    def take(nbytes: int, dtype: str, shape: list[int]) -> torch.Tensor:
        nonlocal pos
        raw = bytearray(blob[pos:pos + nbytes])
        if len(raw) != nbytes:
            raise ValueError("artifact file is truncated")
        pos += nbytes
        t = torch.frombuffer(raw, dtype=torch.uint8) if nbytes else torch.zeros(0, dtype=torch.uint8)
        return t.view(_DTYPES[dtype]).reshape(shape)

    packed, rest = {}, {}
    for e in header["tensors"]:
        if "codec" in e:
            data = {p["key"]: take(p["nbytes"], p["dtype"], p["shape"]) for p in e["parts"]}
            packed[e["name"]] = read_pack(e["codec"], e["config"], tuple(e["shape"]), data)
        else:
            rest[e["name"]] = take(e["nbytes"], e["dtype"], e["shape"])
    if pos != len(blob):
        raise ValueError(f"artifact file has {len(blob) - pos} trailing bytes")
    return Artifact(packed, rest), header.get("seed")


def artifact_of(model: torch.nn.Module, packed: dict[str, Packed]) -> Artifact:
    """Split a model's parameters into the quantized ones (`packed`, by param name) and the rest; fused
    MoE expert tensors as their experts' matrices (models/roles.py `matrix_weights`)."""
    from quantatlas.models.layout import layout
    from quantatlas.models.roles import matrix_weights

    rest, seen = {}, set()
    for name, p in matrix_weights(model).items():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if name not in packed:
            rest[name] = p
    active = {t.name + ".weight": t.moe.top_k / t.moe.n_experts
              for t in (layout(model).roles if _has_experts(model) else []) if t.expert is not None}
    return Artifact(packed, rest, active)


def _has_experts(model: torch.nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None))
