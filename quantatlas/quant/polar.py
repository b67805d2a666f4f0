"""PolarQuant's recursive polar transform (Han et al. 2025, arXiv 2502.02617), the laws of its
angles, and the Lloyd-Max angle codebooks those laws give.

The transform of x ∈ R^d in L levels (2^L divides d):

    level 1      the d/2 pairs (x_2j, x_2j+1)  ->  radius r_j = ‖pair‖, angle ψ_j = atan2(x_2j+1, x_2j) ∈ [0, 2π)
    level l ≥ 2  the pairs of level l-1 radii (r_2j, r_2j+1)  ->  their norm, angle atan2(r_2j+1, r_2j) ∈ [0, π/2]

leaves d/2^l angles at level l and d/2^L radii (one, ‖x‖, when L = log2 d). The inverse walks back
from the last radii: each radius r and angle ψ give the pair (r cos ψ, r sin ψ).

The angle laws. Let x ~ N(0, σ²I) — or any fixed x after a Haar-random rotation: the angles depend
on x/‖x‖ only, and that direction is then uniform on the sphere, exactly as a Gaussian's is.

  level 1: (x_2j, x_2j+1) is an isotropic Gaussian pair, so its angle is uniform on [0, 2π).
  level l ≥ 2: the two radii of a pair are the norms of m = 2^(l-1) independent N(0, σ²)
  coordinates each, so their joint density is ∝ r_a^(m-1) r_b^(m-1) exp(-(r_a² + r_b²)/2σ²). With
  r_a = R cos ψ, r_b = R sin ψ (dr_a dr_b = R dR dψ) it factors as
      R^(2m-1) exp(-R²/2σ²) · (cos ψ sin ψ)^(m-1),
  so ψ is independent of R (and of every lower-level angle, which only sees directions within the
  two halves), with density on [0, π/2]

      f_l(ψ) = 2^(2-m) sin^(m-1)(2ψ) / B(m/2, m/2)        (= Γ(m) / (2^(m-2) Γ(m/2)²) · sin^(m-1)(2ψ)),

  and sin²ψ = r_b² / (r_a² + r_b²) ~ Beta(m/2, m/2), so the CDF is F_l(ψ) = I_{sin²ψ}(m/2, m/2).
  It is symmetric about π/4 and concentrates there as m grows (Var ψ ≈ 1/(4(m + 1))).

Codebooks (`angle_codebook`): the Lloyd-Max (MSE-optimal) quantizer of each level's law.
  level 1: the law is uniform, whose Lloyd-Max quantizer is the uniform one: levels (k + ½)·2π/n.
  It is also the best quantizer on the circle: a pair of radius r decoded at angle ψ̂ is off by
  2r²(1 − cos(ψ − ψ̂)), smallest at the nearest level, which is the cell [k, k + 1)·2π/n.
  level l ≥ 2: Lloyd's iteration on f_l (thresholds at midpoints, levels at the centroids of
  their cells); cell masses from F_l exactly, first moments ∫ψ f_l by composite Gauss–Legendre.
  Angle MSE is the right criterion: a pair of radius R decoded at ψ̂ is off by R²·2(1 − cos δ) ≈ R²δ²
  with R independent of ψ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import linalg, special

from quantatlas._lazy import torch

TWO_PI = 2.0 * math.pi
HALF_PI = 0.5 * math.pi
#: composite Gauss–Legendre for the cells' first moments: pieces per cell, nodes per piece
QUAD_PIECES, QUAD_NODES = 32, 16
LLOYD_TOL = 1e-10
LLOYD_MAX_ITER = 1000


# -- the transform ----------------------------------------------------------------------------
def polar_transform(x: torch.Tensor, levels: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Angles of each level ([..., d/2^l], level 1 first) and the last radii [..., d/2^L] of x [..., d]."""
    d = x.shape[-1]
    if levels < 1 or d % (1 << levels):
        raise ValueError(f"polar transform: {levels} levels need a length divisible by {1 << levels}, got {d}")
    angles, r = [], x
    for level in range(1, levels + 1):
        a, b = r[..., 0::2], r[..., 1::2]
        psi = torch.atan2(b, a)
        if level == 1:   # atan2 is in (-π, π]; the level-1 law is stated on [0, 2π)
            psi = torch.where(psi < 0, psi + TWO_PI, psi)
        angles.append(psi)
        r = torch.hypot(a, b)
    return angles, r


