"""Lloyd-Max codebooks against published values, closed forms, quadrature and sampling."""
import numpy as np
import pytest
from scipy import integrate, special, stats

from quantatlas.quant import lloyd_max
from quantatlas.quant.lloyd_max import codebook


@pytest.mark.parametrize("bits,published,digits", [(2, 0.1175, 4), (3, 0.03455, 5), (4, 0.00950, 5)])
def test_gaussian_mse_matches_published(bits, published, digits):
    assert round(codebook(bits).mse, digits) == published


def test_gaussian_one_bit_closed_form():
    cb = codebook(1)
    np.testing.assert_allclose(cb.levels, [-np.sqrt(2 / np.pi), np.sqrt(2 / np.pi)], rtol=1e-12)
    assert abs(cb.mse - (1 - 2 / np.pi)) < 1e-12


def test_gaussian_two_bit_levels_match_max_1960():
    # Max (1960), Table I, N = 4: outputs ±0.4528, ±1.510; threshold ±0.9816
    cb = codebook(2)
    np.testing.assert_allclose(cb.levels[2:], [0.4528, 1.510], atol=6e-4)
    np.testing.assert_allclose(cb.thresholds, [-0.9816, 0.0, 0.9816], atol=6e-4)


def _centroids_by_quadrature(cb, pdf, lo, hi):
    edges = np.concatenate([[lo], cb.thresholds, [hi]])
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        mass = integrate.quad(pdf, a, b, epsabs=1e-14, epsrel=1e-12)[0]
        first = integrate.quad(lambda x: x * pdf(x), a, b, epsabs=1e-14, epsrel=1e-12)[0]
        out.append(first / mass)
    return np.array(out)


@pytest.mark.parametrize("bits", [3, 5])
def test_gaussian_is_a_lloyd_fixed_point(bits):
    cb = codebook(bits)
    np.testing.assert_allclose(cb.thresholds, (cb.levels[1:] + cb.levels[:-1]) / 2, atol=1e-15)
    np.testing.assert_allclose(_centroids_by_quadrature(cb, stats.norm.pdf, -np.inf, np.inf), cb.levels, atol=1e-8)


@pytest.mark.parametrize("d,bits", [(16, 3), (128, 2), (5, 4)])
def test_sphere_is_a_lloyd_fixed_point(d, bits):
    cb = codebook(bits, "sphere", d)
    k = (d - 3) / 2

    def pdf(x):
        return (1 - x * x) ** k / special.beta(0.5, k + 1)

    np.testing.assert_allclose(_centroids_by_quadrature(cb, pdf, -1.0, 1.0), cb.levels, atol=1e-9)
    # exact mse by quadrature
    edges = np.concatenate([[-1.0], cb.thresholds, [1.0]])
    mse = sum(integrate.quad(lambda x, c=c: (x - c) ** 2 * pdf(x), a, b, epsabs=1e-15)[0]
              for a, b, c in zip(edges[:-1], edges[1:], cb.levels))
    assert abs(cb.mse - mse) < 1e-10


def test_sphere_in_three_dimensions_is_uniform():
    # Archimedes: a coordinate of a uniform point on S^2 is uniform on [-1, 1] → uniform quantizer
    for bits in (1, 3, 8):
        n = 1 << bits
        cb = codebook(bits, "sphere", 3)
        np.testing.assert_allclose(cb.levels, -1 + (2 * np.arange(n) + 1) / n, atol=1e-11)
        assert abs(cb.mse - (2 / n) ** 2 / 12) < 1e-13


def test_sphere_tends_to_gaussian():
    d = 20000
    for bits in (2, 4):
        np.testing.assert_allclose(np.sqrt(d) * codebook(bits, "sphere", d).levels, codebook(bits).levels, atol=3e-3)


def test_monte_carlo_mse():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1_000_000)
    cb = codebook(3)
    x_hat = cb.levels[np.searchsorted(cb.thresholds, x)]
    assert abs(np.mean((x - x_hat) ** 2) / cb.mse - 1) < 0.01
    # first coordinate of uniform unit vectors in d = 8
    v = rng.standard_normal((400_000, 8))
    u = v[:, 0] / np.linalg.norm(v, axis=1)
    cb8 = codebook(4, "sphere", 8)
    u_hat = cb8.levels[np.searchsorted(cb8.thresholds, u)]
    assert abs(np.mean((u - u_hat) ** 2) / cb8.mse - 1) < 0.01


