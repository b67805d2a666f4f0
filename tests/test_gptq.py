"""GPTQ / LDLQ / GPTAQ solver: checked against a direct column-by-column OBS written here."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch

from quantatlas.quant.codecs import make_codec
from quantatlas.quant.codecs.base import Codec, Packed, Quantized
from quantatlas.quant.solvers import MAX_DAMP_RAISES, gptq, rtn

ROWS, COLS = 64, 256


pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    """X [n, cols] with correlated columns and uneven channel scales (as LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    scale = torch.exp(0.7 * torch.randn(cols, generator=g))
    return (torch.randn(n, cols, generator=g) @ mix) * scale


def hessian(X: torch.Tensor) -> torch.Tensor:
    return (2.0 / X.shape[0]) * X.T @ X


def problem(seed: int, rows: int = ROWS, cols: int = COLS, n: int = 1024):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(rows, cols, generator=g), hessian(correlated_inputs(n, cols, seed))


def proxy(W_hat, W, H) -> float:
    D = (W_hat - W).double()
    return float(((D @ H.double()) * D).sum())


def direct_obs(W, H, codec, *, damp=0.01, order=None, static=False, H_cross=None, fit_importance=True,
               dtype=torch.float64):
    """Textbook OBS quantization, one column at a time, in float64, without the Cholesky trick.

    Keeps the inverse Hessian of the free columns explicitly: quantize column q, move the
    free columns by -(w_q - q̂)/[H⁻¹]_qq · H⁻¹[q, :], then remove q from H⁻¹. GPTAQ adds
    w_q · H_cross[q, F] (H_F)⁻¹ for the free columns F after q. Groups are fitted on the
    current weights at their first column, or (static) on the original weights. A vector
    codec fixes its block_width columns B at once: -(W_B - Q_B) [H⁻¹]_BB⁻¹ H⁻¹[B, :].
    """
    W = W.to(dtype).clone()
    H = H.to(dtype).clone()
    rows, cols = W.shape
    imp = torch.diagonal(H).clone() if fit_importance else None
    dead = torch.diagonal(H) == 0
    W[:, dead] = 0
    H[dead, dead] = 1
    H += damp * torch.diagonal(H).mean() * torch.eye(cols, dtype=H.dtype, device=H.device)
    Hinv = torch.linalg.inv(H)
    C = None if H_cross is None else H_cross.to(dtype)
    g, bw = codec.group_of(cols), codec.block_width
    params = {}
    if static:
        for gi in range(cols // g):
            cols_g = slice(gi * g, (gi + 1) * g)
            params[gi] = codec.fit(W[:, cols_g].float(), None if imp is None else imp[cols_g].float())
    order = list(range(cols)) if order is None else list(order)
    free = list(order)
    Q = torch.zeros_like(W)
    for start in range(0, cols, bw):
        B = order[start:start + bw]
        gi, col = divmod(B[0], g)
        if gi not in params:
            params[gi] = codec.fit(W[:, B[0]:B[0] + g].float(), None if imp is None else imp[B[0]:B[0] + g].float())
        w = W[:, B].clone()
        qhat = codec.quantize(w.float(), params[gi], col).values.to(dtype)
        Q[:, B] = qhat
        for b in B:
            free.remove(b)
        F = torch.tensor(free, dtype=torch.long, device=W.device)
        if bw == 1:
            q = B[0]
            W[:, F] -= ((w[:, 0] - qhat[:, 0]) / Hinv[q, q])[:, None] * Hinv[q, F][None, :]
            Hinv = Hinv - torch.outer(Hinv[:, q], Hinv[q, :]) / Hinv[q, q]   # the inverse of H without q
        else:
            HBB_inv = torch.linalg.inv(Hinv[B][:, B])
            W[:, F] -= (w - qhat) @ HBB_inv @ Hinv[B][:, F]
            Hinv = Hinv - Hinv[:, B] @ HBB_inv @ Hinv[B, :]                  # the inverse of H without B
        if C is not None and len(free):
            W[:, F] += w @ (C[B][:, F] @ Hinv[F][:, F])
    return Q.float()


# -- equality with the direct OBS ------------------------------------------------------------
@pytest.mark.parametrize("opts", [{"bits": 4, "group": None}, {"bits": 3, "group": 32},
                                  {"bits": 4, "group": 32, "symmetric": False}])
def test_lazy_batch_equals_direct_obs(opts):
    W, H = problem(0)
    codec = make_codec("uniform", opts)
    ref = direct_obs(W, H, codec)
    W_before, H_before = W.clone(), H.clone()
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        W_hat, packed, info = gptq(W.to(dtype), H, codec)
        assert torch.equal(W, W_before) and torch.equal(H, H_before)  # inputs untouched
        assert W_hat.dtype == torch.float32 and info["damp"] == 0.01
        # a one-step rounding flip from fp32 noise would show as a difference of a whole grid step
        torch.testing.assert_close(W_hat, ref, atol=tol, rtol=0)
        assert torch.equal(codec.decode(packed), W_hat)
        assert info["proxy_loss"] == pytest.approx(proxy(W_hat, W, H), rel=1e-4)


def test_block_size_does_not_change_the_result():
    W, H = problem(1)
    for opts in ({"bits": 3, "group": 32}, {"bits": 4, "group": 64}, {"bits": 2, "group": None}):
        codec = make_codec("uniform", opts)
        # 48 is not a multiple of the group: groups start inside blocks and run past their end
        results = [gptq(W.double(), H, codec, block_size=b)[0] for b in (32, 48, 128, 256)]
        for r in results[1:]:
            torch.testing.assert_close(r, results[0], atol=1e-9, rtol=0)
        torch.testing.assert_close(results[0], direct_obs(W, H, codec), atol=1e-9, rtol=0)


# -- quality ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_proxy_loss_below_rtn(bits):
    # minmax scales refitted on error-fed weights blow up at 2 bits (symmetric grid -2..1), so
    # there the grid is chosen by the codec's MSE clip search, for RTN and GPTQ alike
    clips = ("mse",) if bits == 2 else ("minmax", "mse")
    for seed in range(2):
        W, H = problem(seed)
        for group in (None, 32):
            for clip in clips:
                codec = make_codec("uniform", {"bits": bits, "group": group, "clip": clip})
                _, _, info = gptq(W, H, codec)
                W_rtn, _ = rtn(W, codec)
                assert info["proxy_loss"] < 0.9 * proxy(W_rtn, W, H), (seed, group, clip)


def test_hessian_clip_not_worse_than_minmax_on_average():
    losses = {"minmax": [], "hessian": []}
    for seed in range(4):
        W, H = problem(seed, rows=32)
        W = W * torch.exp(torch.randn(W.shape, generator=torch.Generator().manual_seed(seed)))  # heavy tails
        for clip in losses:
            codec = make_codec("uniform", {"bits": 3, "group": 32, "clip": clip})
            losses[clip].append(gptq(W, H, codec)[2]["proxy_loss"])
    assert sum(losses["hessian"]) <= sum(losses["minmax"])


# -- act order -------------------------------------------------------------------------------
def test_act_order_static_groups_needs_no_permutation():
    W, H = problem(2)
    codec = make_codec("uniform", {"bits": 3, "group": 32})
    W_hat, packed, info = gptq(W.double(), H, codec, act_order=True, static_groups=True)
    # the stored matrix is the one the solver returns, in the original column order
    assert torch.equal(codec.decode(packed), W_hat)
    assert set(packed.data) == set(codec.encode(W).data) and packed.nbytes == codec.encode(W).nbytes
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    torch.testing.assert_close(W_hat, direct_obs(W, H, codec, order=order.tolist(), static=True), atol=1e-9, rtol=0)
    # with static groups but no act order, the same fixed parameters in the natural order
    W_static = gptq(W.double(), H, codec, static_groups=True)[0]
    torch.testing.assert_close(W_static, direct_obs(W, H, codec, static=True), atol=1e-9, rtol=0)
    # per-row codec: act order needs no static groups
    row = make_codec("uniform", {"bits": 3, "group": None})
    W_row, packed_row, _ = gptq(W, H, row, act_order=True)
    assert torch.equal(row.decode(packed_row), W_row)


def test_act_order_grouped_without_static_groups_is_refused():
    W, H = problem(0)
    with pytest.raises(ValueError, match="static_groups"):
        gptq(W, H, make_codec("uniform", {"bits": 4, "group": 32}), act_order=True)


# -- degenerate Hessians --------------------------------------------------------------------------
def test_rank_deficient_and_dead_columns():
    W, _ = problem(3)
    X = correlated_inputs(40, COLS, 3)          # 40 samples for 256 columns: rank 40
    X[:, [0, 5, 77, 200]] = 0                    # dead inputs: zero rows/columns and diagonal in H
    H = hessian(X)
    codec = make_codec("uniform", {"bits": 4, "group": 32})
    for kw in ({}, {"act_order": True, "static_groups": True}, {"damp": 0.0}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # damp 0 on a singular H raises damp
            W_hat, packed, info = gptq(W, H, codec, **kw)
        assert torch.isfinite(W_hat).all() and math.isfinite(info["proxy_loss"])
        assert info["dead_columns"] == 4
        assert (W_hat[:, [0, 5, 77, 200]] == 0).all()
        assert torch.equal(codec.decode(packed), W_hat)
    all_dead = gptq(W, torch.zeros(COLS, COLS), codec)
    assert (all_dead[0] == 0).all() and all_dead[2]["dead_columns"] == COLS


def test_cholesky_failure_raises_damp_with_warnings():
    W, _ = problem(4, cols=64)
    A = hessian(torch.randn(16, 64, generator=torch.Generator().manual_seed(4)))  # rank 16: eigenvalue 0
    H = A - 0.05 * torch.diagonal(A).mean() * torch.eye(64)  # slightly indefinite, diagonal still positive
    assert (torch.diagonal(H) > 0).all()
    codec = make_codec("uniform", {"bits": 4, "group": 32})
    with pytest.warns(RuntimeWarning, match="damp=0.01; retrying with damp=0.1"):
        W_hat, packed, info = gptq(W, H, codec)
    assert info["damp"] == pytest.approx(0.1) and torch.isfinite(W_hat).all()
    # hopeless: a Hessian with a huge negative eigenvalue; bounded tries, then a ValueError
    sign = torch.ones(64)
    sign[::2] = -1
    bad = 11 * torch.eye(64) - 10 * torch.outer(sign, sign)   # diagonal 1, an eigenvalue 11 - 640
    assert (torch.diagonal(bad) > 0).all() and torch.linalg.eigvalsh(bad).min() < -600
    with pytest.warns(RuntimeWarning) as rec, pytest.raises(ValueError, match="not positive definite"):
        gptq(W, bad, codec)
    assert len([r for r in rec if "Cholesky" in str(r.message)]) == MAX_DAMP_RAISES


def test_bad_arguments_name_the_field():
    W, H = problem(0, cols=64)
    codec = make_codec("uniform", {"bits": 4, "group": 32})
    for kw, field in (({"block_size": 0}, "block_size"), ({"damp": -1.0}, "damp"),
                      ({"act_order": "yes"}, "act_order"), ({"H_cross": torch.zeros(3, 3)}, "H_cross")):
        with pytest.raises(ValueError, match=field):
            gptq(W, H, codec, **kw)
    with pytest.raises(ValueError, match="H must be"):
        gptq(W, H[:32, :32], codec)
    with pytest.raises(ValueError, match="block_size"):
        gptq(W, H, ToyVector(), block_size=33)


# -- vector codecs: the LDLQ path ---------------------------------------------------------------
@dataclass
class ToyParams:
    scale: torch.Tensor  # [rows]


class ToyVector(Codec):
    """2-D vector quantizer: pairs of weights snap to the nearest of 16 points (2 bits/weight)."""

    name = "toy_vector2"
    group_size = 32
    block_width = 2
    # a hexagonal-ish 16-point constellation, fixed
    POINTS = torch.tensor([[x + 0.5 * (y % 2), y * 0.866] for y in range(-2, 2) for x in range(-2, 2)]) + \
        torch.tensor([0.25, 0.433])

    def fit(self, w, importance=None):
        return ToyParams(w.float().pow(2).mean(1).sqrt().clamp_min(1e-8))  # the points span about ±1.7 RMS

    def _codes(self, w, params):
        pairs = (w / params.scale[:, None]).reshape(w.shape[0], -1, 2)
        return torch.cdist(pairs, self.POINTS.to(w)[None].expand(w.shape[0], -1, -1)).argmin(-1)

    def quantize(self, w, params, col=0):
        assert w.shape[1] % 2 == 0 and col % 2 == 0
        codes = self._codes(w.float(), params)                   # one code per pair: [rows, c / 2]
        pts = self.POINTS.to(w.device)[codes]
        return Quantized(pts.reshape(w.shape) * params.scale[:, None], codes)  # float32, as every codec returns

    def pack(self, codes, params):
        rows, cols = codes.shape[0], 2 * codes.shape[1]
        self.group_of(cols)
        return Packed(self.name, {}, (rows, cols), {"codes": codes.to(torch.uint8),
                                                   "scale": torch.stack([p.scale for p in params], 1)})

    def decode(self, packed):
        rows, cols = packed.shape
        g = self.group_of(cols)
        pts = self.POINTS[packed.data["codes"].long()].reshape(rows, cols // g, g)
        return (pts * packed.data["scale"][..., None]).reshape(rows, cols)


def test_vector_codec_ldlq_path():
    W, H = problem(5)
    codec = ToyVector()
    W_hat, packed, info = gptq(W, H, codec)
    assert torch.equal(codec.decode(packed), W_hat)
    W_rtn, _ = rtn(W, codec)
    assert info["proxy_loss"] < 0.8 * proxy(W_rtn, W, H)
    # the lazy LDLQ update is the direct block OBS update
    torch.testing.assert_close(gptq(W.double(), H, codec)[0], direct_obs(W, H, codec), atol=1e-9, rtol=0)
    W_x, X_fp, X_q, H_q, H_cross = asym_problem(5)
    torch.testing.assert_close(gptq(W_x.double(), H_q, codec, H_cross=H_cross)[0],
                               direct_obs(W_x, H_q, codec, H_cross=H_cross), atol=1e-9, rtol=0)
    # LDLQ is block-size invariant too, and with act order moves whole pairs
    torch.testing.assert_close(gptq(W.double(), H, codec, block_size=32)[0],
                               gptq(W.double(), H, codec, block_size=128)[0], atol=1e-9, rtol=0)
    W_ao, packed_ao, info_ao = gptq(W, H, codec, act_order=True, static_groups=True)
    assert torch.equal(codec.decode(packed_ao), W_ao) and info_ao["proxy_loss"] < proxy(W_rtn, W, H)


def test_registered_codecs_through_gptq():
    W, H = problem(6)
    W = W * 0.02
    for name, opts in (("turbo", {"bits": 3, "group": 64}), ("q4_0", {}), ("q4_k", {}),
                       ("lloyd_max", {"bits": 3, "group": 64})):
        codec = make_codec(name, opts)
        W_hat, packed, info = gptq(W, H, codec, block_size=128)
        assert torch.equal(codec.decode(packed), W_hat), name
        W_rtn, _ = rtn(W, codec)
        assert info["proxy_loss"] < proxy(W_rtn, W, H), name


# -- GPTAQ -----------------------------------------------------------------------------------------
def asym_problem(seed: int, rows: int = ROWS, cols: int = 128, n: int = 2048):
    """fp inputs X_fp and the quantized model's inputs X_q = X_fp + an error correlated with X_fp."""
    X_fp = correlated_inputs(n, cols, seed)
    g = torch.Generator().manual_seed(2000 + seed)
    X_q = X_fp @ (torch.eye(cols) + 0.15 * torch.randn(cols, cols, generator=g) / cols ** 0.5) \
        + 0.1 * torch.randn(n, cols, generator=g) * X_fp.std(0)
    W = torch.randn(rows, cols, generator=g)
    H = hessian(X_q)
    H_cross = (2.0 / n) * (X_fp - X_q).T @ X_q
    return W, X_fp, X_q, H, H_cross


def test_gptaq_with_zero_cross_term_is_gptq():
    W, H = problem(7)
    codec = make_codec("uniform", {"bits": 3, "group": 32})
    a, pa, _ = gptq(W, H, codec)
    b, pb, info = gptq(W, H, codec, H_cross=torch.zeros_like(H))
    assert torch.equal(a, b) and torch.equal(pa.data["codes"], pb.data["codes"])
    assert info["asym_proxy_loss"] == pytest.approx(info["proxy_loss"])


def test_gptaq_equals_direct_and_lowers_the_asymmetric_loss():
    for seed in range(3):
        W, X_fp, X_q, H, H_cross = asym_problem(seed)
        codec = make_codec("uniform", {"bits": 3, "group": 32})
        W_aq, packed, info = gptq(W.double(), H, codec, H_cross=H_cross)
        assert torch.equal(codec.decode(packed), W_aq)
        if seed == 0:
            ref = direct_obs(W, H, codec, H_cross=H_cross)
            torch.testing.assert_close(W_aq, ref, atol=1e-9, rtol=0)
            torch.testing.assert_close(gptq(W.double(), H, codec, H_cross=H_cross, block_size=48)[0], ref,
                                       atol=1e-9, rtol=0)
            order = torch.argsort(torch.diagonal(H), descending=True, stable=True).tolist()
            torch.testing.assert_close(
                gptq(W.double(), H, codec, H_cross=H_cross, act_order=True, static_groups=True)[0],
                direct_obs(W, H, codec, H_cross=H_cross, order=order, static=True), atol=1e-9, rtol=0)
        W_q = gptq(W.double(), H, codec)[0]

        def asym(W_hat):
            return float(((W.double() @ X_fp.T.double() - W_hat.double() @ X_q.T.double()) ** 2).sum())
        assert asym(W_aq) < 0.9 * asym(W_q)
        # the reported asymmetric proxy is that loss, shifted by its value at Ŵ = W, in (2/N) units
        n = X_fp.shape[0]
        assert info["asym_proxy_loss"] == pytest.approx((2.0 / n) * (asym(W_aq) - asym(W)), rel=1e-3)
