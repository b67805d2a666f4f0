"""Lloyd-Max scalar quantizers (MSE-optimal codebooks) for two densities, 1 to 8 bits.

* "gaussian": X ~ N(0, 1).
* "sphere", d: X = first coordinate of a uniformly random unit vector in R^d, density
  f(x) = (1 - x²)^((d-3)/2) / B(1/2, (d-1)/2) on [-1, 1] (i.e. (X+1)/2 ~ Beta((d-1)/2, (d-1)/2)).
  E[X²] = 1/d; √d·X → N(0, 1) as d grows. This is the exact marginal after a uniform random
  rotation of a normalised vector, which is what the `turbo` codec quantizes.

Lloyd's algorithm alternates the two optimality conditions until the levels stop moving
(we accelerate it with Newton steps on the same fixed-point equation, see `lloyd`):
thresholds are midpoints of neighbouring levels, levels are the conditional means of their
cell, c_i = ∫_cell x f / ∫_cell f. Both integrals are evaluated exactly from closed forms
(Φ and φ for the Gaussian, the regularised incomplete beta function for the sphere), so the
result is the true Lloyd-Max codebook, not a sample estimate. The start is the high-rate
optimum (levels at quantiles of f^(1/3), Panter–Dite), which makes convergence fast.

Every codebook converges in a few steps (milliseconds), so results are only cached in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import linalg, special

TOL = 1e-12


@dataclass(frozen=True)
class Codebook:
    levels: np.ndarray      # [2^bits] ascending
    thresholds: np.ndarray  # [2^bits - 1] decision boundaries (midpoints)
    mse: float              # E[(X - Q(X))²] under the design density
    iterations: int


class _Density:
    """A symmetric density, described by its upper-tail integrals T_j(t) = ∫_t^∞ x^j f(x) dx, t >= 0.

    Cell integrals are assembled from tails (never as differences of CDFs near 1), so the
    small cells far in the tails keep full relative precision.
    """

    second_moment: float
    support: float  # half-width of the support (inf for the Gaussian)

    def tails(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def pdf(self, t: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def init_levels(self, n: int) -> np.ndarray:
        raise NotImplementedError

    def cells(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """∫_a^b x^j f(x) dx for j = 0, 1, 2 and cells a < b."""
        ta0, ta1, ta2 = self.tails(np.abs(a))
        tb0, tb1, tb2 = self.tails(np.abs(b))
        pos, neg = a >= 0, b <= 0
        # both ends >= 0: T(a) - T(b); both <= 0: mirror image; straddling 0: two half-line pieces
        mass = np.where(pos, ta0 - tb0, np.where(neg, tb0 - ta0, 1.0 - ta0 - tb0))
        first = ta1 - tb1                         # x f is odd: the same expression in all three cases
        half2 = 0.5 * self.second_moment
        second = np.where(pos, ta2 - tb2, np.where(neg, tb2 - ta2, (half2 - ta2) + (half2 - tb2)))
        return mass, first, second


class _Gaussian(_Density):
    second_moment, support = 1.0, np.inf

    def pdf(self, t):
        finite = np.isfinite(t)
        return np.where(finite, np.exp(-0.5 * np.where(finite, t, 0.0) ** 2), 0.0) / np.sqrt(2 * np.pi)

    def tails(self, t):
        phi = self.pdf(t)
        t_phi = np.where(np.isfinite(t), np.where(np.isfinite(t), t, 0.0) * phi, 0.0)
        upper = special.ndtr(-t)
        return upper, phi, t_phi + upper        # ∫_t^∞ x² φ = t φ(t) + Φ(-t)

    def init_levels(self, n):
        # f^(1/3) ∝ N(0, 3): levels at its quantiles
        return np.sqrt(3.0) * special.ndtri((np.arange(n) + 0.5) / n)


def _log_half_beta(b: float) -> float:
    """log B(½, b) = log Γ(½) + log Γ(b) - log Γ(b + ½), to full double precision for every b > 0.

    scipy's `beta`/`betaln` take the difference of two large log-gammas for large b and lose
    accuracy there (relative error ~1e-13 at b ~ 256, 2.6e-12 at b = 2047.5, 4e-11 at b ~ 3e4 with
    scipy 1.17). For b >= 32 we use Stirling's series on the ratio instead:
    log Γ(b + ½) - log Γ(b) = ½ log b + (b log1p(1/(2b)) - ½) + ω(b + ½) - ω(b),
    ω(x) = 1/(12x) - 1/(360x³) + 1/(1260x⁵) - 1/(1680x⁷) (truncation error < 1/(1188 x⁹) < 1e-16).
    """
    if b < 32:
        return float(np.log(special.beta(0.5, b)))

    def omega(x):
        y = 1.0 / (x * x)
        return (1 / 12 - y * (1 / 360 - y * (1 / 1260 - y / 1680))) / x

    log_ratio = 0.5 * np.log(b) + (b * np.log1p(0.5 / b) - 0.5) + (omega(b + 0.5) - omega(b))
    return 0.5 * np.log(np.pi) - log_ratio


class _Sphere(_Density):
    """f(x) = (1 - x²)^k / B(½, k+1), k = (d-3)/2.

    Every power (1 - x²)^k is taken as exp(k log1p(-x²)): the naive pow rounds 1 - x² first and
    multiplies that relative rounding error by k (±1e-13 of noise in T_1 at d = 4096, enough to
    keep the Newton iteration from ever meeting its tolerance), and the normaliser is taken in log
    form from `_log_half_beta` (scipy's beta is off by 2.6e-12 at d = 4096, which biases the fixed
    point: the Lloyd map is ill-conditioned at high rate, so its levels moved by up to ~2e-9).
    """

    def __init__(self, d: int):
        self.d, self.k = d, (d - 3) / 2.0   # f ∝ (1 - x²)^k
        self.second_moment, self.support = 1.0 / d, 1.0
        self.log_norm = _log_half_beta(self.k + 1)

    def _log_power(self, u: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
        """(u < 1, p log(1 - u) - log B) where u < 1 (0 elsewhere), for u = x² in [0, 1]."""
        inside = u < 1.0
        return inside, p * np.log1p(-np.where(inside, u, 0.0)) - self.log_norm

    def pdf(self, t):
        u = np.clip(np.asarray(t, dtype=float) ** 2, 0.0, None)
        inside, log_f = self._log_power(u, self.k)
        # on or beyond the edge |t| >= 1: 0, or the d <= 3 limits (1 for d = 3, ∞ for d = 2)
        edge = np.where(u > 1.0, 0.0, 0.0 ** self.k if self.k >= 0 else np.inf) * np.exp(-self.log_norm)
        return np.where(inside, np.exp(log_f), edge)

    def tails(self, t):
        # u = x²: ∫_t^1 x^j f dx = ½ ∫_{t²}^1 u^((j-1)/2) (1-u)^k du / B(½, k+1)
        k = self.k
        u = np.clip(t * t, 0.0, 1.0)
        t0 = 0.5 * special.betaincc(0.5, k + 1, u)
        inside, log_t1 = self._log_power(u, k + 1)
        t1 = np.where(inside, 0.5 * np.exp(log_t1) / (k + 1), 0.0)
        # B(3/2, k+1) / B(1/2, k+1) = (1/2) / (k + 3/2) = 1/d exactly
        t2 = 0.5 * special.betaincc(1.5, k + 1, u) * self.second_moment
        return t0, t1, t2

    def init_levels(self, n):
        # f^(1/3) ∝ (1 - x²)^(k/3): (x+1)/2 ~ Beta(k/3 + 1, k/3 + 1)
        a = self.k / 3 + 1
        return 2 * special.betaincinv(a, a, (np.arange(n) + 0.5) / n) - 1


def _density(kind: str, d: int | None) -> _Density:
    if kind == "gaussian":
        return _Gaussian()
    if kind == "sphere":
        if not isinstance(d, int) or d < 2:
            raise ValueError(f"lloyd_max: sphere codebook needs an integer dimension d >= 2, got {d!r}")
        return _Sphere(d)
    raise ValueError(f"lloyd_max: codebook must be 'gaussian' or 'sphere', got {kind!r}")


def _lloyd_step(density: _Density, levels: np.ndarray):
    """One application of the Lloyd map: centroids of the cells cut at the midpoints."""
    edge = density.support
    t = np.concatenate([[-edge], 0.5 * (levels[1:] + levels[:-1]), [edge]])
    mass, first, second = density.cells(t[:-1], t[1:])
    new = first / np.maximum(mass, np.finfo(float).tiny)
    return new, t, mass, (mass, first, second)


def _newton_step(density: _Density, levels, new, t, mass, resid) -> np.ndarray:
    """Solve (J - I) step = -(T(c) - c) with the tridiagonal Jacobian J of the Lloyd map T."""
    n = len(levels)
    inner = t[1:-1]                                   # the thresholds that move
    f = density.pdf(inner)
    m = np.maximum(mass, np.finfo(float).tiny)
    da = f * (new[1:] - inner) / m[1:]                # d c_i / d a_i, i = 1..n-1
    db = f * (inner - new[:-1]) / m[:-1]              # d c_i / d b_i, i = 0..n-2
    banded = np.zeros((3, n))                         # each threshold moves ½ per neighbouring level
    banded[1] = -1.0
    banded[1, 1:] += 0.5 * da
    banded[1, :-1] += 0.5 * db
    banded[0, 1:] = 0.5 * db                          # d T_i / d c_{i+1}
    banded[2, :-1] = 0.5 * da                         # d T_i / d c_{i-1}
    return linalg.solve_banded((1, 1), banded, -resid)


def lloyd(density: _Density, n_levels: int, tol: float = TOL, max_iter: int = 1000) -> Codebook:
    """The symmetric fixed point c = T(c) of the Lloyd map T (relative tolerance tol on the levels).

    Plain Lloyd iteration converges linearly and slowly at many levels (thousands of steps at
    6 bits), so we take Newton steps on T(c) - c. Its Jacobian is tridiagonal: level i is the
    centroid of [a, b] with a, b the midpoints to its neighbours, and for a cell of mass m,
    dc/da = f(a)(c - a)/m, dc/db = f(b)(b - c)/m. A Newton step that would break the ordering
    or not shrink the residual is replaced by a plain Lloyd step. Iterates are kept symmetric
    (T preserves symmetry; this removes a slow antisymmetric mode for the arcsine law, d = 2).
    We stop when neither a plain Lloyd step nor a Newton step moves any level by more than tol.
    """
    levels = density.init_levels(n_levels)
    scale = 1.0 if np.isinf(density.support) else density.support
    for it in range(1, max_iter + 1):
        new, t, mass, _ = _lloyd_step(density, levels)
        resid = new - levels
        step = resid if n_levels == 1 else _newton_step(density, levels, new, t, mass, resid)
        # stop on the Newton step too: near a flat direction of T a small residual can hide a large error
        if max(np.abs(resid).max(), np.abs(step).max()) < tol * scale:
            levels = new
            break
        trial = levels + step
        ok = bool(np.all(np.diff(trial) > 0) and np.all(np.abs(trial) < density.support))
        if ok:
            ok = np.abs(_lloyd_step(density, trial)[0] - trial).max() < np.abs(resid).max()
        levels = trial if ok else new
        levels = 0.5 * (levels - levels[::-1])
    else:
        raise RuntimeError(f"Lloyd-Max did not converge in {max_iter} iterations ({n_levels} levels)")
    _, t, _, (mass, first, second) = _lloyd_step(density, levels)
    # E[(X - c)²] over each cell = ∫x² f - 2c ∫x f + c² ∫ f
    mse = float(np.sum(second - 2 * levels * first + levels ** 2 * mass))
    thresholds = t[1:-1].copy()
    levels.flags.writeable = thresholds.flags.writeable = False  # shared through the cache
    return Codebook(levels, thresholds, mse, it)


@lru_cache(maxsize=None)
def codebook(bits: int, kind: str = "gaussian", d: int | None = None) -> Codebook:
    """The Lloyd-Max codebook with 2^bits levels for N(0,1) ("gaussian") or the d-dim sphere marginal.

    Every codebook converges in a few Newton steps (≤ 30 ms at 8 bits), so it is computed on
    first use and kept in memory; there is no disk cache to go stale.
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"lloyd_max: bits must be an integer from 1 to 8, got {bits!r}")
    return lloyd(_density(kind, d), 1 << bits)


def gaussian_levels(bits: int) -> np.ndarray:
    return codebook(bits, "gaussian").levels


def sphere_levels(bits: int, d: int) -> np.ndarray:
    return codebook(bits, "sphere", d).levels
