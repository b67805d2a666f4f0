"""ggml's scale searches (ggml/src/ggml-quants.c), vectorised over blocks.

Each function takes x [B, n] (B independent blocks of n weights) and does what the C function
of the same name does for every block at once: the loops over search steps stay Python loops,
the loops over weights become tensor ops, sums stay left-to-right fp32 (see cfloat.py).
Codes come back as int32 tensors holding the value C stores in its int8_t/uint8_t array.

    make_qx_quants   symmetric grid [-nmax, nmax-1], scale refit by weighted least squares over
                     19 trial inverse scales -(nmax + 0.1*is)/max, is = -9..9
    make_q3_quants   symmetric, then up to 5 passes of coordinate descent on single codes (x^2 weights)
    make_qkx2_quants affine grid [0, nmax] with a min <= 0: trial inverse scales
                     (rmin + rdelta*is + nmax)/(max - min), least-squares (scale, min) per trial
    make_qkx3_quants as qkx2, x^2 weights by default, overflow-safe rounding; also returns the
                     (iscale, min) that produced the best codes, which ggml keeps as final codes
    make_qp_quants   non-negative values (sub-block scales) on [0, nmax] with a search over 8
                     trial scales and coordinate descent
"""
from __future__ import annotations

import torch

from quantatlas.quant.codecs.ggml.cfloat import (
    GROUP_MAX_EPS, c_absmax, c_max, c_min, f32, fdiv, nearest_int, seq_sum,
)


def _col(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(-1)


def make_qx_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor):
    """rmse_type 1 with weights (`qw`, or x*x when ggml passes NULL).

    Returns (scale [B], L [B, n] = l + nmax, iscale [B] that produced L, valid [B]); blocks with
    max|x| < GROUP_MAX_EPS get scale 0, L 0, valid False.
    """
    amax, xmax = c_absmax(x)
    valid = amax >= GROUP_MAX_EPS

    def trial(iscale):
        l = nearest_int(_col(iscale) * x).clamp(-nmax, nmax - 1)
        lf = l.float()
        return l, seq_sum(weights * x * lf), seq_sum(weights * lf * lf)

    iscale = fdiv(float(-nmax), xmax)
    l, sumlx, suml2 = trial(iscale)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    best_l, best_iscale = l, iscale
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale_s = fdiv(f32(-(f32(nmax) + f32(f32(0.1) * step))), xmax)
        l, sumlx, suml2 = trial(iscale_s)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_l = torch.where(_col(better), l, best_l)
        best_iscale = torch.where(better, iscale_s, best_iscale)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    scale = torch.where(valid, scale, torch.zeros_like(scale))
    codes = torch.where(_col(valid), best_l + nmax, torch.zeros_like(best_l))
    return scale, codes, best_iscale, valid


def make_q3_quants(x: torch.Tensor, nmax: int):
    """do_rmse = true. Returns (scale [B], L [B, n] = l + nmax)."""
    amax, xmax = c_absmax(x)
    valid = amax >= GROUP_MAX_EPS
    iscale = fdiv(float(-nmax), xmax)
    L = nearest_int(_col(iscale) * x).clamp(-nmax, nmax - 1)
    w = x * x
    sumlx = seq_sum(w * x * L.float())
    suml2 = seq_sum(w * L.float() * L.float())
    for _ in range(5):
        changed = torch.zeros_like(valid)
        for i in range(x.shape[-1]):
            wi, xi, li = w[:, i], x[:, i], L[:, i].float()
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new_l = nearest_int(xi * sl2 / slx).clamp(-nmax, nmax - 1)
            nl = new_l.float()
            slx_n = slx + wi * xi * nl
            sl2_n = sl2 + wi * nl * nl
            accept = ((slx > 0) & (new_l != L[:, i]) & (sl2_n > 0)
                      & (slx_n * slx_n * suml2 > sumlx * sumlx * sl2_n))
            L[:, i] = torch.where(accept, new_l, L[:, i])
            sumlx = torch.where(accept, slx_n, sumlx)
            suml2 = torch.where(accept, sl2_n, suml2)
            changed |= accept
        if not bool(changed.any()):  # a pass without changes is a fixed point for every block
            break
    scale = torch.where(valid & (suml2 > 0), sumlx / suml2, torch.zeros_like(sumlx))
    codes = torch.where(_col(valid), L + nmax, torch.zeros_like(L))
    return scale, codes


def _affine_error(scale, lf, mn, x, weights, use_mad):
    diff = _col(scale) * lf + _col(mn) - x
    return seq_sum(weights * (diff.abs() if use_mad else diff * diff))


