"""Leech lattice vector quantization (LLVQ; van der Ouderaa, van Baalen, Whatmough, Nagel 2026,
"Leech lattice vector quantization for efficient LLM compression"): codec `leech`.

The lattice. Λ24 in integer coordinates (the usual √8-scaled ones, minimal norm² 32, i.e. norm 4
after dividing by 8) with C24 the extended binary Golay code:

    x ∈ Λ  ⇔  for one t ∈ {0, 1} and one codeword c ∈ C24:
              x_i ≡ t + 2·c_i (mod 4) for every i,   and   Σ_i x_i ≡ 4t (mod 8).

So Λ is the union of 8192 cosets (t, c) of 4·D24: t = 0 the even points (coordinates ≡ 2 mod 4
exactly on the support of c, ≡ 0 elsewhere), t = 1 the odd ones (≡ 3 mod 4 on the support of c,
≡ 1 elsewhere). C24 here is the extended quadratic-residue code in systematic form [I12 | B]
(`golay_generator`), so a codeword is named by its first 12 bits (its message).

Shells. The points of norm² N form a shell: 196 560 of norm² 32 (the kissing configuration),
16 773 120 of 48, ... (the theta series of Λ). A codebook is a union of shells; with every shell of
norm² 16·2 … 16·13 and the origin it has 2^47.997 points, so one point is a 48-bit index: 2 bits
per weight for 24 weights. (The origin and the 16 773 120 points of norm² 48 fit 24 bits: 1 bit per
weight, `default_shells`.)

Vector types (the orbits the search runs over). Inside one coset the class of each coordinate
(x_i mod 4) is fixed, so a point is "which magnitude goes where, with which sign":
  * odd coset (t = 1, c): with z = y ⊙ (1 − 2c) the point's x' = x ⊙ (1 − 2c) has every x'_i ≡ 1
    (mod 4): x'_i = +m for m ≡ 1 (mod 4), −m for m ≡ 3 (mod 4), so the signs are forced by the
    magnitudes. Σx ≡ 4 (mod 8) holds iff the number of magnitudes ≡ ±3 (mod 8) is odd (Σx ≡
    24 + 6|c| + 4·that number, and 6|c| ≡ 0 for every Golay weight). A type is a multiset of 24
    odd magnitudes; <x, y> = <x', z> is largest with x' sorted like z (rearrangement inequality),
    so the best point of a type in the coset is its values sorted descending, laid on z sorted
    descending: score = z_sorted · w_type, one dot product.
  * even coset (t = 0, c), k = |c|: magnitudes ≡ 2 (mod 4) on the k support coordinates (M2),
    ≡ 0 (mod 4) on the others (M0, zeros included); signs free except one parity: Σx ≡ 0 (mod 8)
    iff #(negative support coordinates) ≡ n4 + n6 (mod 2), n4 = #M0 ≡ 4 (mod 8), n6 = #M2 ≡ 6
    (mod 8) (for k = 0 the type itself must have n4 even). Best point: M2 sorted descending on
    |y| of the support sorted descending, M0 likewise off the support, signs of y; if the parity
    is wrong, flip the support coordinate with the least m·|y| (the last one of the sorted support,
    both sequences descending): score = |y|_sorted · w_type − 2·m_min·|y|_min·[parity wrong].
    (Flipping the cheapest coordinate after the sorted assignment is optimal: the best of
    "Σ m|y| − 2·min m|y|" over assignments gives the least magnitude to the least |y|.)
The types of a shell are all multisets of magnitudes of the right residues with Σm² = N
(`shell_types`); up to norm² 208 there are 383. Every point of the shell is one type placed in
one coset: the search is exact over the shells.

The search (`LeechShells.nearest`). Score of a point: Euclidean codebook (gain_bits 0)
2<x, y> − ‖x‖² (= ‖y‖² − ‖y − x‖²); angular codebook (gain_bits > 0) <x, y>/‖x‖. For each of
the 8192 cosets a cheap upper bound of the best score in it, from a Lagrangian relaxation: drop
the mod-8 condition and the exact norm, then every coordinate is independent,
    max_x <x,y> − μ‖x‖²  ≤  Σ_i max_{v ≡ r_i (4), |v| ≤ v_max} (v·y_i − μ v²),
one term per coordinate and class, and the sum over a coset is linear in c, so all 4096 codewords
come from one [24 × 4096] matmul per kind. Euclidean: μ = ½ (and, for y outside the ball
‖x‖² ≤ N_max, the smaller bound with λ(N_max − ‖x‖²) added, λ = ‖y‖/√N_max − 1); angular: one μ
per shell, μ_N = ‖y‖/(2√N), adding μ_N·N and dividing by √N, the most over the shells. The cosets
with the two best bounds are scored exactly (the type scores above), then every coset whose bound
is not below the best exact score so far (less a float32 margin). Nothing is pruned that could
win, so the answer is the exact best point of the codebook (ties aside); `nearest(prune=False)`
scores all 8192 cosets (tests/test_leech.py checks both against brute force over the minimal
shell and against a dynamic programme per coset). About 2-4 cosets per block pass the bound
for N(0, 1) inputs; one CPU core encodes about 2·10^5 weights per second at 2 bits (8·10^4
with gain bits; bench/gaussian_mse.py) and decodes (index to point) about 7·10^6.

The index (`LeechShells.index` / `point`): shells in order, inside a shell the cosets in order
(t, message), inside a coset the points in lexicographic order of their coordinates. The rank
inside a coset is enumerative coding: with COUNT[a, b, n, s] = the number of vectors of a
coordinates of the coset's first class and b of its second, norm² n and sum ≡ s (mod 8)
(a dynamic programme, `count_table`), the rank of x is Σ_i Σ_{v < x_i of x_i's class}
COUNT[classes after i, n − (Σ_{j<i} x_j² + v²), s − (Σ_{j<i} x_j + v)]. The number of points of a
coset is COUNT[24 − |c|, |c|, N, 4t]. No codebook is stored: the tables are counts (a few MB).

The codec. A tile of 24 weights (3 rows × 8 columns, GPTQ's block width 8, rows padded with zeros
to a multiple of 3; or 1 row × 24 columns) divided by its rows' scales σ is y; stored: its index
(24·bits bits) and one fp16 σ per row and `group` columns.
  gain_bits = 0: ŵ = σ·x, x the nearest point of the shells; σ = RMS/κ (KAPPA, the N(0, 1)-optimal
      load measured with bench/gaussian_mse.py, or `load`; `scale_search` tries σ·m on
      lattice.SCALE_GRID). Inside GPTQ a lower load (a larger σ) does better: the error feedback grows
      a group's later columns after its scale was fitted, and the ball's overload errors feed forward
      (GPTQ + incoherence on the reference model's layers 0, 2 and 5 with calibration Hessians: proxy
      loss −20 % at load 2.6 against 2.88; E8P shows the same at a lower κ).
  gain_bits = g: ŵ = σ·γ_j·x/‖x‖, x the shell point of largest cosine to y, γ_j the gain level
      nearest to that cosine·‖y‖ (which is exact for this product codebook: for every direction the
      best gain is the nearest level to <u, y>, and the best direction is the same for every gain);
      σ = RMS, γ = the Lloyd–Max levels of ‖y‖ ~ χ24 times the code's mean cosine (COSINE). The
      index is (shape index << g) | j, the shapes from `default_shells(bits, g)`.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from quantatlas._lazy import torch
from quantatlas.quant.codecs.base import Codec, Packed, Quantized
from quantatlas.quant.codecs.lattice import LatticeConfig, ScaleParams, row_scale, search_scale

#: quadratic residues mod 11: the circulant part of the Golay generator's B
QR11 = (1, 3, 4, 5, 9)
#: the Leech theta series coefficient of norm 2m (norm² 16m in integer coordinates) comes from
#: (65520/691)(σ11(m) − τ(m)); the shells a codebook may use: m = 2 … MAX_SHELL
MAX_SHELL = 13


# ---- the extended Golay code ------------------------------------------------------------------

@lru_cache(maxsize=None)
def golay_generator() -> np.ndarray:
    """[12, 24] generator [I | B] of the extended Golay code: B = [[0, 1…1], [1…1ᵀ, A]] with A the
    11×11 circulant whose first row has ones at 0 and at the quadratic residues mod 11."""
    row = [1 if (i == 0 or i in QR11) else 0 for i in range(11)]
    b = np.zeros((12, 12), dtype=np.uint8)
    b[0, 1:] = 1
    b[1:, 0] = 1
    b[1:, 1:] = np.array([row[i:] + row[:i] for i in range(11)], dtype=np.uint8)
    return np.concatenate([np.eye(12, dtype=np.uint8), b], 1)


@lru_cache(maxsize=None)
def golay_codewords() -> np.ndarray:
    """All 4096 codewords [4096, 24] (uint8); row m is the codeword of message m (bit j of m picks
    generator row j), so its first 12 coordinates are the bits of m."""
    m = np.arange(4096)
    bits = (m[:, None] >> np.arange(12)) & 1
    return ((bits @ golay_generator().astype(np.int64)) & 1).astype(np.uint8)


def leech_theta(m: int) -> int:
    """The number of Leech lattice points of norm 2m (m ≥ 1): 65520/691·(σ11(m) − τ(m))."""
    sigma = sum(d ** 11 for d in range(1, m + 1) if m % d == 0)
    q = [1] + [0] * m                       # Δ = q·Π(1 − qⁿ)²⁴: τ(m) is the coefficient of q^(m-1) of Π
    for n in range(1, m + 1):
        for _ in range(24):
            for i in range(m, n - 1, -1):
                q[i] -= q[i - n]
    return 65520 * (sigma - q[m - 1]) // 691


# ---- vector types ------------------------------------------------------------------------------

def multisets(count: int, norm: int, mags: tuple[int, ...]) -> list[tuple[int, ...]]:
    """All non-increasing sequences of `count` values from `mags` (descending) with Σv² = norm."""
    out: list[tuple[int, ...]] = []

    def rec(left: int, rest: int, start: int, cur: list[int]):
        if left == 0:
            if rest == 0:
                out.append(tuple(cur))
            return
        for j in range(start, len(mags)):
            m = mags[j]
            if m * m * left < rest:    # `left` values this large cannot fill the rest; smaller ones neither
                break
            if m * m > rest:           # too large: the next magnitude
                continue
            cur.append(m)
            rec(left - 1, rest - m * m, j, cur)
            cur.pop()

    rec(count, norm, 0, [])
    return out


@lru_cache(maxsize=None)
def shell_types(norm: int) -> tuple[list, list]:
    """The vector types of the shell of norm² `norm`: (even, odd).

    even: (k, column, parity, m_min): k = support size of c; column = [M2 descending, M0
    descending] (the magnitudes laid on |y| sorted: support first); parity = n4 + n6 mod 2, the
    number of negative support coordinates Σx ≡ 0 (mod 8) asks for; m_min = the least M2 (0 if k = 0).
    odd: column = x' values sorted descending (+m for m ≡ 1, −m for m ≡ 3 mod 4).
    The origin (norm 0) is the even type k = 0 of zeros."""
    vmax = math.isqrt(norm)
    m0 = tuple(range(vmax - vmax % 4, -1, -4))                                  # 0 mod 4, descending
    m2 = tuple(v for v in range(vmax, 0, -1) if v % 4 == 2)
    odd_mags = tuple(v for v in range(vmax, 0, -1) if v % 2)
    even = []
    for k in (0, 8, 12, 16, 24):
        for n2 in range(0, norm + 1, 4):
            tops = multisets(k, n2, m2) if k else ([()] if n2 == 0 else [])
            if not tops:
                continue
            rests = multisets(24 - k, norm - n2, m0) if k < 24 else ([()] if n2 == norm else [])
            for top in tops:
                for rest in rests:
                    n4 = sum(1 for v in rest if v % 8 == 4)
                    n6 = sum(1 for v in top if v % 8 == 6)
                    if k == 0 and n4 % 2:
                        continue
                    even.append((k, top + rest, (n4 + n6) % 2, top[-1] if k else 0))
    odd = []
    for mags in multisets(24, norm, odd_mags):
        if sum(1 for v in mags if v % 8 in (3, 5)) % 2 == 0:
            continue
        xp = sorted((v if v % 4 == 1 else -v for v in mags), reverse=True)
        odd.append(tuple(xp))
    return even, odd


def type_sizes(norm: int) -> int:
    """The number of points of a shell counted from its types (a check on `shell_types`)."""
    even, odd = shell_types(norm)
    weights = {k: int(n) for k, n in zip(*np.unique(golay_codewords().sum(1), return_counts=True))}
    total = 0
    for k, col, _p, _mmin in even:
        top, rest = col[:k], col[k:]
        signs = 2 ** (k - 1) if k else 1
        total += weights[k] * _arrangements(top) * _arrangements(rest) * signs * 2 ** sum(1 for v in rest if v)
    for col in odd:
        total += 4096 * _arrangements(col)
    return total


def _arrangements(values) -> int:
    n = math.factorial(len(values))
    for _v, k in zip(*np.unique(np.array(values, dtype=np.int64), return_counts=True)):
        n //= math.factorial(int(k))
    return n


# ---- counting and the index --------------------------------------------------------------------

def class_values(r: int, vmax: int) -> list[int]:
    """The integers ≡ r (mod 4) in [−vmax, vmax], ascending."""
    return [v for v in range(-vmax, vmax + 1) if v % 4 == r]


def count_table(t: int, nmax: int) -> np.ndarray:
    """COUNT[a, b, n, s] (int64): vectors with a coordinates of class t and b of class t + 2 (mod 4),
    Σv² = n ≤ nmax and Σv ≡ s (mod 8). A dynamic programme: one coordinate more is a convolution
    with that class's (v², v mod 8) for every value v."""
    vmax = math.isqrt(nmax)
    out = np.zeros((25, 25, nmax + 1, 8), dtype=np.int64)
    out[0, 0, 0, 0] = 1

    def grow(x: np.ndarray, r: int) -> np.ndarray:
        y = np.zeros_like(x)
        for v in class_values(r, vmax):
            y[v * v:] += np.roll(x[:nmax + 1 - v * v], v % 8, axis=-1)
        return y

    for a in range(25):
        for b in range(25 - a):
            if a or b:
                out[a, b] = grow(out[a - 1, b], t) if a else grow(out[a, b - 1], t + 2)
    if out.max() >= 2 ** 62:
        raise ValueError(f"leech: counts up to norm² {nmax} overflow int64")
    return out


