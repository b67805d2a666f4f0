"""quantatlas.eval.kld against a slow, direct computation written here from the definitions
(KL as sum_i p_i (log p_i - log q_i) on numpy softmax probabilities; the summary statistics
as llama.cpp's kl_divergence() accumulates them: one-pass sums, its SE / covariance rules,
its float32 percentile index rule)."""
import math
import struct

import numpy as np
import pytest
import torch

from quantatlas.eval.kld import (DP_PERCENTILES, KLD_PERCENTILES, TokenMetrics, concat_metrics,
                                 format_kld_report, kld_statistics, token_metrics)


# -- the slow reference ---------------------------------------------------------------------------

def softmax_np(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_tokens(base_logits, q_logits, targets):
    """Per token, with Python loops over rows and numpy over the vocabulary."""
    kld, nll_b, nll_q, same = [], [], [], []
    for x, y, t in zip(base_logits, q_logits, targets):
        p, q = softmax_np(x), softmax_np(y)
        kl = 0.0
        for pi, qi in zip(p, q):
            if pi > 0:
                kl += pi * (math.log(pi) - math.log(qi))
        kld.append(kl)
        nll_b.append(-math.log(p[t]))
        nll_q.append(-math.log(q[t]))
        same.append(int(np.argmax(p)) == int(np.argmax(q)))
    return np.array(kld), np.array(nll_b), np.array(nll_q), np.array(same)


def f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def llama_percentile(values, fraction):
    v = sorted(values)
    if fraction <= 0:
        return v[0]
    if fraction >= 1:
        return v[-1]
    p = f32(f32(fraction) * f32(len(v) - 1))
    ip = int(p)
    p = f32(p - ip)
    return (1 - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)]


