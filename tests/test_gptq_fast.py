"""The optimised GPTQ loop (transposed layout, sub-blocks, the inverse-free factor R, the
fused per-column rounding of scalar codecs, the proxy loss from ‖E‖²) against a plain
per-column GPTQ written here: no lazy batches, the textbook factor U = chol(H⁻¹)ᵀ, every
update applied to every later column at once. Small matrices: seconds in all."""
from __future__ import annotations

import sys

import pytest
import torch

from quantatlas.quant.codecs import make_codec
from quantatlas.quant.codecs.base import Codec
from quantatlas.quant.solvers import gptq

G = sys.modules["quantatlas.quant.solvers.gptq"]


pytestmark = pytest.mark.usefixtures("one_thread")


def problem(seed: int, rows: int = 32, cols: int = 128, n: int = 512, dead=()):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    X = (torch.randn(n, cols, generator=g) @ mix) * torch.exp(0.7 * torch.randn(cols, generator=g))
    X[:, list(dead)] = 0
    W = torch.randn(rows, cols, generator=g)
    return W, (2.0 / n) * X.T @ X, X


def plain_gptq(W, H, codec, *, damp=0.01, order=None, static=False, C=None):
    """GPTQ one column (bw columns for a vector codec) at a time, float64, eager updates.

    U upper with UᵀU = (H + λI)⁻¹. Column block B: E = (w_B - q̂_B) U_BB⁻¹, then every later
    column moves by -E U[B, later] and (GPTAQ) by w_B (C[B, F] (H_F)⁻¹), F the columns after
    B, with w_B the values before rounding. Groups are fitted on the current weights at their
    first column, or (static) on the original ones, with importance diag(H).
    """
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    imp = torch.diagonal(H).clone()
    dead = torch.diagonal(H) == 0
    W[:, dead] = 0
    H[dead, dead] = 1
    order = torch.arange(cols) if order is None else torch.as_tensor(order)
    W, H, imp_p = W[:, order], H[order][:, order], imp[order]
    C = None if C is None else C.double()[order][:, order]
    Hd = H + damp * torch.diagonal(H).mean() * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd)).T
    g, bw = codec.group_of(cols), codec.block_width
    params = {}
    if static:
        for gi in range(cols // g):
            sel = torch.argsort(order)[gi * g:(gi + 1) * g]   # positions of the original group's columns
            params[gi] = codec.fit(W[:, sel].float(), imp[gi * g:(gi + 1) * g].float())
    Q = torch.zeros_like(W)
    for p in range(0, cols, bw):
        gi, col = divmod(int(order[p]), g)
        if gi not in params:
            params[gi] = codec.fit(W[:, p:p + g].float(), imp_p[p:p + g].float())
        w = W[:, p:p + bw].clone()
        Q[:, p:p + bw] = codec.quantize(w.float(), params[gi], col).values.double()
        E = torch.linalg.solve_triangular(U[p:p + bw, p:p + bw], w - Q[:, p:p + bw], upper=True, left=False)
        F = slice(p + bw, cols)
        W[:, F] -= E @ U[p:p + bw, F]
        if C is not None and p + bw < cols:
            W[:, F] += w @ (C[p:p + bw, F] @ torch.linalg.inv(Hd[F, F]))
    return Q[:, torch.argsort(order)].float()


def proxy(W_hat, W, H) -> float:
    D = (W_hat - W).double()
    return float(((D @ H.double()) * D).sum())


def check(W, H, codec, ref, **kw):
    """float64: equal to the plain loop; float32: the same proxy loss within 1e-4, and nearly all codes."""
    W64, packed64, info64 = gptq(W.double(), H, codec, **kw)
    torch.testing.assert_close(W64, ref, atol=1e-9, rtol=0)
    assert torch.equal(codec.decode(packed64), W64)
    assert info64["proxy_loss"] == pytest.approx(proxy(W64, W, H), rel=1e-7)
    W32, packed32, info32 = gptq(W, H, codec, **kw)
    assert torch.equal(codec.decode(packed32), W32)
    assert proxy(W32, W, H) == pytest.approx(proxy(ref, W, H), rel=1e-4)
    assert info32["proxy_loss"] == pytest.approx(proxy(W32, W, H), rel=1e-4)
    assert (W32 != ref).float().mean() < 0.01   # an fp32 tie may flip a rounding, not more
    return W64, info64


@pytest.mark.parametrize("opts,kw", [
    ({"bits": 3, "group": 32}, {}),
    ({"bits": 4, "group": 32, "symmetric": False}, {"block_size": 48}),     # groups cross block ends
    ({"bits": 4, "group": 64, "symmetric": False, "clip": "hessian"}, {"block_size": 32}),  # groups span blocks
    ({"bits": 2, "group": None, "clip": "mse"}, {}),
])
def test_uniform_equals_plain_gptq(opts, kw):
    W, H, _ = problem(0)
    codec = make_codec("uniform", opts)
    check(W, H, codec, plain_gptq(W, H, codec), **kw)


def test_act_order_and_static_groups():
    W, H, _ = problem(1)
    codec = make_codec("uniform", {"bits": 3, "group": 32, "symmetric": False})
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    check(W, H, codec, plain_gptq(W, H, codec, order=order, static=True), act_order=True, static_groups=True)
    check(W, H, codec, plain_gptq(W, H, codec, static=True), static_groups=True)


def test_gptaq_equals_plain_gptq_with_the_cross_term():
    W, H, X = problem(2, n=1024)
    g = torch.Generator().manual_seed(3)
    X_q = X + 0.1 * torch.randn(X.shape, generator=g) * X.std(0)
    H_q = (2.0 / X.shape[0]) * X_q.T @ X_q
    C = (2.0 / X.shape[0]) * (X - X_q).T @ X_q
    codec = make_codec("uniform", {"bits": 3, "group": 32})
    ref = plain_gptq(W, H_q, codec, C=C)
    W64 = gptq(W.double(), H_q, codec, H_cross=C)[0]
    torch.testing.assert_close(W64, ref, atol=1e-9, rtol=0)
    order = torch.argsort(torch.diagonal(H_q), descending=True, stable=True)
    W_ao = gptq(W.double(), H_q, codec, H_cross=C, act_order=True, static_groups=True, block_size=48)[0]
    torch.testing.assert_close(W_ao, plain_gptq(W, H_q, codec, C=C, order=order, static=True), atol=1e-9, rtol=0)


def test_vector_codec_e8p_block_width_8():
    W, H, _ = problem(4, rows=16)
    codec = make_codec("e8p", {"bits": 2, "group": 64})
    assert codec.block_width == 8
    check(W, H, codec, plain_gptq(W, H, codec), block_size=32)
    order = torch.argsort(torch.diagonal(H).reshape(-1, 8).sum(1), descending=True, stable=True)
    order = (order[:, None] * 8 + torch.arange(8)).flatten()
    W_ao = gptq(W.double(), H, codec, act_order=True, static_groups=True)[0]
    torch.testing.assert_close(W_ao, plain_gptq(W, H, codec, order=order, static=True), atol=1e-9, rtol=0)


def test_trellis_tile_256():
    W, H, _ = problem(5, rows=4, cols=512, n=1024)
    codec = make_codec("trellis", {"bits": 2, "L": 8, "T": 256})
    assert codec.block_width == 256
    W64, _ = check(W, H, codec, plain_gptq(W, H, codec), block_size=256)


def test_dead_columns_and_the_proxy_loss_identity():
    W, H, _ = problem(6, dead=(0, 7, 64, 127))
    codec = make_codec("uniform", {"bits": 4, "group": 32, "symmetric": False})
    W64, info = check(W, H, codec, plain_gptq(W, H, codec))
    assert info["dead_columns"] == 4 and (W64[:, [0, 7, 64, 127]] == 0).all()
    # a damp so large that ‖E‖² - λ‖D‖² would cancel: the direct product is used, same value
    W_big, _, info_big = gptq(W.double(), H, codec, damp=100.0)
    assert info_big["proxy_loss"] == pytest.approx(proxy(W_big, W, H), rel=1e-9)


def test_sub_block_size_does_not_change_the_result(monkeypatch):
    W, H, _ = problem(7)
    codec = make_codec("uniform", {"bits": 3, "group": 32})
    results = []
    for sub in (1, 5, 16, 128):
        monkeypatch.setattr(G, "SUB_BLOCK", sub)
        results.append(gptq(W.double(), H, codec, block_size=64)[0])
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=1e-9, rtol=0)


