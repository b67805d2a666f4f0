"""GPTVQ and AQLM (issue 16): k-means and beam search against brute force on tiny cases, bits against a
hand count, decode(pack(codes)) == the values quantize returned, GPTQ/LDLQ and the AQLM solver."""
from __future__ import annotations

import itertools

import pytest
import torch

from quantatlas.context import RunContext
from quantatlas.quant.config import ConfigError, build, parse_config


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- k-means ------------------------------------------------------------------------------------
def _wsse(x, h, assign, k):
    """Weighted SSE of an assignment with each centroid coordinate at its h-weighted mean (the optimum)."""
    total = 0.0
    for c in range(k):
        m = assign == c
        if not m.any():
            continue
        mu = (h[m] * x[m]).sum(0) / h[m].sum(0)
        total += float((h[m] * (x[m] - mu) ** 2).sum())
    return total


def test_weighted_kmeans_reaches_the_brute_force_optimum_on_tiny_cases():
    from quantatlas.quant.codecs.gptvq import weighted_kmeans

    g = _gen(3)
    centers = torch.tensor([[0.0, 0.0], [3.0, 1.0], [-2.0, 4.0]])
    x = centers.repeat_interleave(torch.tensor([3, 3, 2]), 0) + 0.4 * torch.randn(8, 2, generator=g)
    h = torch.rand(8, 2, generator=g) + 0.2
    best = min(_wsse(x, h, torch.tensor(a), 3) for a in itertools.product(range(3), repeat=8))
    C, assign = weighted_kmeans(x, h, 3, 50, _gen(0))
    assert _wsse(x, h, assign, 3) == pytest.approx(best, rel=1e-5)
    # and its objective with its own centroids is that value
    got = float((h * (x - C[assign]) ** 2).sum())
    assert got == pytest.approx(best, rel=1e-5)


def test_weighted_kmeans_is_a_fixed_point_of_brute_force_steps():
    from quantatlas.quant.codecs.gptvq import weighted_kmeans

    g = _gen(1)
    x, h = torch.randn(40, 2, generator=g), torch.rand(40, 2, generator=g) + 0.1
    C, assign = weighted_kmeans(x, h, 4, 200, _gen(5))
    for i in range(40):  # each vector sits at its weighted-nearest centroid (checked one by one)
        d = [float((h[i] * (x[i] - C[c]) ** 2).sum()) for c in range(4)]
        assert d[int(assign[i])] == pytest.approx(min(d), abs=1e-6)
    for c in range(4):   # each centroid coordinate is the h-weighted mean of its members
        m = assign == c
        assert m.any()
        assert torch.allclose(C[c], (h[m] * x[m]).sum(0) / h[m].sum(0), atol=1e-5)


# ---- GPTVQ --------------------------------------------------------------------------------------
def _encode_by_steps(codec, w, importance=None):
    """fit/quantize per group (quantize in block_width tiles), pack; returns (values, packed)."""
    g = codec.group_of(w.shape[1])
    values, codes, params = [], [], []
    for c in range(0, w.shape[1], g):
        p = codec.fit(w[:, c:c + g], None if importance is None else importance[c:c + g])
        params.append(p)
        for j in range(0, g, codec.block_width):
            q = codec.quantize(w[:, c + j:c + j + codec.block_width], p, j)
            values.append(q.values)
            codes.append(q.codes)
    return torch.cat(values, 1), codec.pack(torch.cat(codes, 1), params)


@pytest.mark.parametrize("opts", [{"bits": 2, "dim": 1, "group": 32}, {"bits": 2, "dim": 2, "group": 32, "rows": 8},
                                  {"bits": 3, "dim": 4, "group": 16, "codebook_bits": 16, "iters": 5}])
