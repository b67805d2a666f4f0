"""Classic TCQ (codec `tcq`, issue 28 part 4): Ungerboeck's codes (free distance, written here),
the Viterbi path against a search over every path, exactly R stored bits per weight, decode(pack)
== quantize, the codec inside GPTQ/LDLQ, Marcellin & Fischer's uniform-source figure, the
trained levels (a fixed point of the training, never worse than the Lloyd-Max load on new samples),
and 2-D tiles (tile_rows × T/tile_rows, QTIP's 16 × 16) against their row-major paths built by hand."""
from __future__ import annotations

import heapq
import itertools
import math

import numpy as np
import pytest
import torch

from quantatlas.quant.codecs import make_codec
from quantatlas.quant.config import ConfigError, parse_config
from tile_blocks import hand_tile, quantize_block_by_block

pytestmark = pytest.mark.usefixtures("one_thread")

#: Ungerboeck 1987, Table I (amplitude modulation): ν -> (h1, h0) in octal, as printed there
PUBLISHED = {2: ("2", "5"), 3: ("04", "13"), 4: ("04", "23"), 5: ("10", "45"), 6: ("024", "103"),
             7: ("126", "235"), 8: ("362", "515")}
#: free squared distance of the code's paths, in units of the level spacing (subsets 4Z + k). Ungerboeck
#: lists 9, 10, 11, 13, 14, 16, 16: at ν = 8 its 16 is the parallel transitions' bound (two points per subset
#: in 8-AM, 4 apart); the trellis paths alone are 17 apart.
FREE_DISTANCE = {2: 9, 3: 10, 4: 11, 5: 13, 6: 14, 7: 16, 8: 17}


def _parity(x: int) -> int:
    return bin(x).count("1") & 1


def _step(state: int, u: int, h0: int, h1: int, nu: int) -> tuple[int, int]:
    """One shift-register step: (next state, subset 2·z1 + z0) with z = ⊕ h_i u_{t-i}."""
    window = (state << 1) | u
    return window & ((1 << nu) - 1), 2 * _parity(window & h0) + _parity(window & h1)


def _free_distance(nu: int, h0: int, h1: int) -> int:
    """Least Σ d² over error paths that leave state 0 and come back; the squared distance between
    subsets k, k' of the levels 4Z + k depends on k XOR k' only: 01, 11 -> 1, 10 -> 4 (a regular labelling)."""
    weight = {0: 0, 1: 1, 3: 1, 2: 4}
    first, w = _step(0, 1, h0, h1, nu)
    best, dist, heap = math.inf, {first: weight[w]}, [(weight[w], first)]
    while heap:
        d, s = heapq.heappop(heap)
        if d > dist[s] or d >= best:
            continue
        for u in (0, 1):
            t, k = _step(s, u, h0, h1, nu)
            if t == 0:
                best = min(best, d + weight[k])
            elif d + weight[k] < dist.get(t, math.inf):
                dist[t] = d + weight[k]
                heapq.heappush(heap, (d + weight[k], t))
    return best


def _gf2_gcd(a: int, b: int) -> int:
    while b:
        while a and a.bit_length() >= b.bit_length():
            a ^= b << (a.bit_length() - b.bit_length())
        a, b = b, a
    return a


def test_ungerboeck_codes_as_published_with_their_free_distance():
    from quantatlas.quant.codecs.tcq import UNGERBOECK

    assert UNGERBOECK == {nu: (int(h0, 8), int(h1, 8)) for nu, (h1, h0) in PUBLISHED.items()}
    for nu, (h0, h1) in UNGERBOECK.items():
        assert h0 & 1 and h0 >> nu == 1 and not h1 & 1 and h1 >> nu == 0   # Ungerboeck's form
        assert _gf2_gcd(h0, h1) == 1                                        # not catastrophic
        assert _free_distance(nu, h0, h1) == FREE_DISTANCE[nu]
    # and none better among all non-catastrophic codes of that form, for the small trellises
    for nu in (2, 3, 4):
        best = max(_free_distance(nu, h0, h1) for h0 in range(1 << nu | 1, 2 << nu, 2)
                   for h1 in range(2, 1 << nu, 2) if _gf2_gcd(h0, h1) == 1)
        assert best == FREE_DISTANCE[nu]


