"""The uniform codec and bit packing against direct computations written here."""
import numpy as np
import pytest
import torch

from quantatlas.quant.codecs import make_codec, pack_bits, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (1001,), generator=g)
    stream = pack_bits(codes, bits)
    assert stream.dtype == torch.uint8 and stream.numel() == (1001 * bits + 7) // 8
    assert torch.equal(unpack_bits(stream, bits, 1001), codes)
    # little-endian bit order: the first code sits in the lowest bits of byte 0
    if bits == 4:
        assert stream[0].item() == codes[0].item() | (codes[1].item() << 4)
    # in chunks (of 16 codes here), from a narrow dtype, from a transposed view: the same stream
    assert torch.equal(pack_bits(codes, bits, chunk=16), stream)
    assert torch.equal(pack_bits(codes.to(torch.int16), bits), stream)
    for grid in (codes[:1000].reshape(40, 25), codes[:960].reshape(40, 24)):   # flat chunks; whole rows
        view = grid.t().contiguous().t().to(torch.int16)
        assert torch.equal(pack_bits(view, bits, chunk=50), pack_bits(grid.reshape(-1), bits))


def _direct_uniform(w: np.ndarray, bits: int, group: int, symmetric: bool) -> np.ndarray:
    """Element-by-element min/max RTN, written from the definition in uniform.py's docstring."""
    out = np.zeros_like(w)
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], group):
            x = w[r, c0:c0 + group]
            if symmetric:
                hi = 2 ** (bits - 1) - 1
                s = float(np.float16(np.abs(x).max() / hi)) or 1.0
                for j, v in enumerate(x):
                    out[r, c0 + j] = s * min(max(np.round(v / s), -hi - 1), hi)
            else:
                hi = 2 ** bits - 1
                lo_v, hi_v = min(x.min(), 0.0), max(x.max(), 0.0)
                s = float(np.float16((hi_v - lo_v) / hi)) or 1.0
                z = min(max(np.round(-lo_v / s), 0), hi)
                for j, v in enumerate(x):
                    out[r, c0 + j] = s * (min(max(np.round(v / s) + z, 0), hi) - z)
    return out


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (3, 64, False), (2, 16, True), (8, 64, False)])
def test_uniform_matches_direct(bits, group, symmetric):
    g = torch.Generator().manual_seed(bits * group)
    w = torch.randn(6, 128, generator=g) * 0.05
    w[0] = 0.0                       # an all-zero row
    w[1, :group] = 0.3               # a constant group
    # absmax: the grid `_direct_uniform` writes (signed_max, the default, is tests/test_gptq_defaults.py's)
    codec = make_codec("uniform", {"bits": bits, "group": group, "symmetric": symmetric,
                                   **({"scale": "absmax"} if symmetric else {})})
    packed = codec.encode(w)
    got = codec.decode(packed).numpy()
    want = _direct_uniform(w.numpy().astype(np.float32), bits, group, symmetric)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)


def test_uniform_bits_are_counted_from_storage():
    w = torch.randn(64, 256)
    assert make_codec("uniform", {"bits": 4, "group": 128}).encode(w).bits_per_weight == 4 + 16 / 128
    assert make_codec("uniform", {"bits": 3, "group": 128, "symmetric": False}).encode(w).bits_per_weight == 3 + 32 / 128
    assert make_codec("uniform", {"bits": 4, "group": None}).encode(w).bits_per_weight == 4 + 16 / 256
    assert make_codec("uniform", {"bits": 4}).bits_per_weight((64, 256)) == 4.125


@pytest.mark.parametrize("clip", ["mse", "hessian"])
def test_clip_search_never_worse_than_minmax(clip):
    g = torch.Generator().manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((32, 128)) * 0.02
    imp = torch.rand(128, generator=g) + 0.1
    base = make_codec("uniform", {"bits": 3, "group": 64})
    tuned = make_codec("uniform", {"bits": 3, "group": 64, "clip": clip})
    e0 = ((base.decode(base.encode(w, imp)) - w) ** 2 * imp).reshape(32, 2, 64).sum(-1)
    e1 = ((tuned.decode(tuned.encode(w, imp)) - w) ** 2 * imp).reshape(32, 2, 64).sum(-1)
    if clip == "hessian":
        assert (e1 <= e0 + 1e-9).all()
    assert e1.sum() < e0.sum()


@pytest.mark.parametrize("opts,message", [
    ({"bits": 1}, r"uniform\.bits: Input should be greater than or equal to 2 \(value: 1\)"),
    ({"bits": 9}, r"uniform\.bits: Input should be less than or equal to 8 \(value: 9\)"),
    ({"bits": True}, r"uniform\.bits: Input should be a valid integer"),
    ({"bits": 4, "group": 0}, r"uniform\.group: Input should be greater than 0"),
    ({"bits": 4, "clip": "foo"}, r"uniform\.clip: Input should be 'minmax', 'mse' or 'hessian'"),
    ({"bits": 4, "nonsense": 1}, r"uniform\.nonsense: Extra inputs are not permitted"),
    ({}, r"uniform\.bits: Field required")])
def test_uniform_rejects_bad_options(opts, message):
    with pytest.raises(ValueError, match=message):
        make_codec("uniform", opts)


def test_unknown_codec_is_named():
    with pytest.raises(ValueError, match="unknown codec 'int5'"):
        make_codec("int5", {})


def test_group_must_divide_columns():
    with pytest.raises(ValueError, match="not a multiple of group size 128"):
        make_codec("uniform", {"bits": 4, "group": 128}).encode(torch.randn(4, 200))


def test_f16_and_bf16_codecs_store_the_16_bit_patterns():
    """fp16 against numpy's float16 conversion; bf16 against round-to-nearest-even on the fp32 bits."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 64, generator=g) * torch.logspace(-6, 4, 64)     # subnormals to large values
    f16 = make_codec("f16")
    p = f16.encode(w)
    assert p.bits_per_weight == 16.0
    want = w.numpy().astype(np.float16)
    assert np.array_equal(p.data["values"].numpy().view(np.float16), want)
    assert np.array_equal(f16.decode(p).numpy(), want.astype(np.float32))
    assert torch.equal(f16.fake_quantize(w), f16.decode(p))
    bits = w.numpy().view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32) << 16
    bf16 = make_codec("bf16")
    q = bf16.encode(w)
    assert q.bits_per_weight == 16.0 and np.array_equal(bf16.decode(q).numpy(), rounded.view(np.float32))
