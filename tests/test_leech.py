"""The Leech lattice codec (issue 28, part 1): the Golay code, the shells' sizes, the index as a
bijection, the exact search against brute force and against a dynamic programme written here, and
the codec inside GPTQ with incoherence. The reference computations below know nothing of the
codec's vector types: they build points from the lattice's definition."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quantatlas.quant.codecs import make_codec
from quantatlas.quant.codecs.leech import LeechShells, golay_codewords, golay_generator, shell_types, type_sizes

pytestmark = pytest.mark.usefixtures("one_thread")

TWO_BIT = (0,) + tuple(16 * m for m in range(2, 14))      # the 2-bit codebook: origin, norm² 32 … 208
ANGULAR = tuple(16 * m for m in range(2, 12))               # 2 bits with 2 gain bits: norm² 32 … 176


def theta(m: int) -> int:
    """Leech vectors of norm 2m: (65520/691)(σ11(m) − τ(m)), τ from q·Π(1 − qⁿ)²⁴ (written out here)."""
    coeffs = [1] + [0] * m
    for n in range(1, m + 1):
        for _ in range(24):
            coeffs = [coeffs[i] - (coeffs[i - n] if i >= n else 0) for i in range(m + 1)]
    tau = coeffs[m - 1]
    sigma11 = sum(d ** 11 for d in range(1, m + 1) if m % d == 0)
    return 65520 * (sigma11 - tau) // 691


def in_leech(x: np.ndarray) -> np.ndarray:
    """Membership by the definition: one parity t, x ≡ t + 2c (mod 4) with c a Golay codeword, Σx ≡ 4t (mod 8)."""
    words = set((golay_codewords().astype(np.int64) << np.arange(24)).sum(1).tolist())
    t = x[:, 0] % 2
    same = (x % 2 == t[:, None]).all(1)
    c = ((x - t[:, None]) % 4) // 2
    word = (c << np.arange(24)).sum(1)
    return same & np.isin(word, list(words)) & (x.sum(1) % 8 == (4 * t) % 8)


def minimal_vectors() -> np.ndarray:
    """The 196 560 vectors of norm² 32, built from the octads as Conway–Sloane list them:
    (±2⁸ 0¹⁶) on an octad with an even number of minus signs, (∓3, ±1²³) with the upper signs on a
    codeword, (±4² 0²²)."""
    cw = golay_codewords().astype(np.int64)
    octads = cw[cw.sum(1) == 8]
    support = np.nonzero(octads)[1].reshape(-1, 8)
    signs = np.array([s for s in np.ndindex(*(2,) * 8) if sum(s) % 2 == 0])      # 1 = minus, even count
    a = np.zeros((len(octads), len(signs), 24), dtype=np.int64)
    np.put_along_axis(a, np.broadcast_to(support[:, None, :], (len(octads), len(signs), 8)),
                      (2 - 4 * signs)[None].repeat(len(octads), 0), axis=2)
    b = np.ones((4096, 24, 24), dtype=np.int64)
    b[:, np.arange(24), np.arange(24)] = -3
    b = b * (1 - 2 * cw)[:, None, :]
    c = []
    for i in range(24):
        for j in range(i + 1, 24):
            for si in (4, -4):
                for sj in (4, -4):
                    v = np.zeros(24, dtype=np.int64)
                    v[i], v[j] = si, sj
                    c.append(v)
    return np.concatenate([a.reshape(-1, 24), b.reshape(-1, 24), np.array(c)])


def test_the_code_is_the_extended_golay_code():
    G = golay_generator().astype(np.int64)
    assert ((G @ G.T) % 2 == 0).all()                               # self-orthogonal: self-dual at rank 12
    cw = golay_codewords()
    assert len({r.tobytes() for r in cw}) == 4096                    # rank 12
    weights, counts = np.unique(cw.sum(1), return_counts=True)
    assert weights.tolist() == [0, 8, 12, 16, 24] and counts.tolist() == [1, 759, 2576, 759, 1]
    # a self-dual doubly-even [24, 12, 8] code is the Golay code, so the lattice built on it is Λ24


def test_shell_sizes_are_the_theta_series():
    book = LeechShells(TWO_BIT)
    assert book.shell_sizes.tolist() == [1] + [theta(m) for m in range(2, 14)]
    assert book.shell_sizes[1:4].tolist() == [196560, 16773120, 398034000]       # Conway & Sloane, Table 4.14
    assert all(type_sizes(16 * m) == theta(m) for m in range(2, 14))          # the types cover every shell
    assert book.size <= 2 ** 48 and math.log2(book.size) > 47.99                 # one 48-bit index per 24 weights
    assert sum(len(e) + len(o) for e, o in (shell_types(16 * m) for m in range(2, 14))) == 383


def test_minimal_shell_index_is_a_bijection():
    book = LeechShells((32,))
    assert book.size == 759 * 128 + 24 * 4096 + 1104 == 196560
    points = book.point(torch.arange(book.size)).numpy()
    assert (book.index(torch.from_numpy(points)) == torch.arange(book.size)).all()   # encode∘decode = id
    expected = minimal_vectors()
    assert len(expected) == 196560 and in_leech(expected).all() and ((expected ** 2).sum(1) == 32).all()
    # the decoded points are exactly the minimal vectors, each once
    distinct = np.unique(points.astype(np.int8), axis=0)
    assert len(distinct) == 196560 and np.array_equal(distinct, np.unique(expected.astype(np.int8), axis=0))


def test_two_bit_index_round_trips_on_a_sample_and_the_edges():
    book = LeechShells(TWO_BIT)
    g = torch.Generator().manual_seed(0)
    starts = book.starts[torch.randint(0, len(book.starts), (300,), generator=g)]   # some cosets' first points
    shell_starts = torch.cumsum(book.shell_sizes, 0)                                # the shells' ends
    edges = torch.cat([starts, starts - 1, shell_starts, shell_starts - 1, torch.tensor([0])])
    idx = torch.cat([torch.randint(0, book.size, (5000,), generator=g), edges[(edges >= 0) & (edges < book.size)]])
    x = book.point(idx)
    assert (book.index(x) == idx).all()
    xn = x.numpy()
    assert in_leech(xn).all() and np.isin((xn ** 2).sum(1), TWO_BIT).all()
    assert len(np.unique(xn, axis=0)) == len(torch.unique(idx))                  # distinct indices, distinct points
    # indices follow the shells: every index below a shell's start has a smaller norm
    assert (torch.diff((x * x).sum(1)[idx.argsort()]) >= 0).all()


@pytest.mark.parametrize("angular", [False, True])
def test_search_equals_brute_force_over_the_minimal_shell(angular):
    norms = (32,) if angular else (0, 32)
    book = LeechShells(norms)
    pts = torch.from_numpy(minimal_vectors()).float()
    if not angular:
        pts = torch.cat([torch.zeros(1, 24), pts])
    g = torch.Generator().manual_seed(1)
    y = torch.randn(48, 24, generator=g) * torch.tensor([0.3, 1.0, 2.0, 5.0]).repeat(12)[:, None]
    x, score = book.nearest(y, angular=angular)
    sq = (pts * pts).sum(1)
    brute = (y @ pts.T / sq.sqrt()) if angular else (2 * y @ pts.T - sq)
    assert torch.allclose(score, brute.max(1).values, rtol=1e-5, atol=1e-4)
    xf = x.float()
    got = ((y * xf).sum(1) / xf.norm(dim=1)) if angular else (2 * (y * xf).sum(1) - (xf * xf).sum(1))
    assert torch.allclose(got, score, rtol=1e-5, atol=1e-4)                      # the point scores what it says


def coset_dp(y: np.ndarray, t: int, c: np.ndarray, nmax: int) -> np.ndarray:
    """max <x, y> over the points of coset (t, c) for every norm² n ≤ nmax (−inf where none): a dynamic
    programme over the coordinates with state (norm², sum mod 8), from the lattice's definition."""
    vmax = math.isqrt(nmax)
    best = np.full((nmax + 1, 8), -np.inf)
    best[0, 0] = 0.0
    for i in range(24):
        new = np.full_like(best, -np.inf)
        for v in range(-vmax, vmax + 1):
            if (v - t - 2 * int(c[i])) % 4:
                continue
            shifted = np.roll(best[:nmax + 1 - v * v], v % 8, axis=1) + v * y[i]
            np.maximum(new[v * v:], shifted, out=new[v * v:])
        best = new
    return best[:, (4 * t) % 8]


