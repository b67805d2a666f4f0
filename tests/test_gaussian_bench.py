"""bench/gaussian_mse.py runs whole (issue 28 part 3): its list of runs comes from the codec registry, every
codec quantatlas registers is in it (a codec with a required option and no variant fails here, by name),
and every run of the list works on a tiny sample. Its rows without a sample: Zador's high-resolution estimate
(Panter–Dite at n = 1, D(R) as n grows, the Gaussian's ‖p‖_{n/(n+2)} against a numerical integral) and the
coded limits of 2^(R+1)-level codes (Max's 2-bit quantizer as the rate reaches log2 of the levels)."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from quantatlas.quant.config import CodecConfig, parse_config, registry

pytestmark = pytest.mark.usefixtures("one_thread")


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "gaussian_mse.py"
    spec = importlib.util.spec_from_file_location("gaussian_mse_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


BENCH = _bench()


def _own_codecs() -> dict:
    """quantatlas's codecs (tests register toys elsewhere)."""
    return {n: c for n, c in registry("codec").items() if c.__module__.startswith("quantatlas.")}


def test_every_registered_codec_is_in_the_bench_list():
    runs = BENCH.bench_runs()                       # raises naming any codec without the variant it needs
    for r in runs:                                  # every configuration is valid (the slow ones run below at L = 12)
        parse_config("codec", {r.codec: r.options})
    listed = {r.codec for r in runs}
    assert set(_own_codecs()) - set(BENCH.NOT_MATRIX_CODECS) == listed
    tcq = {(r.options["bits"], r.options["states"]) for r in runs if r.codec == "tcq" and "levels" not in r.options}
    assert tcq == {(b, s) for b in (1, 2, 3, 4) for s in (8, 32, 256)}
    assert {r.options["n"] for r in runs if r.codec == "dn"} >= {8, 12, 16}
    # rows are grouped by nominal bits: the option, else the format's digit, else the stored rate rounded down
    assert [BENCH.nominal_bits(n, o, r) for n, o, r in [("tcq", {"bits": 3}, 3.004), ("q4_1", {}, 5.0),
                                                        ("nvfp4", {}, 4.5), ("aqlm", {}, 2.07)]] == [3, 4, 4, 2]


def test_a_codec_with_a_required_option_and_no_variant_is_named():
    class NeedsWidth(CodecConfig):     # no `name`: not registered anywhere
        width: int
        bits: int

    with pytest.raises(ValueError, match=r"codec 'needs_width' has required options \['width'\]"):
        BENCH.bench_runs({"needs_width": NeedsWidth})
    BENCH.VARIANTS["needs_width"] = [{"width": 3}]
    try:
        runs = BENCH.bench_runs({"needs_width": NeedsWidth})
    finally:
        del BENCH.VARIANTS["needs_width"]
    assert [r.options for r in runs] == [{"bits": b, "width": 3} for b in BENCH.BITS]


@pytest.fixture
def small_hyb_table(monkeypatch):
    """QTIP's HYB table is a k-means of 2^17 Gaussian points (25 s in a fresh cache): fit on 2^12 here,
    and forget it afterwards, so no other test sees this table."""
    from quantatlas.quant.codecs import trellis

    monkeypatch.setattr(trellis, "HYB_SAMPLES", 1 << 12)
    trellis.hyb_table.cache_clear()
    trellis.codebook_values.cache_clear()
    yield
    trellis.hyb_table.cache_clear()
    trellis.codebook_values.cache_clear()


@pytest.mark.parametrize("name", sorted(set(_own_codecs()) - set(BENCH.NOT_MATRIX_CODECS)))
def test_every_run_of_the_list_works_on_a_tiny_sample(name, small_hyb_table):
    runs = BENCH.bench_runs({name: _own_codecs()[name]}, trellis_L=(12,))   # L = 16: the same codes, 16x the search
    assert runs
    w = torch.randn(4, 512, generator=torch.Generator().manual_seed(0))
    rows = BENCH.run_all(runs, {r.sample: w for r in runs}, log=lambda m: None)
    for row in rows:
        assert row["bits_per_weight"] > 0 and row["weights_per_second"] > 0 and row["weights_per_cpu_second"] > 0
        assert math.isfinite(row["mse"]) and row["mse"] < 1.0, row     # below the source's variance


def test_zador_estimate_panter_dite_and_its_large_n_limit():
    for R in (1, 2, 3, 4):                                   # n = 1: Panter–Dite, √3·π/2·2^(−2R)
        assert BENCH.zador_mse(1, R) == pytest.approx(math.sqrt(3) * math.pi / 2 * 2.0 ** (-2 * R), rel=1e-12)
    big = BENCH.zador_mse(10_000, 2) / 2.0 ** -4             # n → ∞: D(R) (from above, as O(log n / n))
    assert 1 < big < 1.001
    assert BENCH.zador_mse(100, 2) / 2.0 ** -4 > big         # monotone on the way
    # not a bound at 2 bits: at n = 1 it is above the real optimum, Max's 2-bit Lloyd–Max MSE 0.1175
    assert BENCH.zador_mse(1, 2) > 0.1175 * 1.4
    # G of the n-ball: 1/12 for the segment, 1/(4π) for the disc
    assert BENCH.ball_second_moment(1) == pytest.approx(1 / 12, rel=1e-12)
    assert BENCH.ball_second_moment(2) == pytest.approx(1 / (4 * math.pi), rel=1e-12)
    # and the 3-ball: E‖x‖² = 3/5 on the unit ball, V = 4π/3, so G = (1/3)·(3/5)·V^(−2/3)
    assert BENCH.ball_second_moment(3) == pytest.approx((1 / 5) * (4 * math.pi / 3) ** (-2 / 3), rel=1e-12)


