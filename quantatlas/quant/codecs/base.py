"""The codec interface: an inner quantizer for one weight matrix [rows, cols].

A codec splits each row into column groups that share parameters (scales, zero points,
norms, ...). The same three steps serve plain encoding and GPTQ-style solvers:

    params = codec.fit(w_group, importance)      # parameters for one column group
    w_hat  = codec.quantize(w_cols, params, col)  # values on the grid, columns col.. of the group
    packed = codec.pack(w_hat, params_per_group)  # the bytes that are stored

`encode` is just these steps over every group; GPTQ interleaves them with its error
feedback. Bits are counted from `Packed.nbytes`, i.e. from what is stored.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class Packed:
    """What a codec stores for one matrix: named tensors (byte streams, fp16 scales, ...)."""

    codec: str
    config: dict[str, Any]
    shape: tuple[int, int]
    data: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data.values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    def to_bytes(self) -> bytes:
        """The stored bytes, concatenated in a fixed order (for artifact-size measurement)."""
        return b"".join(self.data[k].contiguous().cpu().view(torch.uint8).numpy().tobytes()
                        for k in sorted(self.data))


class Codec(ABC):
    """Base class for inner quantizers. Subclasses set `name` and implement the four steps."""

    name: ClassVar[str]
    #: columns that share one set of parameters; None means the whole row.
    group_size: int | None = None
    #: columns a solver must hand to `quantize` together (1 for scalar codecs).
    block_width: int = 1

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
    def quantize(self, w: torch.Tensor, params: Any, col: int = 0) -> torch.Tensor:
        """Grid values for columns `col .. col + w.shape[1]` of a group whose parameters are `params`."""

    @abstractmethod
    def pack(self, w_hat: torch.Tensor, params: list[Any]) -> Packed:
        """Store a matrix whose values lie on the grid; `params` holds one entry per group."""

    @abstractmethod
    def decode(self, packed: Packed) -> torch.Tensor:
        """The float32 matrix that `packed` represents."""

    def config(self) -> dict[str, Any]:
        return {}

    def encode(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Packed:
        w = w.detach().float()
        g = self.group_of(w.shape[1])
        params, parts = [], []
        for c in range(0, w.shape[1], g):
            imp = None if importance is None else importance[c:c + g].float()
            p = self.fit(w[:, c:c + g], imp)
            params.append(p)
            parts.append(self.quantize(w[:, c:c + g], p, 0))
        return self.pack(torch.cat(parts, dim=1), params)

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        """Stored bits per weight for a matrix of this shape (from an actual pack)."""
        return self.encode(torch.zeros(shape)).bits_per_weight


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes (< 2**bits) into a little-endian bit stream of uint8."""
    flat = codes.reshape(-1).to(torch.int32)
    shifts = torch.arange(bits, device=flat.device, dtype=torch.int32)
    stream = ((flat[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, device=flat.device, dtype=torch.int32))
    return (stream.reshape(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8)


def unpack_bits(stream: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `count` codes as int64."""
    shifts = torch.arange(8, device=stream.device, dtype=torch.int32)
    bitv = ((stream.to(torch.int32)[:, None] >> shifts) & 1).reshape(-1)[:count * bits]
    weights = (1 << torch.arange(bits, device=stream.device, dtype=torch.int64))
    return (bitv.reshape(count, bits).to(torch.int64) * weights).sum(1)
