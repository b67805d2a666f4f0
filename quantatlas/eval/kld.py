"""KLD-first statistics, defined as llama.cpp's `llama-perplexity --kl-divergence` defines them.

Which tokens are scored (the windowing lives in eval/windows.py): llama.cpp cuts the token
stream into non-overlapping chunks of n_ctx tokens (BOS replaces the first token when the
vocabulary adds one) and, in each chunk, uses the logits at positions first .. n_ctx-2 to
predict tokens first+1 .. n_ctx-1, with first = n_ctx/2: n_ctx - 1 - n_ctx/2 scored tokens
per chunk (255 at n_ctx=512), each with at least n_ctx/2 tokens of context.

Per scored token t (P = reference/base model, Q = quantized model, y = the actual next token):
    kld_t      = sum_i P_i (log P_i - log Q_i)            over the full vocabulary
    nll_base_t = -log P_y,  nll_q_t = -log Q_y
    dp_t       = Q_y - P_y                                 ("Δp")
    same_top_t = argmax P == argmax Q

Summary statistics over n tokens, as kl_divergence() in tools/perplexity/perplexity.cpp:
    mean ± SE     SE = sqrt(var_pop / (n-1)), var_pop = E[x^2] - E[x]^2, and SE = 0 when n <= 10
    cov(a, b)     = (E[ab] - E[a]E[b]) / (n-1), and 0 when n < 10
    PPL(Q)        = exp(mean nll_q) ± PPL(Q) * SE(nll_q); PPL(base) likewise
    cor           = cov(nll_q, nll_base) / (SE(nll_q) SE(nll_base))
    ln ratio      = mean nll_q - mean nll_base ± sqrt(SE_q^2 + SE_base^2 - 2 cov)
    PPL ratio     = exp(ln ratio) ± ratio * SE(ln ratio)
    PPL diff      = PPL(Q) - PPL(base) ± sqrt(PPL_se^2 + PPL_base_se^2 - 2 PPL PPL_base cov)
    KLD           mean ± SE; percentiles; median; max; min
    Δp            mean ± SE; percentiles; median; max; min
    RMS Δp        sqrt(E[dp^2]) ± 0.5 / RMS * SE(dp^2)
    same top      p = k/n ± sqrt(p (1-p) / (n-1))
Percentile f of the sorted values v: pos = f * (n-1) in float32 arithmetic (as llama.cpp does
it: `float p = fraction*(values.size()-1)`), i = floor(pos), w = pos - i (float32), value =
(1-w) v[i] + w v[min(i+1, n-1)]; f <= 0 gives v[0], f >= 1 gives v[n-1]. The median is the
middle element, or the mean of the two middle elements when n is even.

Deliberate differences from llama.cpp, all below its own rounding or where it prints nan:
- We keep the reference log-probs exactly (llama.cpp stores them as 16-bit codes over a
  16-nat range and skips vocabulary terms with log P <= -16 in the KL sum).
- Everything is float64 (q's log-softmax is taken in float32 first when the reference is
  float32, see _q_logprobs), and variances are computed from centred values (two-pass), which
  equals llama.cpp's one-pass E[x^2] - E[x]^2 up to rounding. The SEs of the ln ratio and of
  the PPL difference are computed as the SE of the per-token combination (nll_q - nll_base,
  PPL nll_q - PPL_base nll_base), which is the same quantity and cannot go negative, so
  identical models give exactly 0 where llama.cpp's sqrt(s^2 + s^2 - 2cov) may give nan.
- For n <= 10 every SE (ln ratio and PPL difference included) is 0 and cor is nan; llama.cpp
  mixes a zero SE with a non-zero covariance at exactly n == 10. RMS Δp's SE is 0 when
  RMS Δp is 0 (llama.cpp: 0/0), same top's SE is 0 when n < 2.
- llama.cpp prints the summary only when n >= 100; we compute it for any n >= 1 and
  format_kld_report says when n < 100.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Percentiles llama.cpp prints: key -> fraction. The key drops the decimal point of the
# percent value: p999 is 99.9%, p01 is 0.1%.
KLD_PERCENTILES = {"kld_p999": 0.999, "kld_p99": 0.990, "kld_p95": 0.950, "kld_p90": 0.900,
                   "kld_p10": 0.100, "kld_p5": 0.050, "kld_p1": 0.010, "kld_p01": 0.001}
DP_PERCENTILES = {"dp_p999": 0.999, "dp_p99": 0.990, "dp_p95": 0.950, "dp_p90": 0.900,
                  "dp_p75": 0.750, "dp_p25": 0.250, "dp_p10": 0.100, "dp_p5": 0.050,
                  "dp_p1": 0.010, "dp_p01": 0.001}

# Elements per [rows, V] float64 temporary in token_metrics (128 MiB): bounds memory at any vocabulary.
_BLOCK_ELEMENTS = 1 << 24


@dataclass
class TokenMetrics:
    """One entry per scored token (float64 / bool numpy arrays of equal length)."""
    kld: np.ndarray       # KL(P_base || P_q) over the full vocabulary, nats
    nll_base: np.ndarray  # -log P_base(correct token)
    nll_q: np.ndarray     # -log P_q(correct token)
    same_top: np.ndarray  # argmax P_base == argmax P_q

    def __post_init__(self):
        n = len(self.kld)
        for name in ("nll_base", "nll_q", "same_top"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"TokenMetrics.{name} has {len(getattr(self, name))} entries, kld has {n}")

    def __len__(self) -> int:
        return len(self.kld)

    @property
    def p_base(self) -> np.ndarray:
        return np.exp(-self.nll_base)

    @property
    def p_q(self) -> np.ndarray:
        return np.exp(-self.nll_q)

    @property
    def dp(self) -> np.ndarray:
        """Δp = P_q(correct) - P_base(correct)."""
        return self.p_q - self.p_base


def _check_inputs(base_logprobs: torch.Tensor, q_logits: torch.Tensor, targets: torch.Tensor) -> None:
    if base_logprobs.ndim != 2:
        raise ValueError(f"base_logprobs must be [N, V], got shape {tuple(base_logprobs.shape)}")
    if q_logits.shape != base_logprobs.shape:
        raise ValueError(f"q_logits shape {tuple(q_logits.shape)} differs from base_logprobs shape "
                         f"{tuple(base_logprobs.shape)}")
    if targets.shape != (base_logprobs.shape[0],):
        raise ValueError(f"targets must be [N] = [{base_logprobs.shape[0]}], got shape {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if not base_logprobs.dtype.is_floating_point or not q_logits.dtype.is_floating_point:
        raise ValueError(f"base_logprobs and q_logits must be floating point, got {base_logprobs.dtype} "
                         f"and {q_logits.dtype}")
    if targets.numel():
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= base_logprobs.shape[1]:
            bad = lo if lo < 0 else hi
            raise ValueError(f"targets contain token id {bad}, outside the vocabulary [0, {base_logprobs.shape[1]})")


def _q_logprobs(q_logits: torch.Tensor, base_dtype: torch.dtype) -> torch.Tensor:
    """log_softmax of the quantized logits, as float64.

    Taken in float64 when the reference is float64, else in float32 (how eval/windows.py builds
    the reference cache), so an unquantized model scored against its own cache gives KLD 0.0
    exactly, not rounding noise. The reference carries that float32 rounding anyway.
    """
    if base_dtype == torch.float64:
        return torch.log_softmax(q_logits.double(), dim=-1)
    return torch.log_softmax(q_logits.float(), dim=-1).double()


@torch.no_grad()
def token_metrics(base_logprobs: torch.Tensor, q_logits: torch.Tensor, targets: torch.Tensor) -> TokenMetrics:
    """Per-token KLD, NLLs and top-token agreement.

    base_logprobs [N, V]: log-softmax of the reference model (normalised); q_logits [N, V]: raw
    logits of the quantized model; targets [N]: the token each row predicts. Runs on the tensors'
    device in float64, in row blocks so that memory stays bounded for large vocabularies.
    """
    _check_inputs(base_logprobs, q_logits, targets)
    n, vocab = base_logprobs.shape
    q_logits = q_logits.to(base_logprobs.device)
    targets = targets.to(base_logprobs.device, torch.long)
    tol = 1e-3 if base_logprobs.dtype in (torch.float32, torch.float64) else 5e-2
    rows = max(1, _BLOCK_ELEMENTS // max(vocab, 1))
    kld, nll_base, nll_q, same_top = [], [], [], []
    for r0 in range(0, n, rows):
        base_block = base_logprobs[r0:r0 + rows]
        base = base_block.double()
        p = base.exp()
        # The reference must be normalised, sum_i P_i = 1; written so that NaN fails the check too.
        log_mass = p.sum(-1).log()
        if not bool((log_mass.abs() <= tol).all()):
            i = int(torch.nonzero(~(log_mass.abs() <= tol))[0, 0])
            raise ValueError(f"base_logprobs row {r0 + i} is not a log-softmax: logsumexp = {float(log_mass[i]):.6g} "
                             f"(expected 0); pass log_softmax of the reference logits")
        q = _q_logprobs(q_logits[r0:r0 + rows], base_block.dtype)
        t = targets[r0:r0 + rows, None]
        terms = (base - q).mul_(p)
        row_kld = terms.sum(-1)
        nan_rows = torch.nonzero(row_kld.isnan())[:, 0]
        if nan_rows.numel():
            # 0 * log 0 = 0: entries where the reference has P_i = 0 (log P_i = -inf) add nothing.
            # Rare, so fixed up row by row rather than masking every block; NaN from q stays NaN.
            fixed = terms[nan_rows].masked_fill_(p[nan_rows] == 0, 0.0).sum(-1)
            row_kld = row_kld.index_put((nan_rows,), fixed)
        kld.append(row_kld)
        nll_base.append(-base.gather(1, t)[:, 0])
        nll_q.append(-q.gather(1, t)[:, 0])
        same_top.append(base_block.argmax(-1) == q.argmax(-1))

    def out(parts, dtype):
        if not parts:
            return np.zeros(0, dtype=dtype)
        return torch.cat(parts).cpu().numpy().astype(dtype, copy=False)

    return TokenMetrics(out(kld, np.float64), out(nll_base, np.float64), out(nll_q, np.float64),
                        out(same_top, bool))


def concat_metrics(parts: list[TokenMetrics]) -> TokenMetrics:
    """Join per-chunk metrics in order."""
    if not parts:
        raise ValueError("concat_metrics: parts is empty")
    return TokenMetrics(*(np.concatenate([getattr(p, f) for p in parts])
                          for f in ("kld", "nll_base", "nll_q", "same_top")))


# -- llama.cpp's estimators ---------------------------------------------------------------------

def _var_pop(x: np.ndarray) -> float:
    return float(np.mean((x - x.mean()) ** 2))


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    """mean, and SE = sqrt(var_pop/(n-1)), 0 for n <= 10 (llama.cpp's mean_and_uncertainty)."""
    n = len(x)
    var = _var_pop(x)
    return float(x.mean()), (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def _cov(a: np.ndarray, b: np.ndarray) -> float:
    """cov_pop(a, b)/(n-1), 0 for n < 10 (llama.cpp's covariance)."""
    n = len(a)
    return float(np.mean((a - a.mean()) * (b - b.mean()))) / (n - 1) if n >= 10 else 0.0


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's percentile of ascending values (see the module docstring for the index rule)."""
    n = len(sorted_values)
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    pos = np.float32(fraction) * np.float32(n - 1)       # float32 product, as in llama.cpp
    i = int(pos)
    w = float(pos - np.float32(i))
    return (1.0 - w) * float(sorted_values[i]) + w * float(sorted_values[min(i + 1, n - 1)])


def _median(sorted_values: np.ndarray) -> float:
    n = len(sorted_values)
    if n % 2 == 0:
        return 0.5 * (float(sorted_values[n // 2]) + float(sorted_values[n // 2 - 1]))
    return float(sorted_values[n // 2])


def kld_statistics(m: TokenMetrics) -> dict[str, float]:
    """Every statistic llama.cpp prints in --kl-divergence mode, as fractions (not percent)."""
    n = len(m)
    if n < 1:
        raise ValueError("kld_statistics: TokenMetrics has no tokens (n_tokens = 0)")
    a = np.asarray(m.nll_q, dtype=np.float64)
    b = np.asarray(m.nll_base, dtype=np.float64)
    kld = np.asarray(m.kld, dtype=np.float64)
    dp = np.exp(-a) - np.exp(-b)
    s: dict[str, float] = {"n_tokens": n}

    ln_q, se_q = _mean_se(a)
    ln_base, se_base = _mean_se(b)
    cov = _cov(a, b)
    ppl, ppl_base = math.exp(ln_q), math.exp(ln_base)
    s.update(ppl=ppl, ppl_se=ppl * se_q, ppl_base=ppl_base, ppl_base_se=ppl_base * se_base)
    if se_q > 0 and se_base > 0:
        s["ppl_cor"] = min(1.0, max(-1.0, cov / (se_q * se_base)))
    else:
        s["ppl_cor"] = math.nan

    def combination_se(x: np.ndarray) -> float:
        # sqrt(SE_a^2 + SE_b^2 - 2 cov) in llama.cpp = the SE of the per-token combination.
        return math.sqrt(_var_pop(x) / (n - 1)) if n > 10 else 0.0

    ln_ratio = ln_q - ln_base
    ln_ratio_se = combination_se(a - b)
    ratio = math.exp(ln_ratio)
    s.update(ln_ppl_ratio=ln_ratio, ln_ppl_ratio_se=ln_ratio_se, ppl_ratio=ratio, ppl_ratio_se=ratio * ln_ratio_se,
             ppl_diff=ppl - ppl_base, ppl_diff_se=combination_se(ppl * a - ppl_base * b))

    s["kld_mean"], s["kld_se"] = _mean_se(kld)
    kld_sorted = np.sort(kld)
    s["kld_max"], s["kld_min"] = float(kld_sorted[-1]), float(kld_sorted[0])
    s["kld_median"] = _median(kld_sorted)
    for key, f in KLD_PERCENTILES.items():
        s[key] = percentile(kld_sorted, f)

    s["dp_mean"], s["dp_se"] = _mean_se(dp)
    dp_sorted = np.sort(dp)
    s["dp_max"], s["dp_min"] = float(dp_sorted[-1]), float(dp_sorted[0])
    s["dp_median"] = _median(dp_sorted)
    for key, f in DP_PERCENTILES.items():
        s[key] = percentile(dp_sorted, f)
    mse, mse_se = _mean_se(dp * dp)
    s["rms_dp"] = math.sqrt(mse)
    s["rms_dp_se"] = 0.5 / s["rms_dp"] * mse_se if s["rms_dp"] > 0 else 0.0

    same = float(np.count_nonzero(m.same_top)) / n
    s["same_top"] = same
    s["same_top_se"] = math.sqrt(same * (1.0 - same) / (n - 1)) if n > 1 else 0.0
    return s


def format_kld_report(stats: dict) -> str:
    """The three summary blocks llama.cpp prints, with its number formats (percent where it prints %)."""
    s = stats
    pct = lambda f: f"{100 * f:4.1f}%"  # noqa: E731  "99.9%", " 1.0%"
    lines = []
    if s["n_tokens"] < 100:
        lines += [f"note: only {s['n_tokens']} tokens; llama.cpp prints no summary below 100", ""]
    lines += [
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {s['ppl']:10.6f} ± {s['ppl_se']:10.6f}",
        f"Mean PPL(base)                : {s['ppl_base']:10.6f} ± {s['ppl_base_se']:10.6f}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s['ppl_cor']:6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {s['ln_ppl_ratio']:10.6f} ± {s['ln_ppl_ratio_se']:10.6f}",
        f"Mean PPL(Q)/PPL(base)         : {s['ppl_ratio']:10.6f} ± {s['ppl_ratio_se']:10.6f}",
        f"Mean PPL(Q)-PPL(base)         : {s['ppl_diff']:10.6f} ± {s['ppl_diff_se']:10.6f}",
        "",
        "====== KL divergence statistics ======",
        f"Mean    KLD: {s['kld_mean']:10.6f} ± {s['kld_se']:10.6f}",
        f"Maximum KLD: {s['kld_max']:10.6f}",
    ]
    kld_rows = [(pct(f), s[k]) for k, f in KLD_PERCENTILES.items()]
    lines += [f"{p}   KLD: {v:10.6f}" for p, v in kld_rows[:4]]
    lines.append(f"Median  KLD: {s['kld_median']:10.6f}")
    lines += [f"{p}   KLD: {v:10.6f}" for p, v in kld_rows[4:]]
    lines += [
        f"Minimum KLD: {s['kld_min']:10.6f}",
        "",
        "====== Token probability statistics ======",
        f"Mean    Δp: {100 * s['dp_mean']:6.3f} ± {100 * s['dp_se']:5.3f} %",
        f"Maximum Δp: {100 * s['dp_max']:6.3f}%",
    ]
    dp_rows = [(pct(f), s[k]) for k, f in DP_PERCENTILES.items()]
    lines += [f"{p}   Δp: {100 * v:6.3f}%" for p, v in dp_rows[:5]]
    lines.append(f"Median  Δp: {100 * s['dp_median']:6.3f}%")
    lines += [f"{p}   Δp: {100 * v:6.3f}%" for p, v in dp_rows[5:]]
    lines += [
        f"Minimum Δp: {100 * s['dp_min']:6.3f}%",
        f"RMS Δp    : {100 * s['rms_dp']:6.3f} ± {100 * s['rms_dp_se']:5.3f} %",
        f"Same top p: {100 * s['same_top']:6.3f} ± {100 * s['same_top_se']:5.3f} %",
    ]
    return "\n".join(lines)
