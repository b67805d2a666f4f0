"""Lattice codecs (issue 15, part 4): nearest points against brute force over candidate lists written
here, the E8P codebook's size and structure built independently, decode(pack(codes)) == quantize
values, stored bits, and the codecs inside GPTQ's block update."""
from __future__ import annotations

import pytest
import torch

from quantatlas.quant.codecs import make_codec


def _brute(y, cands):
    d = ((y[:, None, :] - cands[None, :, :]) ** 2).sum(-1)
    return d.min(1).values


def _e8_member(v):
    """v [N, 8] in E8: all coordinates integer or all half-integer, sum even."""
    two = 2 * v
    assert torch.equal(two, two.round())
    two = two.long()
    same = ((two & 1) == (two[:, :1] & 1)).all(1)
    return same & ((v.sum(1).round().long() % 2) == 0) & (v.sum(1) == v.sum(1).round())


def test_nearest_dn_and_e8_match_brute_force():
    from quantatlas.quant.codecs.lattice import nearest_dn, nearest_e8

    g = torch.Generator().manual_seed(0)
    y4 = 1.5 * torch.randn(300, 4, generator=g, dtype=torch.float64)
    ints = torch.cartesian_prod(*[torch.arange(-5, 6, dtype=torch.float64)] * 4)
    d4 = ints[ints.sum(1).remainder(2) == 0]
    got = nearest_dn(y4)
    assert (got.sum(1).remainder(2) == 0).all()
    assert torch.allclose(((y4 - got) ** 2).sum(1), _brute(y4, d4))

    y8 = 0.8 * torch.randn(150, 8, generator=g, dtype=torch.float64).clamp(-1, 1)
    ints = torch.cartesian_prod(*[torch.arange(-2, 3, dtype=torch.float64)] * 8)
    halves = torch.cartesian_prod(*[torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float64)] * 8)
    cands = torch.cat([ints, halves])
    cands = cands[cands.sum(1).remainder(2) == 0]
    got = nearest_e8(y8)
    assert _e8_member(got).all()
    assert torch.allclose(((y8 - got) ** 2).sum(1), _brute(y8, cands))


@pytest.mark.parametrize("bits", [2, 3])
def test_box_codebooks_are_exact_nearest_and_have_2_to_the_stored_bits_points(bits):
    from quantatlas.quant.codecs.lattice import d4_box, e8_box

    g = torch.Generator().manual_seed(bits)
    # e8 box: coordinates odd quarters in [-2^(b-1)+1/4, 2^(b-1)-1/4], v - 1/4 in E8
    half = 2 ** (bits - 1)
    if bits == 2:  # every point of E8 + 1/4 whose coordinates are odd quarters in [-7/4, 7/4]
        ints = torch.cartesian_prod(*[torch.arange(-2, 2, dtype=torch.float64)] * 8)
        halves = torch.cartesian_prod(*[torch.arange(-1.5, 1.6, dtype=torch.float64)] * 8)
        v = torch.cat([ints, halves])
        v = v[v.sum(1).remainder(2) == 0] + 0.25
        e8cb = v[(v.abs() <= 1.75).all(1)]
        assert _e8_member(e8cb - 0.25).all()
        assert e8cb.shape[0] == 2 ** (8 * bits)                           # 8b stored bits per 8 weights
        assert torch.equal(torch.sort(e8cb.sum(1)).values, torch.sort(-e8cb.sum(1)).values)  # symmetric
        y = 0.9 * torch.randn(200, 8, generator=g, dtype=torch.float64)
        v, _ = e8_box(y, bits)
        assert torch.allclose(((y - v) ** 2).sum(1), _brute(y, e8cb))
    # d4 box: z + 1/2, z in D4 with coordinates in [-2^(b-1), 2^(b-1)-1]
    ints = torch.cartesian_prod(*[torch.arange(-half, half, dtype=torch.float64)] * 4)
    d4cb = ints[ints.sum(1).remainder(2) == 0] + 0.5
    assert d4cb.shape[0] == 2 ** (4 * bits - 1)
    y = half * 0.6 * torch.randn(300, 4, generator=g, dtype=torch.float64)
    v, _ = d4_box(y, bits)
    assert torch.allclose(((y - v) ** 2).sum(1), _brute(y, d4cb))


