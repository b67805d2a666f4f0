"""D_n for any n (codec `dn`, issue 28 part 2): the nearest point against brute force for n = 12 in a
small box, `dn {n: 4}` is `d4` byte for byte, stored bits with a short last block, and GPTQ/LDLQ
with that short block equal to the textbook OBS of tests/test_gptq.py."""
from __future__ import annotations

import pytest
import torch
from test_gptq import direct_obs, proxy

from quantatlas.quant.codecs import make_codec
from quantatlas.quant.config import ConfigError, parse_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _brute(y, cands):
    """The nearest candidate to each row of y (distances in chunks of candidates)."""
    best_d, best = None, None
    for c in cands.split(1 << 15):
        d = torch.cdist(y, c) ** 2
        dmin, idx = d.min(1)
        if best_d is None:
            best_d, best = dmin, c[idx]
        else:
            better = dmin < best_d
            best_d, best = torch.where(better, dmin, best_d), torch.where(better[:, None], c[idx], best)
    return best_d, best


@pytest.mark.parametrize("lo,hi,spread", [(-1.0, 1.0, 1.3), (0.0, 1.0, 1.0)])
def test_nearest_d12_in_a_box_equals_brute_force(lo, hi, spread):
    """Every point of D12 ∩ [lo, hi]^12 (265,720 or 2,048 of them) against lattice.nearest_dn."""
    from quantatlas.quant.codecs.lattice import nearest_dn

    g = torch.Generator().manual_seed(12)
    y = spread * torch.randn(40, 12, generator=g, dtype=torch.float64) + (lo + hi) / 2
    ints = torch.cartesian_prod(*[torch.arange(lo, hi + 1, dtype=torch.float64)] * 12)
    cands = ints[ints.sum(1).remainder(2) == 0]
    got = nearest_dn(y, lo, hi)
    assert ((got >= lo) & (got <= hi)).all() and (got.sum(1).remainder(2) == 0).all()
    d_brute, _ = _brute(y, cands)
    assert torch.allclose(((y - got) ** 2).sum(1), d_brute)


def test_codec_box_for_d12_is_the_nearest_codebook_point():
    """The codec's 2-bit D12 + ½ codebook (coordinates in [-2, 1] + ½): no codebook point that differs
    from the answer in 6 random coordinates only (4^6 / 2 of them per row) is nearer."""
    from quantatlas.quant.codecs.dn import box_point

    g = torch.Generator().manual_seed(1)
    y = 1.2 * torch.randn(60, 12, generator=g, dtype=torch.float64)
    got = box_point(y, 2) + 0.5
    # every codebook point that agrees with `got` outside 6 random positions: the best of them is `got`
    pos = torch.randperm(12, generator=g)[:6]
    free = torch.cartesian_prod(*[torch.arange(-2, 2, dtype=torch.float64)] * 6)
    for i in range(y.shape[0]):
        z = (got[i] - 0.5).expand(free.shape[0], 12).clone()
        z[:, pos] = free
        z = z[z.sum(1).remainder(2) == 0]
        d, _ = _brute(y[i:i + 1], z + 0.5)
        assert float(((y[i] - got[i]) ** 2).sum()) == pytest.approx(float(d[0]), abs=1e-12)


@pytest.mark.parametrize("opts", [{"bits": 2, "group": 32}, {"bits": 3, "group": None},
                                  {"bits": 4, "group": 64, "scale_search": False}])
def test_dn_with_n_4_is_d4(opts):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(4))
    imp = torch.rand(128, generator=torch.Generator().manual_seed(5)) + 0.5
    a, b = make_codec("d4", opts).encode(w, imp), make_codec("dn", {"n": 4, **opts}).encode(w, imp)
    assert a.data.keys() == b.data.keys()
    assert all(torch.equal(a.data[k], b.data[k]) for k in a.data)
    assert torch.equal(make_codec("d4", opts).decode(a), make_codec("dn", {"n": 4, **opts}).decode(b))


@pytest.mark.parametrize("n,bits,group,cols", [(12, 2, None, 64), (8, 3, 32, 64), (12, 3, 24, 48), (16, 2, None, 40),
                                               (5, 2, None, 32)])
