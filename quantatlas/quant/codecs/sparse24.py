"""2:4 structured sparsity with the kept values on a low-bit uniform grid (parameter-golf's
storage trick; NVIDIA's 2:4 layout).

In every run of 4 consecutive columns of a row, the 2 weights of largest magnitude are kept and
the other 2 are zero. The kept values are rounded to a symmetric `bits`-bit grid with one fp16
scale per row and column group (the `uniform` codec's grid, its `scale` rule, absmax | half_step |
signed_max, and its clip search: `clip: mse` or `hessian`, the Hessian-weighted per-row search,
fitted on the group with its pruned entries zero).

Stored per 4 weights: 2 value codes of `bits` bits and 2 position codes of 2 bits (the kept
columns, ascending), so bits per weight = (2 bits + 4) / 4 + 16 / group: 3.125 at bits 4, group 128.

GPTQ gets tiles of 4 columns (`block_width`): the mask of a tile is chosen on the error-updated
weights it hands over, and the pruned weights' error is spread like any rounding error.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from quantatlas._lazy import torch
from quantatlas.quant.codecs.base import Codec, Packed, Quantized, pack_bits, unpack_bits
from quantatlas.quant.codecs.uniform import SymmetricScale, UniformConfig, symmetric_scale_field
from quantatlas.quant.config import CodecConfig


class Sparse24Config(CodecConfig):
    name = "sparse24"
    bits: int = Field(4, ge=2, le=8)
    group: int = Field(128, gt=0)
    clip: Literal["minmax", "mse", "hessian"] = "minmax"
    scale: SymmetricScale = symmetric_scale_field()

    @field_validator("group")
    @classmethod
    def _tiles(cls, v):
        if v % 4:
            raise ValueError(f"must be a multiple of 4 (2:4 tiles), got {v}")
        return v

    def build(self):
        return Sparse24(self)


def keep_mask(w: "torch.Tensor") -> "torch.Tensor":
    """Boolean [rows, cols]: the 2 largest |w| of every 4 consecutive columns (ties: the lower column)."""
    rows, cols = w.shape
    t = w.abs().reshape(rows, cols // 4, 4)
    idx = t.topk(2, dim=-1, sorted=False).indices
    return torch.zeros_like(t, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, cols)


class Sparse24(Codec):
    name = "sparse24"
    block_width = 4

    def __init__(self, cfg: Sparse24Config):
        super().__init__(cfg)
        self.bits, self.group_size = cfg.bits, cfg.group
        self.grid = UniformConfig(bits=cfg.bits, group=cfg.group, symmetric=True, clip=cfg.clip,
                                  scale=cfg.scale).build()

    def group_of(self, cols: int) -> int:
        if cols % 4:
            raise ValueError(f"sparse24: {cols} columns are not a multiple of 4")
        return super().group_of(cols)

    def fit(self, w, importance=None):
        w = w.float()
        return self.grid.fit(w * keep_mask(w), importance)

    def quantize(self, w, params, col=0):
        w = w.float()
        rows, cols = w.shape
        if cols % 4:
            raise ValueError(f"sparse24: quantize needs whole tiles of 4 columns, got {cols}")
        mask = keep_mask(w)
        q = self.grid.codes(w, params)                                     # [rows, cols] in [lo, hi]
        values = self.grid.values(q, params) * mask
        lo = self.grid.levels()[0]
        pos = mask.reshape(rows, cols // 4, 4).nonzero()[:, 2].reshape(rows, cols // 4, 2)   # ascending
        kept = torch.gather(q.reshape(rows, cols // 4, 4), -1, pos) - lo
        codes = torch.cat([kept, pos.to(kept.dtype)], -1).reshape(rows, cols)  # per tile: v0 v1 p0 p1
        return Quantized(values, codes.to(torch.int64))

    def pack(self, codes, params):
        rows, cols = codes.shape
        self.group_of(cols)
        t = codes.reshape(rows, cols // 4, 4)
        return Packed(self.name, self.config(), (rows, cols), {
            "codes": pack_bits(t[..., :2], self.bits),
            "positions": pack_bits(t[..., 2:], 2),
            "scale": torch.stack([p.scale for p in params], 1).half(),   # [rows, groups]
        })

    def decode(self, packed):
        rows, cols = packed.shape
        g = self.group_of(cols)
        n = rows * cols // 2
        lo = self.grid.levels()[0]
        q = unpack_bits(packed.data["codes"], self.bits, n).reshape(rows, cols // 4, 2).float() + lo
        pos = unpack_bits(packed.data["positions"], 2, n).reshape(rows, cols // 4, 2)
        s = packed.data["scale"].float().repeat_interleave(g, 1).reshape(rows, cols // 4, 4)
        out = torch.zeros(rows, cols // 4, 4, device=q.device)
        out.scatter_(-1, pos, q)
        return (out * s).reshape(rows, cols)
