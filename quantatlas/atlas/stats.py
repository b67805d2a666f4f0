"""The statistics behind a verdict: paired t-test across seeds, paired block bootstrap over
per-token KLD, Holm's step-down correction. numpy + scipy (`scipy.stats` for the t-test and its
interval; no torch).

All differences are "improvements": positive means the treatment is better than the control
(control - treatment when lower is better).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _stats():
    from scipy import stats   # imported when a verdict is computed, not by every ledger writer

    return stats


def t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    return float(_stats().t.sf(t, df))


def t_quantile(q: float, df: int) -> float:
    return float(_stats().t.ppf(q, df))


def normal_two_sided_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2.0))


def normal_quantile(q: float) -> float:
    return float(_stats().norm.ppf(q))


@dataclass
class PairedT:
    n: int
    mean: float        # mean improvement
    se: float          # its standard error, sd / sqrt(n) with the n-1 sd
    t: float
    p: float           # two-sided
    ci: tuple[float, float]


def paired_t(improvements: np.ndarray, alpha: float) -> PairedT:
    """Paired t-test of mean(improvements) = 0, i.e. of control vs treatment seed by seed,
    with the two-sided (1 - alpha) confidence interval of the mean improvement."""
    d = np.asarray(improvements, dtype=np.float64)
    n = d.size
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {n}")
    if np.all(d == d[0]):   # every seed moved by exactly the same amount: no seed noise at all
        mean = float(d[0])
        p = 1.0 if mean == 0.0 else 0.0
        return PairedT(n, mean, 0.0, math.copysign(math.inf, mean) if mean else 0.0, p, (mean, mean))
    res = _stats().ttest_1samp(d, 0.0)         # = ttest_rel(control, treatment) on the improvements
    ci = res.confidence_interval(confidence_level=1 - alpha)
    se = float(d.std(ddof=1)) / math.sqrt(n)
    return PairedT(n, float(d.mean()), se, float(res.statistic), float(res.pvalue), (float(ci.low), float(ci.high)))


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values (None entries are not tested and stay None).

    Sort the m tested p ascending; adjusted p_(i) = max over j <= i of min(1, (m - j + 1) p_(j)).
    Rejecting where adjusted p < alpha controls the family-wise error rate at alpha.
    """
    tested = [(p, i) for i, p in enumerate(p_values) if p is not None]
    m = len(tested)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(tested)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


@dataclass
class Bootstrap:
    n_tokens: int
    block: int
    n_boot: int
    mean: float            # observed mean per-token improvement
    se: float              # standard deviation of the bootstrap replicates of that mean
    z: float
    p: float               # two-sided, normal approximation with the bootstrap SE
    ci_relative: tuple[float, float] | None   # percentile CI of improvement / control mean


def block_bootstrap(control: np.ndarray, treatment: np.ndarray, block: int, alpha: float,
                    lower_is_better: bool = True, n_boot: int = 4000, seed: int = 0) -> Bootstrap:
    """Paired bootstrap over tokens: both arms were scored on the same tokens, so resample
    token *blocks* (an eval window's scored tokens, which share a context and are correlated)
    with replacement and recompute both means on the same resample.

    p comes from z = mean improvement / bootstrap SE (two-sided normal), which resolves small
    p-values that a count of B replicates cannot; the CI of the relative improvement is the
    percentile interval of the replicates. A fixed RNG seed keeps verdicts reproducible.
    """
    c = np.asarray(control, dtype=np.float64)
    t = np.asarray(treatment, dtype=np.float64)
    if c.shape != t.shape or c.ndim != 1:
        raise ValueError(f"paired bootstrap needs two 1-D arrays of one length, got {c.shape} and {t.shape}")
    n = c.size
    block = max(1, min(int(block), n))
    improvement = (c - t) if lower_is_better else (t - c)
    starts = np.arange(0, n, block)
    block_imp = np.add.reduceat(improvement, starts)       # sums per block (the last may be shorter)
    block_ctl = np.add.reduceat(c, starts)
    block_len = np.diff(np.append(starts, n)).astype(np.float64)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, starts.size, size=(n_boot, starts.size))
    count = block_len[pick].sum(axis=1)
    imp_star = block_imp[pick].sum(axis=1) / count
    ctl_star = block_ctl[pick].sum(axis=1) / count
    mean = float(improvement.mean())
    se = float(imp_star.std(ddof=1))
    if se == 0.0:
        z = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        p = 1.0 if mean == 0.0 else 0.0
    else:
        z = mean / se
        p = normal_two_sided_p(z)
    ci = None
    if np.all(np.abs(ctl_star) > 0):
        rel = imp_star / np.abs(ctl_star)
        lo, hi = np.quantile(rel, [alpha / 2, 1 - alpha / 2])
        ci = (float(lo), float(hi))
    return Bootstrap(n, block, n_boot, mean, se, z, p, ci)
