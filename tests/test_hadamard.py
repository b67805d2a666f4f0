"""Hadamard matrices and transforms against definitions and scipy's Sylvester matrix."""
import numpy as np
import pytest
import scipy.linalg
import torch

from quantatlas.quant import hadamard as had
from quantatlas.quant.hadamard import (WILLIAMSON, RandomizedHadamard, fwht, fwht_butterfly, hadamard_factors,
                                       hadamard_matrix, hadamard_transform, random_signs)

BASE_SIZES = [12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172, 44, 76, 148]


@pytest.mark.parametrize("n", BASE_SIZES + [24, 56, 344, 1536])
def test_hadamard_matrix_is_hadamard(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype))


def test_model_widths_factor_without_padding():
    # Llama-2-7B MLP, Llama-3-8B MLP, Qwen2.5-7B MLP, Llama-2-13B MLP, Llama-1-30B MLP
    assert hadamard_factors(11008) == (172, 6)
    assert hadamard_factors(14336) == (28, 9)
    assert hadamard_factors(18944) == (148, 7)
    assert hadamard_factors(13824) == (108, 7)
    assert hadamard_factors(17920) == (140, 7)
    assert hadamard_factors(4096) == (1, 12)
    assert hadamard_factors(40 * 64) == (20, 7)
    for n in (3, 92, 4 * 47, 0):
        with pytest.raises(ValueError, match="Hadamard"):
            hadamard_factors(n)


@pytest.mark.parametrize("n", [11008, 14336])
def test_large_transforms_are_orthogonal(n):
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    y = hadamard_transform(x)
    # orthogonal: norms and inner products are kept, and the transpose call inverts it
    np.testing.assert_allclose((y @ y.T).numpy(), (x @ x.T).numpy(), rtol=1e-10, atol=1e-8)
    assert torch.allclose(hadamard_transform(y, transpose=True), x, atol=1e-10)
    # the ±1 structure: unnormalised output of a basis vector is a ±1 column of H
    e = torch.zeros(n, dtype=torch.float64)
    e[n // 3] = 1
    assert set(hadamard_transform(e, normalize=False).unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("t", sorted(WILLIAMSON))
def test_williamson_quadruples(t):
    """Symmetric circulants whose periodic autocorrelations sum to 4t at shift 0 and 0 elsewhere."""
    rows = [np.array([1 if c == "+" else -1 for c in r]) for r in WILLIAMSON[t]]
    total = np.zeros(t, dtype=int)
    for a in rows:
        assert len(a) == t
        assert all(a[i] == a[-i % t] for i in range(t))
        total += np.array([a @ np.roll(a, s) for s in range(t)])
    assert total[0] == 4 * t and not total[1:].any()


def test_paley_jacobsthal_over_prime_power_fields():
    # GF(27) and GF(25): χ(a - b) must be ±1 off the diagonal, with (q-1)/2 squares per row
    for q in (27, 25, 19):
        jac = had._jacobsthal(q)
        assert (np.diag(jac) == 0).all()
        off = jac[~np.eye(q, dtype=bool)]
        assert set(off.tolist()) == {-1, 1}
        assert ((jac == 1).sum(1) == (q - 1) // 2).all()
        # Q Qᵀ = q I - J, the defining property of a Jacobsthal matrix
        assert (jac @ jac.T == q * np.eye(q, dtype=int) - np.ones((q, q), dtype=int)).all()


@pytest.mark.parametrize("n", [1, 2, 8, 128, 256, 1024])
def test_fwht_equals_dense_sylvester(n):
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    s = torch.from_numpy(scipy.linalg.hadamard(n).astype(np.float64))  # independent Sylvester
    want = x @ s.T / np.sqrt(n)
    assert torch.allclose(fwht(x), want, atol=1e-12)
    assert torch.allclose(fwht_butterfly(x), want, atol=1e-12)
    assert torch.allclose(fwht(x, normalize=False), x @ s.T, atol=1e-10)
    assert torch.equal(had.sylvester(n), s)


def test_fwht_inverse_and_scaling():
    x = torch.randn(3, 4096, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = fwht(x)
    assert torch.allclose(fwht(y), x, atol=1e-12)  # Sylvester is symmetric and orthonormal once scaled
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-12)
    assert torch.allclose(fwht(x, normalize=False), y * 64, atol=1e-9)
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(12))


@pytest.mark.parametrize("n", [12 * 16, 172 * 4, 28 * 8, 52 * 2, 156])
def test_transform_matches_dense_kronecker(n):
    x = torch.randn(6, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    h = hadamard_matrix(n)
    assert torch.allclose(hadamard_transform(x), x @ h.T / np.sqrt(n), atol=1e-12)
    assert torch.allclose(hadamard_transform(x, transpose=True), x @ h / np.sqrt(n), atol=1e-12)
    # batch dims and float32 are handled
    x32 = x.float().reshape(2, 3, n)
    assert torch.allclose(hadamard_transform(x32), (x @ h.T / np.sqrt(n)).float().reshape(2, 3, n), atol=1e-5)


@pytest.mark.parametrize("size,block", [(256, None), (256, 64), (172 * 2, 172), (96, 12)])
def test_randomized_hadamard(size, block):
    rot = RandomizedHadamard(size, seed=7, block=block)
    b = block or size
    signs = random_signs(size, 7)
    # direct construction: blockdiag(H_b) diag(s) / sqrt(b)
    want = torch.block_diag(*[hadamard_matrix(b)] * (size // b)) @ torch.diag(signs.double()) / np.sqrt(b)
    q = rot.matrix()
    assert torch.allclose(q, want, atol=1e-12)
    assert torch.allclose(q @ q.T, torch.eye(size, dtype=q.dtype), atol=1e-12)
    x = torch.randn(3, size, dtype=torch.float64)
    assert torch.allclose(rot.rotate(x), x @ q.T, atol=1e-12)
    assert torch.allclose(rot.unrotate(rot.rotate(x)), x, atol=1e-12)


def test_signs_are_seeded():
    a, b = random_signs(512, 0), random_signs(512, 1)
    assert torch.equal(a, random_signs(512, 0)) and not torch.equal(a, b)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(a.mean())) < 0.2
    with pytest.raises(ValueError, match="block"):
        RandomizedHadamard(100, 0, block=64)
    with pytest.raises(ValueError, match="Hadamard"):
        RandomizedHadamard(92, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_transform_on_cuda_matches_cpu():
    x = torch.randn(8, 11008, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hadamard_transform(x.cuda()).cpu(), hadamard_transform(x), atol=1e-4)
