"""The codec interface: an inner quantizer for one weight matrix [rows, cols].

A codec splits each row into column groups that share parameters (scales, zero points,
norms, ...). The same three steps serve plain encoding and GPTQ-style solvers:

    params = codec.fit(w_group, importance)      # parameters for one column group
    q      = codec.quantize(w_cols, params, col)  # q.values on the grid and q.codes that store them
    packed = codec.pack(codes, params_per_group)  # the bytes that are stored

`codes` is the concatenation (along columns, in column order) of the codes of every quantize
call, so packing never searches again: a code found by a search (a trellis path, a lattice
point, ggml's scale search) is stored as found. `encode` is these steps over every group; GPTQ
interleaves them with its error feedback. Bits are counted from `Packed.nbytes`, i.e. from
what is stored.

A Packed decodes from its own contents (`Packed.decode()`): its codec's name and config, which
for a seeded codec hold the run's seed (`for_run` puts it there), and its stored tensors. A
format that wraps another pack (incoherence's rotations, quant/incoherence.py) is a subclass
that holds the inner pack and adds its own stored parts (`parts()`).

A codec is built from its config (`quantatlas.quant.config`); a family is one file with both.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from quantatlas._lazy import torch

if TYPE_CHECKING:
    from quantatlas.context import RunContext


#: rows of `Codec.probe`, times what a codec's `tile_rows` needs (3-row Leech tiles divide it)
PROBE_ROWS = 48


@dataclass
class Packed:
    """What a codec stores for one matrix: named tensors (byte streams, fp16 scales, ...)."""

    codec: str
    config: dict[str, Any]
    shape: tuple[int, int]
    data: dict[str, torch.Tensor] = field(default_factory=dict)

    def parts(self) -> dict[str, torch.Tensor]:
        """Every tensor that is stored (and counted), by key: the codec's `data` (a wrapper adds its own)."""
        return self.data

    @classmethod
    def from_parts(cls, codec: str, config: dict[str, Any], shape: tuple[int, int],
                   parts: dict[str, torch.Tensor]) -> "Packed":
        """The pack that `parts()` came from (what a file stores: codec name, config, shape, tensors)."""
        return cls(codec, config, tuple(shape), dict(parts))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    def to_bytes(self) -> bytes:
        """The stored bytes, concatenated in a fixed order (for artifact-size measurement)."""
        parts = self.parts()
        return b"".join(parts[k].contiguous().cpu().view(torch.uint8).numpy().tobytes() for k in sorted(parts))

    def decode(self) -> torch.Tensor:
        """The float32 matrix, from this pack alone: its codec rebuilt from name and config."""
        from quantatlas.quant.config import build, fill_first_defaults

        return build("codec", fill_first_defaults({self.codec: self.config})).decode(self)


@dataclass
class Quantized:
    """What `quantize` returns for some columns: the grid values and the codes that store them."""

    values: torch.Tensor  # [rows, c] float32
    codes: torch.Tensor   # [rows, m] integer codes, laid out as the codec's `pack` reads them