def _independent_e8p_codebook():
    """QuIP#'s E8P built another way: every D8 + 1/2 point with norm² <= 10 (its absolute values
    give the 227 patterns) plus the 29 norm-12 patterns, all signs with even sum, ±1/4."""
    from quantatlas.quant.codecs.e8p import NORM12_HALVES

    halfint = torch.cartesian_prod(*[torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])] * 8)
    keep = ((halfint ** 2).sum(1) <= 10) & (halfint.sum(1).remainder(2) == 0)
    pats = torch.unique(halfint[keep].abs(), dim=0)
    assert pats.shape[0] == 227
    n12 = torch.tensor([[0.5 if i in h else 1.5 for i in range(8)] for h in NORM12_HALVES])
    assert ((n12 ** 2).sum(1) == 12).all() and torch.unique(n12, dim=0).shape[0] == 29
    pats = torch.cat([pats, n12])
    signs = torch.cartesian_prod(*[torch.tensor([1.0, -1.0])] * 8)
    pts = (pats[:, None, :] * signs[None, :, :]).reshape(-1, 8)
    pts = pts[pts.sum(1).remainder(2) == 0]
    return torch.cat([pts + 0.25, pts - 0.25])


def test_e8p_codebook_size_structure_and_exact_search():
    from quantatlas.quant.codecs.e8p import abs_patterns, e8p_decode, e8p_nearest

    assert abs_patterns().shape == (256, 8)
    grid = e8p_decode(torch.arange(2 ** 16))
    assert torch.unique(grid, dim=0).shape[0] == 2 ** 16                     # 16 bits, all distinct
    assert _e8_member((grid - 0.25).double()).all()                          # a subset of E8 + 1/4
    ref = _independent_e8p_codebook()
    assert ref.shape[0] == 2 ** 16
    a = torch.unique(torch.round(grid * 4).long(), dim=0)
    b = torch.unique(torch.round(ref * 4).long(), dim=0)
    assert torch.equal(a, b)                                                 # the same set of points
    g = torch.Generator().manual_seed(3)
    x = 1.03 * torch.randn(2000, 8, generator=g)
    v, codes = e8p_nearest(x)
    assert torch.equal(e8p_decode(codes), v)
    best = (2 * x @ grid.T - (grid ** 2).sum(1)).argmax(1)
    assert torch.allclose(((x - v) ** 2).sum(1), ((x - grid[best]) ** 2).sum(1), atol=1e-5)
    # QuIP#'s 2-bit figure on N(0, 1): about 0.089-0.091 at its load factor 1.03 (brute force here)
    mse = float(((x / 1.03 - grid[best] / 1.03) ** 2).mean())
    assert 0.085 < mse < 0.095


def test_e8p_residual_stages_match_brute_force():
    from quantatlas.quant.codecs.e8p import e81b_points, e8p_decode

    r = torch.tensor(e81b_points(), dtype=torch.float32)
    assert torch.unique(r, dim=0).shape[0] == 256
    assert _e8_member(r.double()).all() and int(((r ** 2).sum(1) <= 2).sum()) == 241
    grid = e8p_decode(torch.arange(2 ** 16))
    g = torch.Generator().manual_seed(4)
    w = torch.randn(4, 64, generator=g)
    for bits, second, rho in ((3, r, 2.04), (4, grid, 3.45)):
        codec = make_codec("e8p", {"bits": bits, "group": 64})
        p = codec.fit(w)
        q = codec.quantize(w, p)
        x = (w / p.scale[:, None]).reshape(-1, 8)
        c1 = grid[(2 * x @ grid.T - (grid ** 2).sum(1)).argmax(1)]
        res = (x - c1) * rho
        c2 = second[(2 * res @ second.T - (second ** 2).sum(1)).argmax(1)]
        want = ((c1 + c2 / rho).reshape(4, 64) * p.scale[:, None])
        assert torch.allclose(q.values, want, atol=1e-5)


