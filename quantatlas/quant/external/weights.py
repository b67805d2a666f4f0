"""An artifact's weights in the spec's model: match its tensors to the model's parameters (refusing
a mismatch in one line naming the tensor, before anything is evaluated), decode them into a copy
of the model, and count its bits and bytes from what it stores.

    ext = open_artifact(cfg, model, "arms.llama_q4km", arm)   # listing + match; raises UserError
    ext.load_into(model)                                       # every parameter from the artifact
    ext.sizes(model).measure(compress=True)                    # bits per weight / param, bytes

Matching. Each format's reader (gguf_reader.py, gptq.py, awq.py, compressed_tensors.py) says which
model parameter each stored tensor (or group of them: a GPTQ qweight, qzeros, scales and g_idx)
becomes, and the shape it decodes to. Refused, naming the tensor: an artifact of another architecture,
a parameter of the model the artifact does not hold, a stored tensor no parameter takes, a shape that
differs from the parameter's. Every parameter comes from the artifact; nothing of the spec's model is
kept but its architecture (and its buffers: RoPE frequencies).

Bits, as for our own arms (eval/bits.py): bits per weight = 8 × the bytes of the quantized parameters'
stored tensors (codes, scales, zero points, g_idx, a packed shape) / their weights; bits per parameter
= 8 × every stored tensor's bytes / the model's parameters (each storage once). A tensor stored as
plain numbers (F32, F16, BF16) is not quantized and counts at its own width: a GGUF keeps norms in
F32, so its bits per parameter count them at 32 bits where our file stores 16. `bytes_packed` is the
stored tensors' bytes; `bytes_file` the artifact's files (the GGUF; a folder's *.safetensors: the
weights, not its tokenizer or config), and `bytes_zstd` / `bytes_brotli` those files back to back
after zstd-22 and brotli-11.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from quantatlas.errors import UserError
from quantatlas.eval.bits import compressed_size
from quantatlas.quant.external.awq import AWQReader
from quantatlas.quant.external.compressed_tensors import CompressedTensorsReader
from quantatlas.quant.external.config import FORMAT_NAMES, ArtifactConfig
from quantatlas.quant.external.gguf_reader import GGUFReader
from quantatlas.quant.external.gptq import GPTQReader
from quantatlas.quant.external.reader import Entry, Reader
from quantatlas.quant.external.stored import ArtifactError, Listing, absolute, read_listing


def _reader(listing: Listing) -> Reader:
    return {"gguf": GGUFReader, "gptq": GPTQReader, "awq": AWQReader,
            "compressed_tensors": CompressedTensorsReader}[listing.format](listing)


def _unique_parameters(model) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())   # a tied head once, under the name that comes first


def _model_shape(model, name: str, p: torch.Tensor, linear_view: bool) -> tuple[int, ...]:
    """The shape a parameter is compared in: a transformers Conv1D keeps [in, out]; a quantized matrix of an
    HF-folder format decodes to the Linear view [out, in] (GPTQ/AWQ pack Conv1D weights transposed), so it is
    compared (and loaded) transposed."""
    module = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    if linear_view and p.dim() == 2 and type(module).__name__ == "Conv1D":
        return (p.shape[1], p.shape[0])
    return tuple(p.shape)


class ExternalWeights:
    """An artifact matched to a model (see the module docstring)."""

    def __init__(self, listing: Listing, reader: Reader, entries: list[Entry], where: str):
        self.listing, self.reader, self.entries, self.where = listing, reader, entries, where

    def load_into(self, model) -> None:
        """Every parameter of `model`, in place, from the artifact (in the parameter's dtype and device)."""
        params = _unique_parameters(model)
        with torch.no_grad():
            for e in self.entries:
                p = params[e.param]
                w = self.reader.decode(e)
                if tuple(w.shape) != e.shape:   # a reader bug, not a user's: say which tensor
                    raise RuntimeError(f"{e.param}: decoded shape {tuple(w.shape)}, expected {e.shape}")
                if tuple(p.shape) != e.shape:   # a Conv1D read from a Linear view
                    w = w.t()
                p.data.copy_(w.to(p.dtype))

    def sizes(self, model) -> "ExternalSizes":
        stored = self.listing.tensors
        q = [e for e in self.entries if e.quantized]
        weights = sum(_numel(e.shape) for e in q)
        qbytes = sum(stored[s].nbytes for e in q for s in e.stored)
        n_params = sum(p.numel() for p in _unique_parameters(model).values())
        payload = self.listing.bytes_stored
        return ExternalSizes(bits_per_weight=8.0 * qbytes / weights if weights else 16.0,
                             bits_per_param=8.0 * payload / n_params, bytes_packed=payload,
                             files=tuple(str(f) for f in self.listing.files))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class ExternalSizes:
    """An artifact arm's bits (from its stored tensors) and its files, measured as our artifact file is."""
    bits_per_weight: float
    bits_per_param: float
    bytes_packed: int
    files: tuple[str, ...]

    def blob(self) -> bytes:
        return b"".join(Path(f).read_bytes() for f in self.files)

    def measure(self, compress: bool = True) -> dict[str, float]:
        out = {"bits_per_weight": self.bits_per_weight, "bits_per_param": self.bits_per_param,
               "bytes_packed": self.bytes_packed, "bytes_file": sum(os.path.getsize(f) for f in self.files)}
        if compress:
            blob = self.blob()
            out["bytes_zstd"] = compressed_size(blob, "zstd-22")
            out["bytes_brotli"] = compressed_size(blob, "brotli-11")
        return out


def open_artifact(cfg: ArtifactConfig, model, where: str, arm=None) -> ExternalWeights:
    """Read the artifact of `cfg` (a relative path from the working directory) and match it to `model`;
    refuse, in one UserError naming the tensor, what does not match (module docstring). `where` is the
    arm's spec path ("arms.x"); a sha256 the config holds must be the artifact's."""
    field = f"{where}.artifact"
    path = absolute(cfg.path, Path.cwd())
    if not path.exists():
        raise UserError(f"{field}.{cfg.format}: no such {'file' if cfg.format == 'gguf' else 'folder'}: {path}",
                        f"{field}.{cfg.format}")
    try:
        listing = read_listing(cfg.format, path)
        if cfg.sha256 is not None and listing.sha256() != cfg.sha256:
            raise ArtifactError(f"its tensors hash to {listing.sha256()}, not the spec's sha256 {cfg.sha256} (the "
                                "file changed since the spec was resolved)")
        reader = _reader(listing)
        reader.check(model, arm)
        entries = reader.entries(model)
        _match(listing, reader, entries, model)
    except ArtifactError as e:
        raise UserError(f"{field}: {FORMAT_NAMES[cfg.format]} {path.name}: {e}", field) from None
    return ExternalWeights(listing, reader, entries, where)


def _match(listing: Listing, reader: Reader, entries: list[Entry], model) -> None:
    params = _unique_parameters(model)
    linear_view = listing.format != "gguf"
    claimed: set[str] = set()
    seen: dict[str, str] = {}
    for e in entries:
        first = e.stored[0]
        if e.param not in params:
            raise ArtifactError(f"tensor {first} has no parameter {e.param} in the model (an extra tensor: "
                                "another architecture or size?)")
        if e.param in seen:
            raise ArtifactError(f"tensors {seen[e.param]} and {first} both hold parameter {e.param}")
        seen[e.param] = first
        want = _model_shape(model, e.param, params[e.param], linear_view and e.quantized)
        if tuple(e.shape) != want:
            raise ArtifactError(f"tensor {first} decodes to shape {list(e.shape)}, the model's {e.param} is "
                                f"{list(want)}")
        claimed.update(e.stored)
    extra = sorted(set(listing.tensors) - claimed - reader.free)
    if extra:
        raise ArtifactError(f"tensor {extra[0]} is no parameter of the model"
                            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    missing = [n for n in params if n not in seen]
    if missing:
        raise ArtifactError(f"the model's {missing[0]} is not in the artifact"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