class Codec(ABC):
    """Base class for inner quantizers. Subclasses set `name` and implement the four steps."""

    name: ClassVar[str]
    #: columns that share one set of parameters; None means the whole row.
    group_size: int | None = None
    #: columns a solver must hand to `quantize` together (1 for scalar codecs).
    block_width: int = 1
    #: with one group per row, whether a row whose length is not a multiple of block_width may end in
    #: one shorter block (its last cols mod block_width columns, handed to `quantize` last)
    ragged_tail: bool = False

    def __init__(self, cfg=None):
        self.cfg = cfg

    def groups(self, cols: int) -> int:
        g = self.group_of(cols)
        return cols // g

    def group_of(self, cols: int) -> int:
        """The group width for a matrix with `cols` columns; raises if it does not divide."""
        g = self.group_size or cols
        if cols % g:
            raise ValueError(f"{self.name}: {cols} columns are not a multiple of group size {g}")
        return g

    @abstractmethod
    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Any:
        """Parameters for one column group `w` [rows, g]; `importance` [g] weights the columns."""

    @abstractmethod
    def quantize(self, w: torch.Tensor, params: Any, col: int = 0) -> Quantized:
        """Grid values and codes for columns `col .. col + w.shape[1]` of a group with parameters `params`."""

    def column_quantizer(self, params: Any):
        """Optional fast path for scalar codecs (block_width 1) inside GPTQ's per-column loop.

        A codec that overrides this returns `fn(w, col, values, codes)` for a group's `params`:
        w is one column [rows] (contiguous), col its offset in the group; fn writes into the
        float32 [rows] buffers `values` and `codes` exactly quantize(w[:, None], params, col)'s
        values and codes (as floats), without allocating. The base class has none.
        """
        return None

    @abstractmethod
    def pack(self, codes: torch.Tensor, params: list[Any]) -> Packed:
        """Store a matrix from its codes (all quantize calls' codes, in column order); one `params` per group."""

    @abstractmethod
    def decode(self, packed: Packed) -> torch.Tensor:
        """The float32 matrix that `packed` represents."""

    def config(self) -> dict[str, Any]:
        """The config a pack carries: as packs were written before options added later existed (at their
        first default they are left out, so an artifact's bytes do not change; `Packed.decode` reads them so)."""
        from quantatlas.quant.config import drop_first_defaults_of_later

        return {} if self.cfg is None else drop_first_defaults_of_later(self.cfg.to_spec())[self.cfg.name]

    def for_run(self, ctx: "RunContext") -> "Codec":
        """The codec a run uses; codecs with random parts (rotation signs, k-means starts) derive
        them from the run context and keep the result in their config (so every pack they make
        decodes from its own contents); the others are the same for every run."""
        return self

    @property
    def seeded(self) -> bool:
        return type(self).for_run is not Codec.for_run

    def for_matrix(self, w: torch.Tensor) -> "Codec":
        """The codec that quantizes the whole matrix `w` (what `encode`, a solver or a fake quantizer is
        handed): a codec with a part stored once per matrix (NVFP4's fp32 tensor scale, FP8's per-tensor
        scale) fixes it from w here, so that `fit` on any group of w sees it; the others are themselves."""
        return self

    def encode(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Packed:
        w = w.detach().float()
        codec = self.for_matrix(w)
        g = codec.group_of(w.shape[1])
        params, codes = [], []
        for c in range(0, w.shape[1], g):
            imp = None if importance is None else importance[c:c + g].float()
            p = codec.fit(w[:, c:c + g], imp)
            params.append(p)
            codes.append(codec.quantize(w[:, c:c + g], p, 0).codes)
        return codec.pack(torch.cat(codes, dim=1), params)

    def probe(self, cols: int) -> Packed:
        """A pack of one group of a `cols`-column matrix (seeded N(0, 1) rows, as many as the codec's row tiles
        fill): what this codec stores, for checks before any matrix is quantized."""
        rows = math.lcm(PROBE_ROWS, getattr(self, "tile_rows", 1))
        w = torch.randn(rows, self.group_of(cols), generator=torch.Generator().manual_seed(0))
        return self.encode(w)

    def fake_quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """decode(encode(w)) without packing: the grid values of every group (for activations, KV)."""
        w = w.detach().float()
        codec = self.for_matrix(w)
        g = codec.group_of(w.shape[1])
        out = []
        for c in range(0, w.shape[1], g):
            imp = None if importance is None else importance[c:c + g].float()
            out.append(codec.quantize(w[:, c:c + g], codec.fit(w[:, c:c + g], imp), 0).values)
        return torch.cat(out, dim=1)

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        """Stored bits per weight for a matrix of this shape (from an actual pack)."""
        return self.encode(torch.zeros(shape)).bits_per_weight


def pack_bits(codes: torch.Tensor, bits: int, chunk: int = 1 << 20) -> torch.Tensor:
    """Pack unsigned integer codes (< 2**bits, any integer dtype) into a little-endian bit stream of uint8,
    in the row-major order of `codes`.

    Code i occupies stream bits [bits*i, bits*i + bits). Eight codes make `bits` whole bytes,
    so each chunk of eight is assembled as one 64-bit word and split into bytes; about `chunk`
    codes at a time (whole rows of a matrix whose rows are a multiple of 8 long, so a transposed
    view is never copied whole), so the temporaries stay small next to the matrix.
    """
    n = codes.numel()
    if codes.dim() == 2 and codes.shape[1] % 8 == 0 and codes.shape[1]:
        step = max(1, chunk // codes.shape[1])
        parts = (codes[r:r + step] for r in range(0, codes.shape[0], step))
    else:
        flat, step = codes.reshape(-1), max(8, chunk - chunk % 8)
        parts = (flat[a:a + step] for a in range(0, n, step))
    dev = codes.device
    shifts = torch.arange(8, device=dev, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, device=dev, dtype=torch.int64) * 8
    stream = torch.empty((n + 7) // 8 * bits, device=dev, dtype=torch.uint8)
    at = 0   # bytes written; every part but the last is a multiple of 8 codes
    for part in parts:
        part = part.reshape(-1).to(torch.int64)
        if part.numel() % 8:
            part = torch.cat([part, part.new_zeros((-part.numel()) % 8)])
        words = (part.reshape(-1, 8) << shifts).sum(1, dtype=torch.int64)            # bits*8 <= 64
        stream[at:at + words.numel() * bits].copy_(((words[:, None] >> byte_shifts) & 0xFF).reshape(-1))
        at += words.numel() * bits
    return stream[:(n * bits + 7) // 8]


def unpack_bits(stream: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `count` codes as int64."""
    chunks = (count + 7) // 8
    s = stream.reshape(-1).to(torch.int64)
    need = chunks * bits
    if s.numel() < need:
        s = torch.cat([s, s.new_zeros(need - s.numel())])
    byte_shifts = torch.arange(bits, device=s.device, dtype=torch.int64) * 8
    words = (s[:need].reshape(chunks, bits) << byte_shifts).sum(1, dtype=torch.int64)
    shifts = torch.arange(8, device=s.device, dtype=torch.int64) * bits
    return ((words[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]
