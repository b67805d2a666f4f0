"""Null calibration of the verdict rules: simulated experiments whose two arms come from the same
distribution (seed noise on each arm's level, heavy-tailed per-token KLD) must be called a
success no more often than alpha (plus its binomial margin) at 1, 2, 3 and 5 seeds; and a true
20 % KLD reduction at 5 seeds with 2 % seed noise must be found at least 80 % of the time.
Also shown: the same null judged as if the arms were deterministic (the token bootstrap alone),
which is what the too-few-seeds rule exists to prevent.

Run `python tests/test_atlas_null_calibration.py` for the table."""
import math

import numpy as np

from quantatlas.atlas.stored import StoredSpec
from quantatlas.atlas.verdict import Criterion, SeedRun, judge_run_set

WINDOWS, PER_WINDOW = 48, 255            # 12240 scored tokens in eval windows of ctx 512
SPEC = StoredSpec({"data": {"eval": {"ctx": 512, "score": "second_half"}}})
CRIT = Criterion(metric="kld_mean", better="lower", min_effect=0.05, alpha=0.01)
N_EXPERIMENTS = 300
SEED_NOISE = 0.02


def _difficulty() -> np.ndarray:
    """Token difficulty shared by every arm and seed (the same eval tokens): gamma per token times
    a per-window level."""
    d = np.random.default_rng(1234).gamma(0.6, 0.02, WINDOWS * PER_WINDOW)
    return d * np.repeat(np.random.default_rng(99).lognormal(0, 0.3, WINDOWS), PER_WINDOW)


DIFFICULTY = _difficulty()


def arm(rng: np.random.Generator, scale: float, seeds: int, seed_noise: float) -> dict[int, SeedRun]:
    """One arm's runs: per seed a level (1 + seed_noise * N(0, 1)), then per token lognormal noise
    and a heavy tail (1 % of tokens multiplied by 1 + 3 * Pareto(2.5))."""
    out = {}
    for s in range(seeds):
        level = scale * (1.0 + seed_noise * rng.normal())
        noise = rng.lognormal(0, 0.3, DIFFICULTY.size)
        spikes = np.where(rng.random(DIFFICULTY.size) < 0.01, 1.0 + 3.0 * rng.pareto(2.5, DIFFICULTY.size), 1.0)
        tok = (DIFFICULTY * level * noise * spikes).astype(np.float32)
        out[s] = SeedRun(s, {"kld_mean": float(tok.mean(dtype=np.float64))}, tok)
    return out


def simulate(seeds: int, effect: float = 0.0, seeded: bool = True, n: int = N_EXPERIMENTS,
             seed_noise: float = SEED_NOISE, rng_seed: int = 0) -> dict[str, float]:
    """Rates of each verdict over n simulated experiments (treatment level 1 - effect)."""
    rng = np.random.default_rng([rng_seed, seeds, int(effect * 1000), int(seeded)])
    flags = {"ctl": seeded, "t": seeded}
    counts = {"success": 0, "worse": 0, "ci_excludes": 0, "inconclusive": 0}
    for _ in range(n):
        arms = {"ctl": arm(rng, 1.0, seeds, seed_noise), "t": arm(rng, 1.0 - effect, seeds, seed_noise)}
        j = judge_run_set(arms, ["ctl", "t"], "ctl", CRIT, SPEC, flags)["t"]
        key = {"better_by_min_effect": "success", "worse": "worse",
               "ci_excludes_min_effect": "ci_excludes"}.get(j.rule, "inconclusive")
        counts[key] += 1
    return {k: v / n for k, v in counts.items()}


def margin(alpha: float, n: int) -> float:
    """alpha plus three binomial standard errors: the most a calibrated rate should show in n tries."""
    return alpha + 3.0 * math.sqrt(alpha * (1 - alpha) / n)


def test_false_success_rate_stays_below_alpha_at_1_2_3_and_5_seeds():
    bound = margin(CRIT.alpha, N_EXPERIMENTS)
    for seeds in (1, 2, 3, 5):
        rates = simulate(seeds)
        assert rates["success"] <= bound, (seeds, rates)
        # a significant "worse" between identical recipes is as false as a success
        assert rates["worse"] <= bound, (seeds, rates)
        if seeds < 3:
            assert rates["inconclusive"] == 1.0, (seeds, rates)          # the too-few-seeds rule


def test_without_the_rule_one_seed_is_overconfident():
    """The token bootstrap alone, on seeded arms with one seed: far more false calls than alpha
    (the reason for the rule)."""
    rates = simulate(1, seeded=False, n=150)
    assert rates["success"] + rates["worse"] > 3 * margin(CRIT.alpha, 150), rates


def test_power_for_a_true_20_percent_reduction_at_5_seeds():
    rates = simulate(5, effect=0.20)
    assert rates["success"] >= 0.80, rates


def table() -> str:
    lines = [f"{'seeds':>5}  {'false success':>13}  {'false worse':>11}  {'token test alone: success / worse':>34}",
             "-" * 70]
    for seeds in (1, 2, 3, 5):
        r = simulate(seeds)
        alone = simulate(seeds, seeded=False)
        lines.append(f"{seeds:>5}  {r['success']:>13.3f}  {r['worse']:>11.3f}  "
                     f"{alone['success']:>16.3f} / {alone['worse']:.3f}")
    p = simulate(5, effect=0.20)
    lines.append(f"power (5 seeds, true -20 % KLD, {100 * SEED_NOISE:.0f} % seed noise): {p['success']:.3f}; "
                 f"alpha {CRIT.alpha}, bound {margin(CRIT.alpha, N_EXPERIMENTS):.3f}, {N_EXPERIMENTS} experiments each")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
