"""QuIP#'s E8P codebook (Tseng et al. 2024, "QuIP#: Even Better LLM Quantization with Hadamard
Incoherence and Lattice Codebooks") and its residual stages for 3 and 4 bits: codec `e8p`.

The codebook (2^16 points in 8 dimensions, 2 bits per weight). Let
    A = {|v| : v ∈ D8 + ½·1 (half-integer coordinates, even sum), ‖v‖² ≤ 10}   (227 patterns)
      ∪ 29 patterns of norm² 12 (five 3/2 and three 1/2; the positions of the three ½ listed in
        NORM12_HALVES, as QuIP#'s final codebook has them),
256 "absolute patterns" a (positive half-integers). A point is
    s ⊙ a ± ¼·1,   s ∈ {±1}^8 with Σ(s ⊙ a) even,
i.e. s ⊙ a ∈ D8 + ½ ⊂ E8, and the point lies in E8 + ¼ (s⊙a - ¼ = (s⊙a - ½) + ¼, s⊙a - ½ ∈ D8).
Flipping the sign of a half-integer changes the sum's parity, so the parity fixes one sign:
7 sign bits are free. 256 · 2^7 · 2 = 2^16 distinct points (a > 0 makes s⊙a distinct; the two
shifts differ by ½·1 ∉ D8). Code (16 bits): abs index (8) | signs of coordinates 0..6 (7) << 8 |
shift (1 = +¼) << 15; the sign of coordinate 7 is whatever makes #negatives ≡ Σa (mod 2).

Exact nearest point (no candidate pruning): for each shift, y = x ∓ ¼; for a pattern a the best
signs are s = sign(y), and if #negatives has the wrong parity, the coordinate with the least
a_i|y_i| flips. ‖y - s⊙a‖² = ‖y‖² - 2(Σ a_i|y_i| - [wrong parity]·2·min_i a_i|y_i|) + ‖a‖², so
all 256 patterns are scored at once (a [N, 256] matmul and a [N, 256, 8] minimum, chunked).

Residual stages (QuIP#'s RVQ): ŵ = σ(c₁ + c₂/ρ), c₂ the nearest point of the second codebook to
ρ·(x - c₁):
    bits 3: c₂ from "E8 1-bit": the 241 points of E8 with ‖v‖² ≤ 2 (0, 112 of type (±1,±1,0⁶),
            128 of type (±½)⁸ with even minus count) and 15 of norm² 4 (2e_i for all i, -2e_i for
            i < 7): 256 points, 1 bit per weight; ρ = 2.04, κ = 0.98.
    bits 4: c₂ from E8P again; ρ = 3.45, κ = 1.03.
    bits 2: c₁ alone, κ = 1.03.
(ρ and κ as in QuIP#'s codebooks; x = w/σ with σ = RMS(w)/κ, so x has RMS κ.) The second
stage is found after the first (greedy, as QuIP#), by exact search in its own codebook.

Stored: codes (16 bits per 8 weights, plus 8 or 16 for the residual stage) and one fp16 σ per
row and group (`group`, default 128; `group: null` = one per row; QuIP# itself uses one per
matrix after incoherence processing). `scale_search: true` tries σ·m on a grid per row and group
(lattice.SCALE_GRID) and keeps the least (importance-weighted) error. block_width = 8.
"""
from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Literal

import numpy as np
from pydantic import Field

from quantatlas._lazy import torch
from quantatlas.quant.codecs.base import Packed, Quantized
from quantatlas.quant.codecs.lattice import BlockLattice, LatticeConfig, ScaleParams
from quantatlas.quant.config import CodecConfig  # noqa: F401  (the family base, for readers)

#: positions of the three ½ entries in the 29 norm-12 patterns (the others are 3/2), in order
NORM12_HALVES = (
    (1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2),
    (3, 6, 7), (3, 5, 7), (3, 4, 7), (3, 5, 6), (3, 4, 6), (3, 4, 5),
    (2, 6, 7), (2, 5, 7), (2, 4, 7), (2, 5, 6), (2, 4, 6), (2, 4, 5),
    (1, 6, 7), (1, 5, 7), (1, 4, 7), (1, 5, 6), (1, 4, 6),
    (0, 4, 5), (0, 6, 7), (0, 5, 7), (0, 4, 7), (0, 5, 6), (0, 4, 6),
    (0, 1, 4), (2, 3, 7),
)
#: (κ, ρ) per bits: the load factor (x = w·κ/RMS) and the residual scale
STAGES = {2: (1.03, None), 3: (0.98, 2.04), 4: (1.03, 3.45)}
CHUNK = 4096


