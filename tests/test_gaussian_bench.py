"""bench/gaussian_mse.py runs whole (issue 28 part 3): its list of runs comes from the codec registry, every
codec quantatlas registers is in it (a codec with a required option and no variant fails here, by name),
and every run of the list works on a tiny sample."""
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