@pytest.mark.parametrize("kind,d", [("gaussian", None), ("sphere", 2), ("sphere", 128), ("sphere", 4096)])
def test_every_rate_converges(kind, d):
    for bits in range(1, 9):
        cb = codebook(bits, kind, d)
        assert cb.levels.shape == (1 << bits,) and np.all(np.diff(cb.levels) > 0)
        np.testing.assert_allclose(cb.levels, -cb.levels[::-1], atol=1e-12)
        # one more plain Lloyd step moves nothing: a true fixed point
        new = lloyd_max._lloyd_step(lloyd_max._density(kind, d), cb.levels)[0]
        assert np.abs(new - cb.levels).max() < 1e-11
        if bits > 1:  # more bits, less distortion, roughly 6 dB per bit
            prev = codebook(bits - 1, kind, d).mse
            assert 3.0 < prev / cb.mse < 5.0


def _half_beta_exact(b):
    """B(1/2, b) for b = n or n + 1/2 exactly (as a rational, times pi for half-integers), then rounded."""
    from fractions import Fraction
    from math import factorial
    n = int(b)
    if b == n:   # Γ(1/2)Γ(n)/Γ(n+1/2) = 4^n (n!)^2 / (n (2n)!)
        return float(Fraction(4 ** n * factorial(n) ** 2, n * factorial(2 * n)))
    # Γ(1/2)Γ(n+1/2)/Γ(n+1) = π (2n)! / (4^n (n!)^2)
    return np.pi * float(Fraction(factorial(2 * n), 4 ** n * factorial(n) ** 2))


@pytest.mark.parametrize("d", [2, 3, 4, 5, 16, 63, 64, 65, 66, 129, 512, 1001, 4096, 4097, 20000, 65536])
def test_sphere_normaliser_is_accurate_at_every_dimension(d):
    # scipy's beta(1/2, b) is off by 2.6e-12 at d = 4096 (4e-11 at d = 65536): the codebook must not use it there
    b = (d - 1) / 2
    assert abs(np.exp(lloyd_max._log_half_beta(b)) / _half_beta_exact(b) - 1) < 1e-14


def test_sphere_density_and_first_moment_tail_are_exact_at_large_d():
    # d = 4097: k = 2047 and B(1/2, 2048) are rational, so f(t) and T_1(t) are exact rationals at a float t
    from fractions import Fraction
    from math import factorial
    d, n = 4097, 2048
    den = lloyd_max._density("sphere", d)
    inv_b = Fraction(n * factorial(2 * n), 4 ** n * factorial(n) ** 2)
    ts = np.array([0.0, 3e-4, 0.0021, 0.013, 0.0377, 0.061, 0.08])
    t0, t1, t2 = den.tails(ts)
    for i, t in enumerate(ts):
        w = 1 - Fraction(float(t)) ** 2
        pdf, tail1 = float(w ** (n - 1) * inv_b), float(w ** n * inv_b / (2 * n))
        assert abs(den.pdf(np.array(t)) / pdf - 1) < 5e-15
        assert abs(t1[i] / tail1 - 1) < 5e-15     # the naive (1 - t²)^2048 is off by up to ~2e-13
    assert t0[0] == 0.5 and abs(t2[0] * 2 * d - 1) < 1e-15   # half the mass and half of E[X²] = 1/d


@pytest.mark.parametrize("d", [4096, 8192, 20000])
def test_large_dimension_eight_bits_converges_quickly(d):
    # with noisy tails Newton stalled at a residual ~2.5e-13 and never met its tolerance
    cb = codebook(8, "sphere", d)
    assert cb.iterations <= 10
    new = lloyd_max._lloyd_step(lloyd_max._density("sphere", d), cb.levels)[0]
    assert np.abs(new - cb.levels).max() < 1e-14


def test_bad_arguments():
    for bits in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="bits"):
            codebook(bits)
    with pytest.raises(ValueError, match="dimension"):
        codebook(2, "sphere", 1)
    with pytest.raises(ValueError, match="codebook"):
        codebook(2, "laplace")
