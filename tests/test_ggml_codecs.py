"""ggml block codecs: llama.cpp's bytes and values, checked against independent computations.

Oracles: the `gguf` package (quantize for the types it implements, dequantize for all), and a slow
per-block transcription of ggml-quants.c below (plain Python loops over np.float32 scalars, C's
evaluation order, no vectorisation) for the searches gguf does not implement: the k-quants, IQ4_NL,
IQ4_XS and the imatrix paths of Q4_0/Q4_1/Q5_0/Q5_1.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from quantatlas.quant.codecs import make_codec

TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs", "mxfp4"]
BPW = {"q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5, "q2_k": 2.625, "q3_k": 3.4375,
       "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625, "iq4_nl": 4.5, "iq4_xs": 4.25, "mxfp4": 4.25}


def qtype(name):
    return GGMLQuantizationType[name.upper()]


def gguf_can_quantize(name):
    try:
        gq.quantize(np.zeros((1, 256), np.float32), qtype(name))
        return True
    except NotImplementedError:
        return False


GGUF_QUANTIZES = [t for t in TYPES if gguf_can_quantize(t)]


def matrices(cols, seed=0):
    """Named test matrices (float32) of width `cols`."""
    rng = np.random.default_rng(seed)
    mixed = rng.standard_normal((3, cols)).astype(np.float32)
    mixed[0, :32] = 0.0                               # an all-zero block
    mixed[0, 32:48] = 0.5                             # a constant stretch
    mixed[1, :cols // 2] *= 1e-6                      # tiny half row
    mixed[1, 7] = 30.0                                # an outlier
    mixed[2, 32:64] = -np.abs(mixed[2, 32:64]) - 1.0  # a negative-only block
    return {
        "normal": rng.standard_normal((4, cols)).astype(np.float32),
        "student_t2": rng.standard_t(2, (4, cols)).astype(np.float32),
        "zeros": np.zeros((2, cols), np.float32),
        "constant": np.stack([np.full(cols, 0.37), np.full(cols, -2.5)]).astype(np.float32),
        "tiny_1e-6": (rng.standard_normal((2, cols)) * 1e-6).astype(np.float32),
        "tiny_1e-30": (rng.standard_normal((2, cols)) * 1e-30).astype(np.float32),
        "mixed": mixed,
    }


def importance_for(cols, seed=1):
    rng = np.random.default_rng(seed)
    imp = np.exp(rng.standard_normal(cols)).astype(np.float32)
    imp[3] = 0.0  # a column that never fires
    return imp


def bits_of(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


# --------------------------------------------------------------------------------------------
# gguf as the oracle
# --------------------------------------------------------------------------------------------

def test_gguf_quantizes_the_legacy_types():
    assert {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1"} <= set(GGUF_QUANTIZES)


@pytest.mark.parametrize("name", GGUF_QUANTIZES)
def test_bytes_equal_gguf_quantize(name):
    codec = make_codec(name)
    for kind, x in matrices(512).items():
        ours = codec.encode(torch.from_numpy(x)).data["blocks"].numpy()
        theirs = gq.quantize(x, qtype(name))
        assert ours.shape == theirs.shape
        assert np.array_equal(ours, theirs), f"{name} {kind}: {(ours != theirs).sum()} bytes differ"


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("with_importance", [False, True])
def test_decode_equals_gguf_dequantize_bitwise(name, with_importance):
    codec = make_codec(name)
    g = codec.group_size
    cols = max(2 * g, 128)
    imp = torch.from_numpy(importance_for(cols)) if with_importance else None
    for kind, x in matrices(cols).items():
        w = torch.from_numpy(x)
        packed = codec.encode(w, imp)
        blocks = packed.data["blocks"].numpy()
        assert blocks.shape == (x.shape[0], cols // g * GGML_QUANT_SIZES[qtype(name)][1])
        decoded = codec.decode(packed).numpy()
        assert np.array_equal(bits_of(gq.dequantize(blocks, qtype(name))), bits_of(decoded)), f"{name} {kind}"
        # fit -> quantize -> pack, group by group as a solver does: the values it returns are the
        # decoded values, and (where ggml's search sees one block at a time) the same bytes
        params = [codec.fit(w[:, c:c + g], None if imp is None else imp[c:c + g]) for c in range(0, cols, g)]
        parts = [codec.quantize(w[:, c:c + g], p) for c, p in zip(range(0, cols, g), params)]
        w_hat = torch.cat([q.values for q in parts], 1)
        repacked = codec.pack(torch.cat([q.codes for q in parts], 1), params)
        assert np.array_equal(bits_of(w_hat.numpy()), bits_of(codec.decode(repacked).numpy())), f"{name} {kind}"
        if not (with_importance and codec.uses_row_sigma2):  # those weight by the whole row's mean x^2
            assert torch.equal(repacked.data["blocks"], packed.data["blocks"]), f"{name} {kind}"


@pytest.mark.parametrize("name", TYPES)
def test_pack_codes_values_a_solver_moved(name):
    """quantize on changed weights (as GPTQ does after error feedback) -> pack the codes -> decode is lossless."""
    codec = make_codec(name)
    g = codec.group_size
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 2 * g, generator=gen)
    params = [codec.fit(w[:, c:c + g]) for c in range(0, 2 * g, g)]
    moved = w + 0.3 * torch.randn(w.shape, generator=gen)
    parts = [codec.quantize(moved[:, c + k:c + k + 8], params[c // g], col=k) for c in range(0, 2 * g, g)
             for k in range(0, g, 8)]
    w_hat = torch.cat([q.values for q in parts], 1)
    decoded = codec.decode(codec.pack(torch.cat([q.codes for q in parts], 1), params))
    assert torch.equal(decoded, w_hat)
    assert not torch.equal(w_hat, torch.cat([codec.quantize(w[:, c:c + g], params[c // g]).values
                                             for c in range(0, 2 * g, g)], 1))


# --------------------------------------------------------------------------------------------
# bits, errors, user mistakes
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TYPES)
def test_bits_per_weight_equal_ggml(name):
    block, type_size = GGML_QUANT_SIZES[qtype(name)]
    codec = make_codec(name)
    assert codec.group_size == block
    assert codec.bits_per_weight((3, 2 * 256)) == 8 * type_size / block == BPW[name]


def test_the_formats_table_is_ggmls():
    """One table of ggml types (the formats themselves) serves export, the mixtures and the web: it
    must list exactly these formats, each with the gguf package's block and type sizes."""
    from quantatlas.export import GGML_TYPES
    from quantatlas.quant.codecs.ggml.block_codec import formats
    from quantatlas.quant.gguf_mix import block_size

    assert sorted(formats()) == sorted(TYPES) == sorted(GGML_TYPES)
    for name, fmt in formats().items():
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[fmt.ggml_type]]
        assert (fmt.group_size, fmt.type_size) == (block, type_size) == (block_size(name), type_size), name


