"""Confidence in a verdict's stated result, from 0 to 1.

What it means. A verdict states a result about a treatment arm against the control; its confidence
is how strongly the data, and independent confirmations of them, support *that statement*:

    success       "the treatment is better than the control" (by at least min_effect)
    failure       "it is worse", or "it is not better by min_effect" (the CI excludes min_effect)
    inconclusive  no decision. Its confidence is how far the data already lean towards the
                  hypothesis ("the treatment is better than the control"), scaled below every
                  decided verdict: an undecided arm never outranks a decided one, and of two arms
                  undecided alike (same noise, same seeds) the better one never gets less
    baseline      the control, or a reference arm (fp16, `reference: true`): not a claim about an
                  effect; its confidence is the repeatability of its measurement
    conflict      reproductions disagree: 0

One formula for every claim. A claim is a side of the improvement Δ (control - treatment on the
criterion, sign-flipped when higher is better) with a p-value and a signed margin z (in SE; z > 0
when the data lie on the claim's side). One run set (one environment, one contributor) gives

    c1 = s_p * s_z * s_n
    s_p = clip(ln(1/p) / (2 ln(1/alpha)), 0, 1)   evidence: 0 at p = 1, 0.5 at p = alpha, 1 at p <= alpha^2
    s_z = z+^2 / (z+^2 + 4), z+ = max(z, 0)        margin over noise: 0.5 when the margin is 2 SE, 0 when
                                                   the data lie on the other side of the claim
    s_n = n / (n + 2)                              seeds: 1 -> 0.33, 3 -> 0.6, 10 -> 0.83; 1 when
                                                   >= 2 seeds gave identical numbers (no seed noise)

and the claims, with SE = sqrt(SE_seeds^2 + SE_tokens^2) (seed-to-seed noise, paired t, and eval-token
noise, block bootstrap, are independent: the eval tokens are the same for every seed):

    success                     Δ > 0:  p = Holm-adjusted p of "no difference",  z = Δ / SE
    failure, worse              Δ < 0:  p = Holm-adjusted p of "no difference",  z = -Δ / SE
    failure, CI excludes        Δ < min_effect * |control|:  p = one-sided p of "Δ >= min_effect",
      min_effect                        z = (min_effect * |control| - Δ) / SE
    inconclusive (the lean)     Δ > 0:  z = Δ / SE,  p = Phi(-z) (the one-sided normal p from the same
                                        SE: an undecided arm took no deciding test, or did not pass it)

Confirmations. k counts independent confirmations: the distinct (machine, contributor) pairs whose
run sets reach the same verdict, plus the other models (same spec, another model) on which a decided
verdict holds. Reproductions of one machine by one contributor show as reproductions but add nothing.

    combine(c1, k) = [1 - (1 - c1)^k] * [1 - 2^-(k+1)]

The first factor treats each confirmation as an independent chance for the evidence to be right; the
second caps what fewer confirmations can claim: one environment on one model reaches at most 0.75,
two confirmations 0.875, three 0.94, however small its p.

    decided (success, failure)   confidence = max(combine(c1, k), DECIDED_FLOOR)
    inconclusive                 confidence = DECIDED_FLOOR * combine(c1 of the lean, k)   (< DECIDED_FLOOR)
    baseline                     confidence = combine(s_n, k)
    conflict                     confidence = 0

DECIDED_FLOOR (0.1) is where the two bands meet: a verdict that passed its test at alpha is never
less confident than one that did not (the floor binds only for a barely passed test on one seed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

#: every decided verdict (success, failure) has at least this confidence; every undecided one less
DECIDED_FLOOR = 0.1

FORMULA = ("confidence = [1 - (1 - s_p*s_z*s_n)^k] * [1 - 2^-(k+1)], at least 0.1 when decided; an inconclusive "
           "verdict 0.1 times that for its lean (the treatment better);  s_p = clip(ln(1/p) / (2 ln(1/alpha)), 0, 1);  "
           "s_z = z+^2/(z+^2+4), z = margin on the claim's side / sqrt(SE_seeds^2 + SE_tokens^2);  s_n = n/(n+2) "
           "(1 if seeds identical);  k = agreeing (machine, contributor) pairs + other models where it holds")


@dataclass
class Terms:
    s_p: float
    s_z: float
    s_n: float
    k: int
    confidence: float
    kind: str = "decided"        # decided | lean (inconclusive) | baseline | conflict

    def as_dict(self) -> dict:
        return {"s_p": round(self.s_p, 4), "s_z": round(self.s_z, 4), "s_n": round(self.s_n, 4), "k": self.k,
                "confidence": self.confidence, "kind": self.kind}


def evidence_from_p(p: float | None, alpha: float) -> float:
    if p is None:
        return 0.0
    if p <= 0.0:
        return 1.0
    return min(1.0, max(0.0, math.log(1.0 / p) / (2.0 * math.log(1.0 / alpha))))


def signal_to_noise(z: float | None) -> float:
    """z is signed towards the claim: a margin on the other side of it is no support (0)."""
    if z is None or math.isnan(z) or z <= 0:
        return 0.0
    if math.isinf(z):
        return 1.0
    return z * z / (z * z + 4.0)


def seed_term(n_seeds: int, deterministic: bool) -> float:
    if deterministic:
        return 1.0
    return n_seeds / (n_seeds + 2.0) if n_seeds > 0 else 0.0


def one_sided_p(z: float | None) -> float | None:
    """Phi(-z): the one-sided normal p of "no margin" for a margin of z SE."""
    if z is None or math.isnan(z):
        return None
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _combined(c1: float, k: int) -> float:
    k = max(k, 1)
    evidence = 1.0 - (1.0 - min(max(c1, 0.0), 1.0)) ** k
    replication = 1.0 - 2.0 ** -(k + 1)
    return evidence * replication


def combine(c1: float, k: int) -> float:
    return round(_combined(c1, k), 3)


def verdict_confidence(p: float | None, z: float | None, n_seeds: int, deterministic: bool, alpha: float,
                       k: int) -> Terms:
    """A decided verdict (success or failure): its claim's p and signed margin z."""
    s_p, s_z, s_n = evidence_from_p(p, alpha), signal_to_noise(z), seed_term(n_seeds, deterministic)
    return Terms(s_p, s_z, s_n, k, max(combine(s_p * s_z * s_n, k), DECIDED_FLOOR))


def undecided_confidence(z: float | None, n_seeds: int, deterministic: bool, alpha: float, k: int) -> Terms:
    """An inconclusive verdict: its lean towards the hypothesis, z = Δ / SE (p = Phi(-z)), in the band
    below every decided verdict."""
    s_p, s_z, s_n = evidence_from_p(one_sided_p(z), alpha), signal_to_noise(z), seed_term(n_seeds, deterministic)
    value = min(round(DECIDED_FLOOR * _combined(s_p * s_z * s_n, k), 3), round(DECIDED_FLOOR - 0.001, 3))
    return Terms(s_p, s_z, s_n, k, value, "lean")


def baseline_confidence(n_seeds: int, deterministic: bool, k: int) -> Terms:
    s_n = seed_term(n_seeds, deterministic)
    return Terms(1.0, 1.0, s_n, k, combine(s_n, k), "baseline")


def conflict_confidence(k: int) -> Terms:
    return Terms(0.0, 0.0, 0.0, k, 0.0, "conflict")