def llama_median(values):
    v = sorted(values)
    n = len(v)
    return 0.5 * (v[n // 2] + v[n // 2 - 1]) if n % 2 == 0 else v[n // 2]


def reference_stats(kld, nll_b, nll_q, same):
    """kl_divergence() of llama.cpp's perplexity.cpp, written from its sums."""
    n = len(kld)
    S = dict(nll=0.0, nll2=0.0, b=0.0, b2=0.0, nb=0.0, kld=0.0, kld2=0.0, dp=0.0, dp2=0.0, dp4=0.0, top=0)
    dps = []
    for k, b, a, s in zip(kld, nll_b, nll_q, same):
        S["nll"] += a; S["nll2"] += a * a
        S["b"] += b; S["b2"] += b * b
        S["nb"] += a * b
        S["kld"] += k; S["kld2"] += k * k
        d = math.exp(-a) - math.exp(-b)
        dps.append(d)
        S["dp"] += d; S["dp2"] += d * d; S["dp4"] += d ** 4
        S["top"] += int(s)

    def mu(s1, s2):
        f = s1 / n
        df = s2 / n - f * f
        return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)

    def cov(sa, sb, sab):
        return 0.0 if n < 10 else (sab / n - (sa / n) * (sb / n)) / (n - 1)

    r = {}
    lq, lq_se = mu(S["nll"], S["nll2"])
    lb, lb_se = mu(S["b"], S["b2"])
    c = cov(S["nll"], S["b"], S["nb"])
    r["ppl"], r["ppl_se"] = math.exp(lq), math.exp(lq) * lq_se
    r["ppl_base"], r["ppl_base_se"] = math.exp(lb), math.exp(lb) * lb_se
    r["ppl_cor"] = c / (lq_se * lb_se) if lq_se * lb_se > 0 else math.nan
    r["ln_ppl_ratio"] = lq - lb
    r["ln_ppl_ratio_se"] = math.sqrt(max(0.0, lq_se ** 2 + lb_se ** 2 - 2 * c))
    r["ppl_ratio"] = math.exp(lq - lb)
    r["ppl_ratio_se"] = r["ppl_ratio"] * r["ln_ppl_ratio_se"]
    r["ppl_diff"] = r["ppl"] - r["ppl_base"]
    r["ppl_diff_se"] = math.sqrt(max(0.0, r["ppl_se"] ** 2 + r["ppl_base_se"] ** 2
                                     - 2 * r["ppl"] * r["ppl_base"] * c))
    r["kld_mean"], r["kld_se"] = mu(S["kld"], S["kld2"])
    r["kld_max"], r["kld_min"], r["kld_median"] = max(kld), min(kld), llama_median(kld)
    r["kld_p999"], r["kld_p99"] = llama_percentile(kld, 0.999), llama_percentile(kld, 0.99)
    r["kld_p95"], r["kld_p90"] = llama_percentile(kld, 0.95), llama_percentile(kld, 0.90)
    r["kld_p10"], r["kld_p5"] = llama_percentile(kld, 0.10), llama_percentile(kld, 0.05)
    r["kld_p1"], r["kld_p01"] = llama_percentile(kld, 0.01), llama_percentile(kld, 0.001)
    r["dp_mean"], r["dp_se"] = mu(S["dp"], S["dp2"])
    r["dp_max"], r["dp_min"], r["dp_median"] = max(dps), min(dps), llama_median(dps)
    for pct in (99.9, 99, 95, 90, 75, 25, 10, 5, 1, 0.1):
        r["dp_p" + f"{pct:g}".replace(".", "")] = llama_percentile(dps, pct / 100)
    mse, mse_se = mu(S["dp2"], S["dp4"])
    r["rms_dp"] = math.sqrt(mse)
    r["rms_dp_se"] = 0.5 / r["rms_dp"] * mse_se if r["rms_dp"] > 0 else 0.0
    p = S["top"] / n
    r["same_top"], r["same_top_se"] = p, math.sqrt(p * (1 - p) / (n - 1))
    r["n_tokens"] = n
    return r


# -- cases -------------------------------------------------------------------------------------------

def make_case(kind, n, vocab, seed):
    rng = np.random.default_rng(seed)
    if kind == "heavy":
        x = 3.0 * rng.standard_t(2.5, size=(n, vocab))
    else:
        x = 2.0 * rng.standard_normal((n, vocab))
    if kind == "identical":
        y = x.copy()
    elif kind == "swap_top":
        # every row's top two logits exchanged: the argmaxes always differ
        y = x.copy()
        order = np.argsort(-x, axis=1)
        r = np.arange(n)
        y[r, order[:, 0]], y[r, order[:, 1]] = x[r, order[:, 1]], x[r, order[:, 0]]
    elif kind == "far":
        y = x + 1.5 * rng.standard_normal((n, vocab))
    else:  # close, heavy
        y = x + 0.2 * rng.standard_normal((n, vocab))
    targets = rng.integers(0, vocab, size=n)
    hit = rng.random(n) < 0.3  # some tokens are the reference's favourite, so Δp spreads both ways
    targets[hit] = x[hit].argmax(1)
    return x, y, targets


def run_module(x, y, t):
    base = torch.log_softmax(torch.from_numpy(x), dim=-1)
    return token_metrics(base, torch.from_numpy(y), torch.from_numpy(t))


STAT_KEYS = (["n_tokens", "ppl", "ppl_se", "ppl_base", "ppl_base_se", "ppl_cor", "ln_ppl_ratio",
              "ln_ppl_ratio_se", "ppl_ratio", "ppl_ratio_se", "ppl_diff", "ppl_diff_se", "kld_mean",
              "kld_se", "kld_max", "kld_min", "kld_median", "dp_mean", "dp_se", "dp_max", "dp_min",
              "dp_median", "rms_dp", "rms_dp_se", "same_top", "same_top_se"]
             + list(KLD_PERCENTILES) + list(DP_PERCENTILES))


@pytest.mark.parametrize("kind,n,vocab,seed", [
    ("close", 150, 64, 0),
    ("far", 37, 40, 1),
    ("heavy", 120, 96, 2),
    ("swap_top", 64, 32, 3),
    ("close", 2003, 24, 4),   # large n: every percentile falls between elements
    ("far", 11, 16, 5),       # smallest n with SEs
])
def test_matches_direct_computation(kind, n, vocab, seed):
    x, y, t = make_case(kind, n, vocab, seed)
    m = run_module(x, y, t)
    kld, nll_b, nll_q, same = reference_tokens(x, y, t)
    np.testing.assert_allclose(m.kld, kld, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(m.nll_base, nll_b, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(m.nll_q, nll_q, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(m.same_top, same)
    assert m.kld.dtype == np.float64 and m.same_top.dtype == bool
    np.testing.assert_allclose(m.dp, np.exp(-nll_q) - np.exp(-nll_b), atol=1e-14)

    got, want = kld_statistics(m), reference_stats(kld, nll_b, nll_q, same)
    assert set(STAT_KEYS) <= set(got)
    for key in STAT_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-7, abs=1e-12), key
    # Sanity on the reference itself: the statistics mean what they say.
    assert want["ppl"] == pytest.approx(math.exp(np.mean(nll_q)))
    assert want["kld_se"] == pytest.approx(np.std(kld, ddof=1) / math.sqrt(n))
    assert want["ppl_cor"] == pytest.approx(np.corrcoef(nll_q, nll_b)[0, 1])
    if kind == "swap_top":
        assert got["same_top"] == 0.0 and got["same_top_se"] == 0.0


def test_zero_probability_entries():
    # Masked vocabulary entries (logit -inf) in the reference contribute 0 * log 0 = 0, whether or
    # not the quantized model masks them too; a -inf in q where the reference has mass gives inf.
    x, y, t = make_case("close", 40, 30, 8)
    x[:, :4] = -np.inf
    y[::2, :4] = -np.inf
    t = np.maximum(t, 4)
    m = run_module(x, y, t)
    kld, nll_b, nll_q, same = reference_tokens(x, y, t)
    assert np.isfinite(m.kld).all()
    np.testing.assert_allclose(m.kld, kld, rtol=1e-9, atol=1e-13)
    np.testing.assert_array_equal(m.same_top, same)
    y2 = y.copy()
    y2[3, 10] = -np.inf
    assert run_module(x, y2, t).kld[3] == np.inf


def test_percentile_index_rule_is_llamas():
    # Values 0..n-1 make a percentile equal its fractional index, so this checks the float32 rule
    # itself; the spread-out values check the interpolation weight.
    from quantatlas.eval.kld import percentile
    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 10, 101, 1000, 2003, 65280, 16777217 // 64):
        ramp = np.arange(n, dtype=np.float64)
        vals = np.sort(rng.standard_exponential(n))
        for f in (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999):
            assert percentile(ramp, f) == pytest.approx(llama_percentile(ramp, f), rel=1e-15, abs=1e-15)
            assert percentile(vals, f) == pytest.approx(llama_percentile(vals, f), rel=1e-15, abs=1e-15)
            # and it is linear interpolation at (almost) numpy's position
            assert percentile(vals, f) == pytest.approx(np.percentile(vals, 100 * f), abs=1e-4 * vals[-1])
    assert percentile(np.array([1.0, 2.0]), 0.0) == 1.0 and percentile(np.array([1.0, 2.0]), 1.0) == 2.0
    # float32 fraction: 0.999f * 2002 is not 0.999 * 2002
    assert f32(f32(0.999) * 2002) != 0.999 * 2002
    assert percentile(np.arange(2003.0), 0.999) == f32(f32(0.999) * 2002)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_identical_models(dtype):
    x, _, t = make_case("close", 300, 50, 11)
    logits = torch.from_numpy(x).to(dtype)
    base = torch.log_softmax(logits, dim=-1)   # what the reference cache stores, in that dtype
    m = token_metrics(base, logits, torch.from_numpy(t))
    assert np.all(m.kld == 0.0)
    assert np.array_equal(m.nll_q, m.nll_base) and m.same_top.all()
    s = kld_statistics(m)
    for key in ["kld_mean", "kld_se", "kld_max", "kld_min", "kld_median", "ln_ppl_ratio", "ln_ppl_ratio_se",
                "ppl_diff", "ppl_diff_se", "dp_mean", "dp_se", "rms_dp", "rms_dp_se", "same_top_se",
                "ppl_ratio_se"] + list(KLD_PERCENTILES) + list(DP_PERCENTILES):
        assert s[key] == 0.0, key
    assert s["ppl_ratio"] == 1.0 and s["same_top"] == 1.0 and s["ppl"] == s["ppl_base"]
    assert s["ppl_cor"] == pytest.approx(1.0, abs=1e-12)


def test_float32_and_float64_inputs_agree():
    x, y, t = make_case("far", 200, 300, 12)
    m64 = run_module(x, y, t)
    x32, y32 = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    m32 = token_metrics(torch.log_softmax(x32, dim=-1), y32, torch.from_numpy(t))
    for f in ("kld", "nll_base", "nll_q"):
        np.testing.assert_allclose(getattr(m32, f), getattr(m64, f), rtol=0, atol=2e-6, err_msg=f)
    np.testing.assert_array_equal(m32.same_top, m64.same_top)
    s32, s64 = kld_statistics(m32), kld_statistics(m64)
    for key in ("kld_mean", "kld_p99", "ppl", "ln_ppl_ratio", "rms_dp", "same_top"):
        assert s32[key] == pytest.approx(s64[key], rel=2e-6, abs=2e-6), key


def test_row_blocks_and_concat(monkeypatch):
    import quantatlas.eval.kld as kld_module
    x, y, t = make_case("heavy", 97, 40, 13)
    whole = run_module(x, y, t)
    monkeypatch.setattr(kld_module, "_BLOCK_ELEMENTS", 40 * 7)   # 7 rows per block: ragged last block
    blocked = run_module(x, y, t)
    parts = concat_metrics([run_module(x[a:b], y[a:b], t[a:b]) for a, b in ((0, 30), (30, 31), (31, 97))])
    for other in (blocked, parts):
        for f in ("kld", "nll_base", "nll_q", "same_top"):
            np.testing.assert_array_equal(getattr(other, f), getattr(whole, f))
    assert kld_statistics(parts) == kld_statistics(whole)


def test_small_n_conventions():
    # llama.cpp: SEs are 0 for n <= 10 (mean_and_uncertainty), covariance 0 for n < 10.
    for n in (1, 2, 7, 10):
        x, y, t = make_case("far", n, 16, 20 + n)
        s = kld_statistics(run_module(x, y, t))
        kld, nll_b, nll_q, same = reference_tokens(x, y, t)
        assert s["n_tokens"] == n
        assert s["kld_mean"] == pytest.approx(np.mean(kld), rel=1e-12)
        assert s["ln_ppl_ratio"] == pytest.approx(np.mean(nll_q) - np.mean(nll_b), rel=1e-12, abs=1e-14)
        for key in ("kld_se", "ppl_se", "ppl_base_se", "dp_se", "rms_dp_se", "ln_ppl_ratio_se", "ppl_diff_se"):
            assert s[key] == 0.0, (n, key)
        assert math.isnan(s["ppl_cor"])
        assert s["kld_median"] == pytest.approx(np.median(kld), rel=1e-12)
        assert s["kld_max"] == kld.max() or s["kld_max"] == pytest.approx(kld.max(), rel=1e-9)
        if n > 1:
            p = same.mean()
            assert s["same_top_se"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
        assert "llama.cpp prints no summary below 100" in format_kld_report(s)


def test_report_lines():
    x, y, t = make_case("close", 150, 64, 0)
    s = kld_statistics(run_module(x, y, t))
    report = format_kld_report(s)
    lines = report.splitlines()
    expected = [
        "====== Perplexity statistics ======",
        "Mean PPL(Q)                   : %10.6f ± %10.6f" % (s["ppl"], s["ppl_se"]),
        "Mean PPL(base)                : %10.6f ± %10.6f" % (s["ppl_base"], s["ppl_base_se"]),
        "Cor(ln(PPL(Q)), ln(PPL(base))): %6.2f%%" % (100 * s["ppl_cor"]),
        "Mean ln(PPL(Q)/PPL(base))     : %10.6f ± %10.6f" % (s["ln_ppl_ratio"], s["ln_ppl_ratio_se"]),
        "Mean PPL(Q)/PPL(base)         : %10.6f ± %10.6f" % (s["ppl_ratio"], s["ppl_ratio_se"]),
        "Mean PPL(Q)-PPL(base)         : %10.6f ± %10.6f" % (s["ppl_diff"], s["ppl_diff_se"]),
        "====== KL divergence statistics ======",
        "Mean    KLD: %10.6f ± %10.6f" % (s["kld_mean"], s["kld_se"]),
        "Maximum KLD: %10.6f" % s["kld_max"],
        "99.9%%   KLD: %10.6f" % s["kld_p999"],
        "99.0%%   KLD: %10.6f" % s["kld_p99"],
        "Median  KLD: %10.6f" % s["kld_median"],
        " 0.1%%   KLD: %10.6f" % s["kld_p01"],
        "Minimum KLD: %10.6f" % s["kld_min"],
        "====== Token probability statistics ======",
        "Mean    Δp: %6.3f ± %5.3f %%" % (100 * s["dp_mean"], 100 * s["dp_se"]),
        "Maximum Δp: %6.3f%%" % (100 * s["dp_max"]),
        "75.0%%   Δp: %6.3f%%" % (100 * s["dp_p75"]),
        "Median  Δp: %6.3f%%" % (100 * s["dp_median"]),
        " 5.0%%   Δp: %6.3f%%" % (100 * s["dp_p5"]),
        "RMS Δp    : %6.3f ± %5.3f %%" % (100 * s["rms_dp"], 100 * s["rms_dp_se"]),
        "Same top p: %6.3f ± %5.3f %%" % (100 * s["same_top"], 100 * s["same_top_se"]),
    ]
    positions = [lines.index(e) for e in expected]   # each present as a whole line...
    assert positions == sorted(positions)              # ...in llama.cpp's order
    assert len([ln for ln in lines if "KLD: " in ln]) == 12
    assert len([ln for ln in lines if "Δp" in ln]) == 15
    assert "no summary" not in report


def test_bad_inputs():
    x, y, t = make_case("close", 8, 10, 30)
    base = torch.log_softmax(torch.from_numpy(x), -1)
    q, tt = torch.from_numpy(y), torch.from_numpy(t)
    with pytest.raises(ValueError, match="q_logits shape"):
        token_metrics(base, q[:, :5], tt)
    with pytest.raises(ValueError, match="targets"):
        token_metrics(base, q, tt[:3])
    with pytest.raises(ValueError, match="token id 10"):
        token_metrics(base, q, torch.full((8,), 10))
    with pytest.raises(ValueError, match="targets must be integer"):
        token_metrics(base, q, tt.double())
    with pytest.raises(ValueError, match="not a log-softmax"):
        token_metrics(torch.from_numpy(x), q, tt)   # raw logits instead of log-probs
    with pytest.raises(ValueError, match="base_logprobs must be"):
        token_metrics(base[0], q[0], tt[:1])
    with pytest.raises(ValueError, match="parts is empty"):
        concat_metrics([])
    with pytest.raises(ValueError, match="n_tokens = 0"):
        kld_statistics(token_metrics(base[:0], q[:0], tt[:0]))
    with pytest.raises(ValueError, match="TokenMetrics.nll_q"):
        TokenMetrics(np.zeros(3), np.zeros(3), np.zeros(2), np.zeros(3, bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    x, y, t = make_case("far", 64, 1000, 40)
    cpu = run_module(x, y, t)
    base = torch.log_softmax(torch.from_numpy(x), -1).cuda()
    gpu = token_metrics(base, torch.from_numpy(y).cuda(), torch.from_numpy(t).cuda())
    for f in ("kld", "nll_base", "nll_q"):
        np.testing.assert_allclose(getattr(gpu, f), getattr(cpu, f), rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(gpu.same_top, cpu.same_top)
