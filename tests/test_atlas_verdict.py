"""Verdict rules, the bits rule, reproductions/conflict and the confidence formula, on
synthetic per-seed metrics and per-token KLD (no database, no torch)."""
import math

import numpy as np
import pytest

from quantatlas.atlas import confidence as conf
from quantatlas.atlas.stored import StoredSpec
from quantatlas.atlas.verdict import (Criterion, RunSetInfo, SeedRun, combine_run_sets, experiment_result,
                                      judge_run_set)

WINDOWS, PER_WINDOW = 48, 255
SPEC = StoredSpec({"data": {"eval": {"ctx": 512, "score": "second_half"}}})


def token_klds(scale: float, seed: int, arm_noise: float = 0.15, seed_jitter: float = 0.0) -> np.ndarray:
    """Per-token KLD: a token difficulty shared by every arm and seed (same eval tokens) times the
    arm's scale, a per-seed factor (calibration randomness) and per-token noise."""
    difficulty = np.random.default_rng(1234).gamma(0.6, 0.02, WINDOWS * PER_WINDOW)
    window = np.repeat(np.random.default_rng(99).lognormal(0, 0.3, WINDOWS), PER_WINDOW)
    rng = np.random.default_rng(int(scale * 1e6) + 7919 * seed)
    seed_factor = 1.0 + seed_jitter * rng.normal()
    return (difficulty * window * scale * seed_factor * rng.lognormal(0, arm_noise, difficulty.size)).astype(np.float32)


def arm_runs(scale: float, seeds=(0, 1, 2), bits: float = 4.5, seed_jitter: float = 0.002, tokens=True):
    out = {}
    for s in seeds:
        tok = token_klds(scale, s, seed_jitter=seed_jitter)
        out[s] = SeedRun(s, {"kld_mean": float(tok.mean(dtype=np.float64)), "bits_per_param": bits},
                         tok if tokens else None)
    return out


def judge(arms, control="ctl", crit=None, seeded=None):
    return judge_run_set(arms, list(arms), control, crit or Criterion(), SPEC, seeded)


def test_success_failure_and_baseline_on_clear_effects():
    out = judge({"ctl": arm_runs(1.0), "good": arm_runs(0.8), "bad": arm_runs(1.25)})
    assert out["ctl"].result == "baseline"
    assert out["good"].result == "success" and out["good"].rule == "better_by_min_effect"
    assert out["good"].effect == pytest.approx(0.2, abs=0.02)
    assert out["good"].ci[0] < out["good"].effect < out["good"].ci[1]
    assert out["bad"].result == "failure" and out["bad"].rule == "worse"
    assert out["bad"].effect == pytest.approx(-0.25, abs=0.03)
    # both tests ran, and p is the larger of the two, Holm-adjusted over the 2 treatments
    g, b = out["good"], out["bad"]
    assert g.p_seed is not None and g.p_tokens is not None
    assert g.p_value == max(g.p_seed, g.p_tokens)
    expected = min(1, 2 * g.p_value) if g.p_value <= b.p_value else max(min(1, 2 * b.p_value), g.p_value)
    assert g.p_adjusted == pytest.approx(expected)


def test_a_real_but_small_improvement_is_a_failure_when_the_ci_excludes_min_effect():
    seeds = (0, 1, 2, 3, 4)
    out = judge({"ctl": arm_runs(1.0, seeds, seed_jitter=0.0005), "small": arm_runs(0.98, seeds, seed_jitter=0.0005)})
    j = out["small"]
    assert 0 < j.effect < 0.05 and j.ci[1] < 0.05
    assert j.result == "failure" and j.rule == "ci_excludes_min_effect"


def test_noisy_seeds_make_an_effect_inconclusive():
    # a 10 % improvement on average, but seeds scatter by ~15 %: 3 seeds cannot tell
    out = judge({"ctl": arm_runs(1.0, seed_jitter=0.0), "maybe": arm_runs(0.9, seed_jitter=0.15)})
    j = out["maybe"]
    assert j.p_tokens < 0.01           # token noise alone would call it
    assert j.p_seed > 0.01 and j.result == "inconclusive"


def test_holm_across_arms_turns_a_lone_success_inconclusive():
    """Criterion without per-token values: the t-test over seeds is the only test."""
    crit = Criterion(metric="ppl", better="lower", min_effect=0.01, alpha=0.05)

    def runs(values):
        return {s: SeedRun(s, {"ppl": v}) for s, v in enumerate(values)}

    ctl = runs([10.0, 10.0, 10.0])
    treat = runs([9.5, 9.3, 9.65])          # paired t p = 0.036 < 0.05 on its own
    alone = judge_run_set({"ctl": ctl, "a": treat}, ["ctl", "a"], "ctl", crit, None)["a"]
    assert alone.p_value < 0.05 and alone.result == "success"
    three = judge_run_set({"ctl": ctl, "a": treat, "b": runs([9.5, 9.3, 9.65]), "c": runs([9.5, 9.3, 9.65])},
                          ["ctl", "a", "b", "c"], "ctl", crit, None)
    assert three["a"].p_adjusted == pytest.approx(min(1.0, 3 * alone.p_value))
    assert three["a"].result == "inconclusive"


