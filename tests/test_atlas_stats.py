"""The verdict statistics against independent computations: scipy's paired t-test, Holm's
sequential rejection procedure, a slow loop bootstrap, and analytic standard errors."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from quantatlas.atlas.stats import block_bootstrap, holm, normal_two_sided_p, paired_t, t_quantile, t_sf


def test_paired_t_matches_scipy_ttest_rel_and_t_interval():
    rng = np.random.default_rng(1)
    for n in (3, 5, 12):
        control = rng.normal(1.0, 0.1, n)
        treatment = control - 0.03 + rng.normal(0, 0.02, n)
        got = paired_t(control - treatment, alpha=0.05)
        ref = sps.ttest_rel(control, treatment)
        assert got.t == pytest.approx(ref.statistic, rel=1e-10)
        assert got.p == pytest.approx(ref.pvalue, rel=1e-8)
        d = control - treatment
        lo, hi = sps.t.interval(0.95, n - 1, loc=d.mean(), scale=sps.sem(d))
        assert got.ci == pytest.approx((lo, hi), rel=1e-8)


def test_t_distribution_helpers_match_scipy():
    for df in (1, 2, 7, 30):
        for t in (0.1, 1.5, 4.0):
            assert t_sf(t, df) == pytest.approx(sps.t.sf(t, df), rel=1e-10)
        assert t_quantile(0.995, df) == pytest.approx(sps.t.ppf(0.995, df), rel=1e-10)
    assert normal_two_sided_p(1.959963984540054) == pytest.approx(0.05, rel=1e-9)


def test_paired_t_with_no_seed_noise():
    exact = paired_t(np.array([0.2, 0.2, 0.2]), alpha=0.01)
    assert exact.p == 0.0 and exact.se == 0.0
    assert paired_t(np.zeros(4), alpha=0.01).p == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        paired_t(np.array([0.1]), alpha=0.01)


def _holm_procedure(p, alpha):
    """Holm (1979) as a procedure: reject the smallest while p_(k) <= alpha / (m - k)."""
    order = np.argsort(p, kind="stable")
    rejected = set()
    for k, i in enumerate(order):
        if p[i] < alpha / (len(p) - k):
            rejected.add(int(i))
        else:
            break
    return rejected


def test_holm_adjusted_p_values_agree_with_the_step_down_procedure():
    # worked example: sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 with a running max
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    rng = np.random.default_rng(0)
    for _ in range(200):
        m = int(rng.integers(1, 8))
        p = rng.uniform(0, 0.05, m) ** rng.uniform(0.5, 2)
        adjusted = holm(list(p))
        for alpha in (0.01, 0.05):
            assert {i for i, a in enumerate(adjusted) if a < alpha} == _holm_procedure(p, alpha)
    assert holm([None, 0.02, None]) == [None, 0.02, None]


def test_block_bootstrap_equals_a_slow_loop_over_the_same_resamples():
    rng = np.random.default_rng(3)
    n, block, boot = 1000, 64, 300          # 15 full blocks and one of 40 tokens
    c = rng.gamma(0.5, 0.02, n)
    t = c * 0.9 + rng.normal(0, 0.001, n)
    got = block_bootstrap(c, t, block, alpha=0.1, n_boot=boot, seed=11)
    blocks = [np.arange(s, min(s + block, n)) for s in range(0, n, block)]
    pick = np.random.default_rng(11).integers(0, len(blocks), size=(boot, len(blocks)))
    imp, rel = [], []
    for row in pick:
        idx = np.concatenate([blocks[b] for b in row])
        imp.append(np.mean(c[idx] - t[idx]))
        rel.append(np.mean(c[idx] - t[idx]) / np.mean(c[idx]))
    assert got.mean == pytest.approx(np.mean(c - t), rel=1e-12)
    assert got.se == pytest.approx(np.std(imp, ddof=1), rel=1e-9)
    assert got.ci_relative == pytest.approx(tuple(np.quantile(rel, [0.05, 0.95])), rel=1e-9)
    assert got.p == pytest.approx(math.erfc(abs(got.mean / got.se) / math.sqrt(2)), rel=1e-12)


def test_bootstrap_standard_error_matches_theory_for_iid_and_for_correlated_blocks():
    rng = np.random.default_rng(5)
    n = 40 * 100
    d = rng.normal(0, 1, n)
    iid = block_bootstrap(np.full(n, 10.0) + d, np.full(n, 10.0), block=1, alpha=0.05, n_boot=1000)
    assert iid.se == pytest.approx(d.std(ddof=1) / math.sqrt(n), rel=0.08)
    # every token in a window shares one offset: the honest SE is that of 40 window means,
    # ~10x the naive per-token SE; blocks of one window recover it
    shared = np.repeat(rng.normal(0, 1, 40), 100)
    wide = block_bootstrap(np.full(n, 10.0) + shared, np.full(n, 10.0), block=100, alpha=0.05)
    naive = block_bootstrap(np.full(n, 10.0) + shared, np.full(n, 10.0), block=1, alpha=0.05, n_boot=1000)
    assert wide.se == pytest.approx(shared[::100].std(ddof=1) / math.sqrt(40), rel=0.15)
    assert naive.se < wide.se / 5


def test_bootstrap_p_is_calibrated_under_the_null():
    """Two arms with the same distribution: about alpha of the tests reject."""
    rng = np.random.default_rng(7)
    p = []
    for _ in range(300):
        base = rng.gamma(0.5, 0.02, 64 * 32)
        a = base * rng.lognormal(0, 0.2, base.size)
        b = base * rng.lognormal(0, 0.2, base.size)
        p.append(block_bootstrap(a, b, 32, alpha=0.05, n_boot=400, seed=int(rng.integers(1 << 30))).p)
    rate = np.mean(np.array(p) < 0.05)
    assert 0.02 <= rate <= 0.09


def test_bootstrap_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same|one length"):
        block_bootstrap(np.ones(10), np.ones(9), 2, alpha=0.05)