@pytest.mark.parametrize("angular,norms", [(False, TWO_BIT), (True, ANGULAR)])
def test_coset_scores_equal_a_dynamic_programme(angular, norms):
    """The type-based score of a coset (the best point of the chosen shells in it) against the DP."""
    book = LeechShells(norms)
    g = torch.Generator().manual_seed(2)
    y = torch.randn(24, 24, generator=g) * (1.0 if angular else 2.9)
    cosets = torch.randint(0, 8192, (24,), generator=g)
    cosets[:4] = torch.tensor([0, 4096, 4095, 8191])                            # c = 0 and c = 1 in both kinds
    score, _group, _type = book.exact(y, cosets, angular)
    cw = golay_codewords()
    shells = np.array([n for n in norms if n or not angular])
    for j in range(len(y)):
        t, msg = int(cosets[j]) // 4096, int(cosets[j]) % 4096
        dot = coset_dp(y[j].double().numpy(), t, cw[msg], max(norms))[shells]
        ref = dot / np.sqrt(shells) if angular else 2 * dot - shells
        assert score[j].item() == pytest.approx(ref.max(), rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("angular,norms,scale", [(False, TWO_BIT, 2.9), (True, ANGULAR, 1.0)])
def test_pruned_search_is_the_search_over_every_coset(angular, norms, scale):
    """The bounds leave out only cosets that cannot win: the same best as scoring all 8192 exactly."""
    book = LeechShells(norms)
    g = torch.Generator().manual_seed(3)
    y = torch.randn(8, 24, generator=g) * scale
    y[0] *= 3        # far outside the codebook's ball
    y[1] *= 0.05     # near the origin
    x, score = book.nearest(y, angular=angular)
    x_all, score_all = book.nearest(y, angular=angular, prune=False)
    assert torch.allclose(score, score_all, rtol=1e-6, atol=1e-5)
    assert in_leech(x.numpy()).all() and np.isin((x.numpy() ** 2).sum(1), norms).all()


@pytest.mark.parametrize("opts", [{"bits": 2, "group": 32}, {"bits": 2, "group": 32, "gain_bits": 2},
                                  {"bits": 2, "group": 48, "tile": "1x24"}, {"bits": 1, "group": None}])
def test_pack_decodes_to_the_quantized_values_and_bits_are_the_stored_bytes(opts):
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(4))
    codec = make_codec("leech", opts)
    packed = codec.encode(w)
    w_hat = codec.decode(packed)
    assert torch.equal(w_hat, codec.fake_quantize(w))                            # no second search
    assert torch.equal(packed.decode(), w_hat)
    tile_rows = 3 if opts.get("tile", "3x8") == "3x8" else 1
    tiles = -(-40 // tile_rows) * 96 // (24 // tile_rows)                       # rows padded to whole tiles
    groups = 96 // (opts["group"] or 96)
    assert packed.nbytes == tiles * 3 * opts["bits"] + 40 * groups * 2           # 24·bits-bit index, fp16 scales
    assert packed.bits_per_weight == 8 * packed.nbytes / (40 * 96)
    mse = float(((w_hat - w) ** 2).mean())
    assert mse < (0.09 if opts["bits"] == 2 else 0.33)


def test_load_sets_the_scale():
    w = torch.randn(6, 48, generator=torch.Generator().manual_seed(7))
    rms = w.pow(2).mean(1).sqrt()
    for opts, load in (({"bits": 2, "group": None}, 2.88), ({"bits": 2, "group": None, "load": 2.5}, 2.5),
                       ({"bits": 2, "group": None, "gain_bits": 2}, 1.0)):
        scale = make_codec("leech", opts).encode(w).data["scale"].float()[:, 0]
        assert torch.allclose(scale, (rms / load).half().float())


def test_two_bit_gaussian_mse_beats_e8p():
    w = torch.randn(12, 1536, generator=torch.Generator().manual_seed(5))
    leech = make_codec("leech", {"bits": 2, "group": None, "tile": "1x24"})
    e8p = make_codec("e8p", {"bits": 2, "group": None})
    mse = {name: float(((c.decode(c.encode(w)) - w) ** 2).mean()) for name, c in (("leech", leech), ("e8p", e8p))}
    assert mse["leech"] < 0.9 * mse["e8p"]


def test_inside_the_ball_the_error_is_the_leech_lattices_second_moment():
    """Where the ball does not truncate the lattice, the nearest point's error is the lattice's own: per
    coordinate G(Λ24)·V^(1/12), with G = 0.065771 (Conway & Sloane, table 2.3) and V = 8^12 the volume per
    point in these √8-scaled coordinates. A search that missed nearer points would err more. The inputs
    are N(0, κ²) blocks at the codec's load κ = 2.88 kept where ‖y‖² < 150 (the ball reaches 208, and the
    covering radius² is 16)."""
    y = torch.randn(6000, 24, generator=torch.Generator().manual_seed(11)) * 2.88
    y = y[(y ** 2).sum(1) < 150][:2000]
    x, _ = LeechShells(TWO_BIT).nearest(y)
    mse = float(((x.float() - y) ** 2).mean())
    assert mse == pytest.approx(0.065771 * 8, rel=0.03)


def test_inside_gptq_with_incoherence():
    from quantatlas.context import RunContext
    from quantatlas.quant.config import build
    from quantatlas.quant.incoherence import IncoherentPacked
    from quantatlas.quant.solvers import gptq

    g = torch.Generator().manual_seed(6)
    X = torch.randn(2048, 64, generator=g) @ (torch.eye(64) + 0.4 * torch.randn(64, 64, generator=g))
    X[:, :2] *= 6
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(40, 64, generator=g)
    codec = make_codec("leech", {"bits": 2, "group": 32})
    W_hat, packed, info = gptq(W, H, codec, block_size=32)                     # LDLQ over 8-column blocks
    assert torch.equal(codec.decode(packed), W_hat)

    def proxy(Q):
        D = (Q - W).double()
        return float(((D @ H.double()) * D).sum())
    assert info["proxy_loss"] < 0.9 * proxy(codec.fake_quantize(W))
    solver = build("solver", {"gptq": {"incoherence": True}}).for_run(RunContext(0))
    w1, p1 = solver.solve(W, {"hessian": H.clone()}, codec)
    assert isinstance(p1, IncoherentPacked) and torch.equal(p1.decode(), w1)
    assert proxy(w1) < proxy(codec.fake_quantize(W))


def test_options_are_checked():
    from quantatlas.quant.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="multiple of the tile's 24 columns"):
        parse_config("codec", {"leech": {"bits": 2, "tile": "1x24", "group": 128}})
    with pytest.raises(ConfigError, match="more than the 2\\^46"):
        parse_config("codec", {"leech": {"bits": 2, "gain_bits": 2, "shells": [192, 208]}})
    with pytest.raises(ConfigError, match="origin"):
        parse_config("codec", {"leech": {"bits": 2, "gain_bits": 1, "shells": [0, 32]}})
    with pytest.raises(ConfigError, match="shells"):
        parse_config("codec", {"leech": {"bits": 2, "shells": [40]}})
    with pytest.raises(ConfigError, match="bits"):
        parse_config("codec", {"leech": {"bits": 3}})
    with pytest.raises(ConfigError, match="bits"):
        parse_config("codec", {"leech": {}})