def _affine_search(x, nmax, weights, rmin, rdelta, nstep, use_mad, qkx3):
    """Shared body of make_qkx2_quants / make_qkx3_quants (they differ in three details)."""
    xmin, xmax = c_min(x), c_max(x)
    sum_w = seq_sum(weights, start_with_first=True)
    sum_x = seq_sum(weights * x, start_with_first=True)
    xmin = torch.where(xmin > 0, torch.zeros_like(xmin), xmin)
    valid = xmax > xmin if qkx3 else xmax != xmin
    iscale = fdiv(float(nmax), xmax - xmin)
    scale = fdiv(1.0, iscale)
    L = nearest_int(_col(iscale) * (x - _col(xmin))).clamp(0, nmax)
    best_error = _affine_error(scale, L.float(), xmin, x, weights, use_mad)
    mn, rule_iscale, rule_min = xmin, iscale, xmin
    for step in range(nstep + 1):
        iscale_s = fdiv(f32(f32(f32(rmin) + f32(f32(rdelta) * step)) + nmax), xmax - mn)
        v = _col(iscale_s) * (x - _col(mn))
        if qkx3:  # v can be inf/nan once the min has moved near max
            l = torch.where(v > 0, nearest_int(torch.where(v < nmax, v, torch.full_like(v, nmax))),
                            torch.zeros_like(v, dtype=torch.int32))
        else:
            l = nearest_int(v).clamp(0, nmax)
        lf = l.float()
        sum_l = seq_sum(weights * lf)
        sum_l2 = seq_sum(weights * lf * lf)
        sum_xl = seq_sum(weights * lf * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        err = _affine_error(this_scale, lf, this_min, x, weights, use_mad)
        better = (D > 0) & (err < best_error)
        L = torch.where(_col(better), l, L)
        best_error = torch.where(better, err, best_error)
        rule_iscale = torch.where(better, iscale_s, rule_iscale)
        rule_min = torch.where(better, mn, rule_min)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(valid, scale, torch.zeros_like(scale))
    the_min = -torch.where(valid, mn, xmin)
    L = torch.where(_col(valid), L, torch.zeros_like(L))
    return scale, the_min, L, rule_iscale, rule_min, valid


def make_qkx2_quants(x, nmax, weights, rmin, rdelta, nstep, use_mad):
    """Returns (scale [B], the_min [B] (>= 0, subtracted), L [B, n])."""
    scale, the_min, L, *_ = _affine_search(x, nmax, weights, rmin, rdelta, nstep, use_mad, qkx3=False)
    return scale, the_min, L


def make_qkx3_quants(x, nmax, weights, rmin, rdelta, nstep, use_mad):
    """weights None means x*x. Returns (scale, the_min, L, rule_iscale, rule_min, valid).

    L is what v = rule_iscale*(x - rule_min) rounds to (v > 0 ? nearest_int(min(v, nmax)) : 0);
    ggml stores L as the final codes of Q4_1/Q5_1 with an imatrix, so a codec re-codes new
    values with the same rule. Blocks with max <= min (valid False) have L = 0.
    """
    if weights is None:
        weights = x * x
    return _affine_search(x, nmax, weights, rmin, rdelta, nstep, use_mad, qkx3=True)


def make_qp_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor):
    """x >= 0 (sub-block scales or mins). Returns (scale [B], L [B, n] as C's uint8_t values)."""
    xmax = x.amax(-1).clamp_min(0.0)
    valid = xmax >= GROUP_MAX_EPS
    iscale = fdiv(float(nmax), xmax)
    L0 = nearest_int(_col(iscale) * x) & 0xFF
    scale0 = fdiv(1.0, iscale)
    diff = x - _col(scale0) * L0.float()
    best_mse = seq_sum(weights * diff * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_s = fdiv(f32(f32(f32(0.1) * step) + nmax), xmax)
        scale_s = fdiv(1.0, iscale_s)
        l = nearest_int(_col(iscale_s) * x).clamp(max=nmax)
        diff = x - _col(scale_s) * l.float()
        mse = seq_sum(weights * diff * diff)
        better = mse < best_mse
        best_mse = torch.where(better, mse, best_mse)
        iscale = torch.where(better, iscale_s, iscale)
    l = nearest_int(_col(iscale) * x).clamp(max=nmax)
    sumlx = seq_sum(weights * x * l.float())
    suml2 = seq_sum(weights * l.float() * l.float())
    L = l & 0xFF  # C keeps the codes in uint8_t from here on
    for _ in range(5):
        changed = torch.zeros_like(valid)
        for i in range(x.shape[-1]):
            wi, xi, li = weights[:, i], x[:, i], L[:, i].float()
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new_l = nearest_int(xi * sl2 / slx).clamp(max=nmax)
            nl = new_l.float()
            slx_n = slx + wi * xi * nl
            sl2_n = sl2 + wi * nl * nl
            accept = ((slx > 0) & (sl2 > 0) & (new_l != L[:, i])
                      & (slx_n * slx_n * suml2 > sumlx * sumlx * sl2_n))
            L[:, i] = torch.where(accept, new_l & 0xFF, L[:, i])
            sumlx = torch.where(accept, slx_n, sumlx)
            suml2 = torch.where(accept, sl2_n, suml2)
            changed |= accept
        if not bool(changed.any()):
            break
    scale = torch.where(valid & (suml2 > 0), sumlx / suml2, torch.zeros_like(sumlx))
    return scale, torch.where(_col(valid), L, torch.zeros_like(L))