@pytest.mark.parametrize("name", TYPES)
def test_width_not_a_multiple_of_the_block_raises(name):
    codec = make_codec(name)
    with pytest.raises(ValueError, match="100"):
        codec.encode(torch.randn(2, 100))


def test_error_decreases_with_bits_on_gaussian_data():
    w = torch.randn(16, 1024, generator=torch.Generator().manual_seed(5))
    mse = {t: ((make_codec(t).decode(make_codec(t).encode(w)) - w) ** 2).mean().item() for t in TYPES}
    for family in (["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0"], ["q4_0", "q5_0", "q8_0"],
                   ["q4_1", "q5_1", "q8_0"], ["iq4_xs", "q5_k"], ["iq4_nl", "q5_0"]):
        errs = [mse[t] for t in family]
        assert errs == sorted(errs, reverse=True) and len(set(errs)) == len(errs), (family, errs)


@pytest.mark.parametrize("name", TYPES)
def test_importance_lowers_importance_weighted_error(name):
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(16, 512, generator=gen)
    imp = torch.exp(2 * torch.randn(512, generator=gen))
    codec = make_codec(name)
    plain = (((codec.decode(codec.encode(w)) - w) ** 2) * imp).mean()
    weighted = (((codec.decode(codec.encode(w, imp)) - w) ** 2) * imp).mean()
    assert weighted <= plain
    if name not in ("q8_0", "mxfp4"):  # ggml's Q8_0 and MXFP4 ignore the imatrix
        assert weighted < 0.8 * plain


