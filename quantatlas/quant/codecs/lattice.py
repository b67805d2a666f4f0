"""Lattice codecs `d4` and `e8`: Conway–Sloane nearest-point decoding on a box-truncated lattice,
one fp16 scale per row and group (the D4/E8 rows of issue 15, part 4).

Nearest points (Conway & Sloane, "Fast quantizing and decoding algorithms for lattice quantizers
and codes", IEEE T-IT 1982; SPLAG ch. 20):
    D_n = {z ∈ Zⁿ : Σz even}. f(y) = round every coordinate; if Σf is odd, move the coordinate
          with the largest rounding error to its other neighbour. The result is the nearest
          D_n point (changing one coordinate by ±1 is the cheapest parity fix; by ±2 fixes nothing).
    E8  = D8 ∪ (D8 + ½·1): the nearer of the nearest points of the two cosets.
Box truncation keeps the same argument exact: per coordinate the best integer in [lo, hi] and
the second best (its neighbour on y's side, or on the other side at the box edge); if the parity
is wrong, the coordinate whose second best costs least moves. `nearest_dn(y, lo, hi)`.

The codebooks (b = `bits`):
    d4: σ·(z + ½·1), z ∈ D4, z_i ∈ [-2^(b-1), 2^(b-1) - 1]. The translate D4 + ½ makes the set
        symmetric under negation (-(z + ½) = (-z - 1) + ½ and Σ(-z - 1) is even). 2^(4b-1)
        points per 4 weights: the last coordinate's low bit follows from the parity, so
        4b - 1 bits are stored: b - ¼ bits per weight.
    e8: σ·(v + ¼·1), v ∈ E8, every coordinate of v + ¼ an odd multiple of ¼ in
        [-2^(b-1) + ¼, 2^(b-1) - ¼] (the E8 + ¼ of QuIP#: symmetric, no zero coordinate). v = m + t·½
        with t ∈ {0, 1} the coset and m ∈ D8, m_i ∈ [-2^(b-1), 2^(b-1) - 1]: 2·2^(8b-1) = 2^(8b)
        points, stored as t (1 bit), m_0..m_6 (b bits each), m_7 without its low bit (b - 1):
        exactly b bits per weight.
The scale: σ = RMS(group row) / κ_b (κ_b: the Gaussian-optimal load factor, measured with
bench/gaussian_mse.py); with `scale_search` (default) each row and group tries σ·m for m on a
grid and keeps the one with the least (diag-H-weighted, when GPTQ passes importance) error.
Stored per matrix: the codes and one fp16 σ per row and group; nothing else (the codebook is a
function of `bits`). block_width = 4 (d4) or 8 (e8): GPTQ hands whole lattice blocks to
`quantize` and does the LDLQ block update.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pydantic import Field, model_validator

from quantatlas._lazy import torch
from quantatlas.quant.codecs.base import Codec, Packed, Quantized, pack_bits, unpack_bits
from quantatlas.quant.config import CodecConfig

FP16_MAX = 65504.0
#: multipliers of the base scale tried by `scale_search`
SCALE_GRID = (0.7, 0.76, 0.82, 0.88, 0.94, 1.0, 1.06, 1.12, 1.2, 1.3, 1.45)


# ---- nearest points --------------------------------------------------------------------------

def nearest_dn(y: torch.Tensor, lo: float | None = None, hi: float | None = None) -> torch.Tensor:
    """Nearest point of D_n (integer vectors with even sum) to each row of y [..., n], with every
    coordinate in [lo, hi] when a box is given (hi - lo >= 1). Returns float integer values."""
    b = torch.round(y)
    if lo is not None:
        b = b.clamp(lo, hi)
    d = y - b
    step = torch.where(d >= 0, torch.ones_like(d), -torch.ones_like(d))
    c = b + step
    if lo is not None:
        outside = (c < lo) | (c > hi)
        c = torch.where(outside, b - step, c)
    extra = (y - c) ** 2 - d ** 2                                # cost of the second best
    odd = torch.remainder(b.sum(-1), 2) != 0
    pick = torch.nn.functional.one_hot(extra.argmin(-1), y.shape[-1]).bool() & odd[..., None]
    return torch.where(pick, c, b)


def nearest_e8(y: torch.Tensor) -> torch.Tensor:
    """Nearest point of E8 = D8 ∪ (D8 + ½) to each row of y [..., 8] (Conway–Sloane)."""
    a = nearest_dn(y)
    h = nearest_dn(y - 0.5) + 0.5
    closer = ((y - a) ** 2).sum(-1) <= ((y - h) ** 2).sum(-1)
    return torch.where(closer[..., None], a, h)


def e8_box(y: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest point of the e8 codebook (unit scale) to y [..., 8]: (value, odd-quarter index k
    with value = (2k + 1)/4, k ∈ [-2^b, 2^b - 1])."""
    lo, hi = -2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1
    m0 = nearest_dn(y - 0.25, lo, hi)          # coset t = 0: value m + ¼
    m1 = nearest_dn(y - 0.75, lo, hi)          # coset t = 1: value m + ½ + ¼
    v0, v1 = m0 + 0.25, m1 + 0.75
    first = ((y - v0) ** 2).sum(-1) <= ((y - v1) ** 2).sum(-1)
    value = torch.where(first[..., None], v0, v1)
    k = torch.where(first[..., None], 2 * m0, 2 * m1 + 1)
    return value, k