#: cosets scored exactly before pruning (the best bounds): the incumbent the others must beat
FIRST_COSETS = 2
#: inputs searched together (the bounds are [chunk, shells, 8192] floats)
SEARCH_CHUNK = 128


class LeechShells:
    """The codebook: the union of the Leech shells of norm² in `norms` (0 = the origin), its index
    and its exact search, with tables on `device`."""

    def __init__(self, norms: tuple[int, ...], device="cpu"):
        self.norms = tuple(sorted(set(int(n) for n in norms)))
        if any(n and (n % 16 or not 32 <= n <= 16 * MAX_SHELL) for n in self.norms):
            raise ValueError(f"leech: shells are norm² 32, 48, …, {16 * MAX_SHELL} (and 0), got {self.norms}")
        self.device = torch.device(device)
        self.nmax = max(self.norms)
        self.vmax = math.isqrt(self.nmax)
        dev = self.device
        cw = golay_codewords()
        self.codewords = torch.tensor(cw, dtype=torch.int64, device=dev)           # [4096, 24]
        self.codewords_f = self.codewords.float()
        self.codewords32 = self.codewords.int()
        # counts, flattened [t, a, b, n, s] for gathers
        count = np.stack([count_table(0, self.nmax), count_table(1, self.nmax)])
        self.count = torch.tensor(count.reshape(-1), dtype=torch.int64, device=dev)
        self.count_strides = (25 * 25 * (self.nmax + 1) * 8, 25 * (self.nmax + 1) * 8, (self.nmax + 1) * 8, 8)
        # points per (shell, coset), cosets in order (t, message): COUNT[t, 24 − |c|, |c|, N, 4t]
        t, k = np.repeat([0, 1], 4096), np.tile(cw.sum(1).astype(np.int64), 2)
        sizes = torch.tensor(np.stack([count[t, 24 - k, k, n, 4 * t] for n in self.norms]), device=dev)
        self.shell_sizes = sizes.sum(1)
        flat = sizes.reshape(-1)
        self.starts = torch.cumsum(flat, 0) - flat                                  # [shells·8192]
        self.size = int(flat.sum())
        # value tables per class r: values ≡ r (mod 4) in [−vmax, vmax], padded
        vals = [class_values(r, self.vmax) for r in range(4)]
        width = max(len(v) for v in vals)
        self.values = torch.tensor([v + [v[-1]] * (width - len(v)) for v in vals], dtype=torch.int32, device=dev)
        self.values_ok = torch.tensor([[True] * len(v) + [False] * (width - len(v)) for v in vals], device=dev)
        self.values_sq = self.values * self.values
        # vector types, grouped: ("odd", None) and ("even", k)
        self.groups = []
        even_by_k: dict[int, list] = {}
        odd: list = []
        for n in self.norms:
            even, od = shell_types(n)
            for k, col, parity, mmin in even:
                even_by_k.setdefault(k, []).append((n, col, parity, mmin))
            odd += [(n, col, 0, 0) for col in od]
        for key, types in [((1, None), odd)] + [((0, k), v) for k, v in sorted(even_by_k.items())]:
            if not types:
                continue
            self.groups.append({
                "t": key[0], "k": key[1],
                "W": torch.tensor([c for _n, c, _p, _m in types], dtype=torch.float32, device=dev).T.contiguous(),
                "norm": torch.tensor([n for n, _c, _p, _m in types], dtype=torch.float32, device=dev),
                "parity": torch.tensor([p for _n, _c, p, _m in types], dtype=torch.int64, device=dev),
                "mmin": torch.tensor([m for _n, _c, _p, m in types], dtype=torch.float32, device=dev)})

    # ---- index ---------------------------------------------------------------------------------

    def _value_counts(self, t, c_i, a_rem, b_rem, n_rem, s_need):
        """For coordinate i of points in cosets t [n] with c_i [n] (int32), the coordinates after it
        holding a_rem, b_rem of the two classes, norm² n_rem and sum ≡ s_need (mod 8) still to place:
        the candidate values v of the coordinate's class [n, width] and the number of points that put
        v there, COUNT[a_rem, b_rem, n_rem − v², s_need − v] (0 for padding or n_rem − v² < 0)."""
        cls = t + 2 * c_i
        v, vsq, ok = self.values[cls], self.values_sq[cls], self.values_ok[cls]
        st = self.count_strides
        base = t * st[0] + a_rem * st[1] + b_rem * st[2]
        rest = n_rem[:, None] - vsq
        i = base[:, None] + rest.clamp(min=0) * st[3] + ((s_need[:, None] - v) & 7)
        return v, torch.where(ok & (rest >= 0), self.count[i], 0)

    def index(self, x: torch.Tensor) -> torch.Tensor:
        """The index (int64) of each codebook point x [n, 24] (integer coordinates)."""
        x = x.to(self.device, torch.int32)
        t = x[:, 0] & 1
        c = ((x - t[:, None]) & 3) >> 1
        msg = (c[:, :12].long() << torch.arange(12, device=self.device)).sum(1)
        norm = (x * x).sum(1, dtype=torch.int32)
        norms = torch.tensor(self.norms, device=self.device, dtype=torch.int32)
        shell = torch.searchsorted(norms, norm).clamp(max=len(self.norms) - 1)
        if not bool((norms[shell] == norm).all()):
            raise ValueError("leech: a point's norm² is not one of the codebook's shells")
        k = c.sum(1, dtype=torch.int32)
        rank = self.starts[shell * 8192 + t * 4096 + msg]
        n_rem, s_need = norm, (4 * t) & 7
        a_rem, b_rem = 24 - k, k
        xs, cs = x.T.contiguous(), c.T.contiguous()                                 # one coordinate = one row
        for i in range(24):
            ci, xi = cs[i], xs[i]
            a_rem, b_rem = a_rem - (1 - ci), b_rem - ci
            v, cnt = self._value_counts(t, ci, a_rem, b_rem, n_rem, s_need)
            rank = rank + torch.where(v < xi[:, None], cnt, 0).sum(1)               # the points before x
            n_rem, s_need = n_rem - xi * xi, (s_need - xi) & 7
        return rank

    def point(self, index: torch.Tensor) -> torch.Tensor:
        """The codebook points [n, 24] (int64) of indices [n] (inverse of `index`)."""
        index = index.to(self.device, torch.int64)
        pos = torch.searchsorted(self.starts, index, right=True) - 1                # shell · 8192 + coset
        rank = index - self.starts[pos]
        pos = pos.int()
        shell, coset = pos // 8192, pos % 8192
        t, msg = coset // 4096, coset % 4096
        cs = self.codewords32[msg].T.contiguous()
        n_rem = torch.tensor(self.norms, device=self.device, dtype=torch.int32)[shell]
        s_need = (4 * t) & 7
        k = cs.sum(0, dtype=torch.int32)
        a_rem, b_rem = 24 - k, k
        xs = torch.empty(24, index.shape[0], dtype=torch.int32, device=self.device)
        for i in range(24):
            ci = cs[i]
            a_rem, b_rem = a_rem - (1 - ci), b_rem - ci
            v, cnt = self._value_counts(t, ci, a_rem, b_rem, n_rem, s_need)
            cum = torch.cumsum(cnt, 1)
            j = (cum <= rank[:, None]).sum(1, keepdim=True)                          # the value whose block holds rank
            rank = rank - (cum - cnt).gather(1, j)[:, 0]
            xi = v.gather(1, j)[:, 0]
            xs[i] = xi
            n_rem, s_need = n_rem - xi * xi, (s_need - xi) & 7
        return xs.T.long()

    # ---- search ----------------------------------------------------------------------------------

    @staticmethod
    def relaxed(y: torch.Tensor, vmax: torch.Tensor) -> torch.Tensor:
        """F[..., r] = max over v ≡ r (mod 4), |v| ≤ vmax of 2·v·y − v² (per coordinate, [..., 4]; vmax
        broadcasts against y): the concave parabola's best value of the class is one of the two
        around y, clamped to the class's range [−vmax + (r + vmax) mod 4, vmax − (vmax − r) mod 4]."""
        r = torch.arange(4, device=y.device, dtype=y.dtype)
        vmax = vmax[..., None]
        lo, hi = -vmax + torch.remainder(r + vmax, 4), vmax - torch.remainder(vmax - r, 4)
        yy = y[..., None]
        below = r + 4 * torch.floor((yy - r) / 4)
        v1 = torch.minimum(torch.maximum(below, lo), hi)
        v2 = torch.minimum(torch.maximum(below + 4, lo), hi)
        return torch.maximum(2 * v1 * yy - v1 * v1, 2 * v2 * yy - v2 * v2)

    def coset_bounds(self, y: torch.Tensor, mu, vmax, scale, shift, reduce: str) -> torch.Tensor:
        """[n, 8192] (cosets in order (t, message)): the `reduce` (min or max) over R relaxations of
        scale·Σ_i max_{v ≡ r_i (4), |v| ≤ vmax} (v·y_i − μ·v²) + shift, r_i = t + 2c_i the coset's
        classes; y [n, 24], μ, scale, shift [R, n, 1], vmax [R].

        max v·y − μv² = μ·max(2v·y' − v²) with y' = y/(2μ) (`relaxed`); the sum over the coordinates is
        Σ_i F_i(t) + Σ_i c_i (F_i(t + 2) − F_i(t)): linear in c, so one matmul gives all codewords."""
        vm = torch.as_tensor(vmax, device=y.device, dtype=y.dtype)[:, None, None]
        F = self.relaxed(y / (2 * mu), vm) * (mu * scale)[..., None]               # [R, n, 24, 4]
        cw = self.codewords_f.T.expand(F.shape[0], 24, 4096)
        out = []
        for t in (0, 1):
            b = torch.baddbmm(F[..., t].sum(-1, keepdim=True) + shift, F[..., t + 2] - F[..., t], cw)
            out.append(b.amin(0) if reduce == "min" else b.amax(0))
        return torch.cat(out, 1)

    def bounds(self, y: torch.Tensor, angular: bool) -> torch.Tensor:
        """[n, 8192] upper bounds of the best score in each coset (t, message) (see the module doc)."""
        norm = y.norm(dim=1, keepdim=True)[None]                                    # [1, n, 1]
        if not angular:
            # 2<x,y> − ‖x‖² ≤ 2<x,y> − ‖x‖² + λ(N_max − ‖x‖²) for λ ≥ 0 on the ball: 2·Σ max(v·y − μv²)
            # + λ·N_max with μ = (1 + λ)/2; the least of λ = 0 and λ = ‖y‖/√N_max − 1 (the one that
            # pulls y onto the ball's sphere, for inputs outside it)
            lam = torch.cat([torch.zeros_like(norm), (norm / math.sqrt(self.nmax) - 1).clamp_min(0)])
            return self.coset_bounds(y, (1 + lam) / 2, [self.vmax] * 2, torch.full_like(lam, 2.0),
                                     lam * self.nmax, "min")
        # per shell N: <x,y>/√N ≤ (μN + Σ max(v·y − μv²))/√N, μ = ‖y‖/(2√N); the most of the shells
        shells = [n for n in self.norms if n]
        root = torch.tensor([math.sqrt(n) for n in shells], device=y.device, dtype=y.dtype)[:, None, None]
        mu = norm.clamp_min(1e-20) / (2 * root)
        return self.coset_bounds(y, mu, [math.isqrt(n) for n in shells], 1 / root.expand_as(mu),
                                 mu * root, "max")

    def _coset_order(self, y, t, c):
        """For pairs (input y [P, 24], coset (t [P], c [P, 24])): the sorted vector the types are laid
        on and its order: odd: z = y⊙(1 − 2c) descending; even: |y| on the support descending, then
        |y| off it descending."""
        odd = t.bool()[:, None]
        z = y * (1 - 2 * c.to(y.dtype))
        key = torch.where(odd, z, y.abs() + c.to(y.dtype) * (2 * y.abs().amax(1, keepdim=True) + 1))
        order = torch.argsort(key, dim=1, descending=True)
        vals = torch.where(odd, z, y.abs()).gather(1, order)
        return vals, order

    def exact(self, y: torch.Tensor, coset: torch.Tensor, angular: bool):
        """The best score and type of each pair (input y [P, 24], coset id [P]): (score [P], group [P],
        type [P]); -inf where the coset holds no point of the codebook."""
        t, msg = coset // 4096, coset % 4096
        c = self.codewords[msg]
        k = c.sum(1)
        vals, _order = self._coset_order(y, t, c)
        score = torch.full((y.shape[0],), -math.inf, device=y.device, dtype=y.dtype)
        group = torch.zeros(y.shape[0], dtype=torch.int64, device=y.device)
        typ = torch.zeros_like(group)
        for gi, g in enumerate(self.groups):
            sel = (t == g["t"]) if g["k"] is None else ((t == g["t"]) & (k == g["k"]))
            rows = torch.nonzero(sel).flatten()
            if rows.numel() == 0:
                continue
            v = vals[rows]
            gain = v @ g["W"]                                                       # [p, T]
            if g["t"] == 0 and g["k"]:
                neg = ((y[rows] < 0).long() * c[rows]).sum(1) & 1
                wrong = (neg[:, None] != g["parity"][None, :]).to(y.dtype)
                gain = gain - 2 * wrong * g["mmin"][None, :] * v[:, g["k"] - 1:g["k"]]
            s = gain / g["norm"].clamp_min(1e-30).sqrt() if angular else 2 * gain - g["norm"]
            if angular:
                s = torch.where(g["norm"] > 0, s, torch.full_like(s, -math.inf))
            best, arg = s.max(1)
            score[rows], group[rows], typ[rows] = best, gi, arg
        return score, group, typ

    def build_point(self, y, coset, group, typ) -> torch.Tensor:
        """The point [P, 24] (int64) of type `typ` of `group` in `coset` that scores best for y."""
        t, msg = coset // 4096, coset % 4096
        c = self.codewords[msg]
        vals, order = self._coset_order(y, t, c)
        x = torch.zeros(y.shape[0], 24, dtype=torch.int64, device=y.device)
        for gi, g in enumerate(self.groups):
            rows = torch.nonzero(group == gi).flatten()
            if rows.numel() == 0:
                continue
            col = g["W"].T[typ[rows]].round().long()                                # [p, 24] slot values
            placed = torch.zeros(rows.numel(), 24, dtype=torch.int64, device=y.device)
            placed.scatter_(1, order[rows], col)
            if g["t"] == 1:
                x[rows] = placed * (1 - 2 * c[rows])
            else:
                sign = torch.where(y[rows] < 0, -1, 1)
                xs = placed * sign
                if g["k"]:
                    neg = ((y[rows] < 0).long() * c[rows]).sum(1) & 1
                    flip = neg != g["parity"][typ[rows]]
                    last = order[rows, g["k"] - 1]
                    xs[flip, last[flip]] *= -1
                x[rows] = xs
        return x

    def nearest(self, y: torch.Tensor, angular: bool = False, prune: bool = True):
        """The best codebook point for each row of y [n, 24] (lattice units): Euclidean (nearest) or
        angular (largest cosine). Returns (x [n, 24] int64, score [n])."""
        xs, scores = [], []
        for a in range(0, y.shape[0], SEARCH_CHUNK):
            x, s = self._nearest(y[a:a + SEARCH_CHUNK].float(), angular, prune)
            xs.append(x)
            scores.append(s)
        if not xs:
            return torch.zeros(0, 24, dtype=torch.int64, device=y.device), y.new_zeros(0)
        return torch.cat(xs), torch.cat(scores)

    def _nearest(self, y, angular, prune):
        n = y.shape[0]
        if prune:
            bound = self.bounds(y, angular)                                         # [n, 8192]
            first = bound.topk(FIRST_COSETS, dim=1).indices
            rows = torch.arange(n, device=y.device).repeat_interleave(FIRST_COSETS)
            s, g, ty = self.exact(y[rows], first.reshape(-1), angular)
            inc = s.reshape(n, FIRST_COSETS).max(1).values
            # every coset that might beat the incumbent (float32 bounds and scores: a margin)
            tol = 1e-4 * (1 + inc.abs())
            bound.scatter_(1, first, -math.inf)
            r2, c2 = torch.nonzero(bound >= (inc - tol)[:, None], as_tuple=True)
            rows, cosets = torch.cat([rows, r2]), torch.cat([first.reshape(-1), c2])
            s2, g2, t2 = self.exact(y[r2], c2, angular)
            s, g, ty = torch.cat([s, s2]), torch.cat([g, g2]), torch.cat([ty, t2])
        else:
            rows = torch.arange(n, device=y.device).repeat_interleave(8192)
            cosets = torch.arange(8192, device=y.device).repeat(n)
            s, g, ty = self.exact(y[rows], cosets, angular)
        best = torch.full((n,), -math.inf, device=y.device, dtype=s.dtype)
        best.scatter_reduce_(0, rows, s, reduce="amax")
        win = torch.nonzero(s == best[rows]).flatten()
        pick = torch.full((n,), -1, dtype=torch.int64, device=y.device)
        pick.scatter_(0, rows[win], win)                                            # one winner per input
        x = self.build_point(y, cosets[pick], g[pick], ty[pick])
        return x, best