# --------------------------------------------------------------------------------------------
# slow reference: ggml-quants.c transcribed block by block
# --------------------------------------------------------------------------------------------
F = np.float32
EPS = F(1e-15)
KV = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]


def nearest_int(f):
    v = np.array([F(f) + F(12582912.0)], np.float32).view(np.int32)[0]
    return (int(v) & 0x007FFFFF) - 0x00400000


def fp16(v):
    return np.float16(F(v))


def fp16_bytes(v):
    return fp16(v).tobytes()


def absmax(x):
    amax, mx = F(0), F(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    return amax, mx


def ssum(vals):
    s = F(0)
    for v in vals:
        s += v
    return s


def make_qx_quants(n, nmax, x, qw):
    amax, mx = absmax(x)
    if amax < EPS:
        return F(0), [0] * n
    w = [qw[i] if qw is not None else x[i] * x[i] for i in range(n)]

    def trial(iscale):
        ls = [max(-nmax, min(nmax - 1, nearest_int(iscale * x[i]))) for i in range(n)]
        sumlx, suml2 = F(0), F(0)
        for i in range(n):
            sumlx += w[i] * x[i] * F(ls[i])
            suml2 += w[i] * F(ls[i]) * F(ls[i])
        return ls, sumlx, suml2

    ls, sumlx, suml2 = trial(F(-nmax) / mx)
    L = [l + nmax for l in ls]
    scale = sumlx / suml2 if suml2 != 0 else F(0)
    best = scale * sumlx
    for s in range(-9, 10):
        if s == 0:
            continue
        ls, sumlx, suml2 = trial(-(F(nmax) + F(0.1) * F(s)) / mx)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            L = [l + nmax for l in ls]
            scale = sumlx / suml2
            best = scale * sumlx
    return scale, L


def make_q3_quants(n, nmax, x):
    amax, mx = absmax(x)
    if amax < EPS:
        return F(0), [0] * n
    iscale = F(-nmax) / mx
    L = [0] * n
    sumlx, suml2 = F(0), F(0)
    for i in range(n):
        L[i] = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        w = x[i] * x[i]
        sumlx += w * x[i] * F(L[i])
        suml2 += w * F(L[i]) * F(L[i])
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = x[i] * x[i]
            slx = sumlx - w * x[i] * F(L[i])
            if slx > 0:
                sl2 = suml2 - w * F(L[i]) * F(L[i])
                new_l = max(-nmax, min(nmax - 1, nearest_int(x[i] * sl2 / slx)))
                if new_l != L[i]:
                    slx += w * x[i] * F(new_l)
                    sl2 += w * F(new_l) * F(new_l)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i], sumlx, suml2 = new_l, slx, sl2
                        changed += 1
        if not changed:
            break
    return (sumlx / suml2 if suml2 > 0 else F(0)), [l + nmax for l in L]


