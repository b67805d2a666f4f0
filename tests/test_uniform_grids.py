"""The uniform codec's symmetric scale rules (`scale: absmax | half_step | signed_max`) against a
direct element-by-element computation written here, against compressed-tensors' own qparams and
quantize functions (skipped where the package is not importable), inside the clip search, GPTQ's
fused column rounding, sparse24 and the activations' clip ratio; and the public grid API."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quantatlas.quant.codecs import make_codec
from quantatlas.quant.codecs.base import unpack_bits
from quantatlas.quant.codecs.uniform import CLIP_STEPS
from quantatlas.quant.config import ConfigError, build, parse_config
from test_gptq_fast import NoFastPath   # the uniform codec without its fused column path

RULES = ("absmax", "half_step", "signed_max")

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(seed: int, rows: int = 6, cols: int = 128, group: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0] = 0.0                                      # an all-zero row
    w[1, :group] = 0.3                              # a constant group
    w[2, :group] = -0.2                             # a constant negative group
    w[3, 3], w[3, 7] = 0.4, -0.4                    # a tie in magnitude: the positive one wins (signed_max)
    w[4, group:2 * group] = w[4, group:2 * group].abs()   # a group without negative weights
    return w.half().float()                         # fp16 weights, as checkpoints store them


def _direct_scale(x: np.ndarray, bits: int, rule: str, shrink: np.float32 = np.float32(1.0)) -> float:
    """One group's scale from the definitions in uniform.py's docstring, in float32 then fp16."""
    n = 2 ** (bits - 1)
    if rule == "signed_max":
        top, bottom = max(float(x.max()), 0.0), min(float(x.min()), 0.0)
        largest = np.float32(top if top >= -bottom else bottom)
        s = np.float16(-(largest * shrink) / np.float32(n))
    else:
        m = np.float32(np.abs(x).max()) * shrink
        s = np.float16(m / np.float32(n - 1 if rule == "absmax" else n - 0.5))
    return float(s) if float(s) != 0 else 1.0


def _direct_codes(x: np.ndarray, s: float, bits: int) -> list[int]:
    n = 2 ** (bits - 1)
    return [int(min(max(np.rint(np.float32(v) / np.float32(s)), -n), n - 1)) for v in x]


def _direct(w: np.ndarray, bits: int, group: int, rule: str):
    """(values, codes, scales) element by element."""
    values, codes = np.zeros_like(w), np.zeros(w.shape, dtype=np.int64)
    scales = np.zeros((w.shape[0], w.shape[1] // group), dtype=np.float32)
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], group):
            x = w[r, c0:c0 + group]
            s = _direct_scale(x, bits, rule)
            scales[r, c0 // group] = s
            for j, q in enumerate(_direct_codes(x, s, bits)):
                codes[r, c0 + j] = q
                values[r, c0 + j] = np.float32(s) * np.float32(q)
    return values, codes, scales


def _codes_of(codec, packed) -> torch.Tensor:
    rows, cols = packed.shape
    lo, _ = codec.levels()
    return unpack_bits(packed.data["codes"], codec.bits, rows * cols).reshape(rows, cols) + lo


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_each_scale_rule_matches_a_direct_computation(rule, bits):
    w = _weights(bits)
    codec = make_codec("uniform", {"bits": bits, "group": 32, "scale": rule})
    packed = codec.encode(w)
    values, codes, scales = _direct(w.numpy(), bits, 32, rule)
    assert packed.data["scale"].dtype == torch.float16 and packed.bits_per_weight == bits + 16 / 32
    np.testing.assert_array_equal(packed.data["scale"].float().numpy(), scales)
    np.testing.assert_array_equal(_codes_of(codec, packed).numpy(), codes)
    np.testing.assert_array_equal(codec.decode(packed).numpy(), values)
    np.testing.assert_array_equal(codec.fake_quantize(w).numpy(), values)
    n = 2 ** (bits - 1)
    used = set(codes[1:].reshape(-1).tolist())
    if rule == "absmax":                      # 2^b - 1 levels: the bottom code is never reached at clip 1
        assert min(used) == -(n - 1)
    else:                                     # full range: the bottom code is reached
        assert min(used) == -n


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_signed_max_puts_the_largest_weight_on_the_bottom_code_and_stores_a_signed_scale(bits):
    w = _weights(10 + bits)
    codec = make_codec("uniform", {"bits": bits, "group": 32, "scale": "signed_max"})
    packed = codec.encode(w)
    codes, n = _codes_of(codec, packed), 2 ** (bits - 1)
    scale = packed.data["scale"].float()
    for r in range(1, w.shape[0]):
        for gi in range(4):
            x = w[r, 32 * gi:32 * gi + 32]
            top = int(torch.argmax(x.abs() - 1e-9 * (x < 0)))   # largest magnitude, the positive one on a tie
            assert codes[r, 32 * gi + top] == -n
            assert torch.sign(scale[r, gi]) == -torch.sign(x[top])
            assert abs(float(scale[r, gi]) * -n - float(x[top])) <= abs(float(x[top])) * 2 ** -10
    assert packed.data["scale"][3, 0] < 0      # the tie +0.4 / -0.4 goes to the positive weight
    assert packed.data["scale"][2, 0] > 0      # a negative constant group: positive scale
    assert torch.all(packed.data["scale"][0] == 1)   # all zero: scale 1, codes 0
    assert torch.all(codes[0] == 0)


def test_the_rules_use_the_extra_level_and_lower_the_error():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    err = {rule: float(((make_codec("uniform", {"bits": 4, "scale": rule}).fake_quantize(w) - w) ** 2).mean())
           for rule in RULES}
    assert err["signed_max"] < err["half_step"] < err["absmax"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_half_step_is_compressed_tensors_symmetric_int(bits):
    """Scales, codes and values against compressed-tensors' calculate_qparams / quantize / fake_quantize."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle import fake_quantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    rows, cols, group = 6, 128, 32
    w = _weights(20 + bits, rows, cols, group)[1:]     # compressed-tensors stores eps, not 1, for an all-zero group
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group)
    grouped = w.half().reshape(rows - 1, cols // group, group)
    scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    assert scale.dtype == torch.float16
    theirs = quantize(w, scale, zero, args)
    codec = make_codec("uniform", {"bits": bits, "group": group, "scale": "half_step"})
    packed = codec.encode(w)
    assert torch.equal(packed.data["scale"], scale)                  # stored as it stores it
    assert torch.equal(_codes_of(codec, packed), theirs.long())
    assert torch.equal(codec.decode(packed).half(), fake_quantize(w, scale, zero, args))


def _direct_search(x: np.ndarray, imp: np.ndarray, bits: int, rule: str):
    """(best error, error of each shrink factor) of the clip search, in float64."""
    shrinks = torch.linspace(1.0, 0.5, CLIP_STEPS).numpy()
    errs = []
    for f in shrinks:
        s = _direct_scale(x, bits, rule, np.float32(f))
        q = np.array(_direct_codes(x, s, bits), dtype=np.float64)
        errs.append(float((imp * (x.astype(np.float64) - np.float32(s) * q) ** 2).sum()))
    return min(errs), errs


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("clip", ["mse", "hessian"])
def test_clip_search_works_with_every_rule(rule, clip):
    bits, group = 3, 32
    w = _weights(30)
    imp = torch.rand(group, generator=torch.Generator().manual_seed(1)) + 0.1
    codec = make_codec("uniform", {"bits": bits, "group": group, "clip": clip, "scale": rule})
    minmax = make_codec("uniform", {"bits": bits, "group": group, "scale": rule})
    used = imp.numpy().astype(np.float64) if clip == "hessian" else np.ones(group)
    shrunk = 0
    for c0 in range(0, w.shape[1], group):
        x = w[:, c0:c0 + group]
        p = codec.fit(x, imp)
        got = ((codec.quantize(x, p).values - x).double() ** 2 * torch.from_numpy(used)).sum(-1)
        plain = ((minmax.quantize(x, minmax.fit(x)).values - x).double() ** 2 * torch.from_numpy(used)).sum(-1)
        for r in range(x.shape[0]):
            best, errs = _direct_search(x[r].numpy(), used, bits, rule)
            assert float(got[r]) <= best * (1 + 1e-6) + 1e-12
            assert float(got[r]) <= float(plain[r]) * (1 + 1e-6) + 1e-12
            if rule == "signed_max" and float(x[r].abs().max()) > 0:   # the scale keeps its sign under a shrink
                top = float(x[r][torch.argmax(x[r].abs() - 1e-9 * (x[r] < 0))])
                assert np.sign(float(p.scale[r])) == -np.sign(top)
            shrunk += errs.index(best) > 0
    assert shrunk > 0                                   # the search moved away from min/max somewhere


@pytest.mark.parametrize("rule", ["half_step", "signed_max"])
@pytest.mark.parametrize("clip", ["minmax", "hessian"])
def test_fused_column_rounding_is_quantize_for_every_rule(rule, clip):
    from quantatlas.quant.solvers import gptq

    codec = make_codec("uniform", {"bits": 4, "group": 32, "scale": rule, "clip": clip})
    g = torch.Generator().manual_seed(8)
    w = 3 * torch.randn(64, 32, generator=g)
    params = codec.fit(w[:, :8] / 3, torch.rand(8, generator=g) + 0.5)   # fitted on smaller values: many clamp
    assert bool((params.scale < 0).any()) == (rule == "signed_max")
    one_column = codec.column_quantizer(params)
    for c in range(w.shape[1]):
        values, codes = torch.empty(64), torch.empty(64)
        one_column(w[:, c].contiguous(), c, values, codes)
        ref = codec.quantize(w[:, c:c + 1], params, c)
        assert torch.equal(values, ref.values[:, 0]) and torch.equal(codes.long(), ref.codes[:, 0])
    cols, n = 128, 512
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    X = torch.randn(n, cols, generator=g) @ mix
    W, H = torch.randn(32, cols, generator=g), (2.0 / n) * X.T @ X
    for dtype in (torch.float32, torch.float64):
        fast, packed_fast, _ = gptq(W.to(dtype), H, codec)
        slow, packed_slow, _ = gptq(W.to(dtype), H, NoFastPath(codec))
        assert torch.equal(fast, slow)
        assert all(torch.equal(packed_fast.data[k], packed_slow.data[k]) for k in packed_slow.data)


@pytest.mark.parametrize("rule", RULES)
def test_sparse24_keeps_the_uniform_grid_of_its_rule(rule):
    from quantatlas.quant.codecs.sparse24 import keep_mask

    w = _weights(40, cols=64, group=16)
    codec = build("codec", {"sparse24": {"bits": 4, "group": 16, "scale": rule}})
    kept = (w * keep_mask(w)).numpy()
    values, _, scales = _direct(kept, 4, 16, rule)
    packed = codec.encode(w)
    np.testing.assert_array_equal(packed.data["scale"].float().numpy(), scales)
    np.testing.assert_array_equal(codec.decode(packed).numpy(), values)
    assert packed.bits_per_weight == (2 * 4 + 4) / 4 + 16 / 16


@pytest.mark.parametrize("rule", RULES)
def test_activation_clip_ratio_shrinks_every_rule(rule):
    from quantatlas.quant.act import fake_quantize_rows

    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3)).half().float()
    codec = make_codec("uniform", {"bits": 4, "group": None, "scale": rule})
    got = fake_quantize_rows(x, codec, 64, 0.9)
    want = np.zeros((5, 64), dtype=np.float32)
    for r in range(5):
        s = _direct_scale(x[r].numpy(), 4, rule, np.float32(0.9))
        want[r] = [np.float32(s) * np.float32(q) for q in _direct_codes(x[r].numpy(), s, 4)]
    np.testing.assert_array_equal(got.numpy(), want)


