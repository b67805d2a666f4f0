"""OCP microscaling (the `mx` codec) and its element formats, bit for bit against independent oracles:
ml_dtypes' casts (float4_e2m1fn, float6_e2m3fn, float6_e3m2fn, float8_e4m3fn, float8_e5m2, float8_e8m0fnu),
torchao 0.18's reference MX quantizer (to_mx / to_dtype, every element and scale rule), and the OCP spec's
floor rule written out below in plain Python."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from quantatlas.quant.codecs import make_codec
from quantatlas.quant.codecs.base import unpack_bits
from quantatlas.quant.codecs.minifloat import ELEMENTS, e8m0_value
from quantatlas.quant.config import ConfigError

ML = {"fp4_e2m1": ml_dtypes.float4_e2m1fn, "fp6_e2m3": ml_dtypes.float6_e2m3fn, "fp6_e3m2": ml_dtypes.float6_e3m2fn,
      "fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}
RULES = ["floor", "rceil", "ceil", "even"]


def _grid_and_midpoints(name):
    """Every finite value of the format, the midpoints between neighbours and their float32 neighbours."""
    f = ELEMENTS[name]
    vals = np.array([np.uint8(c).view(ML[name]) for c in range(2 ** f.bits)]).astype(np.float32)
    v = np.unique(vals[np.isfinite(vals)])
    mids = ((v[1:].astype(np.float64) + v[:-1]) / 2).astype(np.float32)
    return np.concatenate([v, mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf))])


def _test_values(name, seed=0):
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-9, 6, 20000)
    return np.concatenate([rng.standard_normal(20000) * scales, _grid_and_midpoints(name)]).astype(np.float32)


@pytest.mark.parametrize("name", list(ML))
def test_element_cast_codes_and_values_equal_ml_dtypes(name):
    f = ELEMENTS[name]
    y = _test_values(name)
    ours = f.round(torch.from_numpy(y)).numpy()
    ref = np.clip(y, -f.max, f.max).astype(ML[name])           # ml_dtypes overflows to NaN/inf: saturate first
    assert np.array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))   # -0 included
    codes = f.encode(torch.from_numpy(ours)).numpy()
    assert np.array_equal(codes, ref.view(np.uint8).astype(np.int64) & ((1 << f.bits) - 1))
    back = f.decode(torch.from_numpy(codes)).numpy()
    assert np.array_equal(back.view(np.uint32), ours.view(np.uint32))
    assert f.max == float(ml_dtypes.finfo(ML[name]).max)


def test_mxint8_element_is_a_symmetric_fixed_point_byte():
    f = ELEMENTS["int8"]
    y = np.concatenate([np.linspace(-3, 3, 4001), (np.arange(-300, 300) + 0.5) / 64]).astype(np.float32)
    direct = np.clip(np.round(y.astype(np.float64) * 64), -127, 127) / 64      # numpy rounds half to even
    ours = f.round(torch.from_numpy(y)).numpy()
    assert np.array_equal(ours, direct.astype(np.float32))
    codes = f.encode(torch.from_numpy(ours)).numpy()
    assert np.array_equal(codes, (direct * 64).astype(np.int8).view(np.uint8))
    assert np.array_equal(f.decode(torch.from_numpy(codes)).numpy(), ours)
    assert codes.max() <= 255 and 128 not in codes                                # -128 is never produced


def test_e8m0_bytes_are_ml_dtypes_float8_e8m0fnu():
    b = torch.arange(0, 255, dtype=torch.uint8)
    assert np.array_equal(e8m0_value(b).numpy(), b.numpy().view(ml_dtypes.float8_e8m0fnu).astype(np.float32))


def _torchao():
    import logging
    import warnings

    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.prototype.mx_formats.config import ScaleCalculationMode
        from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
        from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
    logging.disable(logging.NOTSET)
    dtypes = {"fp4_e2m1": torch.float4_e2m1fn_x2, "fp6_e2m3": DTYPE_FP6_E2M3, "fp6_e3m2": DTYPE_FP6_E3M2,
              "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
    return to_mx, to_dtype, ScaleCalculationMode, dtypes


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(48, 256, generator=g) * 0.02
    heavy = torch.from_numpy(np.random.default_rng(seed).standard_t(2, (48, 256)).astype(np.float32)) * 0.05
    heavy[0, :32] = 0.0          # an all-zero block
    heavy[1, 5] = 40.0           # an outlier
    return torch.cat([normal, heavy])


@pytest.mark.parametrize("element", list(ML))
def test_mx_equals_torchao_to_mx_for_every_scale_rule(element):
    to_mx, to_dtype, Mode, dtypes = _torchao()
    w = _weights()
    for rule in RULES:
        codec = make_codec("mx", {"element": element, "scale_rounding": rule})
        packed = codec.encode(w)
        scale, data = to_mx(w.contiguous(), dtypes[element], 32, Mode(rule))
        assert torch.equal(packed.data["scales"], scale.view(torch.uint8)), rule
        ref = to_dtype(data, scale, dtypes[element], 32, torch.float32)
        assert torch.equal(codec.decode(packed), ref), rule
        ours_codes = unpack_bits(packed.data["codes"], ELEMENTS[element].bits, w.numel()).reshape(w.shape)
        if element == "fp4_e2m1":       # both pack element 2i in the low nibble
            assert torch.equal(packed.data["codes"], data.view(torch.uint8).reshape(-1)), rule
        elif element.startswith("fp8"):
            assert torch.equal(ours_codes.to(torch.uint8), data.view(torch.uint8)), rule
        else:                           # torchao keeps fp6 codes unpacked, one per byte
            assert torch.equal(ours_codes, data.to(torch.int64)), rule


def _ocp_floor_reference(w: np.ndarray, element: str, block=32) -> np.ndarray:
    """OCP MX v1.0, section 6.3, one block at a time: X = 2^(floor(log2 max|v|) - emax_elem), P = cast(v / X)."""
    f = ELEMENTS[element]
    out = np.zeros_like(w)
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], block):
            v = w[r, c:c + block].astype(np.float64)
            m = float(np.abs(v).max())
            e = (math.frexp(m)[1] - 1 - f.emax) if m > 0 else -127
            x = 2.0 ** max(-127, min(127, e))
            p = np.clip(v / x, -f.max, f.max).astype(np.float32).astype(ML[element]).astype(np.float64)
            out[r, c:c + block] = p * x
    return out.astype(np.float32)


@pytest.mark.parametrize("element", ["fp4_e2m1", "fp6_e3m2", "fp8_e4m3"])
def test_floor_rule_is_the_ocp_spec_written_out(element):
    w = _weights(1)[:16]
    codec = make_codec("mx", {"element": element})
    assert np.array_equal(codec.decode(codec.encode(w)).numpy(), _ocp_floor_reference(w.numpy(), element))


def test_mxint8_scale_and_elements_written_out():
    w = _weights(2)[:8]
    codec = make_codec("mx", {"element": "int8"})
    got = codec.decode(codec.encode(w)).numpy()
    x = w.numpy().astype(np.float64).reshape(8, -1, 32)
    m = np.abs(x).max(-1, keepdims=True)
    e = np.where(m > 0, np.floor(np.log2(np.where(m > 0, m, 1))), -127)          # emax_elem = 0
    X = 2.0 ** e
    want = np.clip(np.round(x / X * 64), -127, 127) / 64 * X
    assert np.array_equal(got, want.reshape(8, -1).astype(np.float32))


@pytest.mark.parametrize("element,bpw", [("fp4_e2m1", 4.25), ("fp6_e2m3", 6.25), ("fp6_e3m2", 6.25),
                                         ("fp8_e4m3", 8.25), ("fp8_e5m2", 8.25), ("int8", 8.25)])
def test_stored_bits_are_exactly_8_plus_32b_per_block(element, bpw):
    codec = make_codec("mx", {"element": element})
    packed = codec.encode(torch.randn(24, 384))
    assert packed.bits_per_weight == bpw == codec.bits_per_weight((24, 384))
    blocks = 24 * 384 // 32
    assert packed.nbytes * 8 == blocks * (8 + 32 * ELEMENTS[element].bits)
    assert packed.data["scales"].shape == (24, 12) and packed.data["scales"].dtype == torch.uint8


@pytest.mark.parametrize("rule", RULES)
def test_solver_path_fit_quantize_pack_and_column_quantizer_agree_with_encode(rule):
    codec = make_codec("mx", {"element": "fp6_e2m3", "scale_rounding": rule})
    w = _weights(3)[:20]
    params = [codec.fit(w[:, c:c + 32]) for c in range(0, 256, 32)]
    parts = [codec.quantize(w[:, c:c + 32], p) for c, p in zip(range(0, 256, 32), params)]
    packed = codec.pack(torch.cat([q.codes for q in parts], 1), params)
    assert torch.equal(packed.data["codes"], codec.encode(w).data["codes"])
    assert torch.equal(codec.decode(packed), torch.cat([q.values for q in parts], 1))
    rnd = codec.column_quantizer(params[2])
    values, codes = torch.empty(20), torch.empty(20)
    moved = w[:, 70] * 1.7                       # a column GPTQ moved: saturates and rounds anew
    rnd(moved.contiguous(), 6, values, codes)
    want = codec.quantize(moved[:, None], params[2], 6)
    assert torch.equal(values, want.values[:, 0]) and torch.equal(codes, want.codes[:, 0].float())


def test_rules_order_their_scales_as_defined():
    """ceil never gives a smaller X than floor, rceil never saturates, even sits between floor and ceil."""
    w = _weights(4)
    exps = {r: make_codec("mx", {"scale_rounding": r}).encode(w).data["scales"].long() for r in RULES}
    assert (exps["ceil"] >= exps["floor"]).all() and (exps["ceil"] - exps["floor"]).max() == 1
    assert ((exps["even"] == exps["floor"]) | (exps["even"] == exps["ceil"])).all()
    assert (exps["even"] != exps["floor"]).any() and (exps["rceil"] != exps["floor"]).any()
    X = e8m0_value(exps["rceil"].to(torch.uint8)).repeat_interleave(32, 1)
    assert ((w / X).abs() <= 6).all()


@pytest.mark.parametrize("options,field", [({"element": "fp6_e2m3", "block": 3}, "block"),
                                           ({"element": "fp5"}, "element"),
                                           ({"scale_rounding": "nearest"}, "scale_rounding")])
def test_bad_options_name_their_field(options, field):
    with pytest.raises(ConfigError, match=field):
        make_codec("mx", options)
