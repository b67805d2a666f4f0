"""ggml's scale searches (ggml/src/ggml-quants.c), vectorised over blocks.

Each function takes x [B, n] (B independent blocks of n weights) and does what the C function
of the same name does for every block at once: loops over search steps stay Python loops, loops
over weights become tensor ops, sums stay left-to-right fp32 (see cfloat.py). Internally the
weights run along dim 0 ([n, B]) so that each step of a left-to-right sum is one contiguous add.
Codes come back [B, n] as int32 holding the value C stores in its int8_t/uint8_t array.

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

from quantatlas._lazy import torch

from quantatlas.quant.codecs.ggml.cfloat import (
    GROUP_MAX_EPS, c_absmax, c_max, c_min, f32, fdiv, nearest_int, seq_sum,
)


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.t().contiguous()


def _sum(t: torch.Tensor) -> torch.Tensor:
    return seq_sum(t, dim=0)


def make_qx_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor):
    """rmse_type 1 with weights (`qw`, or x*x when ggml passes NULL).

    Returns (scale [B], L [B, n] = l + nmax, iscale [B] that produced L, valid [B]); blocks with
    max|x| < GROUP_MAX_EPS get scale 0, L 0, valid False.
    """
    amax, xmax = c_absmax(x)
    valid = amax >= GROUP_MAX_EPS
    xt, wt = _t(x), _t(weights)
    wx = wt * xt  # C: w*x[i]*l == (w*x)*l

    buf = xt.new_empty((3,) + xt.shape)

    def trial(iscale):  # |iscale*x| <= nmax + 1: torch.round is nearest_int there
        lf = torch.mul(xt, iscale, out=buf[2]).round_().clamp_(-nmax, nmax - 1)
        torch.mul(wx, lf, out=buf[0])      # w*x*l
        torch.mul(wt, lf, out=buf[1])      # w*l*l
        buf[1] *= lf
        return seq_sum(buf[:2], dim=1)

    iscale = fdiv(float(-nmax), xmax)
    sumlx, suml2 = trial(iscale)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    best_iscale = iscale
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale_s = fdiv(f32(-(f32(nmax) + f32(f32(0.1) * step))), xmax)
        sumlx, suml2 = trial(iscale_s)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = torch.where(better, iscale_s, best_iscale)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    # the codes of the winning trial, recomputed once (the same ops give the same codes)
    L = nearest_int(best_iscale[:, None] * x).clamp(-nmax, nmax - 1) + nmax
    scale = torch.where(valid, scale, torch.zeros_like(scale))
    return scale, torch.where(valid[:, None], L, torch.zeros_like(L)), best_iscale, valid


def make_q3_quants(x: torch.Tensor, nmax: int):
    """do_rmse = true. Returns (scale [B], L [B, n] = l + nmax)."""
    amax, xmax = c_absmax(x)
    valid = amax >= GROUP_MAX_EPS
    xt = _t(x)
    w = xt * xt
    wx = w * xt
    L = nearest_int(fdiv(float(-nmax), xmax) * xt).clamp(-nmax, nmax - 1)
    Lf = L.float()
    sumlx, suml2 = _sum(wx * Lf), _sum(w * Lf * Lf)
    for _ in range(5):
        changed = torch.zeros_like(valid)
        for i in range(xt.shape[0]):
            li = Lf[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new_l = nearest_int(xt[i] * sl2 / slx).clamp(-nmax, nmax - 1)
            nl = new_l.float()
            slx_n = slx + wx[i] * nl
            sl2_n = sl2 + w[i] * nl * nl
            accept = ((slx > 0) & (new_l != L[i]) & (sl2_n > 0)
                      & (slx_n * slx_n * suml2 > sumlx * sumlx * sl2_n))
            L[i] = torch.where(accept, new_l, L[i])
            Lf[i] = L[i].float()
            sumlx = torch.where(accept, slx_n, sumlx)
            suml2 = torch.where(accept, sl2_n, suml2)
            changed |= accept
        if not bool(changed.any()):  # a pass without changes is a fixed point for every block
            break
    scale = torch.where(valid & (suml2 > 0), sumlx / suml2, torch.zeros_like(sumlx))
    L = L.t() + nmax
    return scale, torch.where(valid[:, None], L, torch.zeros_like(L))


def _affine_codes(v: torch.Tensor, nmax: int, qkx3: bool) -> torch.Tensor:
    """Codes of v = iscale*(x - min) as ggml computes them (int32)."""
    if qkx3:  # v > 0 ? nearest_int(MIN(v, nmax)) : 0 -- v can be inf/nan once the min has moved
        l = nearest_int(torch.where(v < nmax, v, torch.full_like(v, nmax)))
        return torch.where(v > 0, l, torch.zeros_like(l))
    return nearest_int(v).clamp(0, nmax)  # MAX(0, MIN(nmax, nearest_int(v)))


def _affine_codes_float(v: torch.Tensor, nmax: int, qkx3: bool, in_range: bool) -> torch.Tensor:
    """_affine_codes as floats, in place over v, with fewer passes: torch.round is nearest_int
    for |v| < 2^22."""
    if qkx3:  # MIN(v, nmax) is in range whenever v > 0, and nan/-inf/v <= 0 give 0
        off = ~(v > 0)
        return v.clamp_(max=nmax).round_().masked_fill_(off, 0.0)
    if in_range:
        return v.round_().clamp_(0, nmax)
    return _affine_codes(v, nmax, qkx3).float()


def _affine_search(x, nmax, weights, rmin, rdelta, nstep, use_mad, qkx3):
    """Shared body of make_qkx2_quants / make_qkx3_quants (they differ in three details)."""
    xmin, xmax = c_min(x), c_max(x)
    xt, wt = _t(x), _t(weights)
    sum_w = seq_sum(wt, dim=0, start_with_first=True)
    sum_x = seq_sum(wt * xt, dim=0, start_with_first=True)
    xmin = torch.where(xmin > 0, torch.zeros_like(xmin), xmin)
    valid = xmax > xmin if qkx3 else xmax != xmin

    def error(scale, lf, mn):  # sum of w * f(scale*l + min - x), f = |.| or square, in place
        diff = lf * scale
        diff += mn
        diff -= xt
        if use_mad:
            diff.abs_()
        else:
            diff *= diff
        diff *= wt
        return _sum(diff)

    iscale = fdiv(float(nmax), xmax - xmin)
    scale = fdiv(1.0, iscale)
    best_error = error(scale, nearest_int(iscale * (xt - xmin)).clamp(0, nmax).float(), xmin)
    mn, rule_iscale, rule_min = xmin, iscale, xmin
    products = xt.new_empty((3,) + xt.shape)
    for step in range(nstep + 1):
        iscale_s = fdiv(f32(f32(f32(rmin) + f32(f32(rdelta) * step)) + nmax), xmax - mn)
        # |v| is far below 2^22 unless the fitted min sits right next to max (then exact codes)
        bound = iscale_s.abs() * torch.maximum((xmax - mn).abs(), (xmin - mn).abs())
        in_range = bool((bound < 2.0 ** 20)[valid].all())
        lf = _affine_codes_float(iscale_s * (xt - mn), nmax, qkx3, in_range)
        torch.mul(wt, lf, out=products[0])            # w*l
        torch.mul(products[0], lf, out=products[1])   # w*l*l
        torch.mul(products[0], xt, out=products[2])   # w*l*x
        sum_l, sum_l2, sum_xl = seq_sum(products, dim=1)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        err = error(this_scale, lf, this_min)
        better = (D > 0) & (err < best_error)
        best_error = torch.where(better, err, best_error)
        rule_iscale = torch.where(better, iscale_s, rule_iscale)
        rule_min = torch.where(better, mn, rule_min)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    # the codes of the winning trial, recomputed once; for the first codes (no trial won) v lies
    # in [0, nmax], where the clamp form and the qkx3 form agree
    L = _affine_codes(rule_iscale[:, None] * (x - rule_min[:, None]), nmax, qkx3)
    scale = torch.where(valid, scale, torch.zeros_like(scale))
    the_min = -torch.where(valid, mn, xmin)
    L = torch.where(valid[:, None], L, torch.zeros_like(L))
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
    xt, wt = _t(x), _t(weights)
    iscale = fdiv(float(nmax), xmax)
    first = (nearest_int(iscale * xt) & 0xFF).float()  # stored in uint8_t
    diff = xt - fdiv(1.0, iscale) * first
    best_mse = _sum(wt * diff * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_s = fdiv(f32(f32(f32(0.1) * step) + nmax), xmax)
        diff = xt - fdiv(1.0, iscale_s) * nearest_int(iscale_s * xt).clamp(max=nmax).float()
        mse = _sum(wt * diff * diff)
        better = mse < best_mse
        best_mse = torch.where(better, mse, best_mse)
        iscale = torch.where(better, iscale_s, iscale)
    l = nearest_int(iscale * xt).clamp(max=nmax)
    wx = wt * xt
    sumlx, suml2 = _sum(wx * l.float()), _sum(wt * l.float() * l.float())
    L = l & 0xFF  # C keeps the codes in uint8_t from here on
    Lf = L.float()
    for _ in range(5):
        changed = torch.zeros_like(valid)
        for i in range(xt.shape[0]):
            li = Lf[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - wt[i] * li * li
            new_l = nearest_int(xt[i] * sl2 / slx).clamp(max=nmax)
            nl = new_l.float()
            slx_n = slx + wx[i] * nl
            sl2_n = sl2 + wt[i] * nl * nl
            accept = ((slx > 0) & (sl2 > 0) & (new_l != L[i])
                      & (slx_n * slx_n * suml2 > sumlx * sumlx * sl2_n))
            L[i] = torch.where(accept, new_l & 0xFF, L[i])
            Lf[i] = L[i].float()
            sumlx = torch.where(accept, slx_n, sumlx)
            suml2 = torch.where(accept, sl2_n, suml2)
            changed |= accept
        if not bool(changed.any()):
            break
    scale = torch.where(valid & (suml2 > 0), sumlx / suml2, torch.zeros_like(sumlx))
    L = L.t()
    return scale, torch.where(valid[:, None], L, torch.zeros_like(L))