def make_qkx(n, nmax, x, weights, rmin, rdelta, nstep, use_mad, version):
    """make_qkx2_quants (version 2) or make_qkx3_quants (version 3): (scale, the_min, L)."""
    w = [weights[i] if weights is not None else x[i] * x[i] for i in range(n)]
    mn, mx, sum_w = x[0], x[0], w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        mn = x[i] if x[i] < mn else mn
        mx = x[i] if x[i] > mx else mx
        sum_w += w[i]
        sum_x += w[i] * x[i]
    if mn > 0:
        mn = F(0)
    if (mx == mn) if version == 2 else (mx <= mn):
        return F(0), -mn, [0] * n

    def err(scale, m, ls):
        e = F(0)
        for i in range(n):
            diff = scale * F(ls[i]) + m - x[i]
            e += w[i] * (abs(diff) if use_mad else diff * diff)
        return e

    iscale = F(nmax) / (mx - mn)
    scale = F(1) / iscale
    L = [max(0, min(nmax, nearest_int(iscale * (x[i] - mn)))) for i in range(n)]
    best = err(scale, mn, L)
    for s in range(nstep + 1):
        iscale = (F(rmin) + F(rdelta) * F(s) + F(nmax)) / (mx - mn)
        aux = []
        for i in range(n):
            v = iscale * (x[i] - mn)
            if version == 2:
                aux.append(max(0, min(nmax, nearest_int(v))))
            else:
                aux.append(nearest_int(v if v < nmax else F(nmax)) if v > 0 else 0)
        sum_l, sum_l2, sum_xl = F(0), F(0), F(0)
        for i in range(n):
            sum_l += w[i] * F(aux[i])
            sum_l2 += w[i] * F(aux[i]) * F(aux[i])
            sum_xl += w[i] * F(aux[i]) * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F(0)
                this_scale = sum_xl / sum_l2
            cur = err(this_scale, this_min, aux)
            if cur < best:
                L, best, scale, mn = aux, cur, this_scale, this_min
    return scale, -mn, L


def make_qp_quants(n, nmax, x, qw):
    mx = F(0)
    for v in x:
        mx = mx if mx > v else v
    if mx < EPS:
        return F(0), [0] * n
    iscale = F(nmax) / mx
    L = [nearest_int(iscale * x[i]) & 0xFF for i in range(n)]
    scale = F(1) / iscale
    best_mse = F(0)
    for i in range(n):
        diff = x[i] - scale * F(L[i])
        best_mse += qw[i] * diff * diff
    for s in range(-4, 5):
        if s == 0:
            continue
        iscale_s = (F(0.1) * F(s) + F(nmax)) / mx
        scale_s = F(1) / iscale_s
        mse = F(0)
        for i in range(n):
            diff = x[i] - scale_s * F(min(nmax, nearest_int(iscale_s * x[i])))
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse, iscale = mse, iscale_s
    sumlx, suml2 = F(0), F(0)
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = l & 0xFF
        sumlx += qw[i] * x[i] * F(l)
        suml2 += qw[i] * F(l) * F(l)
    for _ in range(5):
        changed = 0
        for i in range(n):
            slx = sumlx - qw[i] * x[i] * F(L[i])
            sl2 = suml2 - qw[i] * F(L[i]) * F(L[i])
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx += qw[i] * x[i] * F(new_l)
                    sl2 += qw[i] * F(new_l) * F(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i], sumlx, suml2 = new_l & 0xFF, slx, sl2
                        changed += 1
        if not changed:
            break
    return (sumlx / suml2 if suml2 > 0 else F(0)), L


def best_index(x):
    x2 = x + x
    idx = 0
    for step in (8, 4, 2, 1):
        j = idx + step
        idx = j if x2 >= F(KV[j - 1] + KV[j]) else idx
    return idx