def inverse_polar_transform(angles: list[torch.Tensor], radii: torch.Tensor) -> torch.Tensor:
    """x from its angles (level 1 first) and last radii: each (r, ψ) becomes (r cos ψ, r sin ψ)."""
    r = radii
    for psi in reversed(angles):
        r = torch.stack((r * torch.cos(psi), r * torch.sin(psi)), dim=-1).flatten(-2)
    return r


# -- the laws -----------------------------------------------------------------------------------
def pair_dimension(level: int) -> int:
    """m = 2^(l-1): how many coordinates each radius of a level-l pair is the norm of."""
    return 1 << (level - 1)


def angle_pdf(level: int, psi: np.ndarray) -> np.ndarray:
    """f_l(ψ): 1/(2π) on [0, 2π) at level 1; 2^(2-m) sin^(m-1)(2ψ) / B(m/2, m/2) on [0, π/2] beyond."""
    psi = np.asarray(psi, dtype=float)
    if level == 1:
        return np.where((psi >= 0) & (psi < TWO_PI), 1.0 / TWO_PI, 0.0)
    m = pair_dimension(level)
    s = np.sin(2.0 * np.clip(psi, 0.0, HALF_PI))
    inside = (psi >= 0) & (psi <= HALF_PI)
    with np.errstate(divide="ignore"):   # log 0 at the ends: f = 0 there for m > 1
        log_f = (2 - m) * math.log(2.0) + (m - 1) * np.log(s) - special.betaln(m / 2, m / 2)
    return np.where(inside, np.exp(log_f), 0.0)


def angle_cdf(level: int, psi: np.ndarray) -> np.ndarray:
    """F_l(ψ): ψ/(2π) at level 1; I_{sin²ψ}(m/2, m/2) beyond (sin²ψ ~ Beta(m/2, m/2))."""
    psi = np.asarray(psi, dtype=float)
    if level == 1:
        return np.clip(psi / TWO_PI, 0.0, 1.0)
    m = pair_dimension(level)
    return special.betainc(m / 2, m / 2, np.sin(np.clip(psi, 0.0, HALF_PI)) ** 2)


def support(level: int) -> float:
    return TWO_PI if level == 1 else HALF_PI


# -- the codebooks ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AngleCodebook:
    levels: np.ndarray      # [2^bits] ascending reconstruction angles
    thresholds: np.ndarray  # [2^bits - 1] cell boundaries (midpoints)
    mse: float              # E[(ψ - Q(ψ))²] under f_l
    iterations: int


_GL_X, _GL_W = np.polynomial.legendre.leggauss(QUAD_NODES)