def test_too_few_seeds_and_no_tokens_means_no_test():
    crit = Criterion(metric="ppl")
    out = judge_run_set({"ctl": {0: SeedRun(0, {"ppl": 10.0})}, "a": {0: SeedRun(0, {"ppl": 5.0})}},
                        ["ctl", "a"], "ctl", crit, None, seeded={"ctl": False, "a": False})
    assert out["a"].result == "inconclusive" and out["a"].rule == "no_test"
    assert any("seed" in n for n in out["a"].notes)


def test_one_seed_uses_the_within_seed_token_bootstrap():
    """Deterministic arms (RTN, fixed formats): one seed and the token bootstrap decide."""
    out = judge({"ctl": arm_runs(1.0, seeds=(0,)), "good": arm_runs(0.8, seeds=(0,))},
                seeded={"ctl": False, "good": False})
    assert out["good"].p_seed is None and out["good"].p_tokens is not None
    assert out["good"].result == "success"


def test_seeded_arms_with_fewer_than_three_seeds_are_inconclusive():
    """The same clear effect, but the arms depend on the seed: 1 or 2 seeds cannot decide."""
    for seeds in ((0,), (0, 1)):
        for seeded in ({"ctl": True, "good": True}, {"ctl": False, "good": True}, None):   # None: no spec
            out = judge({"ctl": arm_runs(1.0, seeds=seeds), "good": arm_runs(0.8, seeds=seeds)}, seeded=seeded)
            j = out["good"]
            assert j.p_tokens is not None and j.p_tokens < 1e-6           # the token test alone would call it
            assert (j.result, j.rule, j.p_adjusted) == ("inconclusive", "too_few_seeds", None), (seeds, seeded)
            assert any("fewer than 3" in n for n in j.notes)
    three = judge({"ctl": arm_runs(1.0), "good": arm_runs(0.8)}, seeded={"ctl": True, "good": True})
    assert three["good"].result == "success"
    # the rule from a spec: GPTQ and a Hadamard rotation are seeded, RTN is not, unless the author says so
    from quantatlas.atlas.stored import seeded_arms

    spec = {"title": "t", "hypothesis": "h", "model": "reference", "control": "rtn",
            "arms": {"rtn": {"codec": {"uniform": {"bits": 4}}},
                     "gptq": {"solver": "gptq", "codec": {"uniform": {"bits": 4}}},
                     "had": {"codec": {"uniform": {"bits": 4}}, "transforms": [{"hadamard": {}}]},
                     "gptq_fixed": {"solver": "gptq", "codec": {"uniform": {"bits": 4}}, "deterministic": True}}}
    assert seeded_arms(spec) == {"rtn": False, "gptq": True, "had": True, "gptq_fixed": False}
    assert seeded_arms(None) == {} and seeded_arms({"arms": {"x": {"codec": 7}}}) == {}
    arms = {a: arm_runs(1.0 if a == "rtn" else 0.8, seeds=(0,)) for a in spec["arms"]}
    out = judge_run_set(arms, list(arms), "rtn", Criterion(), StoredSpec(spec))
    assert {a: out[a].result for a in ("gptq", "had", "gptq_fixed")} == \
        {"gptq": "inconclusive", "had": "inconclusive", "gptq_fixed": "success"}


def test_an_arm_without_a_spec_whose_seeds_agree_exactly_is_deterministic():
    same = lambda scale: {s: SeedRun(s, {"kld_mean": float(token_klds(scale, 0).mean(dtype=np.float64))},  # noqa
                                     token_klds(scale, 0)) for s in (0, 1)}
    out = judge({"ctl": same(1.0), "rtn": same(0.8)})                  # 2 identical seeds, no spec
    assert out["rtn"].result == "success" and not out["rtn"].seed_dependent
    reused = {0: arm_runs(0.8, seeds=(0,))[0]}
    reused[0].metrics["reused_from_seed"] = 0                            # the runner reused seed 0's result
    out = judge({"ctl": {0: SeedRun(0, dict(reused[0].metrics, kld_mean=reused[0].metrics["kld_mean"] / 0.8),
                                    reused[0].per_token / 0.8)}, "rtn": reused})
    assert out["rtn"].result == "success"