class NoFastPath(Codec):
    """The uniform codec without its column_quantizer: GPTQ takes the generic quantize path."""

    def __init__(self, inner):
        super().__init__(inner.cfg)
        self.inner, self.name, self.group_size = inner, inner.name, inner.group_size

    def fit(self, w, importance=None):
        return self.inner.fit(w, importance)

    def quantize(self, w, params, col=0):
        return self.inner.quantize(w, params, col)

    def pack(self, codes, params):
        return self.inner.pack(codes, params)

    def decode(self, packed):
        return self.inner.decode(packed)


@pytest.mark.parametrize("opts", [{"bits": 4, "group": 32}, {"bits": 3, "group": 64, "symmetric": False}])
def test_fused_column_rounding_is_the_codecs_quantize(opts):
    codec = make_codec("uniform", opts)
    w = 3 * torch.randn(64, 32, generator=torch.Generator().manual_seed(8))
    params = codec.fit(w[:, :8] / 3)          # fitted on smaller values: many columns clamp
    one_column = codec.column_quantizer(params)
    for c in range(w.shape[1]):
        values, codes = torch.empty(64), torch.empty(64)
        one_column(w[:, c].contiguous(), c, values, codes)
        ref = codec.quantize(w[:, c:c + 1], params, c)
        assert torch.equal(values, ref.values[:, 0]) and torch.equal(codes.long(), ref.codes[:, 0])
    # inside GPTQ: bit for bit the generic path, float32 and float64
    W, H, _ = problem(9)
    for dtype in (torch.float32, torch.float64):
        fast, packed_fast, info_fast = gptq(W.to(dtype), H, codec)
        slow, packed_slow, info_slow = gptq(W.to(dtype), H, NoFastPath(codec))
        assert torch.equal(fast, slow)
        assert all(torch.equal(packed_fast.data[k], packed_slow.data[k]) for k in packed_slow.data)