def _cell_moments(level: int, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """∫ f, ∫ ψ f, ∫ ψ² f over each cell [edges_i, edges_i+1], all three by the same composite
    Gauss–Legendre rule (QUAD_PIECES pieces of QUAD_NODES nodes per cell), so the centroids are
    consistent to rounding (tests/test_polarquant.py checks the masses against the CDF)."""
    a, b = edges[:-1], edges[1:]
    cuts = a[:, None] + (b - a)[:, None] * np.linspace(0.0, 1.0, QUAD_PIECES + 1)[None, :]
    lo, hi = cuts[:, :-1, None], cuts[:, 1:, None]
    x = 0.5 * (hi + lo) + 0.5 * (hi - lo) * _GL_X
    w = 0.5 * (hi - lo) * _GL_W * angle_pdf(level, x)
    return w.sum((1, 2)), (w * x).sum((1, 2)), (w * x * x).sum((1, 2))


def _lloyd_map(level: int, c: np.ndarray):
    """One step of Lloyd's map T: the centroids of the cells cut at the midpoints of c."""
    edges = np.concatenate([[0.0], 0.5 * (c[1:] + c[:-1]), [support(level)]])
    mass, first, second = _cell_moments(level, edges)
    return first / np.maximum(mass, np.finfo(float).tiny), edges, (mass, first, second)


def _newton_step(level: int, c: np.ndarray, t: np.ndarray, edges: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """Solve (J - I) Δ = -(T(c) - c) with T's tridiagonal Jacobian J. A centroid t_i of the cell [a, b]
    of mass μ moves by dt/da = f(a)(t - a)/μ and dt/db = f(b)(b - t)/μ, and each inner edge is the
    midpoint of two neighbouring levels (½ per level)."""
    n = len(c)
    inner = edges[1:-1]
    f = angle_pdf(level, inner)
    mu = np.maximum(mass, np.finfo(float).tiny)
    da = f * (t[1:] - inner) / mu[1:]          # level i = 1..n-1 through its lower edge
    db = f * (inner - t[:-1]) / mu[:-1]        # level i = 0..n-2 through its upper edge
    band = np.zeros((3, n))
    band[1] = -1.0
    band[1, 1:] += 0.5 * da
    band[1, :-1] += 0.5 * db
    band[0, 1:] = 0.5 * db                     # dT_i / dc_(i+1)
    band[2, :-1] = 0.5 * da                    # dT_i / dc_(i-1)
    return linalg.solve_banded((1, 1), band, -(t - c))


def _lloyd(level: int, n: int) -> AngleCodebook:
    """The fixed point c = T(c): Newton steps on T(c) - c (plain Lloyd converges linearly and takes
    thousands of steps at 6 bits and more), a plain Lloyd step wherever Newton's would break the
    order of the levels or not shrink the residual; stops when neither moves a level by LLOYD_TOL."""
    top = support(level)
    m = pair_dimension(level)
    # start at the quantiles of f (equal-mass cells): ψ = arcsin √(I⁻¹(p; m/2, m/2))
    c = np.arcsin(np.sqrt(special.betaincinv(m / 2, m / 2, (np.arange(n) + 0.5) / n)))
    for it in range(1, LLOYD_MAX_ITER + 1):
        t, edges, (mass, _, _) = _lloyd_map(level, c)
        step = t - c if n == 1 else _newton_step(level, c, t, edges, mass)
        if max(np.abs(t - c).max(), np.abs(step).max()) < LLOYD_TOL:
            c = t
            break
        trial = c + step
        ok = bool(np.all(np.diff(trial) > 0) and trial[0] > 0 and trial[-1] < top)
        if ok:
            ok = np.abs(_lloyd_map(level, trial)[0] - trial).max() < np.abs(t - c).max()
        c = trial if ok else t
        c = 0.5 * (c + (top - c[::-1]))        # the law is symmetric about π/4: keep the levels so
    else:
        raise RuntimeError(f"polar angle codebook: Lloyd did not converge (level {level}, {n} levels)")
    _, edges, (mass, first, second) = _lloyd_map(level, c)
    mse = float(np.sum(second - 2 * c * first + c * c * mass))
    return AngleCodebook(c, edges[1:-1].copy(), mse, it)


@lru_cache(maxsize=None)
def angle_codebook(level: int, bits: int) -> AngleCodebook:
    """The Lloyd-Max codebook of 2^bits angles for level `level`'s law (module docstring)."""
    if level < 1 or not 1 <= bits <= 8:
        raise ValueError(f"polar angle codebook: level >= 1 and bits 1..8, got level {level}, bits {bits}")
    n = 1 << bits
    if level == 1:
        step = TWO_PI / n
        levels = (np.arange(n) + 0.5) * step
        cb = AngleCodebook(levels, np.arange(1, n) * step, step * step / 12.0, 0)
    else:
        cb = _lloyd(level, n)
    cb.levels.flags.writeable = cb.thresholds.flags.writeable = False   # shared through the cache
    return cb
