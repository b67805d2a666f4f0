"""The checkerboard lattice D_n for any n (D8, D12, D16, ...): codec `dn` (issue 28, part 2), the
`d4` codec of lattice.py with the block length an option.

Nearest point. D_n = {z ∈ Zⁿ : Σz even}; lattice.nearest_dn rounds every coordinate and, when the
sum is odd, moves the coordinate whose second-best integer costs least (Conway & Sloane 1982),
exact inside a box too (see lattice.py). The same few lines serve every n.

The codebook (b = `bits`, n = `n`): σ·(z + ½·1), z ∈ D_n, z_i ∈ [-2^(b-1), 2^(b-1) - 1]: the
d4 codebook of lattice.py with n coordinates. 2^(nb-1) points per n weights: the last coordinate's
low bit follows from the parity, so nb - 1 bits are stored, b - 1/n bits per weight. For even n
the set is symmetric under negation (-(z + ½) = (-z - 1) + ½ and Σ(-z - 1) ≡ Σz + n); for odd n
it is not (allowed, but the mirror image of a point is not a point).
`dn {n: 4}` is `d4`: same codebook, load factor, scale search and stored bytes (a test checks it).

A row whose length is not a multiple of n. With `group: null` (one scale per row) a row of c
columns is ⌊c/n⌋ blocks of n and one last block of r = c mod n columns coded in D_r the same way
(r·b - 1 bits): e.g. D12 on a 256-column matrix is 21 D12 blocks and one D4 block. GPTQ hands the
short block last (`ragged_tail`). With a `group`, the group must be a multiple of n (no short blocks).

The scale: σ = RMS(group row) / κ_b,n (κ: the least-MSE load on N(0, 1) samples with the scale search
off, measured for n = 8, 12, 16 by a golden-section search on 2^18 samples, which gives D4's table
back to within 1 %; other n use D4's; at 7 and 8 bits the optimum is flat and the figures noisy),
then with `scale_search` (default) the grid of lattice.SCALE_GRID around it per row and group.
Stored: the codes and one fp16 σ per row and group. block_width = n.
"""
from __future__ import annotations

from pydantic import Field, model_validator

from quantatlas._lazy import torch
from quantatlas.quant.codecs.base import Packed, Quantized, pack_bits, unpack_bits
from quantatlas.quant.codecs.lattice import D4, BlockLattice, LatticeConfig, nearest_dn

#: κ (σ = RMS/κ) per n and bits: the least-MSE load on i.i.d. N(0, 1) rows, scale search off
KAPPA = {
    4: D4.kappa,
    8: {2: 1.023, 3: 1.729, 4: 2.999, 5: 5.385, 6: 9.737, 7: 17.89, 8: 33.67},
    12: {2: 1.012, 3: 1.712, 4: 2.987, 5: 5.311, 6: 9.692, 7: 17.91, 8: 33.15},
    16: {2: 1.008, 3: 1.714, 4: 2.985, 5: 5.327, 6: 9.604, 7: 17.69, 8: 32.17},
}


class DnConfig(LatticeConfig):
    name = "dn"
    n: int = Field(ge=2, le=64)

    @model_validator(mode="after")
    def _group_multiple(self):   # replaces LatticeConfig's check (its dimension is a class constant)
        if self.group is not None and self.group % self.n:
            raise ValueError(f"group must be a multiple of n = {self.n}, got {self.group} "
                             f"(or null: one scale per row, any row length)")
        return self

    def build(self):
        return Dn(self)


def box_point(y: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest point z of D_m with every z_i in [-2^(b-1), 2^(b-1) - 1] to y - ½ (y [..., m]): the
    codebook point is z + ½."""
    return nearest_dn(y - 0.5, -2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1)


class Dn(BlockLattice):
    name = "dn"
    ragged_tail = True

    def __init__(self, cfg: DnConfig):
        self.dim = cfg.n
        self.kappa = KAPPA.get(cfg.n, D4.kappa)
        super().__init__(cfg)

    def group_of(self, cols: int) -> int:
        if self.group_size is None:
            return cols                       # one scale per row: any row length (a short last block)
        return super().group_of(cols)

    def blocks(self, c: int) -> tuple[int, int]:
        """(full blocks, columns of the short last block) of c columns."""
        return c // self.dim, c % self.dim

    def _unit(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codebook points (unit scale) to the rows of y [rows, c]: (values, codes z + 2^(b-1))."""
        rows, c = y.shape
        nb, r = self.blocks(c)
        z = box_point(y[:, :nb * self.dim].reshape(rows, nb, self.dim), self.bits).reshape(rows, nb * self.dim)
        if r:
            z = torch.cat([z, box_point(y[:, nb * self.dim:], self.bits)], 1)
        return z + 0.5, (z + 2 ** (self.bits - 1)).to(torch.int64)

    def _values(self, w, scale):
        inv = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-30), torch.zeros_like(scale))
        return self._unit(w * inv[:, None])[0] * scale[:, None]

    def quantize(self, w, params, col=0):
        w = w.float()
        if col % self.dim:
            raise ValueError(f"dn quantizes blocks of n = {self.dim} columns from a block start: got column {col}")
        s = params.scale.to(w.device)
        inv = torch.where(s > 0, 1.0 / s.clamp_min(1e-30), torch.zeros_like(s))
        v, codes = self._unit(w * inv[:, None])
        return Quantized(v * s[:, None], codes)

    # -- storage: per block the first m - 1 codes (b bits) and the last one without its low bit ----
    def pack(self, codes, params):
        rows, cols = codes.shape
        g = self.group_of(cols)
        nb, r = self.blocks(g)
        u = codes.reshape(rows, cols // g, g)
        full = u[..., :nb * self.dim].reshape(rows, cols // g, nb, self.dim)
        data = {"codes": pack_bits(full[..., :-1], self.bits), "last": pack_bits(full[..., -1] >> 1, self.bits - 1)}
        if r:
            tail = u[..., nb * self.dim:]
            data["tail_codes"] = pack_bits(tail[..., :-1], self.bits)
            data["tail_last"] = pack_bits(tail[..., -1] >> 1, self.bits - 1)
        data["scale"] = torch.stack([p.scale for p in params], 1).half()
        return Packed(self.name, self.config(), (rows, cols), data)

    def _unpack_blocks(self, head: torch.Tensor, last: torch.Tensor, count: int, m: int) -> torch.Tensor:
        """`count` blocks of m codes from their streams: [count, m]."""
        h = unpack_bits(head, self.bits, count * (m - 1)).reshape(count, m - 1)
        low = (unpack_bits(last, self.bits - 1, count) << 1) | (h.sum(1) & 1)   # Σu even <=> Σz even
        return torch.cat([h, low[:, None]], 1)

    def decode(self, packed):
        rows, cols = packed.shape
        g = self.group_of(cols)
        nb, r = self.blocks(g)
        groups = rows * (cols // g)
        u = self._unpack_blocks(packed.data["codes"], packed.data["last"], groups * nb, self.dim)
        u = u.reshape(groups, nb * self.dim)
        if r:
            tail = self._unpack_blocks(packed.data["tail_codes"], packed.data["tail_last"], groups, r)
            u = torch.cat([u, tail], 1)
        z = u.float() - 2 ** (self.bits - 1)
        scale = packed.data["scale"].float()
        w = (z + 0.5).reshape(rows, cols // g, g).to(scale.device) * scale[..., None]
        return w.reshape(rows, cols)
