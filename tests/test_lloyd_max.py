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


def test_bad_arguments():
    for bits in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="bits"):
            codebook(bits)
    with pytest.raises(ValueError, match="dimension"):
        codebook(2, "sphere", 1)
    with pytest.raises(ValueError, match="codebook"):
        codebook(2, "laplace")