# ---- the codec ---------------------------------------------------------------------------------

def default_shells(bits: int, gain_bits: int) -> tuple[int, ...]:
    """The run of consecutive shells (norm² 16m, 16(m+1), …; the origin added when gain_bits = 0)
    with the most points that fit 24·bits − gain_bits index bits: 2 bits, no gain bits: the origin and
    norm² 32 … 208 (2^47.997 points); 1 bit: the origin and norm² 48 (16 773 121 ≤ 2^24)."""
    room = 2 ** (24 * bits - gain_bits)
    origin = (0,) if gain_bits == 0 else ()
    best: tuple[int, ...] = ()
    best_size = 0
    for first in range(2, MAX_SHELL + 1):
        size, run = len(origin), []
        for m in range(first, MAX_SHELL + 1):
            if size + leech_theta(m) > room:
                break
            size += leech_theta(m)
            run.append(16 * m)
        if run and size > best_size:
            best, best_size = origin + tuple(run), size
    return best


@lru_cache(maxsize=None)
def shells_on(norms: tuple[int, ...], device: str) -> LeechShells:
    return LeechShells(norms, device)


@lru_cache(maxsize=None)
def chi_lloyd_max(levels: int, dof: int = 24) -> tuple[float, ...]:
    """Lloyd–Max levels of the χ distribution with `dof` degrees of freedom (the norm of a block of
    `dof` i.i.d. N(0, 1) weights), by Lloyd's iteration on a fine grid of its density."""
    r = np.linspace(0, 12, 12001)
    logp = (dof - 1) * np.log(np.maximum(r, 1e-300)) - r * r / 2
    p = np.exp(logp - logp.max())
    cdf = np.cumsum(p) / p.sum()
    q = np.interp((np.arange(levels) + 0.5) / levels, cdf, r)          # start: the quantiles
    for _ in range(300):
        cell = np.searchsorted((q[1:] + q[:-1]) / 2, r)                     # nearest level of each r
        q = np.bincount(cell, r * p, levels) / np.bincount(cell, p, levels)  # each level: its cell's mean
    return tuple(float(v) for v in q)