def test_losses_off_changes_nothing_but_the_info():
    W, H, X = problem(10)
    C = 0.05 * (torch.randn(128, 128, generator=torch.Generator().manual_seed(10)) / 128 ** 0.5) @ H
    codec = make_codec("uniform", {"bits": 4, "group": 32, "symmetric": False})
    for kw in ({}, {"H_cross": C}):
        a, pa, ia = gptq(W, H, codec, **kw)
        b, pb, ib = gptq(W, H, codec, losses=False, **kw)
        assert torch.equal(a, b) and torch.equal(pa.data["codes"], pb.data["codes"])
        assert ia["proxy_loss"] > 0 and ib["proxy_loss"] is None
        assert ("asym_proxy_loss" in ib) == ("H_cross" in kw) and ib.get("asym_proxy_loss") is None


@pytest.mark.parametrize("kw", [{}, {"act_order": True, "static_groups": True}, {"dead": (3, 70)}])
def test_overwrite_h_gives_the_same_result_and_uses_the_hessians_memory(kw):
    kw = dict(kw)
    W, H, X = problem(11, dead=kw.pop("dead", ()))
    codec = make_codec("uniform", {"bits": 3, "group": 32})
    a, pa, _ = gptq(W, H, codec, losses=False, **kw)
    H2 = H.clone()
    b, pb, _ = gptq(W, H2, codec, losses=False, overwrite_h=True, **kw)
    assert torch.equal(a, b) and all(torch.equal(pa.data[k], pb.data[k]) for k in pa.data)
    if not kw.get("act_order"):            # (act_order reorders into a new matrix)
        assert not torch.equal(H2, H)      # the factor was computed in it
    c, pc, info = gptq(W, H, codec, overwrite_h=True, **kw)   # losses need H: it is left alone
    assert torch.equal(a, c) and info["proxy_loss"] > 0 and torch.equal(H, H.T)


@pytest.mark.parametrize("n", [1, 6, 7])
def test_reverse_in_place_is_flip_for_both_layouts(n):
    M = torch.arange(n * n, dtype=torch.float32).reshape(n, n)
    for m in (M.clone(), M.clone().t()):   # row- and column-major
        want = m.flip(0, 1)
        got = G._reverse_(m, chunk=4)
        assert torch.equal(got, want) and got.data_ptr() == m.data_ptr()
    strided = torch.zeros(n, 2 * n)[:, ::2]
    strided.copy_(M)
    assert torch.equal(G._reverse_(strided, chunk=4), M.flip(0, 1))   # other layouts: a copy


def test_blocked_cholesky_in_place_and_its_restore_after_a_failure(monkeypatch):
    g = torch.Generator().manual_seed(12)
    X = torch.randn(200, 70, generator=g, dtype=torch.float64)
    H = X.T @ X / 200
    A = H.clone()
    monkeypatch.setattr(G, "CHOLESKY_BLOCK", 16)
    assert G._cholesky_(A) and torch.allclose(A, torch.linalg.cholesky(H), atol=1e-12)
    # a Hessian whose Cholesky fails at damp 0.01 and not at 0.1, factored in blocks of 16: the restored
    # matrix is refactored, so the result is the one of damp 0.1 from the start
    W, _, _ = problem(12, cols=64)
    low_rank = torch.randn(16, 64, generator=g)
    A = (2.0 / 16) * low_rank.T @ low_rank
    H = A - 0.05 * torch.diagonal(A).mean() * torch.eye(64)
    codec = make_codec("uniform", {"bits": 4, "group": 32})
    with pytest.warns(RuntimeWarning, match="retrying with damp=0.1"):
        a, pa, ia = gptq(W, H.clone(), codec, losses=False, overwrite_h=True)
    b, pb, ib = gptq(W, H, codec, damp=0.1, losses=False)
    assert ia["damp"] == ib["damp"] and torch.equal(a, b) and torch.equal(pa.data["codes"], pb.data["codes"])
