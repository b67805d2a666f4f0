"""Hadamard matrices of order m·2^k and fast orthonormal Hadamard transforms in torch.

A Hadamard matrix H of order n has entries ±1 and H Hᵀ = n I, so H/√n is orthogonal.
Orders used by real models are a power of two times a small base order m, e.g.
11008 = 172·64 (Llama-2-7B MLP) and 14336 = 28·512 (Llama-3-8B MLP). We build

    H_n = H_m ⊗ S_{2^k}        S: Sylvester, S_1 = [1], S_2j = [[S_j, S_j], [S_j, -S_j]]

where the base H_m comes from
  * Paley I   (m = q + 1,     q ≡ 3 mod 4 a prime power): 12, 20, 28, 44, 60, 68, 84, 108, 140, ...
  * Paley II  (m = 2(q + 1),  q ≡ 1 mod 4 a prime power): 36, 52, 76, 148, ...
  * Williamson (m = 4t, symmetric circulants A, B, C, D of order t with A²+B²+C²+D² = 4t I):
    t = 39 and t = 43 (orders 156 and 172), for which neither Paley construction applies.
Never zero-pad-and-truncate: that is not invertible.

The transform never forms H_n. S_{2^k} is itself a Kronecker product of small Sylvester
factors (S[i, j] = (-1)^popcount(i & j) factorises over bit fields), so y = H_n x is a
sequence of small dense matmuls, one per factor (≤ 128 wide), each over the whole batch:
O(n · Σ factor sizes) work, GEMM-shaped, on any device.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from quantatlas._lazy import torch

# Williamson quadruples: first rows of the symmetric circulants A, B, C, D ('+' = +1, '-' = -1).
# Read off the first row of N. J. A. Sloane's had.156.will and had.172.will (the matrices QuIP#
# and QuaRot ship); tests check symmetry and that the periodic autocorrelations sum to 4t·δ.
WILLIAMSON: dict[int, tuple[str, str, str, str]] = {
    39: ("+++--+-+-----+--++----++--+-----+-+--++",
         "++++---+--++----+-+--+-+----++--+---+++",
         "+++--++-+---+-+--+----+--+-+---+-++--++",
         "+---++-+-+-----+++-++-+++-----+-+-++---"),
    43: ("+---++--++++-+-+++-++--++-+++-+-++++--++---",
         "++-++++++----+-+--++-++-++--+-+----++++++-+",
         "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
         "++---++++-+--+--++--------++--+--+-++++---+"),
}

MAX_FACTOR_BITS = 7  # Sylvester factors of at most 128: one GEMM each, good on CPU and GPU


# ---- finite fields and Paley constructions ----------------------------------------------

def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k and p prime, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k, r = 0, q
    while r % p == 0:
        r, k = r // p, k + 1
    return (p, k) if r == 1 else None


def _field_tables(p: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Addition-by-negation (a - b) and squaring tables of GF(p^k), elements 0..q-1.

    Element e has base-p digits = coefficients of a polynomial of degree < k; arithmetic is
    modulo a monic irreducible f of degree k, found by search (irreducible iff the quotient
    ring has no zero divisors, checked on the full multiplication table).
    """
    q = p ** k
    digits = np.array([[(e // p ** i) % p for i in range(k)] for e in range(q)])  # [q, k]
    place = p ** np.arange(k)

    def mul_table(f_low: np.ndarray) -> np.ndarray:
        # product of every pair as a polynomial of degree 2k-2, then reduce x^j (j >= k) by f
        prod = np.zeros((q, q, 2 * k - 1), dtype=np.int64)
        for i in range(k):
            for j in range(k):
                prod[:, :, i + j] += np.outer(digits[:, i], digits[:, j])
        for deg in range(2 * k - 2, k - 1, -1):  # x^k = -f_low(x)
            top = prod[:, :, deg] % p
            prod[:, :, deg] = 0
            prod[:, :, deg - k:deg] -= top[:, :, None] * f_low[None, None, :]
        return (prod[:, :, :k] % p) @ place

    for code in range(q):  # candidate f = x^k + f_low, f_low from the digits of `code`
        f_low = digits[code]
        if k > 1 and f_low[0] == 0:
            continue  # divisible by x
        table = mul_table(f_low)
        if k == 1 or not (table[1:, 1:] == 0).any():
            break
    else:  # pragma: no cover - an irreducible polynomial of every degree exists
        raise RuntimeError(f"no irreducible polynomial of degree {k} over GF({p})")
    sub = ((digits[:, None, :] - digits[None, :, :]) % p) @ place  # [q, q]: a - b
    square = np.diagonal(table)
    return sub, square


def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = χ(a - b), χ the quadratic character of GF(q) (0 at 0)."""
    p, k = _prime_power(q)
    sub, square = _field_tables(p, k)
    chi = -np.ones(q, dtype=np.int64)
    chi[square] = 1
    chi[0] = 0
    return chi[sub]


def _paley_1(q: int) -> np.ndarray:
    """Order q + 1 for q ≡ 3 (mod 4): H = I + S, S = [[0, 1ᵀ], [-1, Q]] skew with S Sᵀ = q I."""
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return np.eye(q + 1, dtype=np.int64) + s


def _paley_2(q: int) -> np.ndarray:
    """Order 2(q + 1) for q ≡ 1 (mod 4): C = [[0, 1ᵀ], [1, Q]] symmetric conference matrix,
    H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]."""
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    return np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(q + 1, dtype=np.int64),
                                                             np.array([[1, -1], [-1, -1]]))


def _williamson(t: int) -> np.ndarray:
    """Order 4t from symmetric circulants A, B, C, D (Williamson's array)."""
    a, b, c, d = (np.stack([np.roll(np.array([1 if ch == "+" else -1 for ch in row]), i) for i in range(t)])
                  for row in WILLIAMSON[t])
    return np.block([[a, b, c, d],
                     [-b, a, -d, c],
                     [-c, d, a, -b],
                     [-d, -c, b, a]])


def _base_construction(m: int) -> str | None:
    """How a base order m (not a multiple of 8 unless nothing else works) is built, or None."""
    if m == 1:
        return "sylvester"
    if m % 4 == 0 and m // 4 in WILLIAMSON:
        return "williamson"
    pp = _prime_power(m - 1)
    if pp is not None and (m - 1) % 4 == 3:
        return "paley1"
    if m % 2 == 0:
        pp = _prime_power(m // 2 - 1)
        if pp is not None and (m // 2 - 1) % 4 == 1:
            return "paley2"
    return None


def hadamard_factors(n: int) -> tuple[int, int]:
    """(m, k) with n = m·2^k, m a base order we can build; the largest power of two is preferred."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"Hadamard size must be a positive integer, got {n!r}")
    k = (n & -n).bit_length() - 1
    for j in range(k, -1, -1):
        m = n >> j
        if _base_construction(m) is not None:
            return m, j
    raise ValueError(f"no Hadamard matrix of order {n} is available: n must be m·2^k with m = 1, a Paley order "
                     f"(q+1, q ≡ 3 mod 4 or 2(q+1), q ≡ 1 mod 4, q a prime power) or a Williamson order "
                     f"({', '.join(str(4 * t) for t in WILLIAMSON)})")


def has_hadamard(n: int) -> bool:
    try:
        hadamard_factors(n)
        return True
    except ValueError:
        return False


@lru_cache(maxsize=None)
def _base_matrix(m: int) -> np.ndarray:
    how = _base_construction(m)
    if how == "sylvester":
        return np.ones((1, 1), dtype=np.int64)
    if how == "williamson":
        return _williamson(m // 4)
    if how == "paley1":
        return _paley_1(m - 1)
    if how == "paley2":
        return _paley_2(m // 2 - 1)
    raise ValueError(f"no base Hadamard matrix of order {m}")


def sylvester(n: int, dtype=None, device=None) -> torch.Tensor:
    """The ±1 Sylvester matrix of order n = 2^k: S[i, j] = (-1)^popcount(i & j)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester order must be a power of two, got {n}")
    dtype = dtype or torch.float64
    i = torch.arange(n, device=device)
    bits = i[:, None] & i[None, :]
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(dtype)


def hadamard_matrix(n: int, dtype=None, device=None) -> torch.Tensor:
    """The ±1 Hadamard matrix H_n = H_m ⊗ S_{2^k} that `hadamard_transform` applies (unnormalised)."""
    m, k = hadamard_factors(n)
    dtype = dtype or torch.float64
    base = torch.from_numpy(_base_matrix(m)).to(dtype=dtype, device=device)
    return torch.kron(base, sylvester(1 << k, dtype, device))


# ---- fast transforms ----------------------------------------------------------------------

@lru_cache(maxsize=64)
def _factor(kind: str, size: int, dtype: torch.dtype, device: torch.device, normalize: bool) -> torch.Tensor:
    f = sylvester(size, torch.float64) if kind == "sylvester" else torch.from_numpy(_base_matrix(size)).double()
    return (f / math.sqrt(size) if normalize else f).to(dtype=dtype, device=device)


def _factors(n: int, dtype, device, normalize: bool) -> list[torch.Tensor]:
    """Small matrices whose Kronecker product (in order) is H_n, or H_n/√n with each factor F/√p."""
    m, k = hadamard_factors(n)
    out = [] if m == 1 else [_factor("base", m, dtype, device, normalize)]
    if k:
        r = math.ceil(k / MAX_FACTOR_BITS)  # split k bits into r near-equal chunks
        out += [_factor("sylvester", 1 << (k // r + (i < k % r)), dtype, device, normalize) for i in range(r)]
    return out


def hadamard_transform(x: torch.Tensor, normalize: bool = True, transpose: bool = False) -> torch.Tensor:
    """y = H_n x along the last dimension (Hᵀ x with `transpose`), divided by √n if `normalize`.

    With normalize=True this is an orthogonal map, and its inverse is the transpose=True call.
    Computed as one small GEMM per Kronecker factor: apply the factor on the last axis, then
    rotate that axis to the front, so after all factors the axis order is restored. The 1/√n
    is folded into the factors (F/√p each), so it costs no extra pass.
    """
    n = x.shape[-1]
    shape = x.shape
    dtype = x.dtype if x.is_floating_point() else torch.float32
    y = x.reshape(-1, n).to(dtype)
    rows = y.shape[0]
    for f in reversed(_factors(n, dtype, x.device, normalize)):
        p = f.shape[0]
        # row vectors: y ← y Fᵀ applies F; y F applies Fᵀ
        y = (y.reshape(-1, p) @ (f if transpose else f.T)).reshape(rows, n // p, p).transpose(1, 2)
    return y.reshape(shape).contiguous()


def fwht(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Fast Walsh–Hadamard transform (Sylvester/natural order) along the last dim, n = 2^k."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two size, got {n}; use hadamard_transform for m·2^k")
    return hadamard_transform(x, normalize)


def fwht_butterfly(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """The textbook radix-2 butterfly (log2 n passes of a ± b); kept as a reference and for benchmarks."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht_butterfly needs a power-of-two size, got {n}")
    shape, y, h = x.shape, x.reshape(-1, n), 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        y = torch.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], 2)
        h *= 2
    y = y.reshape(shape)
    return y * (1.0 / math.sqrt(n)) if normalize else y


# ---- randomized Hadamard rotations ----------------------------------------------------------

def random_signs(size: int, seed: int, device=None, dtype=None) -> torch.Tensor:
    """±1 vector from a CPU generator (identical on every device and platform)."""
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (size,), generator=g) * 2 - 1).to(dtype=dtype or torch.float32, device=device)


class RandomizedHadamard:
    """Q = blockdiag_b(H_b) · diag(s) / √b with seeded signs s: orthogonal, Q x costs one fast transform.

    `block` = None means one block of the full size. Acts on the last dimension:
    `rotate(x)` = Q x, `unrotate(y)` = Qᵀ y; for a weight W [out, in] read as rows,
    `rotate(W)` = W Qᵀ.
    """

    def __init__(self, size: int, seed: int = 0, block: int | None = None):
        block = size if block is None else block
        if not isinstance(block, int) or block < 1 or size % block:
            raise ValueError(f"hadamard.block must be a positive divisor of the size {size}, got {block!r}")
        hadamard_factors(block)  # raises a ValueError naming the size if no matrix exists
        self.size, self.block, self.seed = size, block, int(seed)
        self._signs = random_signs(size, seed, dtype=torch.float64)
        self._cast: dict = {}  # (dtype, device) -> signs, so online rotations do not copy them per call

    def signs(self, like: torch.Tensor) -> torch.Tensor:
        dtype = like.dtype if like.is_floating_point() else torch.float32
        key = (dtype, like.device)
        if key not in self._cast:
            self._cast[key] = self._signs.to(dtype=dtype, device=like.device)
        return self._cast[key]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        y = (x * self.signs(x)).reshape(*x.shape[:-1], self.size // self.block, self.block)
        return hadamard_transform(y).reshape(x.shape)

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        self._check(y)
        blocks = y.reshape(*y.shape[:-1], self.size // self.block, self.block)
        return hadamard_transform(blocks, transpose=True).reshape(y.shape) * self.signs(y)

    def matrix(self, dtype=None) -> torch.Tensor:
        """Dense Q [size, size] (for tests and small folds)."""
        return self.rotate(torch.eye(self.size, dtype=dtype or torch.float64)).T

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.size:
            raise ValueError(f"rotation of size {self.size} applied to a tensor whose last dim is {x.shape[-1]}")