class LeechConfig(LatticeConfig):
    name = "leech"
    bits: Literal[1, 2]
    #: 0: the lattice points themselves (Euclidean nearest point); g > 0: their directions (angular
    #: search) and 2^g gain levels, the index 24·bits − g shape bits and g gain bits
    gain_bits: int = Field(0, ge=0, le=4)
    #: which 24 weights share a point: 3 rows × 8 columns (GPTQ block width 8; rows padded to a
    #: multiple of 3) or 1 row × 24 columns (block width 24; columns a multiple of 24)
    tile: Literal["3x8", "1x24"] = "3x8"
    #: shells by norm² (32, 48, …, 208; 0 = the origin); null: `default_shells`
    shells: list[int] | None = None
    #: σ = RMS / load, the RMS of w/σ; null: the N(0, 1)-optimal value (KAPPA; 1 with gain bits)
    load: float | None = Field(None, gt=0, allow_inf_nan=False)
    scale_search: bool = False
    lattice_dim: ClassVar[int] = 8

    @model_validator(mode="after")
    def _consistent(self):
        if self.tile == "1x24" and self.group is not None and self.group % 24:
            raise ValueError(f"group must be a multiple of the tile's 24 columns, got {self.group}")
        if self.shells is not None:
            bad = [n for n in self.shells if n and (n % 16 or not 32 <= n <= 16 * MAX_SHELL)]
            if bad or not self.shells or len(set(self.shells)) != len(self.shells):
                raise ValueError(f"shells are distinct norms² 32, 48, …, {16 * MAX_SHELL} (0: the origin), "
                                 f"got {list(self.shells)}")
            if self.gain_bits and 0 in self.shells:
                raise ValueError("the origin (0) has no direction: leave it out of shells when gain_bits > 0")
            size = sum(leech_theta(n // 16) if n else 1 for n in self.shells)
            if size > 2 ** (24 * self.bits - self.gain_bits):
                raise ValueError(f"shells {list(self.shells)} hold {size} points, more than the "
                                 f"2^{24 * self.bits - self.gain_bits} that {24 * self.bits - self.gain_bits} "
                                 f"index bits name")
        return self

    def build(self):
        return Leech(self)


#: σ = RMS / κ: the N(0, 1)-optimal load of the default Euclidean codebooks (bench/gaussian_mse.py)
KAPPA = {(2, 0): 2.88, (1, 0): 1.7}
#: mean cosine of the default angular codebooks to N(0, 1) blocks: the gains are χ24's
#: Lloyd–Max levels times it (so they are Lloyd–Max for ‖y‖·cos, the best gain of a block)
COSINE = {(2, 1): 0.965, (2, 2): 0.965}


class Leech(Codec):
    name = "leech"

    def __init__(self, cfg: LeechConfig):
        super().__init__(cfg)
        self.bits, self.gain_bits, self.scale_search = cfg.bits, cfg.gain_bits, cfg.scale_search
        self.group_size = cfg.group
        self.rows_per_tile, self.block_width = (3, 8) if cfg.tile == "3x8" else (1, 24)
        self.norms = tuple(sorted(cfg.shells)) if cfg.shells is not None else default_shells(cfg.bits, cfg.gain_bits)
        self.index_bytes = 3 * cfg.bits
        if self.gain_bits:
            cos = COSINE.get((cfg.bits, cfg.gain_bits), 0.95)
            self.gains = tuple(cos * g for g in chi_lloyd_max(2 ** cfg.gain_bits))
            self.kappa = 1.0
        else:
            self.kappa = KAPPA.get((cfg.bits, 0), math.sqrt(max(self.norms)) / 5.06)
        if cfg.load is not None:
            self.kappa = cfg.load

    def group_of(self, cols: int) -> int:
        g = super().group_of(cols)
        if g % self.block_width:
            raise ValueError(f"leech ({self.cfg.tile} tiles): rows of {g} columns are not a multiple of "
                             f"{self.block_width}")
        return g

    def shells(self, device) -> LeechShells:
        return shells_on(self.norms, str(torch.device(device)))

    # tiles: [rows, c] (c a multiple of block_width) <-> [tiles, 24], rows padded to rows_per_tile
    def _tiles(self, y: torch.Tensor) -> torch.Tensor:
        rows, c = y.shape
        k, bw = self.rows_per_tile, self.block_width
        pad = -rows % k
        if pad:
            y = torch.cat([y, y.new_zeros(pad, c)])
        return y.reshape(-1, k, c // bw, bw).permute(0, 2, 1, 3).reshape(-1, 24)

    def _untile(self, t: torch.Tensor, rows: int, c: int) -> torch.Tensor:
        k, bw = self.rows_per_tile, self.block_width
        return t.reshape(-1, c // bw, k, bw).permute(0, 2, 1, 3).reshape(-1, c)[:rows]

    def _search(self, y: torch.Tensor):
        """Codebook values (unit scale) and 48-bit indices of the tiles y [n, 24]."""
        book = self.shells(y.device)
        if not self.gain_bits:
            x, _ = book.nearest(y, angular=False)
            return x.to(y.dtype), book.index(x)
        x, cos = book.nearest(y, angular=True)                   # cos = <x/‖x‖, y>
        gains = torch.tensor(self.gains, device=y.device, dtype=y.dtype)
        j = (cos[:, None] - gains[None, :]).abs().argmin(1)      # the nearest gain level to the best gain
        u = x.to(y.dtype) / x.to(y.dtype).norm(dim=1, keepdim=True)
        return u * gains[j][:, None], (book.index(x) << self.gain_bits) | j

    def _values(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        rows, c = w.shape
        inv = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-30), torch.zeros_like(scale))
        v, _ = self._search(self._tiles(w * inv[:, None]))
        return self._untile(v, rows, c) * scale[:, None]

    def fit(self, w, importance=None):
        w = w.float()
        base = row_scale(w, self.kappa)
        if not self.scale_search:
            return ScaleParams(base.half().float())
        return ScaleParams(search_scale(w, base, importance, self._values))

    def quantize(self, w, params, col=0):
        w = w.float()
        rows, c = w.shape
        if c % self.block_width or col % self.block_width:
            raise ValueError(f"leech quantizes whole {self.block_width}-column blocks: got columns {col}..{col + c}")
        s = params.scale.to(w.device)
        inv = torch.where(s > 0, 1.0 / s.clamp_min(1e-30), torch.zeros_like(s))
        v, idx = self._search(self._tiles(w * inv[:, None]))
        # each row of a tile carries the tile's index: [rows, c / block_width]
        k = self.rows_per_tile
        codes = idx.reshape(-1, c // self.block_width).repeat_interleave(k, 0)[:rows]
        return Quantized(self._untile(v, rows, c) * s[:, None], codes)

    def pack(self, codes, params):
        rows, cols = codes.shape[0], codes.shape[1] * self.block_width
        self.group_of(cols)
        idx = codes[::self.rows_per_tile].reshape(-1).long()     # one index per tile, tiles row-major
        data = {"codes": ((idx[:, None] >> (8 * torch.arange(self.index_bytes, device=idx.device))) & 0xFF
                          ).to(torch.uint8),
                "scale": torch.stack([p.scale for p in params], 1).half()}
        return Packed(self.name, self.config(), (rows, cols), data)

    def decode(self, packed):
        rows, cols = packed.shape
        g = self.group_of(cols)
        b = packed.data["codes"].long()
        idx = (b << (8 * torch.arange(self.index_bytes, device=b.device))).sum(1)
        book = self.shells(b.device)
        if self.gain_bits:
            x = book.point(idx >> self.gain_bits).float()
            gains = torch.tensor(self.gains, device=b.device)[idx & (2 ** self.gain_bits - 1)]
            v = x / x.norm(dim=1, keepdim=True) * gains[:, None]
        else:
            v = book.point(idx).float()
        w = self._untile(v, rows, cols)
        scale = packed.data["scale"].float()
        return (w.reshape(rows, cols // g, g).to(scale.device) * scale[..., None]).reshape(rows, cols)


__all__ = ["Leech", "LeechConfig", "LeechShells", "default_shells", "golay_codewords", "golay_generator",
           "leech_theta", "shell_types"]