def test_gptvq_decode_of_pack_is_what_quantize_returned(opts):
    codec = build("codec", {"gptvq": opts})
    w = torch.randn(20, 64, generator=_gen(2))
    imp = torch.rand(64, generator=_gen(3)) + 0.5
    values, packed = _encode_by_steps(codec, w, imp)
    assert torch.equal(codec.decode(packed), values)
    # the tile-by-tile values are the nearest stored centroids: no better codebook entry for any tile
    d = codec.dim
    p = codec.fit(w[:, :codec.group_size], imp[:codec.group_size])
    x = w[:, :d]
    blocks = codec._blocks(20)
    for bi, b in enumerate(blocks):
        C = p.centroids[bi]
        err = ((x[b, None, :] - C[None]) ** 2 * imp[:d]).sum(-1)
        got = ((x[b] - codec.quantize(x, p, 0).values[b]) ** 2 * imp[:d]).sum(-1)
        assert torch.allclose(got, err.min(1).values, atol=1e-5)


def test_gptvq_bits_against_a_hand_count():
    w = torch.randn(64, 128, generator=_gen(4))
    codec = build("codec", {"gptvq": {"bits": 2, "dim": 2, "group": 64, "rows": 32, "iters": 3}})
    packed = codec.encode(w)
    # indices: 64·128/2 vectors × 4 bits; codebooks: 2 column groups × 2 row blocks, 16 centroids × 2
    # int8 values + an fp16 scale each
    hand = 64 * 128 / 2 * 4 + 4 * (16 * 2 * 8 + 16)
    assert packed.nbytes * 8 == hand
    assert packed.bits_per_weight == pytest.approx(hand / (64 * 128)) == pytest.approx(2.1328125)
    fp16 = build("codec", {"gptvq": {"bits": 2, "dim": 2, "group": 64, "rows": 32, "codebook_bits": 16, "iters": 3}})
    assert fp16.encode(w).nbytes * 8 == 64 * 128 / 2 * 4 + 4 * 16 * 2 * 16
    # 12-bit indices (bits 3, dim 4) take two streams, still exactly 12 bits each
    wide = build("codec", {"gptvq": {"bits": 3, "dim": 4, "group": 128, "iters": 1}})
    pk = wide.encode(w)
    assert pk.nbytes * 8 == 64 * 128 / 4 * 12 + 4096 * 4 * 8 + 16


def test_gptvq_seed_and_config_errors():
    w = torch.randn(16, 32, generator=_gen(6))
    codec = build("codec", {"gptvq": {"bits": 2, "dim": 2, "group": 32}})
    run0 = codec.for_run(RunContext(0))
    assert torch.equal(codec.decode(codec.encode(w)), run0.decode(run0.encode(w)))
    a, b = codec.for_run(RunContext(1)).encode(w), codec.for_run(RunContext(2)).encode(w)
    assert not torch.equal(a.data["codebook"], b.data["codebook"])
    assert parse_config("codec", {"gptvq": {"bits": 2}}).seeded
    with pytest.raises(ConfigError, match=r"gptvq: bits · dim = 16 .* at most 12"):
        parse_config("codec", {"gptvq": {"bits": 4, "dim": 4}})
    with pytest.raises(ConfigError, match=r"gptvq\.dim: Input should be 1, 2 or 4"):
        parse_config("codec", {"gptvq": {"bits": 2, "dim": 3}})