def test_deterministic_arms_skip_the_seed_test():
    same = lambda scale: {s: SeedRun(s, {"kld_mean": float(token_klds(scale, 0).mean(dtype=np.float64))},  # noqa
                                     token_klds(scale, 0)) for s in (0, 1, 2)}
    out = judge({"ctl": same(1.0), "rtn": same(0.8)})
    assert out["rtn"].deterministic and out["rtn"].p_seed is None
    assert out["rtn"].result == "success"
    assert any("identical" in n for n in out["rtn"].notes)


def test_higher_is_better_criterion_flips_the_sign():
    crit = Criterion(metric="same_top", better="higher", min_effect=0.01, alpha=0.05)
    runs = lambda vals: {s: SeedRun(s, {"same_top": v}) for s, v in enumerate(vals)}  # noqa: E731
    out = judge_run_set({"ctl": runs([0.90, 0.91, 0.905]), "up": runs([0.95, 0.955, 0.951])},
                        ["ctl", "up"], "ctl", crit, None)
    assert out["up"].effect == pytest.approx((0.952 - 0.905) / 0.905, rel=1e-2)
    assert out["up"].result == "success"


def test_exact_control_with_zero_kld():
    zero = {s: SeedRun(s, {"kld_mean": 0.0}, np.zeros(WINDOWS * PER_WINDOW, np.float32)) for s in (0, 1, 2)}
    out = judge({"fp16": zero, "q4": arm_runs(1.0)}, control="fp16")
    assert out["q4"].effect is None and out["q4"].result == "failure" and out["q4"].rule == "worse"


def test_bits_rule_text_and_domination():
    arms = {"ctl": arm_runs(1.0, bits=4.5), "cheap": arm_runs(0.8, bits=4.5),
            "costly": arm_runs(0.9, bits=5.0)}
    out = judge(arms)
    assert out["costly"].result == "success"
    assert out["costly"].bits_delta == pytest.approx(0.5)
    assert out["costly"].dominated_by == "cheap"
    info = RunSetInfo(1, (("h", "cpu"), "me"), "me@h")
    fv = combine_run_sets([(info, out)], "costly", Criterion(), [])
    assert "costs +0.500 bits/param (+11.1 %)" in fv.text and "dominated by arm cheap" in fv.text
    fv = combine_run_sets([(info, out)], "cheap", Criterion(), [])
    assert "same as the control" in fv.text


def test_an_arm_over_the_artifact_cap_is_marked_and_cannot_win():
    def capped(scale, nbytes, cap=1000.0):
        runs = arm_runs(scale)
        for r in runs.values():
            r.metrics.update(artifact_bytes=nbytes, artifact_cap=cap, over_cap=float(nbytes > cap))
        return runs

    out = judge({"ctl": capped(1.0, 900.0), "big": capped(0.7, 1500.0), "worse": capped(1.25, 800.0)})
    assert out["big"].result == "success" and out["big"].over_cap == (1500.0, 1000.0)
    assert out["ctl"].over_cap is None and out["worse"].over_cap is None
    info = RunSetInfo(1, (("h", "cpu"), "me"), "me@h")
    finals = [combine_run_sets([(info, out)], a, Criterion(), []) for a in ("ctl", "big", "worse")]
    big = finals[1]
    assert big.text.startswith("OVER THE ARTIFACT CAP (1500 > 1000 bytes compressed)")
    assert big.as_dict(Criterion())["over_cap"] is True and finals[2].as_dict(Criterion())["over_cap"] is False
    # the only success does not fit: the experiment is not a success; the arm that fits failed
    result, _, pick = experiment_result(finals, has_treatments=True)
    assert result == "failure" and pick.arm == "worse"
    # without the cap the same numbers make a success
    out = judge({"ctl": arm_runs(1.0), "big": arm_runs(0.7), "worse": arm_runs(1.25)})
    finals = [combine_run_sets([(info, out)], a, Criterion(), []) for a in ("ctl", "big", "worse")]
    assert experiment_result(finals, has_treatments=True)[0] == "success"


def test_no_control_means_every_arm_is_a_baseline():
    out = judge_run_set({"q8": arm_runs(0.1)}, ["q8"], None, Criterion(), SPEC)
    assert out["q8"].result == "baseline"
    info = RunSetInfo(1, (("h", "cpu"), "me"), "me@h")
    finals = [combine_run_sets([(info, out)], "q8", Criterion(), [])]
    assert experiment_result(finals)[0] == "baseline"