def _brute_force(x, levels, nu, R):
    """The least squared error over every path bit string and every level inside each step's subset,
    the subsets from the shift register written above (state 0 at the start)."""
    h0, h1 = (int(h, 8) for h in reversed(PUBLISHED[nu]))
    n = len(x)
    best = math.inf
    for u in itertools.product((0, 1), repeat=n):
        state, subsets = 0, []
        for b in u:
            state, k = _step(state, b, h0, h1, nu)
            subsets.append(k)
        # the level inside each subset is free: every combination, not just the nearest
        for inner in itertools.product(range(1 << (R - 1)), repeat=n):
            err = sum((x[t] - levels[4 * inner[t] + subsets[t]]) ** 2 for t in range(n))
            best = min(best, err)
    return best


@pytest.mark.parametrize("R,states,n,kind", [(2, 4, 6, "lloyd_max"), (2, 8, 6, "uniform"), (1, 16, 9, "lloyd_max"),
                                             (3, 4, 4, "uniform")])
def test_viterbi_equals_a_search_over_every_path(R, states, n, kind):
    from quantatlas.quant.codecs.tcq import unit_levels, viterbi

    nu = states.bit_length() - 1
    levels = torch.tensor(unit_levels(R, kind), dtype=torch.float32)
    x = 1.3 * torch.randn(3, n, generator=torch.Generator().manual_seed(R * 100 + states))
    symbols, cost = viterbi(x, levels, nu)
    codec = make_codec("tcq", {"bits": R, "states": states, "levels": kind, "T": n})
    values = codec.unit_values(symbols, 3)                         # the decoder's values of the symbols found (σ = 1)
    for b in range(3):
        brute = _brute_force(x[b].double().tolist(), levels.double().tolist(), nu, R)
        assert float(cost[b]) == pytest.approx(brute, rel=1e-5, abs=1e-6)
        assert float(((x[b] - values[b]) ** 2).sum()) == pytest.approx(brute, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("opts", [{"bits": 2, "states": 8, "T": 32}, {"bits": 3, "states": 256, "T": 16, "group": 32},
                                  {"bits": 1, "states": 4, "T": 64, "levels": "uniform"},
                                  {"bits": 4, "states": 32, "T": 32}])
def test_exactly_r_bits_per_weight_and_decode_of_pack_is_quantize(opts):
    codec = make_codec("tcq", opts)
    T, R = codec.T, opts["bits"]
    rows, cols = 6, 64
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3))
    g = codec.group_of(cols)
    params = [codec.fit(w[:, c:c + g]) for c in range(0, cols, g)]
    qs = [codec.quantize(w[:, c:c + T], params[c // g], c % g) for c in range(0, cols, T)]   # tile by tile, as GPTQ
    packed = codec.pack(torch.cat([q.codes for q in qs], 1), params)
    assert packed.data["codes"].numel() == math.ceil(rows * cols * R / 8)
    assert packed.nbytes == math.ceil(rows * cols * R / 8) + 2 * rows * (cols // g)
    assert packed.bits_per_weight == pytest.approx(R + 16 * (cols // g) / cols, abs=8 / (rows * cols))
    assert torch.equal(codec.decode(packed), torch.cat([q.values for q in qs], 1))
    assert torch.equal(codec.fake_quantize(w), codec.decode(codec.encode(w)))


def test_gaussian_mse_beats_scalar_lloyd_max():
    """i.i.d. N(0, 1): 8-state TCQ at 2 bits about 1.5 dB from D(R) = 2^-4, Lloyd-Max 2.74 dB."""
    w = torch.randn(32, 512, generator=torch.Generator().manual_seed(0))
    mse = {s: float((make_codec("tcq", {"bits": 2, "states": s}).fake_quantize(w) - w).pow(2).mean()) for s in (4, 64)}
    assert mse[64] < mse[4] < 0.0625 * 10 ** 0.17        # < 1.7 dB from D(R)
    assert 0.0625 * 10 ** 0.1 < mse[64]                   # not better than 1 dB from D(R) (fixed-rate TCQ)


def test_options_are_checked():
    with pytest.raises(ConfigError, match="power of two"):
        parse_config("codec", {"tcq": {"bits": 2, "states": 12}})
    with pytest.raises(ConfigError, match="tcq.states"):
        parse_config("codec", {"tcq": {"bits": 2, "states": 512}})
    with pytest.raises(ConfigError, match="multiple of the path length T = 256"):
        parse_config("codec", {"tcq": {"bits": 2, "group": 128}})
    with pytest.raises(ConfigError, match="tcq.bits"):
        parse_config("codec", {"tcq": {"bits": 8}})
    with pytest.raises(ValueError, match="whole paths of T = 16"):
        codec = make_codec("tcq", {"bits": 2, "T": 16})
        codec.quantize(torch.randn(2, 8), codec.fit(torch.randn(2, 32)), 0)


def test_tcq_inside_gptq_ldlq():
    from quantatlas.quant.solvers import gptq, rtn

    g = torch.Generator().manual_seed(1)
    X = torch.randn(1024, 64, generator=g) @ (torch.eye(64) + 0.3 * torch.randn(64, 64, generator=g))
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(16, 64, generator=g)
    codec = make_codec("tcq", {"bits": 2, "states": 16, "T": 16})
    W_hat, packed, info = gptq(W, H, codec, block_size=32)
    assert torch.equal(codec.decode(packed), W_hat)

    def proxy(Q):
        D = Q - W
        return float(((D @ H) * D).sum())
    assert info["proxy_loss"] == pytest.approx(proxy(W_hat), rel=1e-4)
    assert info["proxy_loss"] < 0.9 * proxy(rtn(W, codec)[0])


def test_uniform_source_within_published_gap_of_the_bound():
    """Marcellin & Fischer 1990 (abstract): for a memoryless uniform source TCQ comes within 0.21 dB of the
    distortion-rate bound at every integral rate. At R = 6, 2^(R+1) levels evenly spread over the support of a
    unit-variance uniform source, D(R) is its Shannon lower bound (12/(2πe))·2^(−2R) to far below 0.01 dB; one
    path of 4096 steps per row (a fixed start state costs ~0.07 dB at T = 256). 2^16 samples: the MSE's sampling
    error is ~0.02 dB (1σ), hence 0.26 dB. 4 states stay far off (granular gain ~0.97 dB of the 1.53)."""
    from quantatlas.quant.codecs.tcq import viterbi

    R = 6
    x = (2 * torch.rand(16, 4096, generator=torch.Generator().manual_seed(7), dtype=torch.float64) - 1) * math.sqrt(3)
    step = 2 * math.sqrt(3) / 2 ** (R + 1)
    levels = (-math.sqrt(3) + step * (torch.arange(2 ** (R + 1)) + 0.5)).float()
    slb = 12 / (2 * math.pi * math.e) * 2 ** (-2 * R)
    gap = {}
    for states in (4, 256):
        _, cost = viterbi(x.float(), levels, states.bit_length() - 1)
        gap[states] = 10 * math.log10(float(cost.double().sum()) / x.numel() / slb)
    assert 0 < gap[256] < 0.26
    assert gap[4] > 0.45


@pytest.mark.parametrize("bits,states", [(2, 8), (1, 32)])
def test_trained_levels_are_a_fixed_point_of_the_training(bits, states):
    """One more pass of the design (Viterbi on the training sample, each level to its centroid) from the
    tabulated levels moves none of them by more than 2e-3 (the table stopped when a pass gained < 1e-6)."""
    from quantatlas.quant.codecs.tcq import train_levels, unit_levels

    table = unit_levels(bits, "trained", states)
    again, history = train_levels(bits, states, start=table, max_iters=1)
    assert np.abs(again - table).max() < 2e-3
    assert len(history) == 1 and history[0] < 2.0 ** (-2 * bits) * 10 ** 0.2      # and the code is good


def test_trained_levels_beat_the_lloyd_max_load_on_new_samples():
    """On a sample the training never saw: trained levels are never worse than the Lloyd-Max load (beyond
    1e-3: at R = 1 with few states the load is already at the optimum, within sampling noise), and from
    R = 2 on at least 0.5 % better; the design converges from the Lloyd-Max levels, so at the training
    sample it is better by construction, and this checks that it is not a fit to that sample."""
    from quantatlas.quant.codecs.tcq import unit_levels, viterbi

    x = torch.randn(128, 256, generator=torch.Generator().manual_seed(1))
    for bits in (1, 2, 3, 4):
        for states in (8, 32, 256):
            mse = {}
            for kind in ("lloyd_max", "trained"):
                levels = torch.tensor(unit_levels(bits, kind, states), dtype=torch.float32)
                mse[kind] = float(viterbi(x, levels, states.bit_length() - 1)[1].double().sum()) / x.numel()
            assert mse["trained"] <= mse["lloyd_max"] * (1 + 1e-3), (bits, states, mse)
            if bits >= 2:
                assert mse["trained"] <= mse["lloyd_max"] * 0.995, (bits, states, mse)


def test_trained_codec_round_trip_and_its_limits():
    codec = make_codec("tcq", {"bits": 3, "states": 16, "levels": "trained", "T": 64})
    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(2))
    packed = codec.encode(w)
    assert torch.equal(codec.decode(packed), codec.fake_quantize(w))
    assert packed.bits_per_weight == pytest.approx(3 + 16 / 128)
    from quantatlas.quant.codecs.tcq_trained import TRAINED

    assert set(TRAINED) == {(b, 1 << nu) for b in (1, 2, 3, 4) for nu in range(2, 9)}
    assert all(len(v) == 2 ** (b + 1) and list(v) == sorted(v) for (b, _s), v in TRAINED.items())
    with pytest.raises(ConfigError, match="tabulated for bits 1-4"):
        parse_config("codec", {"tcq": {"bits": 5, "levels": "trained"}})
    assert "levels" not in parse_config("codec", {"tcq": {"bits": 2}}).options(exclude_defaults=True)


# ---- 2-D tiles (tile_rows × T/tile_rows, QTIP's 16 × 16) ------------------------------------------
@pytest.mark.parametrize("opts,shape", [
    ({"bits": 2, "states": 16, "T": 256, "tile_rows": 16}, (32, 32)),                             # QTIP's 16 × 16
    ({"bits": 2, "states": 256, "T": 256, "tile_rows": 16, "levels": "trained"}, (16, 48)),
    ({"bits": 3, "states": 8, "T": 64, "tile_rows": 4, "group": 32, "levels": "uniform"}, (8, 64)),  # 4 × 16, 2 groups
])
def test_each_tile_is_one_path_over_its_rows_read_row_major(opts, shape):
    from quantatlas.quant.codecs.tcq import level_indices, unit_levels, viterbi

    codec = make_codec("tcq", opts)
    rows, cols = shape
    tr, width = opts["tile_rows"], opts["T"] // opts["tile_rows"]
    assert codec.block_width == width
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(11))
    g = codec.group_of(cols)
    levels = torch.tensor(unit_levels(opts["bits"], opts.get("levels", "lloyd_max"), opts["states"]),
                          dtype=torch.float32)
    nu = opts["states"].bit_length() - 1
    for c in range(0, cols, g):
        p = codec.fit(w[:, c:c + g])
        q = codec.quantize(w[:, c:c + g], p, 0)
        assert q.codes.shape == (rows, g)
        for r0 in range(0, rows, tr):
            for c0 in range(0, g, width):
                x = hand_tile(w[:, c:c + g], p.scale, r0, c0, tr, width)
                want, _ = viterbi(x[None], levels, nu)                          # [1, T]: tr rows of width symbols
                assert q.codes[r0:r0 + tr, c0:c0 + width].flatten().tolist() == want[0].tolist(), (c, r0, c0)
                # and each weight's value is its symbol's level times its row's σ
                vals = levels[level_indices(want, opts["bits"], nu)[0]].reshape(tr, width) * p.scale[r0:r0 + tr, None]
                assert torch.equal(q.values[r0:r0 + tr, c0:c0 + width], vals)


@pytest.mark.parametrize("opts,shape", [
    ({"bits": 2, "states": 16, "T": 256, "tile_rows": 16}, (32, 32)),                              # square
    ({"bits": 2, "states": 16, "T": 256, "tile_rows": 16}, (48, 80)),                              # not square
    ({"bits": 3, "states": 32, "T": 64, "tile_rows": 4, "group": 32, "levels": "trained"}, (12, 64)),
    ({"bits": 1, "states": 4, "T": 32, "tile_rows": 16, "levels": "uniform"}, (16, 6)),           # 16 × 2 tiles
])
def test_2d_tiles_pack_exactly_r_bits_each_path_in_order_and_decode_the_quantized_values(opts, shape):
    from quantatlas.quant.codecs.base import unpack_bits
    from quantatlas.quant.codecs.tcq import level_indices, unit_levels

    codec = make_codec("tcq", opts)
    R, tr = opts["bits"], opts["tile_rows"]
    rows, cols = shape
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(4))
    g, params, codes, values = quantize_block_by_block(codec, w)                               # as GPTQ does
    bw = codec.block_width
    packed = codec.pack(codes, params)
    assert packed.data["codes"].numel() == math.ceil(rows * cols * R / 8)
    assert packed.nbytes == math.ceil(rows * cols * R / 8) + 2 * rows * (cols // g)
    assert packed.bits_per_weight == pytest.approx(R + 16 * (cols // g) / cols, abs=8 / (rows * cols))
    assert codec.bits_per_weight((rows, cols)) == packed.bits_per_weight
    assert torch.equal(codec.decode(packed), values)
    # the stream: tiles by row block, then column block, each tile's T symbols row-major (built here)
    stream = [int(codes[r, c]) for r0 in range(0, rows, tr) for c0 in range(0, cols, bw)
              for r in range(r0, r0 + tr) for c in range(c0, c0 + bw)]
    assert unpack_bits(packed.data["codes"], R, rows * cols).tolist() == stream
    # quantizing a whole group at once (RTN's encode) finds the same paths
    assert torch.equal(codec.decode(codec.encode(w)), values)
    assert torch.equal(codec.fake_quantize(w), values)
    # any symbols are a valid pack (every string is a path): each tile decodes as its own path from state 0,
    # the tile's symbols taken row-major here, each weight times its row's (and group's) σ
    rand = torch.randint(0, 1 << R, (rows, cols), generator=torch.Generator().manual_seed(5))
    decoded = codec.decode(codec.pack(rand, params))
    levels = torch.tensor(unit_levels(R, opts.get("levels", "lloyd_max"), opts["states"]), dtype=torch.float32)
    nu = opts["states"].bit_length() - 1
    for r0 in range(0, rows, tr):
        for c0 in range(0, cols, bw):
            path = torch.tensor([[int(rand[r, c]) for r in range(r0, r0 + tr) for c in range(c0, c0 + bw)]])
            sigma = torch.stack([params[c0 // g].scale[r0:r0 + tr]] * bw, 1)
            want = levels[level_indices(path, R, nu)[0]].reshape(tr, bw) * sigma.half().float()
            assert torch.equal(decoded[r0:r0 + tr, c0:c0 + bw], want), (r0, c0)


@pytest.mark.parametrize("opts", [{"bits": 2, "states": 8, "T": 32},
                                  {"bits": 3, "states": 64, "T": 16, "group": 32, "levels": "uniform"}])
def test_tile_rows_1_is_the_1xT_codec_and_keeps_its_ids(opts):
    from quantatlas.quant.codecs.base import pack_bits
    from quantatlas.quant.codecs.tcq import unit_levels, viterbi

    plain, one = make_codec("tcq", opts), make_codec("tcq", {**opts, "tile_rows": 1})
    rows, cols, T = 6, 64, opts["T"]
    assert one.block_width == plain.block_width == T
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(8))
    g = one.group_of(cols)
    p = one.fit(w[:, :g])
    got = one.quantize(w[:, :g], p, 0)
    # 1 × T tiles: T consecutive columns of one row, one path each, computed here directly
    x = (w[:, :g] * (torch.tensor(1.0) / p.scale)[:, None]).reshape(-1, T)
    levels = torch.tensor(unit_levels(opts["bits"], opts.get("levels", "lloyd_max"), opts["states"]),
                          dtype=torch.float32)
    want, _ = viterbi(x, levels, opts["states"].bit_length() - 1)
    assert torch.equal(got.codes, want.reshape(rows, g))
    assert torch.equal(got.codes, plain.quantize(w[:, :g], p, 0).codes)
    # stored in the matrix's row-major order, as before tiles
    packed = one.encode(w)
    codes = torch.cat([one.quantize(w[:, c:c + g], one.fit(w[:, c:c + g]), 0).codes for c in range(0, cols, g)], 1)
    assert torch.equal(packed.data["codes"], pack_bits(codes, opts["bits"]))
    assert plain.encode(w).to_bytes() == packed.to_bytes()
    # left out of the config, the pack's config and the id at its default; written out otherwise
    cfg = parse_config("codec", {"tcq": {**opts, "tile_rows": 1}})
    assert "tile_rows" not in cfg.to_spec()["tcq"]
    assert cfg.to_spec(exclude_defaults=True) == parse_config("codec", {"tcq": opts}).to_spec(exclude_defaults=True)
    assert "tile_rows" not in packed.config
    tiled = parse_config("codec", {"tcq": {**opts, "tile_rows": 2}})
    assert tiled.to_spec(exclude_defaults=True)["tcq"]["tile_rows"] == 2


def test_rows_that_do_not_fill_tiles_are_refused_before_any_search(monkeypatch):
    from quantatlas.quant.codecs import tcq
    from quantatlas.quant.solvers import gptq

    def no_search(*args, **kwargs):
        raise AssertionError("the Viterbi ran")

    monkeypatch.setattr(tcq, "viterbi", no_search)
    codec = make_codec("tcq", {"bits": 2, "states": 8, "T": 256, "tile_rows": 16})
    w = torch.randn(20, 32)
    with pytest.raises(ValueError, match=r"codec.tile_rows: tcq tiles of 16 rows × 16 columns .*multiple of 16; "
                                         r"got 20 rows"):
        codec.for_matrix(w)                # what encode, fake_quantize and GPTQ call first
    assert codec.for_matrix(torch.randn(32, 32)) is codec
    with pytest.raises(ValueError, match="codec.tile_rows: .*got 20 rows"):
        codec.encode(w)
    with pytest.raises(ValueError, match="codec.tile_rows: .*got 20 rows"):
        gptq(w, torch.eye(32), codec, block_size=32)
    with pytest.raises(ValueError, match="codec.tile_rows: .*got 20 rows"):
        codec.fake_quantize(w)
    with pytest.raises(ValueError, match="codec.tile_rows: .*got 20 rows"):
        codec.pack(torch.zeros(20, 32, dtype=torch.int64), [codec.fit(w)])
    with pytest.raises(ValueError, match="whole paths of 16 columns"):
        codec.quantize(torch.randn(16, 8), codec.fit(torch.randn(16, 8)), 0)


@pytest.mark.parametrize("opts,match", [
    ({"bits": 2, "tile_rows": 3}, "tile_rows = 3 must divide the path length T = 256"),
    ({"bits": 2, "tile_rows": 16, "group": 40}, "group = 40 must be a multiple of the tile width T / tile_rows = 16"),
    ({"bits": 2, "tile_rows": 0}, "greater than or equal to 1"),
])
def test_bad_tile_rows_name_the_problem(opts, match):
    with pytest.raises(ConfigError, match=match):
        parse_config("codec", {"tcq": opts})
    assert parse_config("codec", {"tcq": {"bits": 2, "tile_rows": 16, "group": 32}}) is not None