def _hessian(cols, seed=0):
    g = _gen(seed)
    X = torch.randn(512, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    return 2 * X.T @ X / X.shape[0]


def _proxy(Q, W, H):
    D = Q - W
    return float(((D @ H) * D).sum())


def test_gptvq_inside_gptq_feeds_the_error_back():
    from quantatlas.quant.solvers import gptq, rtn

    H, W = _hessian(64), torch.randn(32, 64, generator=_gen(7))
    codec = build("codec", {"gptvq": {"bits": 2, "dim": 2, "group": 32}})
    W_hat, packed, info = gptq(W, H, codec)
    assert torch.equal(codec.decode(packed), W_hat)
    assert info["proxy_loss"] < _proxy(rtn(W, codec)[0], W, H)


# ---- AQLM ---------------------------------------------------------------------------------------
def _brute(t, h, C):
    M, K, _ = C.shape
    best = None
    for combo in itertools.product(range(K), repeat=M):
        v = sum(C[m, combo[m]] for m in range(M))
        e = (h * (t - v) ** 2).sum(-1)
        best = e if best is None else torch.minimum(best, e)
    return best


def _err(t, h, C, codes):
    v = sum(C[m][codes[:, m]] for m in range(C.shape[0]))
    return (h * (t - v) ** 2).sum(-1)


@pytest.mark.parametrize("M,K,beam", [(2, 4, 4), (3, 3, 9), (1, 8, 1)])
def test_beam_search_wide_enough_is_the_brute_force_optimum(M, K, beam):
    from quantatlas.quant.codecs.aqlm import beam_search

    g = _gen(8)
    t, h, C = torch.randn(30, 3, generator=g), torch.rand(30, 3, generator=g) + 0.1, torch.randn(M, K, 3, generator=g)
    codes = beam_search(t, h, C, beam=beam, passes=0)   # beam >= K^(M-1): the first sweep is exhaustive
    assert torch.allclose(_err(t, h, C, codes), _brute(t, h, C), atol=1e-5)


def test_beam_one_is_greedy_and_refinement_never_loses():
    from quantatlas.quant.codecs.aqlm import beam_search

    g = _gen(9)
    t, h, C = torch.randn(200, 4, generator=g), torch.rand(200, 4, generator=g), torch.randn(3, 8, 4, generator=g)
    greedy_codes = beam_search(t, h, C, beam=1, passes=0)
    # greedy by hand: each codebook in turn takes the entry nearest to what the earlier ones leave
    for i in range(0, 200, 37):
        r = t[i].clone()
        for m in range(3):
            e = [float((h[i] * (r - C[m, k]) ** 2).sum()) for k in range(8)]
            assert int(greedy_codes[i, m]) == min(range(8), key=e.__getitem__)
            r = r - C[m, int(greedy_codes[i, m])]
    greedy = _err(t, h, C, greedy_codes)
    refined = _err(t, h, C, beam_search(t, h, C, beam=1, passes=2))
    beam0 = _err(t, h, C, beam_search(t, h, C, beam=4, passes=0))
    beam1 = _err(t, h, C, beam_search(t, h, C, beam=4, passes=1))
    brute = _brute(t, h, C)
    assert (refined <= greedy + 1e-5).all() and (beam1 <= beam0 + 1e-5).all() and (brute <= beam1 + 1e-5).all()
    assert float(refined.sum()) < float(greedy.sum()) and float(beam1.sum()) < float(greedy.sum())


def test_aqlm_bits_against_a_hand_count_and_decode_of_pack():
    w = torch.randn(32, 64, generator=_gen(10))
    codec = build("codec", {"aqlm": {"codebooks": 2, "code_bits": 8, "iters": 2}})
    values, packed = _encode_by_steps(codec, w)
    assert torch.equal(codec.decode(packed), values)
    # codes: 32·64/8 vectors × 2 codes × 8 bits; codebooks 2 × 256 × 8 fp16; 32 fp16 row scales
    hand = 32 * 64 // 8 * 2 * 8 + 2 * 256 * 8 * 16 + 32 * 16
    assert packed.nbytes * 8 == hand
    assert packed.bits_per_weight == pytest.approx(2 + 2 * 256 * 8 * 16 / (32 * 64) + 16 / 64)
    int8 = build("codec", {"aqlm": {"codebooks": 2, "code_bits": 8, "codebook_bits": 8, "scales": False,
                                    "iters": 2}})
    assert int8.encode(w).nbytes * 8 == 32 * 64 // 8 * 2 * 8 + 2 * (256 * 8 * 8 + 16)
    wide = build("codec", {"aqlm": {"codebooks": 1, "code_bits": 10, "group": 4, "iters": 1, "beam": 1}})
    values, packed = _encode_by_steps(wide, w)
    assert torch.equal(wide.decode(packed), values)
    assert packed.nbytes * 8 == 32 * 64 // 4 * 10 + 1024 * 4 * 16 + 32 * 16


def test_aqlm_solver_lowers_the_output_error_and_stores_its_result():
    from quantatlas.quant.solvers import gptq
    from quantatlas.quant.solvers.aqlm import aqlm

    H, W = _hessian(64, 1), torch.randn(32, 64, generator=_gen(11))
    codec = build("codec", {"aqlm": {"codebooks": 2, "code_bits": 4, "iters": 3, "beam": 4}})
    _, _, ldlq = gptq(W, H, codec)
    W_hat, packed, info = aqlm(W, H, codec, rounds=1, adam_steps=30, lr=1e-2)
    assert torch.equal(codec.decode(packed), W_hat)
    assert info["proxy_loss"] == pytest.approx(_proxy(W_hat, W, H), rel=1e-4)
    assert info["proxy_loss"] < ldlq["proxy_loss"]
    with pytest.raises(ValueError, match="solver aqlm needs the codec aqlm, got 'uniform'"):
        aqlm(W, H, build("codec", {"uniform": {"bits": 2}}))


def test_vq_arms_run_end_to_end(tiny_reference):
    from quantatlas.runner import run_spec
    from quantatlas.spec import parse_spec

    spec = parse_spec({"title": "vq", "data": {"eval": {"tokens": 2048, "ctx": 128},
                                               "calib": {"samples": 4, "seq_len": 128}},
                       "control": "gptvq",
                       "arms": {"gptvq": {"solver": "gptq", "codec": {"gptvq": {"bits": 2, "dim": 2, "group": 64,
                                                                               "iters": 3}}},
                                "aqlm": {"solver": "aqlm", "solver_options": {"rounds": 1, "adam_steps": 5},
                                         "codec": {"aqlm": {"codebooks": 2, "code_bits": 3, "iters": 3,
                                                            "beam": 2, "passes": 0}}}}})
    assert spec.arms["aqlm"].seeded and spec.arms["gptvq"].seeded
    doc = run_spec(spec, ledger=False, loaded=tiny_reference, compress=False, log=lambda m: None)
    for arm in ("gptvq", "aqlm"):
        r = doc["arms"][arm]["seeds"]["0"]
        assert 0 < r["kld_mean"] < 10
    # per layer q [128, 64], k, v [64, 64], o [64, 128], gate, up [128, 64], down [64, 128]; 2 layers
    shapes = [(128, 64), (64, 64), (64, 64), (64, 128), (128, 64), (128, 64), (64, 128)] * 2
    n = sum(r * c for r, c in shapes)
    # gptvq: 2 index bits + one 16-centroid × 2 int8 codebook and its fp16 scale per 64 columns
    books = sum(c // 64 for _, c in shapes) * (16 * 2 * 8 + 16)
    assert doc["arms"]["gptvq"]["seeds"]["0"]["bits_per_weight"] == pytest.approx(2 + books / n)
    # aqlm: 2 codes of 3 bits per 8 weights, two 8 × 8 fp16 codebooks and an fp16 scale per row
    extra = sum(2 * 8 * 8 * 16 + 16 * r for r, _ in shapes)
    assert doc["arms"]["aqlm"]["seeds"]["0"]["bits_per_weight"] == pytest.approx(6 / 8 + extra / n)


def test_vq_configs_validate_without_torch():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from quantatlas.spec import parse_spec\n"
            "s = parse_spec({'title': 'x', 'arms': {'v': {'solver': 'gptq', 'codec': {'gptvq': {'bits': 2}}},"
            " 'a': {'solver': 'aqlm', 'solver_options': {'lr': 0.01},"
            " 'codec': {'aqlm': {'codebooks': 2, 'code_bits': 8}}}}})\n"
            "print(s.arms['v'].seeded, s.arms['a'].seeded)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]