@pytest.mark.parametrize("n", [2, 3, 8])
def test_zador_gaussian_norm_against_a_numerical_integral(n):
    """‖p‖_{n/(n+2)} of N(0, I_n), integrated radially (unit sphere's surface × ∫ r^(n−1) p(r)^a dr), and
    the ball volume from the surface, rebuild the estimate without the closed forms."""
    from scipy import integrate

    a, R = n / (n + 2), 2.0
    surface = 2 * math.pi ** (n / 2) / math.gamma(n / 2)
    radial = integrate.quad(lambda r: r ** (n - 1) * ((2 * math.pi) ** (-n / 2) * math.exp(-r * r / 2)) ** a,
                            0, math.inf, epsabs=0, epsrel=1e-12)[0]
    norm = (surface * radial) ** (1 / a)
    volume = surface / n
    assert BENCH.zador_mse(n, R) == pytest.approx((2 ** (n * R) * volume) ** (-2 / n) * norm / (n + 2), rel=1e-9)


def test_bound_rows_are_listed_and_ordered():
    rows = {(r["codec"], r["options"]["bits"]): r["mse"] for r in BENCH.bound_rows([1, 2, 3, 4])}
    for R in (1, 2, 3, 4):
        d = 2.0 ** (-2 * R)
        # constraints only add: D(R) < alphabet-constrained < uniform-use; lattice cells worse than balls
        assert d < rows["alphabet-constrained R(D)", R] < rows["uniform-use code limit", R]
        for name, n in (("E8", 8), ("Λ24", 24)):
            assert rows[f"{name} + ideal shaping", R] > rows[f"Zador sphere, n={n}", R] > d
    assert rows["Λ24 + ideal shaping", 2] == pytest.approx(0.07311, abs=1e-5)


def test_coded_limits_recomputed_and_max_lloyd_as_rate_reaches_log2_levels():
    from quantatlas.quant.lloyd_max import codebook

    constrained, uniform_use = BENCH.CODED_LIMITS[1]
    assert BENCH.coded_limit(codebook(2).levels, 1, False)[0] == pytest.approx(constrained, abs=2e-5)
    assert BENCH.coded_limit(codebook(2).levels, 1, True)[0] == pytest.approx(uniform_use, abs=2e-5)
    # the 2-bit uniform-use limit too (the 0.82 dB the bench's notes quote for 2-bit TCQ; ~1 CPU-s)
    assert BENCH.coded_limit(codebook(3).levels, 2, True)[0] == pytest.approx(BENCH.CODED_LIMITS[2][1], abs=2e-5)
    # words using 4 levels equally at a rate near log2 4 = 2: the channel becomes the nearest level, the
    # levels Lloyd–Max's: Max (1960), 2 bits: ±0.4528, ±1.510, MSE 0.1175
    D, levels = BENCH.coded_limit([-1.0, -0.3, 0.3, 1.0], 1.99, True)
    assert D == pytest.approx(0.1175, abs=2e-4)
    assert levels == pytest.approx([-1.510, -0.4528, 0.4528, 1.510], abs=2e-3)


def test_merge_keeps_the_rows_of_codecs_not_run(tmp_path, monkeypatch):
    import json

    out = tmp_path / "g.json"
    old = {"rows": 2, "cols": 24, "seed": 0, "results": [
        {"codec": "e8p", "options": {"bits": 2}, "sample": [2, 24], "mse": 0.1, "nominal_bits": 2},
        {"codec": "tcq", "options": {"bits": 2}, "sample": [2, 24], "mse": 0.2, "nominal_bits": 2},
        {"codec": "D(R) = 2^-2R", "options": {"bits": 2}, "mse": 0.0625, "nominal_bits": 2}]}
    out.write_text(json.dumps(old))
    args = type("A", (), {"rows": 2, "cols": 24, "seed": 0})()
    assert [r["codec"] for r in BENCH.kept_rows(out, {"tcq"}, args)] == ["e8p"]
    args.rows = 3
    with pytest.raises(SystemExit, match="rows/cols/seed"):
        BENCH.kept_rows(out, {"tcq"}, args)
    for bad in ("{not json", "[1, 2]", json.dumps({"rows": 2})):      # a file that is not this bench's JSON
        out.write_text(bad)
        with pytest.raises(SystemExit, match=r"--merge: .*g\.json is not a results JSON of this bench"):
            BENCH.kept_rows(out, {"tcq"}, args)