def test_public_grid_api():
    codec = make_codec("uniform", {"bits": 3, "group": 8, "scale": "half_step"})
    assert codec.levels() == (-4, 3)
    assert make_codec("uniform", {"bits": 3, "symmetric": False}).levels() == (0, 7)
    w = torch.tensor([[0.35, -0.7, 0.05, 0.0, 0.21, -0.05, 0.6, 0.25]])   # -0.7: -3.5 steps, to the bottom code
    p = codec.row_params(w)                                   # shrink 1
    assert float(p.scale[0]) == float(torch.tensor(0.7 / 3.5).half()) and p.zero is None
    q = codec.codes(w, p)
    assert q.tolist() == [[2, -4, 0, 0, 1, 0, 3, 1]]
    assert torch.equal(codec.values(q, p), q * p.scale[:, None])
    assert torch.equal(codec.quantize(w, p).values, codec.values(q, p))
    half = codec.row_params(w, torch.tensor([0.5]))
    assert float(half.scale[0]) == float(torch.tensor(0.35 / 3.5).half())


def test_scale_option_is_a_symmetric_grids_and_checked():
    with pytest.raises(ConfigError, match=r"uniform\.scale: half_step is a scale rule of the symmetric grid"):
        parse_config("codec", {"uniform": {"bits": 4, "symmetric": False, "scale": "half_step"}})
    with pytest.raises(ConfigError, match=r"uniform\.scale: Input should be 'absmax', 'half_step' or 'signed_max'"):
        parse_config("codec", {"uniform": {"bits": 4, "scale": "absmean"}})
    assert parse_config("codec", {"uniform": {"bits": 4, "symmetric": False, "scale": "absmax"}}).symmetric is False