@lru_cache(maxsize=None)
def abs_patterns() -> np.ndarray:
    """The 256 absolute patterns [256, 8] (float64): 227 from D8 + ½ within ‖·‖² ≤ 10, sorted
    lexicographically, then the 29 norm-12 patterns."""
    odd = (1, 3, 5)  # 2·|coordinate|
    small = sorted(p for p in itertools.product(odd, repeat=8) if sum(c * c for c in p) <= 40)
    extra = [tuple(1 if i in h else 3 for i in range(8)) for h in NORM12_HALVES]
    return np.array(small + extra, dtype=np.float64) / 2


@lru_cache(maxsize=None)
def e81b_points() -> np.ndarray:
    """QuIP#'s 1-bit E8 codebook [256, 8]: E8 ∩ {‖v‖² ≤ 2} (241) and 15 points 2e_i / -2e_i (i < 7)."""
    pts = [np.zeros(8)]
    for i, j in itertools.combinations(range(8), 2):
        for si, sj in itertools.product((1, -1), repeat=2):
            v = np.zeros(8)
            v[i], v[j] = si, sj
            pts.append(v)
    for signs in itertools.product((1, -1), repeat=8):
        if signs.count(-1) % 2 == 0:
            pts.append(np.array(signs) / 2)
    for i in range(8):
        pts.append(2 * np.eye(8)[i])
    for i in range(7):
        pts.append(-2 * np.eye(8)[i])
    return np.array(pts, dtype=np.float64)


class _Tables:
    """Codebook tensors per device."""

    def __init__(self):
        self._dev: dict = {}

    def on(self, device):
        key = str(device)
        if key not in self._dev:
            a = torch.tensor(abs_patterns(), dtype=torch.float32, device=device)
            r = torch.tensor(e81b_points(), dtype=torch.float32, device=device)
            self._dev[key] = {"abs": a, "abs_sq": (a * a).sum(1), "abs_odd": (a.sum(1).round().long() & 1),
                              "e81b": r, "e81b_sq": (r * r).sum(1)}
        return self._dev[key]


TABLES = _Tables()


def _best_signed(y: torch.Tensor, t: dict, k: int = 4):
    """For each row of y [n, 8]: the best signed pattern s⊙a (Σ even). Returns (gain = -dist²,
    pattern index, negative mask [n, 8]).

    Every pattern's gain without the parity fix is 2·|y|·a - ‖a‖² (one matmul); the fix only
    lowers it. So the exact gain is needed only for wrong-parity patterns whose unfixed gain beats
    the best right-parity one: the top k of them per row, and all 256 for the (rare) rows where
    the k-th still beats the best exact gain found.
    """
    ay = y.abs()
    neg = y < 0
    wrong = (neg.sum(1, keepdim=True) & 1) != t["abs_odd"][None, :]                 # [n, 256]
    g0 = 2 * ay @ t["abs"].T - t["abs_sq"][None, :]
    right_best = torch.where(wrong, float("-inf"), g0).max(1)
    cand_g, cand = torch.where(wrong, g0, float("-inf")).topk(k, dim=1)            # [n, k]
    prod = ay[:, None, :] * t["abs"][cand]                                          # [n, k, 8]
    mn, arg = prod.min(-1)
    fixed = torch.where(torch.isfinite(cand_g), cand_g - 4 * mn, float("-inf"))
    wrong_best, j = fixed.max(1)
    use_wrong = wrong_best > right_best.values
    g = torch.where(use_wrong, wrong_best, right_best.values)
    ai = torch.where(use_wrong, cand.gather(1, j[:, None])[:, 0], right_best.indices)
    fi = arg.gather(1, j[:, None])[:, 0]
    flip = use_wrong
    unsure = torch.nonzero(cand_g[:, -1] > g).flatten()
    if unsure.numel():                                       # exhaustive for those rows
        p = ay[unsure, None, :] * t["abs"][None, :, :]
        mn_all, arg_all = p.min(-1)
        gu = g0[unsure] - 4 * mn_all * wrong[unsure]
        gbest, abest = gu.max(1)
        g[unsure], ai[unsure] = gbest, abest
        flip[unsure] = wrong[unsure].gather(1, abest[:, None])[:, 0]
        fi[unsure] = arg_all.gather(1, abest[:, None])[:, 0]
    neg = neg ^ (torch.nn.functional.one_hot(fi, 8).bool() & flip[:, None])
    return g - (ay * ay).sum(1), ai, neg


