"""Confidence in a verdict, from 0 to 1.

    confidence = [1 - (1 - c1) ** k] * [1 - 2 ** -(k + 1)]

One run set (one environment, one contributor) gives

    c1 = s_p * s_z * s_n
    s_p = clip(ln(1/p) / (2 ln(1/alpha)), 0, 1)   evidence: 0 at p = 1, 0.5 at p = alpha, 1 at p <= alpha^2
    s_z = z^2 / (z^2 + 4)                          effect relative to noise: 0.5 when the margin is 2 SE
    s_n = n / (n + 2)                              seeds: 1 -> 0.33, 3 -> 0.6, 10 -> 0.83; 1 when
                                                   >= 2 seeds gave identical numbers (no seed noise)

where, for the verdict's own claim:
    success, or failure because worse:  p = Holm-adjusted p of "no difference",
                                        z = mean improvement / SE
    failure because the CI excludes min_effect: p = one-sided p of "improvement >= min_effect",
                                        z = (min_effect - improvement) / SE (relative to control)
    inconclusive:                       the smaller of the two, so it shows how near a decision it is
SE = sqrt(SE_seeds^2 + SE_tokens^2): seed-to-seed noise (paired t) and eval-token noise (block
bootstrap) are independent (the eval tokens are the same for every seed).

k counts independent confirmations: the distinct (machine, contributor) pairs whose run sets
reach the same verdict, plus the other models (same spec, another model) on which it holds.
The first factor treats each as an independent chance for the evidence to be right; the second
caps what fewer confirmations can claim: a verdict seen in one environment on one model reaches
at most 0.75, with two confirmations 0.875, three 0.94, however small its p. Reproductions of
one machine by one contributor (e.g. after a new commit) show as reproductions but add nothing.

A baseline (the control arm, or an experiment with no treatment) claims no effect:
c1 = s_n (repeatability of the measurement). A conflict (reproductions that disagree) is 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

FORMULA = ("confidence = [1 - (1 - s_p*s_z*s_n)^k] * [1 - 2^-(k+1)];  s_p = clip(ln(1/p) / (2 ln(1/alpha)), 0, 1);  "
           "s_z = z^2/(z^2+4), z = margin / sqrt(SE_seeds^2 + SE_tokens^2);  s_n = n/(n+2) (1 if seeds "
           "identical);  k = agreeing (machine, contributor) pairs + other models where it holds")


@dataclass
class Terms:
    s_p: float
    s_z: float
    s_n: float
    k: int
    confidence: float

    def as_dict(self) -> dict:
        return {"s_p": round(self.s_p, 4), "s_z": round(self.s_z, 4), "s_n": round(self.s_n, 4), "k": self.k,
                "confidence": self.confidence}


def evidence_from_p(p: float | None, alpha: float) -> float:
    if p is None:
        return 0.0
    if p <= 0.0:
        return 1.0
    return min(1.0, max(0.0, math.log(1.0 / p) / (2.0 * math.log(1.0 / alpha))))


def signal_to_noise(z: float | None) -> float:
    if z is None or math.isnan(z):
        return 0.0
    if math.isinf(z):
        return 1.0
    return z * z / (z * z + 4.0)


def seed_term(n_seeds: int, deterministic: bool) -> float:
    if deterministic:
        return 1.0
    return n_seeds / (n_seeds + 2.0) if n_seeds > 0 else 0.0


def combine(c1: float, k: int) -> float:
    k = max(k, 1)
    evidence = 1.0 - (1.0 - min(max(c1, 0.0), 1.0)) ** k
    replication = 1.0 - 2.0 ** -(k + 1)
    return round(evidence * replication, 3)


def verdict_confidence(p: float | None, z: float | None, n_seeds: int, deterministic: bool, alpha: float,
                       k: int) -> Terms:
    s_p, s_z, s_n = evidence_from_p(p, alpha), signal_to_noise(z), seed_term(n_seeds, deterministic)
    return Terms(s_p, s_z, s_n, k, combine(s_p * s_z * s_n, k))


def baseline_confidence(n_seeds: int, deterministic: bool, k: int) -> Terms:
    s_n = seed_term(n_seeds, deterministic)
    return Terms(1.0, 1.0, s_n, k, combine(s_n, k))