def test_the_default_rule_changes_no_stored_config_key_or_id():
    """`scale` came after results were stored: at absmax it is in no pack's config, arm key or experiment
    id, which read as before; another rule is in all of them. uniform's stored configs write it out (its
    default changed since: tests/test_gptq_defaults.py), sparse24's leave it out at absmax."""
    from quantatlas.atlas import ids
    from quantatlas.spec import parse_spec, stable_arm_config

    for name in ("uniform", "sparse24"):
        # uniform's default is signed_max since issue 25 (tests/test_gptq_defaults.py); absmax is its first
        bare = parse_config("codec", {name: {"bits": 3} if name == "sparse24" else {"bits": 3, "scale": "absmax"}})
        explicit = parse_config("codec", {name: {"bits": 3, "scale": "absmax"}})
        assert bare.options() == explicit.options()
        assert ("scale" in bare.options()) == (name == "uniform")
        assert "scale" not in bare.build().encode(torch.randn(2, 128)).config
        other = parse_config("codec", {name: {"bits": 3, "scale": "signed_max"}})
        assert other.options()["scale"] == "signed_max" and other.options(True) == {"bits": 3, "scale": "signed_max"}

    def spec(opts):
        return {"title": "t", "arms": {"a": {"codec": {"uniform": opts}}}}

    one = parse_spec(spec({"bits": 4, "scale": "absmax"})).arms["a"].model_dump(mode="json")
    assert stable_arm_config(one)["codec"] == {"uniform": {"bits": 4, "group": 128, "symmetric": True, "clip": "minmax"}}
    first = ids.normalise_spec(spec({"bits": 4, "scale": "absmax"}))[1]
    assert first == ids.normalise_spec(spec({"bits": 4, "group": 128, "scale": "absmax", "clip": "minmax"}))[1]
    assert ids.normalise_spec(spec({"bits": 4, "scale": "half_step"}))[1] != first