def pack_qs_2bit(L):
    qs = bytearray(64)
    for j in (0, 128):
        for l in range(32):
            qs[j // 4 + l] = (L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)) & 0xFF
    return bytes(qs)


def ref_q2_k(x, qw):
    L, scales, mins, sc = [0] * 256, [F(0)] * 16, [F(0)] * 16, [0] * 16
    if qw is None:
        for j in range(16):
            xb = x[16 * j:16 * j + 16]
            scales[j], mins[j], L[16 * j:16 * j + 16] = make_qkx(
                16, 3, xb, [abs(v) for v in xb], -0.5, 0.1, 15, True, 2)
        max_scale, max_min = F(0), F(0)
        for j in range(16):
            max_scale = scales[j] if scales[j] > max_scale else max_scale
            max_min = mins[j] if mins[j] > max_min else max_min
        d, dmin = F(0), F(0)
        if max_scale > 0:
            iscale = F(15) / max_scale
            sc = [nearest_int(iscale * s) & 0xFF for s in scales]
            d = max_scale / F(15)
        if max_min > 0:
            iscale = F(15) / max_min
            sc = [(sc[j] | (nearest_int(iscale * mins[j]) << 4)) & 0xFF for j in range(16)]
            dmin = max_min / F(15)
    else:
        sigma2 = ssum([v * v for v in x]) / F(256)
        sw = [F(0)] * 16
        for j in range(16):
            xb = x[16 * j:16 * j + 16]
            weight = [qw[16 * j + l] * np.sqrt(sigma2 + xb[l] * xb[l]) for l in range(16)]
            sw[j] = ssum(weight)
            scales[j], mins[j], L[16 * j:16 * j + 16] = make_qkx(16, 3, xb, weight, -0.9, 0.05, 36, False, 3)
        d, Ls = make_qp_quants(16, 15, scales, sw)
        dmin, Lm = make_qp_quants(16, 15, mins, sw)
        sc = [(Ls[j] | (Lm[j] << 4)) & 0xFF for j in range(16)]
    dv, mv = F(fp16(d)), F(fp16(dmin))
    for j in range(16):
        dd = dv * F(sc[j] & 0xF)
        if not dd:
            continue
        dm = mv * F(sc[j] >> 4)
        for i in range(16):
            L[16 * j + i] = max(0, min(3, nearest_int((x[16 * j + i] + dm) / dd)))
    return bytes(sc) + pack_qs_2bit(L) + fp16_bytes(d) + fp16_bytes(dmin)


def ref_q3_k(x, qw):
    L, scales, s6 = [0] * 256, [F(0)] * 16, [0] * 16
    if qw is None:
        for j in range(16):
            scales[j], L[16 * j:16 * j + 16] = make_q3_quants(16, 4, x[16 * j:16 * j + 16])
        _, max_scale = absmax(scales)
        d = F(0)
        if max_scale:
            iscale = F(-32) / max_scale
            for j in range(16):
                l = ((nearest_int(iscale * scales[j]) + 128) & 0xFF) - 128  # int8_t
                s6[j] = max(-32, min(31, l)) + 32
            d = F(1) / iscale
    else:
        sigma2 = F(2) * ssum([v * v for v in x]) / F(256)
        sw = [F(0)] * 16
        for j in range(16):
            xb = x[16 * j:16 * j + 16]
            weight = [qw[16 * j + l] * np.sqrt(sigma2 + xb[l] * xb[l]) for l in range(16)]
            sw[j] = ssum(weight)
            scales[j], L[16 * j:16 * j + 16] = make_qx_quants(16, 4, xb, weight)
        d, s6 = make_qx_quants(16, 32, scales, sw)
    packed = bytearray(12)
    for j in range(16):
        l = s6[j]
        if j < 8:
            packed[j] = l & 0xF
        else:
            packed[j - 8] |= (l & 0xF) << 4
        packed[j % 4 + 8] |= (l >> 4) << (2 * (j // 4))
    dv = F(fp16(d))
    for j in range(16):
        sc = (packed[j] & 0xF) if j < 8 else (packed[j - 8] >> 4)
        sc = (sc | (((packed[8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32
        dd = dv * F(sc)
        if not dd:
            continue
        for i in range(16):
            L[16 * j + i] = max(-4, min(3, nearest_int(x[16 * j + i] / dd))) + 4
    hmask = bytearray(32)
    for j in range(256):
        if L[j] > 3:
            hmask[j % 32] |= 1 << (j // 32)
            L[j] -= 4
    return bytes(hmask) + pack_qs_2bit(L) + bytes(packed) + fp16_bytes(d)


def scale_min_k4(j, q):
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def ref_q45_k(x, qw, nmax):
    L, scales, mins, ls, lm = [0] * 256, [F(0)] * 8, [F(0)] * 8, [0] * 8, [0] * 8
    if qw is None:
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        for j in range(8):
            xb = x[32 * j:32 * j + 32]
            av_x = np.sqrt(ssum([v * v for v in xb]) / F(32))
            scales[j], mins[j], L[32 * j:32 * j + 32] = make_qkx(
                32, nmax, xb, [av_x + abs(v) for v in xb], rmin, 0.1, nstep, False, 2)
        max_scale, max_min = F(0), F(0)
        for j in range(8):
            max_scale = scales[j] if scales[j] > max_scale else max_scale
            max_min = mins[j] if mins[j] > max_min else max_min
        inv_scale = F(63) / max_scale if max_scale > 0 else F(0)
        inv_min = F(63) / max_min if max_min > 0 else F(0)
        ls = [min(63, nearest_int(inv_scale * s) & 0xFF) for s in scales]
        lm = [min(63, nearest_int(inv_min * m) & 0xFF) for m in mins]
        d, dmin = max_scale / F(63), max_min / F(63)
    else:
        sigma2 = F(2) * ssum([v * v for v in x]) / F(256)
        sw = [F(0)] * 8
        for j in range(8):
            xb = x[32 * j:32 * j + 32]
            weights = [qw[32 * j + l] * np.sqrt(sigma2 + xb[l] * xb[l]) for l in range(32)]
            sw[j] = ssum(weights)
            scales[j], mins[j], L[32 * j:32 * j + 32] = make_qkx(32, nmax, xb, weights, -0.9, 0.05, 36, False, 3)
        d, ls = make_qp_quants(8, 63, scales, sw)
        dmin, lm = make_qp_quants(8, 63, mins, sw)
        if nmax == 31:
            ls, lm = [min(63, v) for v in ls], [min(63, v) for v in lm]
    q = bytearray(12)
    for j in range(8):
        if j < 4:
            q[j], q[j + 4] = ls[j] & 0xFF, lm[j] & 0xFF
        else:
            q[j + 4] = ((ls[j] & 0xF) | ((lm[j] & 0xF) << 4)) & 0xFF
            q[j - 4] = (q[j - 4] | ((ls[j] >> 4) << 6)) & 0xFF
            q[j] = (q[j] | ((lm[j] >> 4) << 6)) & 0xFF
    dv, mv = F(fp16(d)), F(fp16(dmin))
    for j in range(8):
        sc, m = scale_min_k4(j, q)
        dd = dv * F(sc)
        if not dd:
            continue
        dm = mv * F(m)
        for i in range(32):
            L[32 * j + i] = max(0, min(nmax, nearest_int((x[32 * j + i] + dm) / dd)))
    head = fp16_bytes(d) + fp16_bytes(dmin) + bytes(q)
    ql = bytearray(128)
    if nmax == 15:
        for n in range(0, 256, 64):
            for l in range(32):
                ql[n // 2 + l] = L[n + l] | (L[n + l + 32] << 4)
        return head + bytes(ql)
    qh = bytearray(32)
    m1, m2 = 1, 2
    for n in range(0, 256, 64):
        for j in range(32):
            l1, l2 = L[n + j], L[n + j + 32]
            if l1 > 15:
                l1 -= 16
                qh[j] |= m1
            if l2 > 15:
                l2 -= 16
                qh[j] |= m2
            ql[n // 2 + j] = l1 | (l2 << 4)
        m1, m2 = m1 << 2, m2 << 2
    return head + bytes(qh) + bytes(ql)


def ref_q6_k(x, qw):
    L, scales = [0] * 256, [F(0)] * 16
    for j in range(16):
        xb = x[16 * j:16 * j + 16]
        scales[j], L[16 * j:16 * j + 16] = make_qx_quants(16, 32, xb, None if qw is None else qw[16 * j:16 * j + 16])
    max_abs, max_scale = absmax(scales)
    if max_abs < EPS:
        return bytes(210)
    iscale = F(-128) / max_scale
    d = F(1) / iscale
    sc = [((min(127, nearest_int(iscale * s)) + 128) & 0xFF) - 128 for s in scales]
    dv = F(fp16(d))
    for j in range(16):
        dd = dv * F(sc[j])
        if not dd:
            continue
        for i in range(16):
            L[16 * j + i] = max(-32, min(31, nearest_int(x[16 * j + i] / dd))) + 32
    ql, qh = bytearray(128), bytearray(64)
    for j in range(0, 256, 128):
        for l in range(32):
            q1, q2, q3, q4 = (L[j + l + 32 * k] & 0xF for k in range(4))
            ql[j // 2 + l] = q1 | (q3 << 4)
            ql[j // 2 + l + 32] = q2 | (q4 << 4)
            qh[j // 4 + l] = (L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) | \
                ((L[j + l + 96] >> 4) << 6)
    return bytes(ql) + bytes(qh) + np.array(sc, np.int8).tobytes() + fp16_bytes(d)


def iq4_impl(x, qw, super_size):
    """quantize_row_iq4_nl_impl with ntry = 7 -> (d, scale codes (IQ4_XS), L)."""
    sigma2 = ssum([v * v for v in x]) * (F(2) / F(super_size))
    nblocks = super_size // 32
    L, scales = [0] * super_size, [F(0)] * nblocks
    max_scale, amax_scale = F(0), F(0)
    for ib in range(nblocks):
        xb = x[32 * ib:32 * ib + 32]
        w = [qw[32 * ib + j] * np.sqrt(sigma2 + xb[j] * xb[j]) if qw is not None else xb[j] * xb[j]
             for j in range(32)]
        amax, mx = absmax(xb)
        if amax < EPS:
            continue

        def trial(inv):
            sqx, sq2 = F(0), F(0)
            for j in range(32):
                qv = F(KV[best_index(inv * xb[j])])
                sqx += w[j] * qv * xb[j]
                sq2 += w[j] * qv * qv
            return sqx, sq2

        sumqx, sumq2 = trial(F(1) / (-mx / F(KV[0])))
        d = sumqx / sumq2 if sumq2 > 0 else F(0)
        best = d * sumqx
        for itry in range(-7, 8):
            sumqx, sumq2 = trial(F(itry + KV[0]) / mx)
            if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                d = sumqx / sumq2
                best = d * sumqx
        scales[ib] = d
        if abs(d) > amax_scale:
            amax_scale, max_scale = abs(d), d
    if nblocks == 1:
        inv = F(1) / scales[0] if scales[0] else F(0)
        return scales[0], None, [best_index(inv * v) for v in x]
    d = -max_scale / F(32)
    inv = F(1) / d if d else F(0)
    codes = []
    for ib in range(nblocks):
        l = max(-32, min(31, nearest_int(inv * scales[ib])))
        dl = d * F(l)
        idl = F(1) / dl if dl else F(0)
        L[32 * ib:32 * ib + 32] = [best_index(idl * v) for v in x[32 * ib:32 * ib + 32]]
        codes.append(l + 32)
    return d, codes, L


def nibbles32(L):
    return bytes((L[j] | (L[j + 16] << 4)) & 0xFF for j in range(16))


def ref_iq4_nl(x, qw):
    d, _, L = iq4_impl(x, qw, 32)
    return fp16_bytes(d) + nibbles32(L)


def ref_iq4_xs(x, qw):
    d, codes, L = iq4_impl(x, qw, 256)
    scales_h, scales_l = 0, bytearray(4)
    for ib, l in enumerate(codes):
        scales_l[ib // 2] |= (l & 0xF) << (4 * (ib % 2))
        scales_h |= (l >> 4) << (2 * ib)
    return fp16_bytes(d) + np.uint16(scales_h).tobytes() + bytes(scales_l) + \
        b"".join(nibbles32(L[32 * i:32 * i + 32]) for i in range(8))


def ref_legacy_imatrix(name, row, qw):
    """quantize_row_q{4,5}_{0,1}_impl for one row: sigma2 is the mean of x^2 over the row."""
    sigma2 = ssum([v * v for v in row]) / F(len(row))
    out = b""
    for ib in range(len(row) // 32):
        xb = row[32 * ib:32 * ib + 32]
        weight = [qw[32 * ib + j] * np.sqrt(sigma2 + xb[j] * xb[j]) for j in range(32)]
        if name in ("q4_0", "q5_0"):
            d, L = make_qx_quants(32, 8 if name == "q4_0" else 16, xb, weight)
            head = fp16_bytes(d)
        else:
            d, the_min, L = make_qkx(32, 15 if name == "q4_1" else 31, xb, weight, -0.9, 0.05, 36, False, 3)
            head = fp16_bytes(d) + fp16_bytes(-the_min)
        qs = bytes(((L[j] & 0xF) | ((L[j + 16] & 0xF) << 4)) for j in range(16))
        if name in ("q4_0", "q4_1"):
            out += head + qs
            continue
        qh = 0
        for j in range(16):
            qh |= ((L[j] & 0x10) >> 4) << j
            qh |= ((L[j + 16] & 0x10) >> 4) << (j + 16)
        out += head + np.uint32(qh).tobytes() + qs
    return out


REFERENCE = {"q2_k": ref_q2_k, "q3_k": ref_q3_k, "q4_k": lambda x, qw: ref_q45_k(x, qw, 15),
             "q5_k": lambda x, qw: ref_q45_k(x, qw, 31), "q6_k": ref_q6_k,
             "iq4_nl": ref_iq4_nl, "iq4_xs": ref_iq4_xs}


def reference_rows(cols):
    """A few small rows that reach the searches' corner cases."""
    m = matrices(cols, seed=7)
    return np.concatenate([m["normal"][:1], m["student_t2"][:1], m["mixed"], m["constant"][1:],
                           m["tiny_1e-6"][:1]])


@pytest.mark.parametrize("name", list(REFERENCE))
@pytest.mark.parametrize("with_importance", [False, True])
def test_bytes_equal_slow_reference_search(name, with_importance):
    rows = reference_rows(256)
    qw = importance_for(256, seed=8) if with_importance else None
    codec = make_codec(name)
    ours = codec.encode(torch.from_numpy(rows), None if qw is None else torch.from_numpy(qw)).data["blocks"].numpy()
    g = codec.group_size
    with np.errstate(all="ignore"):
        for r, row in enumerate(rows):
            expected = b"".join(REFERENCE[name](row[c:c + g], None if qw is None else qw[c:c + g])
                                for c in range(0, 256, g))
            assert ours[r].tobytes() == expected, f"{name} row {r}"


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1"])
def test_legacy_imatrix_bytes_equal_slow_reference(name):
    rows = reference_rows(128)
    qw = importance_for(128, seed=9)
    ours = make_codec(name).encode(torch.from_numpy(rows), torch.from_numpy(qw)).data["blocks"].numpy()
    with np.errstate(all="ignore"):
        for r, row in enumerate(rows):
            assert ours[r].tobytes() == ref_legacy_imatrix(name, row, qw), f"{name} row {r}"
