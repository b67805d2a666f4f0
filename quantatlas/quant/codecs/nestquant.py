"""NestQuant-style nested E8 lattice (Voronoi) codes: codec `nestquant` (Savkin, Sokolov-Kagan,
Ordentlich, Polyanskiy 2025, "NestQuant: nested lattice quantization for matrix products and LLMs").

Codebook. The Voronoi code of E8 with nesting ratio q = 2^b: C = E8 ∩ q·V(E8), one
representative of each coset of qE8 in E8, q^8 points, b bits per weight. With the generator
G of E8 (rows: 2e_1, e_{i+1} - e_i for i = 1..6, ½·1; det 1, Conway–Sloane's), λ = u G, u ∈ Z^8:
    encode   λ = Q_E8(x / (σβ)),  u = λ G⁻¹ mod q            (8 values of b bits)
    decode   λ' = uG - q·Q_E8(uG / q)                          (the representative in q·V)
    ŵ        = σ β λ'
λ' = λ unless x/(σβ) falls outside q·V (overload). NestQuant's answer is a union of scaled
codebooks: each 8-block takes the β of a few (`betas` = 1, 2, 4 or 8 values, a geometric
ladder β_j = (c_b / q)·γ^(-j) down from a scale c_b/q that rarely overloads) that leaves the least error, stored in log2(betas) bits per block.
Q_E8 is Conway–Sloane's nearest point (lattice.nearest_e8).

Stored: u (b bits per weight), the β index (log2(betas)/8 bits per weight) and one fp16 σ =
RMS per row and group: b + log2(betas)/8 + 16/group bits per weight. block_width = 8.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from quantatlas._lazy import torch
from quantatlas.quant.codecs.base import Packed, Quantized, pack_bits, unpack_bits
from quantatlas.quant.codecs.lattice import BlockLattice, LatticeConfig, ScaleParams, nearest_e8, row_scale

#: (c_b, γ) of the β ladder per bits (tuned on N(0,1) samples, 4 betas: least MSE on a grid of c, γ)
LADDER = {2: (7.9, 1.35), 3: (7.0, 1.3), 4: (7.0, 1.3), 5: (7.0, 1.25), 6: (7.0, 1.25)}


def e8_generator(dtype=None, device=None) -> torch.Tensor:
    g = torch.zeros(8, 8, dtype=dtype or torch.float64, device=device)
    g[0, 0] = 2
    for i in range(1, 7):
        g[i, i - 1], g[i, i] = -1, 1
    g[7] = 0.5
    return g


class NestQuantConfig(LatticeConfig):
    name = "nestquant"
    bits: int = Field(ge=2, le=6)
    betas: Literal[1, 2, 4, 8] = 4
    scale_search: bool = False

    def build(self):
        return NestQuant(self)


class NestQuant(BlockLattice):
    name = "nestquant"
    dim = 8

    def __init__(self, cfg: NestQuantConfig):
        super().__init__(cfg)
        self.q = 2 ** cfg.bits
        c, gamma = LADDER[cfg.bits]
        self.beta = [c / self.q * gamma ** -j for j in range(cfg.betas)]
        self.kappa = {cfg.bits: 1.0}
        self.beta_bits = int(math.log2(cfg.betas))

    def _represent(self, u: torch.Tensor) -> torch.Tensor:
        """The Voronoi representative λ' of codes u [..., 8] (float)."""
        lam = u @ e8_generator(u.dtype, u.device)
        return lam - self.q * nearest_e8(lam / self.q)

    def _nearest(self, y):
        rows, n, _ = y.shape
        ginv = torch.linalg.inv(e8_generator(torch.float64, y.device))
        best_err = best_v = best_u = best_j = None
        for j, beta in enumerate(self.beta):
            lam = nearest_e8(y.double() / beta)
            u = torch.remainder(torch.round(lam @ ginv), self.q)
            v = self._represent(u) * beta
            err = ((y.double() - v) ** 2).sum(-1)
            if best_err is None:
                best_err, best_v, best_u, best_j = err, v, u, torch.zeros_like(err, dtype=torch.int64)
            else:
                take = err < best_err
                best_err = torch.where(take, err, best_err)
                best_v = torch.where(take[..., None], v, best_v)
                best_u = torch.where(take[..., None], u, best_u)
                best_j = torch.where(take, j, best_j)
        shifts = torch.arange(8, device=y.device) * self.cfg.bits
        code = (best_u.long() << shifts).sum(-1) | (best_j << (8 * self.cfg.bits))
        return best_v.float(), code

    def pack(self, codes, params):
        rows, cols = codes.shape[0], codes.shape[1] * 8
        self.group_of(cols)
        b = self.cfg.bits
        u = (codes[..., None] >> (torch.arange(8, device=codes.device) * b)) & (self.q - 1)
        data = {"codes": pack_bits(u, b)}
        if self.beta_bits:
            data["beta"] = pack_bits(codes >> (8 * b), self.beta_bits)
        data["scale"] = torch.stack([p.scale for p in params], 1).half()
        return Packed(self.name, self.config(), (rows, cols), data)

    def decode(self, packed):
        rows, cols = packed.shape
        g = self.group_of(cols)
        n = rows * cols // 8
        u = unpack_bits(packed.data["codes"], self.cfg.bits, 8 * n).reshape(n, 8).double()
        dev = u.device
        j = unpack_bits(packed.data["beta"], self.beta_bits, n) if self.beta_bits else torch.zeros(n, dtype=torch.int64,
                                                                                                 device=dev)
        beta = torch.tensor(self.beta, dtype=torch.float64, device=dev)[j]
        v = (self._represent(u) * beta[:, None]).float()
        scale = packed.data["scale"].float()
        return (v.reshape(rows, cols // g, g).to(scale.device) * scale[..., None]).reshape(rows, cols)