def test_reproductions_agree_raise_confidence_and_disagreement_is_a_conflict():
    crit = Criterion()
    a = RunSetInfo(1, (("host-a", "cpu"), "ann"), "ann@host-a")
    same_machine = RunSetInfo(2, (("host-a", "cpu"), "ann"), "ann@host-a")
    b = RunSetInfo(3, (("host-b", "cuda"), "bob"), "bob@host-b")
    win = judge({"ctl": arm_runs(1.0), "t": arm_runs(0.8)})
    lose = judge({"ctl": arm_runs(1.0), "t": arm_runs(1.3)})
    alone = combine_run_sets([(a, win)], "t", crit, [])
    again = combine_run_sets([(a, win), (same_machine, win)], "t", crit, [])
    independent = combine_run_sets([(a, win), (b, win)], "t", crit, [])
    assert again.confidence == alone.confidence            # same machine and person: no new evidence
    assert independent.confidence > alone.confidence
    assert independent.reproductions[0][2:] == (True, True)
    c1 = alone.terms.s_p * alone.terms.s_z * alone.terms.s_n
    assert independent.confidence == pytest.approx((1 - (1 - c1) ** 2) * 0.875, abs=1e-3)
    assert alone.confidence == pytest.approx(c1 * 0.75, abs=1e-3)
    clash = combine_run_sets([(a, win), (b, lose)], "t", crit, [])
    assert clash.result == "conflict" and clash.confidence == 0.0 and "CONFLICT" in clash.text
    assert experiment_result([clash])[0] == "conflict"


def test_models_on_which_the_verdict_holds_count_in_confidence():
    info = RunSetInfo(1, (("h", "cpu"), "me"), "me@h")
    win = judge({"ctl": arm_runs(1.0), "t": arm_runs(0.8)})
    one = combine_run_sets([(info, win)], "t", Criterion(), [])
    three = combine_run_sets([(info, win)], "t", Criterion(), ["success", "success", "failure"])
    assert (three.models_holding, three.models_total) == (3, 4)
    assert three.terms.k == 3 and three.confidence > one.confidence
    assert "Holds on 3 of 4 models" in three.text
    noisy = judge({"ctl": arm_runs(1.0, seed_jitter=0.2), "t": arm_runs(0.9, seed_jitter=0.2)})
    undecided = combine_run_sets([(info, noisy)], "t", Criterion(), ["success", "success"])
    assert undecided.result == "inconclusive" and "Holds on" not in undecided.text      # not "holds on 1 of 3"
    assert "Undecided on this model (one of 3)" in undecided.text


def test_confidence_formula_terms():
    alpha = 0.01
    assert conf.evidence_from_p(alpha, alpha) == pytest.approx(0.5)
    assert conf.evidence_from_p(alpha ** 2, alpha) == pytest.approx(1.0)
    assert conf.evidence_from_p(1.0, alpha) == 0.0
    assert conf.signal_to_noise(2.0) == pytest.approx(0.5)
    assert conf.seed_term(3, False) == pytest.approx(0.6) and conf.seed_term(1, True) == 1.0
    t = conf.verdict_confidence(p=1e-3, z=4.0, n_seeds=3, deterministic=False, alpha=alpha, k=2)
    c1 = (math.log(1e3) / (2 * math.log(100))) * (16 / 20) * 0.6
    assert t.confidence == pytest.approx((1 - (1 - c1) ** 2) * (1 - 2 ** -3), abs=1e-3)
    # one environment, one model: at most 0.75 however strong the evidence
    assert conf.verdict_confidence(1e-12, 1e6, 3, True, alpha, 1).confidence == 0.75
    assert conf.baseline_confidence(3, True, 1).confidence == 0.75
    # more seeds, smaller p, larger effect: never less confident
    base = conf.verdict_confidence(1e-3, 3.0, 3, False, alpha, 1).confidence
    assert conf.verdict_confidence(1e-3, 3.0, 5, False, alpha, 1).confidence > base
    assert conf.verdict_confidence(1e-5, 3.0, 3, False, alpha, 1).confidence > base
    assert conf.verdict_confidence(1e-3, 6.0, 3, False, alpha, 1).confidence > base


def test_failure_by_ci_confidence_uses_the_min_effect_margin():
    seeds = (0, 1, 2, 3, 4)
    out = judge({"ctl": arm_runs(1.0, seeds, seed_jitter=0.0005), "small": arm_runs(0.98, seeds, seed_jitter=0.0005)})
    info = RunSetInfo(1, (("h", "cpu"), "me"), "me@h")
    fv = combine_run_sets([(info, out)], "small", Criterion(), [])
    p, z = out["small"].claim(0.05)
    assert p == out["small"].p_failure and p < 0.01
    assert z == pytest.approx((0.05 * out["small"].control_mean - out["small"].improvement) / out["small"].se_total)
    assert 0 < fv.confidence <= 1