def e8p_nearest(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest E8P point to each row of x [N, 8] (exact): (values [N, 8], 16-bit codes [N] int64)."""
    t = TABLES.on(x.device)
    vals, codes = [], []
    for c0 in range(0, x.shape[0], CHUNK):
        xc = x[c0:c0 + CHUNK]
        gp, ap, np_ = _best_signed(xc - 0.25, t)     # points s⊙a + ¼
        gm, am, nm = _best_signed(xc + 0.25, t)      # points s⊙a - ¼
        plus = gp >= gm                              # -dist²: ties keep the +¼ point
        ai = torch.where(plus, ap, am)
        neg = torch.where(plus[:, None], np_, nm)
        a = t["abs"][ai]
        sh = torch.where(plus, 0.25, -0.25).to(x.dtype)
        vals.append(torch.where(neg, -a, a) + sh[:, None])
        sign_bits = (neg[:, :7].long() << torch.arange(7, device=x.device)).sum(1)
        codes.append(ai | (sign_bits << 8) | (plus.long() << 15))
    if not vals:
        return x.new_zeros(0, 8), torch.zeros(0, dtype=torch.int64, device=x.device)
    return torch.cat(vals), torch.cat(codes)


def e8p_decode(codes: torch.Tensor) -> torch.Tensor:
    """E8P points [N, 8] of 16-bit codes [N]."""
    t = TABLES.on(codes.device)
    codes = codes.long()
    ai = codes & 0xFF
    bits = (codes[:, None] >> (8 + torch.arange(7, device=codes.device))) & 1                # [N, 7]
    last = (t["abs_odd"][ai] - bits.sum(1)) & 1                                             # parity
    neg = torch.cat([bits, last[:, None]], 1).bool()
    a = t["abs"][ai]
    sh = torch.where(((codes >> 15) & 1).bool(), 0.25, -0.25)
    return torch.where(neg, -a, a) + sh[:, None].to(a.dtype)


def e81b_nearest(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = TABLES.on(x.device)
    idx = (2 * x @ t["e81b"].T - t["e81b_sq"][None, :]).argmax(1)
    return t["e81b"][idx], idx


class E8PConfig(LatticeConfig):
    name = "e8p"
    bits: Literal[2, 3, 4] = Field(2)
    scale_search: bool = False

    def build(self):
        return E8P(self)


class E8P(BlockLattice):
    name = "e8p"
    dim = 8

    def __init__(self, cfg: E8PConfig):
        super().__init__(cfg)
        self.kappa_b, self.rho = STAGES[cfg.bits]
        self.kappa = {cfg.bits: self.kappa_b}

    def _nearest(self, y):
        rows, n, _ = y.shape
        flat = y.reshape(-1, 8)
        v, c = e8p_nearest(flat)
        if self.rho is not None:
            r = (flat - v) * self.rho
            v2, c2 = e8p_nearest(r) if self.bits == 4 else e81b_nearest(r)
            v = v + v2 / self.rho
            c = c | (c2 << 16)
        return v.reshape(rows, n, 8), c.reshape(rows, n)

    def pack(self, codes, params):
        rows, cols = codes.shape[0], codes.shape[1] * 8
        self.group_of(cols)
        first = codes & 0xFFFF
        data = {"codes": (first - (first >= 2 ** 15).long() * 2 ** 16).to(torch.int16)}   # 16 bits as int16
        if self.bits == 3:
            data["resid"] = (codes >> 16).to(torch.uint8)
        elif self.bits == 4:
            second = codes >> 16
            data["resid"] = (second - (second >= 2 ** 15).long() * 2 ** 16).to(torch.int16)
        data["scale"] = torch.stack([p.scale for p in params], 1).half()
        return Packed(self.name, self.config(), (rows, cols), data)

    def decode(self, packed):
        rows, cols = packed.shape
        g = self.group_of(cols)
        c = packed.data["codes"].long() & 0xFFFF
        v = e8p_decode(c.reshape(-1))
        if self.bits == 3:
            v = v + TABLES.on(c.device)["e81b"][packed.data["resid"].long().reshape(-1)] / self.rho
        elif self.bits == 4:
            v = v + e8p_decode((packed.data["resid"].long() & 0xFFFF).reshape(-1)) / self.rho
        scale = packed.data["scale"].float()
        return (v.reshape(rows, cols // g, g).to(scale.device) * scale[..., None]).reshape(rows, cols)


__all__ = ["E8P", "E8PConfig", "ScaleParams", "abs_patterns", "e81b_points", "e8p_decode", "e8p_nearest"]