def test_pack_stores_nb_minus_1_bits_per_block_and_decodes_the_quantized_values(n, bits, group, cols):
    codec = make_codec("dn", {"n": n, "bits": bits, "group": group})
    w = torch.randn(8, cols, generator=torch.Generator().manual_seed(n))
    g = codec.group_of(cols)
    params, codes, values = [], [], []
    for c in range(0, cols, g):
        p = codec.fit(w[:, c:c + g])
        params.append(p)
        for j in range(0, g, n):                    # block by block, the short one last, as GPTQ calls it
            q = codec.quantize(w[:, c + j:c + min(j + n, g)], p, j)
            codes.append(q.codes)
            values.append(q.values)
    packed = codec.pack(torch.cat(codes, 1), params)
    assert torch.equal(codec.decode(packed), torch.cat(values, 1))
    assert torch.equal(codec.fake_quantize(w), codec.decode(codec.encode(w)))
    full, r = divmod(g, n)
    groups = 8 * (cols // g)   # rows × groups; each stream packs all of them, padded to whole bytes
    streams = {"codes": groups * full * (n - 1) * bits, "last": groups * full * (bits - 1)}
    if r:
        streams.update(tail_codes=groups * (r - 1) * bits, tail_last=groups * (bits - 1))
    assert {k: packed.data[k].numel() for k in streams} == {k: -(-v // 8) for k, v in streams.items()}
    assert set(packed.data) == set(streams) | {"scale"} and packed.data["scale"].numel() == groups
    # (n·b - 1) bits per block of n, (r·b - 1) for the short block: below b bits per weight before scales
    assert packed.bits_per_weight < bits + 16 / g + 0.1
    assert float(((codec.decode(packed) - w) ** 2).mean()) < 0.2


def test_options_are_checked():
    with pytest.raises(ConfigError, match="group must be a multiple of n = 12"):
        parse_config("codec", {"dn": {"n": 12, "bits": 2, "group": 128}})
    with pytest.raises(ConfigError, match="dn.n"):
        parse_config("codec", {"dn": {"bits": 2}})
    with pytest.raises(ConfigError, match="n"):
        parse_config("codec", {"dn": {"n": 1, "bits": 2}})
    # d4 keeps its options and its id: no `n` there
    with pytest.raises(ConfigError, match="n"):
        parse_config("codec", {"d4": {"n": 8, "bits": 2}})
    assert parse_config("codec", {"d4": {"bits": 2}}).options() == {"bits": 2, "group": 128, "scale_search": True}


@pytest.mark.parametrize("act_order,gptaq", [(False, False), (True, False), (False, True)])
def test_gptq_with_a_short_last_block_equals_direct_obs(act_order, gptaq):
    """D12 on 64 columns: five 12-blocks and a 4-column block, one scale per row; GPTQ (lazy blocks,
    act_order keeping the short block last; GPTAQ's U form) equals the textbook OBS fixing each block at once."""
    from quantatlas.quant.solvers import gptq, rtn

    g = torch.Generator().manual_seed(7)
    X = torch.randn(2048, 64, generator=g, dtype=torch.float64) @ (
        torch.eye(64, dtype=torch.float64) + 0.4 * torch.randn(64, 64, generator=g, dtype=torch.float64))
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(24, 64, generator=g, dtype=torch.float64)
    codec = make_codec("dn", {"n": 12, "bits": 2, "group": None})
    C = 0.1 * torch.randn(64, 64, generator=g, dtype=torch.float64) @ H if gptaq else None
    W_hat, packed, info = gptq(W, H, codec, block_size=24, act_order=act_order, static_groups=act_order, H_cross=C)
    assert torch.equal(codec.decode(packed), W_hat)
    order = None
    if act_order:
        score = torch.diagonal(H)[:60].reshape(5, 12).sum(1)
        blocks = torch.argsort(score, descending=True, stable=True)
        order = torch.cat([(blocks[:, None] * 12 + torch.arange(12)).flatten(), torch.arange(60, 64)]).tolist()
    ref = direct_obs(W, H, codec, order=order, static=act_order, H_cross=C)
    torch.testing.assert_close(W_hat, ref, atol=1e-6, rtol=0)
    assert info["proxy_loss"] == pytest.approx(proxy(W_hat, W, H), rel=1e-6)
    if not gptaq:
        assert info["proxy_loss"] < 0.9 * proxy(rtn(W.float(), codec)[0], W, H)



def test_a_row_shorter_than_n_is_one_short_block():
    codec = make_codec("dn", {"n": 12, "bits": 2, "group": None})
    w = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    packed = codec.encode(w)
    assert packed.data["codes"].numel() == 0 and packed.data["tail_codes"].numel() == -(-3 * 5 * 2 // 8)
    assert torch.equal(codec.decode(packed), codec.fake_quantize(w))