CASES = [("d4", {"bits": 2, "group": 32}, 2 - 0.25 + 16 / 32), ("d4", {"bits": 3, "group": 32}, 3 - 0.25 + 16 / 32),
         ("e8", {"bits": 2, "group": 32}, 2 + 16 / 32), ("e8", {"bits": 4, "group": 64}, 4 + 16 / 64),
         ("e8p", {"bits": 2, "group": 64}, 2 + 16 / 64), ("e8p", {"bits": 3, "group": 64}, 3 + 16 / 64),
         ("e8p", {"bits": 4, "group": None}, 4 + 16 / 128), ("nestquant", {"bits": 2, "group": 64}, 2.25 + 16 / 64),
         ("nestquant", {"bits": 3, "betas": 1, "group": 64}, 3 + 16 / 64)]


@pytest.mark.parametrize("name,opts,bpw", CASES)
def test_decode_of_pack_is_the_quantized_values_and_bits_are_stored_bits(name, opts, bpw):
    codec = make_codec(name, opts)
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(5))
    g = codec.group_of(128)
    params, codes, values = [], [], []
    for c in range(0, 128, g):
        p = codec.fit(w[:, c:c + g])
        params.append(p)
        for j in range(0, g, codec.block_width):          # block by block, as GPTQ calls it
            q = codec.quantize(w[:, c + j:c + j + codec.block_width], p, j)
            codes.append(q.codes)
            values.append(q.values)
    packed = codec.pack(torch.cat(codes, 1), params)
    assert torch.equal(codec.decode(packed), torch.cat(values, 1))
    assert packed.bits_per_weight == pytest.approx(bpw)
    assert torch.equal(codec.fake_quantize(w), codec.decode(codec.encode(w)))
    assert float(((codec.decode(packed) - w) ** 2).mean()) < 0.2


def test_nestquant_voronoi_code_has_q8_points_in_e8():
    from quantatlas.quant.codecs.nestquant import NestQuant, NestQuantConfig
    from quantatlas.quant.codecs.lattice import nearest_e8

    codec = NestQuant(NestQuantConfig(bits=2, betas=1))
    u = torch.cartesian_prod(*[torch.arange(4, dtype=torch.float64)] * 8)
    reps = codec._represent(u)
    assert torch.unique(reps, dim=0).shape[0] == 4 ** 8
    assert _e8_member(reps).all()
    assert torch.equal(nearest_e8(reps / 4), torch.zeros_like(reps))      # inside 4·V(E8): the Voronoi code
    # a point well inside the region is coded without overload: value = beta * nearest E8 point
    y = 0.3 * torch.randn(1, 50, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    v, _ = codec._nearest(y)
    beta = codec.beta[0]
    assert torch.allclose(v.double(), beta * nearest_e8(y / beta), atol=1e-6)


def test_lattice_options_are_checked():
    from quantatlas.quant.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="group must be a multiple of the lattice dimension 8"):
        parse_config("codec", {"e8": {"bits": 2, "group": 20}})
    with pytest.raises(ConfigError, match="bits"):
        parse_config("codec", {"e8p": {"bits": 5}})
    with pytest.raises(ConfigError, match="betas"):
        parse_config("codec", {"nestquant": {"bits": 2, "betas": 3}})


@pytest.mark.parametrize("name,opts", [("d4", {"bits": 2, "group": 32}), ("e8", {"bits": 2, "group": 32}),
                                       ("e8p", {"bits": 2, "group": 32}), ("nestquant", {"bits": 2, "group": 32}),
                                       ("turbo", {"bits": 2, "group": 32})])
def test_vector_codecs_inside_gptq_block_update(name, opts):
    """GPTQ hands block_width columns at once and feeds the block error through the factor (LDLQ):
    decode(Packed) == Ŵ and the proxy loss beats the codec alone (RTN)."""
    from quantatlas.quant.solvers import gptq, rtn

    g = torch.Generator().manual_seed(7)
    X = torch.randn(2048, 64, generator=g) @ (torch.eye(64) + 0.4 * torch.randn(64, 64, generator=g))
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(24, 64, generator=g)
    codec = make_codec(name, opts)
    W_hat, packed, info = gptq(W, H, codec, block_size=32)
    assert torch.equal(codec.decode(packed), W_hat)

    def proxy(Q):
        D = Q - W
        return float(((D @ H) * D).sum())
    assert info["proxy_loss"] == pytest.approx(proxy(W_hat), rel=1e-4)
    assert info["proxy_loss"] < 0.9 * proxy(rtn(W, codec)[0])
