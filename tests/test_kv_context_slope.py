"""The context-slope summary against a least-squares fit written here."""
from __future__ import annotations

import json

import numpy as np
import pytest

from quantatlas.context_slope import context_slope, format_slope


def _doc(ctx, gaps, seeded=True):
    seeds_k, seeds_v = {}, {}
    for i, g in enumerate(gaps):
        seeds_k[str(i)] = {"kld_mean": 0.01 + g, "kld_se": 1e-4}
        seeds_v[str(i)] = {"kld_mean": 0.01, "kld_se": 1e-4}
        if not seeded and i:
            seeds_k[str(i)]["reused_from_seed"] = seeds_v[str(i)]["reused_from_seed"] = 0
    return {"title": "t", "spec": {"data": {"eval": {"ctx": ctx}}},
            "arms": {"k_int4": {"seeds": seeds_k}, "v_int4": {"seeds": seeds_v}}}


def test_slope_is_least_squares_over_seeds_and_ctx_with_an_interval():
    rng = np.random.default_rng(0)
    ctxs = [128, 256, 512]
    gaps = {c: list(0.001 + 2e-5 * c + rng.normal(0, 5e-4, 3)) for c in ctxs}
    s = context_slope([_doc(c, gaps[c]) for c in ctxs], "k_int4", "v_int4")
    x = np.repeat(ctxs, 3).astype(float)
    y = np.concatenate([gaps[c] for c in ctxs])
    b, a = np.polyfit(x, y, 1)
    assert s.slope == pytest.approx(b) and s.intercept == pytest.approx(a)
    resid = y - (a + b * x)
    se = np.sqrt(resid @ resid / (len(x) - 2) / ((x - x.mean()) ** 2).sum())
    assert s.basis == "scatter" and s.se == pytest.approx(se)
    assert s.low < b < s.high and s.low > 0                      # 2e-5 per token, well resolved
    assert "gap grows with context" in format_slope(s)


def test_deterministic_seeds_count_once_and_one_ctx_is_refused():
    s = context_slope([_doc(128, [0.001] * 3, seeded=False), _doc(512, [0.003] * 3, seeded=False)], "k_int4", "v_int4")
    assert len(s.points) == 2 and s.basis == "measurement"
    assert s.slope == pytest.approx(0.002 / 384)
    assert s.se == pytest.approx(np.sqrt(2 * 2e-8) / 384)    # two points, var 1e-8 + 1e-8 each, weights ±1/384
    with pytest.raises(ValueError, match="two or more ctx"):
        context_slope([_doc(128, [0.001])], "k_int4", "v_int4")
    with pytest.raises(ValueError, match="no arm 'x'"):
        context_slope([_doc(128, [0.001]), _doc(256, [0.001])], "x", "v_int4")


def test_cli_prints_the_table(tmp_path):
    from typer.testing import CliRunner

    from quantatlas.cli import app

    paths = []
    for c, g in ((128, 0.001), (256, 0.002), (512, 0.004)):
        p = tmp_path / f"r{c}.json"
        p.write_text(json.dumps(_doc(c, [g], seeded=False)))
        paths.append(str(p))
    out = CliRunner().invoke(app, ["context-slope", *paths])
    assert out.exit_code == 0, out.output
    assert "slope of (k_int4 − v_int4)" in out.output and "512" in out.output
    bad = CliRunner().invoke(app, ["context-slope", paths[0], "--arm", "nope"])
    assert bad.exit_code == 2 and "no arm 'nope'" in bad.output