def d4_box(y: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest point of the d4 codebook (unit scale) to y [..., 4]: (value z + ½, z)."""
    z = nearest_dn(y - 0.5, -2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1)
    return z + 0.5, z


# ---- a block lattice codec with a per-group scale ----------------------------------------------

class LatticeConfig(CodecConfig):
    """The options every block-lattice codec shares (d4, e8, e8p, nestquant); registers no name."""
    act_order_helps = False   # e8p 2-bit +37 %, d4 +64 %, e8 +41 %, nestquant 3-bit +33 % KLD with them

    bits: int = Field(ge=2, le=8)
    group: int | None = Field(128, gt=0)
    scale_search: bool = True
    lattice_dim: ClassVar[int] = 8

    @model_validator(mode="after")
    def _group_multiple(self):
        dim = self.lattice_dim
        if self.group is not None and self.group % dim:
            raise ValueError(f"group must be a multiple of the lattice dimension {dim}, got {self.group}")
        return self


@dataclass
class ScaleParams:
    scale: torch.Tensor  # [rows] σ, fp16-rounded (stored)


def row_scale(w: torch.Tensor, kappa: float) -> torch.Tensor:
    return (w.pow(2).mean(1).sqrt() / kappa).clamp(min=1e-8, max=FP16_MAX)


def search_scale(w: torch.Tensor, base: torch.Tensor, importance, values_of, grid=SCALE_GRID) -> torch.Tensor:
    """Per row, the σ = base·m (m on `grid`, fp16-rounded) whose grid values `values_of(w, σ)`
    leave the least error Σ_j imp_j (w_j - ŵ_j)² (imp = 1 without importance)."""
    imp = torch.ones(w.shape[1], device=w.device) if importance is None else importance.to(w.device).float()
    best_err, best = None, None
    for m in grid:
        s = (base * m).clamp(max=FP16_MAX).half().float()
        err = (((w - values_of(w, s)) ** 2) * imp).sum(1)
        if best is None:
            best_err, best = err, s
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
    return best


class BlockLattice(Codec):
    """Shared steps of codecs that quantize `dim`-wide blocks against a unit-scale codebook."""

    dim: int
    kappa: dict[int, float]

    def __init__(self, cfg):
        super().__init__(cfg)
        self.bits, self.group_size, self.scale_search = cfg.bits, cfg.group, cfg.scale_search
        self.block_width = self.dim

    def group_of(self, cols: int) -> int:
        g = super().group_of(cols)
        if g % self.dim:
            raise ValueError(f"{self.name}: rows of {g} columns are not a multiple of the lattice dimension {self.dim}")
        return g

    # subclasses: unit-scale nearest point -> (values [rows, n, dim], codes [rows, n·c])
    def _nearest(self, y: torch.Tensor):
        raise NotImplementedError

    def _values(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        rows, c = w.shape
        inv = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-30), torch.zeros_like(scale))
        v, _ = self._nearest((w * inv[:, None]).reshape(rows, c // self.dim, self.dim))
        return v.reshape(rows, c) * scale[:, None]

    def fit(self, w, importance=None):
        w = w.float()
        base = row_scale(w, self.kappa[self.bits])
        if not self.scale_search:
            return ScaleParams(base.half().float())
        return ScaleParams(search_scale(w, base, importance, self._values))

    def quantize(self, w, params, col=0):
        w = w.float()
        rows, c = w.shape
        if c % self.dim or col % self.dim:
            raise ValueError(f"{self.name} quantizes whole {self.dim}-column blocks: got columns {col}..{col + c}")
        s = params.scale.to(w.device)
        inv = torch.where(s > 0, 1.0 / s.clamp_min(1e-30), torch.zeros_like(s))
        v, codes = self._nearest((w * inv[:, None]).reshape(rows, c // self.dim, self.dim))
        return Quantized(v.reshape(rows, c) * s[:, None], codes)


class D4Config(LatticeConfig):
    name = "d4"
    lattice_dim = 4

    def build(self):
        return D4(self)


class E8Config(LatticeConfig):
    name = "e8"
    lattice_dim = 8

    def build(self):
        return E8(self)


class D4(BlockLattice):
    name = "d4"
    dim = 4
    # σ = RMS/κ: the least-MSE load on N(0, 1) samples (a grid search, scale search off)
    kappa = {2: 1.055, 3: 1.786, 4: 3.074, 5: 5.475, 6: 9.75, 7: 17.96, 8: 33.1}

    def _nearest(self, y):
        v, z = d4_box(y, self.bits)
        return v, (z + 2 ** (self.bits - 1)).to(torch.int64).reshape(y.shape[0], -1)

    def pack(self, codes, params):
        rows, cols = codes.shape
        self.group_of(cols)
        u = codes.reshape(rows, cols // 4, 4)
        return Packed(self.name, self.config(), (rows, cols), {
            "codes": pack_bits(u[..., :3], self.bits),
            "last": pack_bits(u[..., 3] >> 1, self.bits - 1),
            "scale": torch.stack([p.scale for p in params], 1).half(),
        })

    def decode(self, packed):
        rows, cols = packed.shape
        g = self.group_of(cols)
        n = rows * cols // 4
        head = unpack_bits(packed.data["codes"], self.bits, 3 * n).reshape(n, 3)
        last = unpack_bits(packed.data["last"], self.bits - 1, n) << 1
        last = last | (head.sum(1) & 1)                      # Σu even <=> Σz even
        z = torch.cat([head, last[:, None]], 1).float() - 2 ** (self.bits - 1)
        scale = packed.data["scale"].float()
        w = (z + 0.5).reshape(rows, cols // g, g).to(scale.device) * scale[..., None]
        return w.reshape(rows, cols)


class E8(BlockLattice):
    name = "e8"
    dim = 8
    kappa = {2: 1.018, 3: 1.718, 4: 3.01, 5: 5.276, 6: 9.598, 7: 17.46, 8: 31.77}

    def _nearest(self, y):
        v, k = e8_box(y, self.bits)
        return v, (k + 2 ** self.bits).to(torch.int64).reshape(y.shape[0], -1)

    def pack(self, codes, params):
        rows, cols = codes.shape
        self.group_of(cols)
        k = codes.reshape(rows, cols // 8, 8)
        t = k[..., 0] & 1                                       # the coset (same parity in a block)
        u = k >> 1                                              # m + 2^(b-1)
        return Packed(self.name, self.config(), (rows, cols), {
            "coset": pack_bits(t, 1),
            "codes": pack_bits(u[..., :7], self.bits),
            "last": pack_bits(u[..., 7] >> 1, self.bits - 1),
            "scale": torch.stack([p.scale for p in params], 1).half(),
        })

    def decode(self, packed):
        rows, cols = packed.shape
        g = self.group_of(cols)
        n = rows * cols // 8
        t = unpack_bits(packed.data["coset"], 1, n)
        head = unpack_bits(packed.data["codes"], self.bits, 7 * n).reshape(n, 7)
        last = (unpack_bits(packed.data["last"], self.bits - 1, n) << 1) | (head.sum(1) & 1)
        m = torch.cat([head, last[:, None]], 1).float() - 2 ** (self.bits - 1)
        v = m + 0.25 + 0.5 * t[:, None].float()
        scale = packed.data["scale"].float()
        return (v.reshape(rows, cols // g, g).to(scale.device) * scale[..., None]).reshape(rows, cols)
