"""Verdicts: each treatment arm against the control, on the spec's criterion metric.

Within one run set (one environment, one contributor, one model hash, one eval fingerprint):

1. Pair the seeds both arms have. improvement_s = control_s - treatment_s (lower is better;
   the other way round for higher-is-better). effect = mean improvement / |mean control|,
   i.e. relative: 0.05 is 5 % better than the control.
2. Seeds: paired t-test of the improvements when there are >= 3 pairs. Skipped when both arms
   gave identical numbers on every seed (deterministic arms: the seed changes nothing).
3. Tokens (criterion kld_mean, per-token KLD stored): paired block bootstrap over the
   seed-averaged per-token KLD (both arms were scored on the same tokens; with one seed it is
   the within-seed bootstrap). Blocks are eval windows.
4. p = the larger of the two p-values when both exist (the claim must beat seed noise *and*
   token noise: an intersection-union test), else the one that exists; the CI is the hull of
   the two (1 - alpha) intervals. Holm's correction across the treatment arms of the run set.
5. Too few seeds. When the comparison depends on the seed (the treatment or the control, or both,
   is a seeded arm: a calibration draw, random rotation signs, k-means starts; the verdict's text
   names which side), the token bootstrap
   sees only token noise: two identical recipes differ by their seeds' luck, which with one or
   two seeds no test can tell from an effect (a null simulation calls such pairs "success" or
   "failure" far more often than alpha). So with fewer than 3 paired seeds such an arm is
   "inconclusive (too few seeds)" whatever its p-values, and takes no part in Holm's family (its
   Holm p is not computed: the pages say why).
   Whether an arm is seeded comes from its spec, parsed once where it leaves the store
   (`StoredSpec.seeded`, the one predicate `quantatlas.spec.Arm.seeded`: the author's
   `deterministic:`, else inferred from solver, transforms and codecs); deterministic arms
   (RTN, fixed formats) keep the token-level test with any number of seeds. Without a spec
   (imported runs) an arm counts as seeded unless all its seeds gave identical numbers (or the
   runner marked them `reused_from_seed`).
6. success      effect >= min_effect and Holm p < alpha;
   failure      worse (improvement < 0) with Holm p < alpha, or the CI's upper end
                < min_effect (the data exclude an improvement of min_effect);
   inconclusive otherwise (including: no test possible);
   baseline     the control arm itself, every arm of an experiment without a control, and every
                reference arm (rule "reference"): an arm that quantizes nothing (fp16) or that the
                spec marks `reference: true` is a reference point, shown but never judged as a
                treatment (no Holm family member, never the experiment's result).

Bits rule. The test compares quality with the declared control whatever the bits. When a
treatment spends more bits per parameter than the control, its verdict text says so first
("costs +N bits/param (+x %) over the control"), the verdict carries `bits_delta`, and if
another arm of the same experiment reaches a better criterion value with no more bits, the
text names it ("dominated by arm A") — the improvement may just be bought with bits. The
result itself is not changed: the hypothesis may be about recovery, not efficiency; the
Pareto view is the landscape's job. bits = bits_per_param (whole model), else bits_per_weight.

Across run sets (reproductions): the first run set that has the arm is the primary verdict;
later run sets are reproductions; a success in one and a failure in another is a "conflict".
Confidence: confidence.py (one meaning for every verdict kind).

Across models (the same spec on another model: a family, a study). An arm's verdict says on how many
models its decided result holds ("Holds on k of n models"), and its confidence counts those models as
confirmations (confidence.py's k). Each verdict also keeps `confidence_own`, the confidence from its own
model's run sets alone (`own_model_confidence`); a study's line "holds on k of n architectures" takes the
least of them over the models where it holds (studies.py), so the study never claims more than its weakest
model does from its own runs, and adding models never raises it.

The experiment's result and confidence are one arm's: the primary arm, the spec's `primary:`, else
the best treatment on the criterion (reference arms and the control are not treatments; an arm over
the artifact cap stands only when no treatment fits it, and then cannot make the experiment a
success). The list shows that arm's metrics beside them (`choose_primary`, `experiment_result`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from quantatlas.atlas import confidence as conf
from quantatlas.atlas.stats import block_bootstrap, holm, paired_t
from quantatlas.eval.ttt import TTT_SUFFIX
from quantatlas.quant.steps import is_reference
from quantatlas.spec import Criterion, EvalData, arm_of

if TYPE_CHECKING:
    from quantatlas.atlas.stored import StoredSpec

BITS_TOLERANCE = 0.001       # bits/param: smaller differences are rounding, not cost
MIN_SEEDS_FOR_T = 3
MIN_SEEDS_SEEDED = 3         # a seeded comparison with fewer paired seeds is inconclusive
RESULTS = ("success", "failure", "inconclusive", "baseline", "conflict")


@dataclass
class SeedRun:
    seed: int
    metrics: dict[str, float]
    per_token: np.ndarray | None = None


def is_reference_arm(config: dict | None) -> bool:
    """A reference point (an arm none of whose steps changes the model's numbers, fp16, or one the spec
    marks `reference: true`): never judged as a treatment, never the arm that stands for an experiment
    (`quant.steps.is_reference` on the stored config)."""
    arm = arm_of(config)
    return arm is not None and is_reference(arm)


def reference_arms(spec: StoredSpec | None) -> dict[str, str]:
    """Arm -> why it is a reference point, for the reference arms of a stored spec (each arm parsed on
    its own, so a spec that no longer validates as a whole still has them)."""
    out = {}
    for name, config in (spec.arms if spec is not None else {}).items():
        if is_reference_arm(config):
            marked = isinstance(config, dict) and config.get("reference") is True
            out[name] = "the spec marks it `reference: true`" if marked else "it quantizes nothing"
    return out


def _seed_dependent(name: str, runs: dict[int, SeedRun], seeded: dict[str, bool] | None, metric: str) -> bool:
    if seeded and name in seeded:
        return seeded[name]
    if any("reused_from_seed" in r.metrics for r in runs.values()):
        return False
    if len(runs) < 2:
        return True
    first = next(iter(runs.values()))
    for r in runs.values():
        if r.metrics.get(metric) != first.metrics.get(metric):
            return True
        a, b = r.per_token, first.per_token
        if (a is None) != (b is None) or (a is not None and not np.array_equal(a, b)):
            return True
    return False


def bits_of(metrics: dict[str, float]) -> float | None:
    for key in ("bits_per_param", "bits_per_weight"):
        v = metrics.get(key)
        if v is not None and math.isfinite(v):
            return float(v)
    return None


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


@dataclass
class ArmJudgement:
    """One treatment arm against the control within one run set."""
    arm: str
    control: str | None
    result: str = "inconclusive"
    rule: str = ""                      # which rule decided
    seeds: list[int] = field(default_factory=list)
    control_mean: float | None = None
    treatment_mean: float | None = None
    improvement: float | None = None    # mean absolute improvement
    effect: float | None = None         # relative
    ci: tuple[float, float] | None = None
    p_seed: float | None = None
    p_tokens: float | None = None
    p_value: float | None = None
    p_adjusted: float | None = None
    p_failure: float | None = None      # one-sided p of "improvement >= min_effect"
    se_seed: float | None = None
    se_tokens: float | None = None
    deterministic: bool = False
    seed_dependent: bool = True         # the comparison depends on the seed (rule 5): either side does
    treatment_seeded: bool = True       # this arm's results depend on the seed
    control_seeded: bool = True         # the control's do
    bits_control: float | None = None
    bits_treatment: float | None = None
    dominated_by: str | None = None
    notes: list[str] = field(default_factory=list)
    per_seed: list[dict] = field(default_factory=list)
    over_cap: tuple[float, float] | None = None  # (largest compressed artifact bytes, the spec's cap)

    @property
    def bits_delta(self) -> float | None:
        if self.bits_control is None or self.bits_treatment is None:
            return None
        return self.bits_treatment - self.bits_control

    @property
    def se_total(self) -> float | None:
        parts = [s for s in (self.se_seed, self.se_tokens) if s is not None]
        return math.sqrt(sum(s * s for s in parts)) if parts else None

    def margin_z(self, margin: float) -> float:
        """A margin on the criterion in SE (signed; +-inf when there is no noise at all)."""
        se = self.se_total
        if se is None or se == 0:
            return math.copysign(math.inf, margin) if margin else 0.0
        return margin / se

    def claim(self, min_effect: float) -> tuple[float | None, float | None]:
        """(p, z) of the verdict's own claim for the confidence formula (confidence.py): z is signed
        towards the claim. Undecided: the lean towards the hypothesis, z = improvement / SE, p = Phi(-z)."""
        if self.improvement is None or self.se_total is None:
            return None, None
        if self.result == "success":
            return self.p_adjusted, self.margin_z(self.improvement)
        if self.rule == "worse":
            return self.p_adjusted, self.margin_z(-self.improvement)
        if self.rule == "ci_excludes_min_effect" and self.control_mean:
            return self.p_failure, self.margin_z(min_effect * abs(self.control_mean) - self.improvement)
        z = self.margin_z(self.improvement)
        return conf.one_sided_p(z), z

    def lean_z(self) -> float | None:
        """How far the data lean towards the hypothesis (the treatment better), in SE."""
        if self.improvement is None or self.se_total is None:
            return None
        return self.margin_z(self.improvement)

    def seed_side(self) -> str:
        """Which side of the comparison depends on the seed, in words."""
        if self.treatment_seeded and self.control_seeded:
            return f"both {self.arm} and the control {self.control} depend on the seed"
        if self.control_seeded:
            return f"the control {self.control} depends on the seed ({self.arm} does not)"
        return f"{self.arm} depends on the seed (the control {self.control} does not)"


def _block_length(n_tokens: int, spec: StoredSpec | None) -> int:
    """Scored tokens per eval window (ctx - 1 - first scored position), if it tiles the tokens."""
    ev = spec.eval if spec is not None else EvalData()
    ctx = ev.ctx
    first = ctx // 2 if ev.score == "second_half" else 0
    per_window = ctx - 1 - first
    if per_window > 0 and n_tokens % per_window == 0 and n_tokens // per_window >= 8:
        return per_window
    return max(1, int(round(math.sqrt(n_tokens))))


def judge_arm(arm: str, control: str, c_runs: dict[int, SeedRun], t_runs: dict[int, SeedRun],
              crit: Criterion, spec: StoredSpec | None = None, seeded: dict[str, bool] | None = None) -> ArmJudgement:
    """Everything but Holm and the final rules (those need all arms)."""
    j = ArmJudgement(arm, control)
    j.treatment_seeded = _seed_dependent(arm, t_runs, seeded, crit.metric)
    j.control_seeded = _seed_dependent(control, c_runs, seeded, crit.metric)
    j.seed_dependent = j.treatment_seeded or j.control_seeded
    seeds = sorted(s for s in c_runs if s in t_runs and crit.metric in c_runs[s].metrics
                   and crit.metric in t_runs[s].metrics)
    j.seeds = seeds
    j.bits_control = _mean(bits_of(r.metrics) for r in c_runs.values())
    j.bits_treatment = _mean(bits_of(r.metrics) for r in t_runs.values())
    if not seeds:
        j.rule = "no_pairs"
        j.notes.append(f"no seed has both arms measured on {crit.metric} yet")
        return j
    c = np.array([c_runs[s].metrics[crit.metric] for s in seeds], dtype=np.float64)
    t = np.array([t_runs[s].metrics[crit.metric] for s in seeds], dtype=np.float64)
    imp = (c - t) if crit.lower_is_better else (t - c)
    j.control_mean, j.treatment_mean = float(c.mean()), float(t.mean())
    j.improvement = float(imp.mean())
    scale = abs(j.control_mean)
    rel = (lambda x: x / scale) if scale > 0 else (lambda x: None)
    j.effect = rel(j.improvement)
    j.deterministic = len(seeds) >= 2 and bool(np.all(c == c[0]) and np.all(t == t[0]))

    cis = []
    if j.deterministic:
        j.notes.append(f"both arms gave identical {crit.metric} on all {len(seeds)} seeds: no seed noise, "
                       f"no seed test needed")
    elif len(seeds) >= MIN_SEEDS_FOR_T:
        pt = paired_t(imp, crit.alpha)
        j.p_seed, j.se_seed = pt.p, pt.se
        if scale > 0:
            cis.append((pt.ci[0] / scale, pt.ci[1] / scale))
    else:
        j.notes.append(f"{len(seeds)} seed(s): seed-to-seed noise not tested (a paired t-test needs "
                       f"{MIN_SEEDS_FOR_T})")

    tokens = [(c_runs[s].per_token, t_runs[s].per_token) for s in seeds]
    if crit.metric == "kld_mean" and all(a is not None and b is not None and a.shape == b.shape
                                         and a.size == tokens[0][0].size for a, b in tokens):
        c_tok = np.mean([a for a, _ in tokens], axis=0, dtype=np.float64)
        t_tok = np.mean([b for _, b in tokens], axis=0, dtype=np.float64)
        block = _block_length(c_tok.size, spec)
        bs = block_bootstrap(c_tok, t_tok, block, crit.alpha, crit.lower_is_better)
        j.p_tokens, j.se_tokens = bs.p, bs.se
        if bs.ci_relative is not None:
            cis.append(bs.ci_relative)
        for s, (a, b) in zip(seeds, tokens):
            one = block_bootstrap(a, b, block, crit.alpha, crit.lower_is_better, n_boot=1000)
            j.per_seed.append({"seed": s, "p_tokens": one.p, "ci": one.ci_relative})
    elif crit.metric == "kld_mean":
        j.notes.append("per-token KLD missing or of different lengths: no token bootstrap")
    else:
        j.notes.append(f"criterion {crit.metric} has no per-token values: seeds are the only replicates")

    ps = [p for p in (j.p_seed, j.p_tokens) if p is not None]
    j.p_value = max(ps) if ps else None
    if cis:
        j.ci = (min(lo for lo, _ in cis), max(hi for _, hi in cis))
    se = j.se_total
    if se is not None and scale > 0:
        margin = crit.min_effect * scale - j.improvement        # > 0: short of min_effect
        if se == 0:
            j.p_failure = 0.0 if margin > 0 else 1.0
        else:
            j.p_failure = 0.5 * math.erfc(margin / (se * math.sqrt(2)))   # Phi(-margin / se)
    by_seed = {s: (cv, tv) for s, cv, tv in zip(seeds, c, t)}
    for row in j.per_seed:
        cv, tv = by_seed[row["seed"]]
        row.update(control=float(cv), treatment=float(tv))
    if not j.per_seed:
        j.per_seed = [{"seed": s, "control": float(cv), "treatment": float(tv)} for s, (cv, tv) in by_seed.items()]
    return j


def too_few_seeds(j: ArmJudgement) -> bool:
    return j.rule != "no_pairs" and j.seed_dependent and len(j.seeds) < MIN_SEEDS_SEEDED


def decide(j: ArmJudgement, crit: Criterion) -> None:
    if j.rule == "no_pairs":
        j.result = "inconclusive"
        return
    if too_few_seeds(j):
        j.result, j.rule = "inconclusive", "too_few_seeds"
        j.notes.append(f"{j.seed_side()}: with {len(j.seeds)} seed(s), fewer than {MIN_SEEDS_SEEDED}, seed-to-seed "
                       f"noise cannot be told from an effect; not in Holm's family")
        return
    a = crit.alpha
    significant = j.p_adjusted is not None and j.p_adjusted < a
    if j.p_adjusted is None:
        j.result, j.rule = "inconclusive", "no_test"
    elif significant and j.effect is not None and j.effect >= crit.min_effect:
        j.result, j.rule = "success", "better_by_min_effect"
    elif significant and j.improvement < 0:
        j.result, j.rule = "failure", "worse"
    elif j.ci is not None and j.ci[1] < crit.min_effect:
        j.result, j.rule = "failure", "ci_excludes_min_effect"
    else:
        j.result, j.rule = "inconclusive", "not_decided"


def ttt_criterion_runs(arms: dict[str, dict[int, SeedRun]], crit: Criterion, spec: StoredSpec | None
                       ) -> dict[str, dict[int, SeedRun]]:
    """A criterion measured under test-time training (`<m>_ttt`, eval/ttt.py): an arm without `ttt:` is
    judged by its standard `<m>`, since TTT that trains nothing scores every window as the standard
    evaluation does (so `q_ttt` can be judged against its own recipe `q` as control). An arm whose spec
    has `ttt:` is judged only by its own `<m>_ttt`."""
    if not crit.metric.endswith(TTT_SUFFIX):
        return arms
    base = crit.metric.removesuffix(TTT_SUFFIX)
    configs = (spec.arms if spec is not None else None) or {}
    out = {}
    for name, runs in arms.items():
        config = configs.get(name)
        if isinstance(config, dict) and config.get("ttt") is not None:
            out[name] = runs
            continue
        out[name] = {s: r if crit.metric in r.metrics or base not in r.metrics else
                     SeedRun(r.seed, {**r.metrics, crit.metric: r.metrics[base]}, r.per_token) for s, r in runs.items()}
    return out


def judge_run_set(arms: dict[str, dict[int, SeedRun]], arm_order: list[str], control: str | None,
                  crit: Criterion, spec: StoredSpec | None = None, seeded: dict[str, bool] | None = None,
                  reference: dict[str, str] | None = None) -> dict[str, ArmJudgement]:
    """Judge every treatment arm of one run set; the control (or every arm without one) and every
    reference arm are baselines. `spec`: the experiment's stored spec (its eval windows are the
    bootstrap's blocks); `seeded`: arm -> depends on the seed (default: `spec.seeded`, from
    `quantatlas.spec.Arm.seeded`); `reference`: arm -> why it is a reference point (default:
    `reference_arms(spec)`)."""
    if seeded is None:
        seeded = spec.seeded if spec is not None else {}
    if reference is None:
        reference = reference_arms(spec)
    arms = ttt_criterion_runs(arms, crit, spec)
    out: dict[str, ArmJudgement] = {}
    if control is None or control not in arm_order or len(arm_order) < 2:
        for name in arm_order:
            if arms.get(name):
                ref = name in reference and name != control
                out[name] = ArmJudgement(name, control, result="baseline", rule="reference" if ref else "baseline",
                                         seeds=sorted(arms[name]), notes=[reference[name]] if ref else [])
                _baseline_stats(out[name], arms[name], crit)
        return out
    c_runs = arms.get(control) or {}
    for name in arm_order:
        if name != control and name in reference and arms.get(name):
            out[name] = ArmJudgement(name, control, result="baseline", rule="reference", seeds=sorted(arms[name]),
                                     notes=[reference[name]])
            _baseline_stats(out[name], arms[name], crit)
    treatments = [a for a in arm_order if a != control and a not in reference and arms.get(a)]
    judged = [judge_arm(a, control, c_runs, arms[a], crit, spec, seeded) for a in treatments]
    for j, p_adj in zip(judged, holm([None if too_few_seeds(j) else j.p_value for j in judged])):
        j.p_adjusted = p_adj
        decide(j, crit)
        out[j.arm] = j
    if c_runs:
        b = ArmJudgement(control, control, result="baseline", rule="baseline", seeds=sorted(c_runs))
        _baseline_stats(b, c_runs, crit)
        out[control] = b
    _mark_dominated(out, arms, crit)
    _mark_over_cap(out, arms)
    return out


def _mark_over_cap(out: dict[str, ArmJudgement], arms: dict[str, dict[int, SeedRun]]) -> None:
    """Arms whose artifact exceeded the spec's `artifact:` cap in any seed (the runs' `over_cap`)."""
    for name, j in out.items():
        over = [r.metrics for r in (arms.get(name) or {}).values() if r.metrics.get("over_cap") == 1.0]
        if over:
            j.over_cap = (max(m.get("artifact_bytes", math.nan) for m in over),
                          max(m.get("artifact_cap", math.nan) for m in over))


def _baseline_stats(j: ArmJudgement, runs: dict[int, SeedRun], crit: Criterion) -> None:
    vals = [r.metrics.get(crit.metric) for r in runs.values()]
    j.treatment_mean = _mean(vals)
    j.bits_treatment = _mean(bits_of(r.metrics) for r in runs.values())
    vals = [v for v in vals if v is not None]
    j.deterministic = len(vals) >= 2 and all(v == vals[0] for v in vals)


def _mark_dominated(out: dict[str, ArmJudgement], arms: dict[str, dict[int, SeedRun]], crit: Criterion) -> None:
    """For treatments costing more bits than the control: an arm with no more bits and a better mean."""
    means = {a: (_mean(r.metrics.get(crit.metric) for r in runs.values()),
                 _mean(bits_of(r.metrics) for r in runs.values())) for a, runs in arms.items() if runs}
    for j in out.values():
        d = j.bits_delta
        if j.result == "baseline" or d is None or d <= BITS_TOLERANCE or j.treatment_mean is None:
            continue
        best = None
        for other, (m, bits) in means.items():
            if other == j.arm or m is None or bits is None or bits > j.bits_treatment + BITS_TOLERANCE:
                continue
            better = m < j.treatment_mean if crit.lower_is_better else m > j.treatment_mean
            if better and (best is None or (m < best[1] if crit.lower_is_better else m > best[1])):
                best = (other, m, bits)
        if best:
            j.dominated_by = best[0]


# ---- across run sets -----------------------------------------------------------------------

@dataclass
class RunSetInfo:
    id: int
    identity: tuple            # (machine, contributor): what makes a reproduction independent
    label: str                 # for texts: contributor@host


@dataclass
class FinalVerdict:
    arm: str
    control: str | None
    result: str
    primary: ArmJudgement
    primary_run_set: RunSetInfo
    reproductions: list[tuple[RunSetInfo, ArmJudgement, bool, bool]]   # (run set, judgement, agrees, independent)
    models_holding: int
    models_total: int
    confidence: float
    terms: conf.Terms
    text: str = ""
    #: the confidence from this model's run sets alone: the other models of the family not counted as
    #: confirmations (what a study's line takes the least of: `studies.py`)
    confidence_own: float | None = None

    def as_dict(self, crit: Criterion) -> dict:
        j = self.primary
        return {
            "arm": self.arm, "control": self.control, "result": self.result, "rule": j.rule,
            "metric": crit.metric, "p_value": j.p_value, "p_adjusted": j.p_adjusted, "effect": j.effect,
            "ci": list(j.ci) if j.ci else None, "confidence": self.confidence, "text": self.text,
            "bits_delta": j.bits_delta, "bits": j.bits_treatment, "bits_control": j.bits_control,
            "dominated_by": j.dominated_by, "n_seeds": len(j.seeds), "seeds": j.seeds,
            "control_mean": j.control_mean, "treatment_mean": j.treatment_mean,
            "confidence_own": self.confidence_own, "reproductions": len(self.reproductions),
            "reproductions_agree": sum(1 for _, _, agree, _ in self.reproductions if agree),
            "models": self.models_holding, "models_total": self.models_total,
            "over_cap": j.over_cap is not None, "reference": j.rule == "reference",
            "seeded": None if j.result == "baseline" else {"treatment": j.treatment_seeded,
                                                           "control": j.control_seeded},
        }

    def details(self) -> dict:
        j = self.primary
        return {
            "rule": j.rule, "p_seed": j.p_seed, "p_tokens": j.p_tokens, "p_failure": j.p_failure,
            "se_seed": j.se_seed, "se_tokens": j.se_tokens, "improvement": j.improvement,
            "deterministic": j.deterministic, "notes": j.notes, "per_seed": j.per_seed,
            "confidence_terms": self.terms.as_dict(), "run_set": self.primary_run_set.label,
            "reproductions": [{"run_set": rs.label, "result": rj.result, "effect": rj.effect, "agrees": agree,
                               "independent": ind} for rs, rj, agree, ind in self.reproductions],
        }


def combine_run_sets(per_run_set: list[tuple[RunSetInfo, dict[str, ArmJudgement]]], arm: str,
                     crit: Criterion, sibling_results: list[str]) -> FinalVerdict | None:
    """The verdict for `arm` over every run set (oldest first) and the models of the family."""
    have = [(rs, js[arm]) for rs, js in per_run_set if arm in js and js[arm].seeds]
    if not have:
        return None
    (rs0, j0), rest = have[0], have[1:]
    reproductions, seen = [], {rs0.identity}
    agreeing = {rs0.identity}
    for rs, j in rest:
        agree = j.result == j0.result
        independent = rs.identity not in seen
        seen.add(rs.identity)
        if agree:
            agreeing.add(rs.identity)
        reproductions.append((rs, j, agree, independent))
    results = {j0.result} | {j.result for _, j, _, _ in reproductions}
    result = "conflict" if {"success", "failure"} <= results else j0.result
    decisive = j0.result in ("success", "failure", "baseline")
    holding = 1 + (sum(1 for r in sibling_results if r == j0.result) if decisive else 0)
    k = len(agreeing) + holding - 1
    terms = _confidence_terms(result, j0, crit, k)
    own = terms if holding == 1 else _confidence_terms(result, j0, crit, len(agreeing))
    fv = FinalVerdict(arm, j0.control, result, j0, rs0, reproductions, holding, 1 + len(sibling_results),
                      terms.confidence, terms, confidence_own=own.confidence)
    fv.text = verdict_text(fv, crit)
    return fv


def _confidence_terms(result: str, j0: ArmJudgement, crit: Criterion, k: int) -> conf.Terms:
    """The confidence of the stated `result` (confidence.py) with k confirmations."""
    if result == "conflict":
        return conf.conflict_confidence(k)
    if j0.result == "baseline":
        return conf.baseline_confidence(len(j0.seeds), j0.deterministic, k)
    if j0.result == "inconclusive":
        return conf.undecided_confidence(j0.lean_z(), len(j0.seeds), j0.deterministic, crit.alpha, k)
    p, z = j0.claim(crit.min_effect)
    return conf.verdict_confidence(p, z, len(j0.seeds), j0.deterministic, crit.alpha, k)


def own_model_confidence(summary: dict, details: dict | None = None) -> float | None:
    """An arm verdict's confidence from its own model's run sets alone (`FinalVerdict.confidence_own`; for a
    verdict cached before it was kept, recomputed from its confidence terms with the other models where it
    holds taken out of k, and never above the confidence stored). None without a confidence."""
    if summary.get("confidence_own") is not None:
        return summary["confidence_own"]
    stored = summary.get("confidence")
    terms = (details or {}).get("confidence_terms")
    if stored is None or not isinstance(terms, dict):
        return stored
    others = max(int(summary.get("models") or 1) - 1, 0)   # other models count only where it is decided
    if not others:
        return stored
    k = max(int(terms.get("k") or 1) - others, 1)
    s_n = float(terms.get("s_n", 0))
    if terms.get("kind") == "decided":
        value = max(conf.combine(float(terms.get("s_p", 0)) * float(terms.get("s_z", 0)) * s_n, k),
                    conf.DECIDED_FLOOR)
    elif terms.get("kind") == "baseline":
        value = conf.combine(s_n, k)
    else:   # a conflict
        value = 0.0
    return min(value, stored)


# ---- words -------------------------------------------------------------------------------

def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f} %"


def format_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "< 1e-6" if p < 1e-6 else f"{p:.2g}"


def verdict_text(fv: FinalVerdict, crit: Criterion) -> str:
    j = fv.primary
    m, a = crit.metric, crit.alpha
    parts = []
    if j.over_cap is not None:
        parts.append(f"OVER THE ARTIFACT CAP ({j.over_cap[0]:.0f} > {j.over_cap[1]:.0f} bytes compressed): "
                     f"{fv.arm} does not fit the spec's `artifact:` limit.")
    if j.result == "baseline":
        v = "n/a" if j.treatment_mean is None else f"{j.treatment_mean:.6g}"
        bits = "" if j.bits_treatment is None else f", {j.bits_treatment:.3f} bits/param"
        if j.rule == "reference":
            parts.append(f"reference: {fv.arm} is a reference point, not judged as a treatment "
                         f"({'; '.join(j.notes)}) ({m} {v}{bits}, {len(j.seeds)} seed(s)).")
        else:
            parts.append(f"baseline: {fv.arm} is the reference point ({m} {v}{bits}, {len(j.seeds)} seed(s)).")
    else:
        lead = {"success": "success", "failure": "failure", "inconclusive": "inconclusive"}[j.result]
        if j.rule == "too_few_seeds":
            lead = "inconclusive (too few seeds)"
        if j.rule == "no_pairs":
            parts.append(f"inconclusive: {'; '.join(j.notes)}.")
        else:
            direction = "better" if (j.improvement or 0) >= 0 else "worse"
            eff = f"{_pct(j.effect)} ({direction})" if j.effect is not None else \
                f"{j.improvement:+.6g} absolute (control {m} is 0)"
            ci = f", {100 * (1 - a):.0f} % CI {_pct(j.ci[0])} .. {_pct(j.ci[1])}" if j.ci else ""
            why = {
                "better_by_min_effect": f"better by at least min_effect {100 * crit.min_effect:.1f} % with "
                                        f"Holm p {format_p(j.p_adjusted)} < {a:g}",
                "worse": f"worse than the control with Holm p {format_p(j.p_adjusted)} < {a:g}",
                "ci_excludes_min_effect": f"the CI excludes an improvement of {100 * crit.min_effect:.1f} %",
                "no_test": "no statistical test possible",
                "too_few_seeds": f"{j.seed_side()}, and {len(j.seeds)} seed(s) cannot separate seed noise from "
                                 f"an effect (at least {MIN_SEEDS_SEEDED} are needed; no Holm p)",
                "not_decided": f"neither better by {100 * crit.min_effect:.1f} % with p < {a:g} nor ruled out "
                               f"(Holm p {format_p(j.p_adjusted)})",
            }[j.rule]
            parts.append(f"{lead}: {fv.arm} vs control {j.control} on {m}: effect {eff}{ci}; {why}.")
            tests = []
            if j.p_seed is not None:
                tests.append(f"seeds: paired t p {format_p(j.p_seed)} (n = {len(j.seeds)})")
            if j.p_tokens is not None:
                tests.append(f"tokens: paired block bootstrap p {format_p(j.p_tokens)}")
            if tests:
                parts.append("Tests: " + "; ".join(tests) + ".")
            notes = [n for n in j.notes if not (j.rule == "too_few_seeds" and n.startswith(j.seed_side()))]
            if notes:
                parts.append("Notes: " + "; ".join(notes) + ".")
        d = j.bits_delta
        if d is not None:
            if d > BITS_TOLERANCE:
                rel = f" (+{100 * d / j.bits_control:.1f} %)" if j.bits_control else ""
                s = f"Bits: costs +{d:.3f} bits/param{rel} over the control ({j.bits_treatment:.3f} vs " \
                    f"{j.bits_control:.3f}); judged on quality at that cost"
                if j.dominated_by:
                    s += f"; dominated by arm {j.dominated_by} (no more bits, better {m})"
                parts.append(s + ".")
            elif d < -BITS_TOLERANCE:
                parts.append(f"Bits: saves {-d:.3f} bits/param against the control ({j.bits_treatment:.3f} vs "
                             f"{j.bits_control:.3f}).")
            else:
                parts.append(f"Bits: same as the control ({j.bits_treatment:.3f} bits/param).")
    if fv.result == "conflict":
        res = ", ".join(f"{rs.label}: {rj.result}" for rs, rj, _, _ in fv.reproductions)
        parts.append(f"CONFLICT: reproductions disagree (first run set {fv.primary_run_set.label}: {j.result}; {res}).")
    elif fv.reproductions:
        agree = sum(1 for _, _, ag, _ in fv.reproductions if ag)
        ind = sum(1 for _, _, ag, i in fv.reproductions if ag and i)
        parts.append(f"Reproductions: {agree} of {len(fv.reproductions)} agree ({ind} independent).")
    if fv.models_total > 1 and fv.result in ("success", "failure"):
        parts.append(f"Holds on {fv.models_holding} of {fv.models_total} models.")
    elif fv.models_total > 1 and fv.result != "baseline":   # an undecided arm holds nowhere, its own model included
        parts.append(f"Undecided on this model (one of {fv.models_total}).")
    t = fv.terms
    terms = f"s_p {t.s_p:.2f} · s_z {t.s_z:.2f} · s_n {t.s_n:.2f}, k = {t.k}"
    if t.kind == "lean":
        lean = "better" if (j.improvement or 0) > 0 else "no better"
        terms = f"undecided, below every decided verdict: leans {lean}, {terms}"
    parts.append(f"Confidence {fv.confidence:.2f} ({terms}).")
    return " ".join(parts)


def choose_primary(verdicts: list[dict], named: str | None, lower_is_better: bool = True) -> dict | None:
    """The arm verdict that stands for the experiment, from arm summaries (`FinalVerdict.as_dict`: arm,
    result, treatment_mean, over_cap): the spec's `primary:` (`named`; None while it has no verdict),
    else the best treatment on the criterion, among the treatments within the artifact cap when any
    is; reference arms and the control (results "baseline") are not treatments. Without any treatment
    (no control), the best arm that is not a reference point. None: nothing judged yet."""
    if named:
        return next((v for v in verdicts if v.get("arm") == named), None)
    treat = [v for v in verdicts if v.get("result") != "baseline"]
    if not treat:     # nothing judged against a control (no control): the arms that are not reference points
        treat = [v for v in verdicts if not v.get("reference")] or verdicts
    fits = [v for v in treat if not v.get("over_cap")] or treat
    measured = [v for v in fits if v.get("treatment_mean") is not None and math.isfinite(v["treatment_mean"])]
    if measured:
        sign = 1.0 if lower_is_better else -1.0
        return min(measured, key=lambda v: sign * v["treatment_mean"])      # the first on a tie (arm order)
    return fits[0] if fits else None


def experiment_result(finals: list[FinalVerdict], has_treatments: bool = False, primary: str | None = None,
                      crit: Criterion | None = None) -> tuple[str | None, float | None, FinalVerdict | None]:
    """(result, confidence, the arm verdict they are) for a whole experiment: the primary arm's
    (`choose_primary`; `primary` is the spec's `primary:`). An arm over the artifact cap cannot make
    the experiment a success: it stands only when no treatment fits, and then as inconclusive with
    the confidence of its lean (confidence.py). baseline with no treatment arm; None (pending) while no arm, or no treatment of an experiment that has some (or not the
    named primary), has been judged yet."""
    if not finals:
        return None, None, None
    crit = crit or Criterion()
    if has_treatments and not primary and all(f.primary.result == "baseline" for f in finals):
        return None, None, None
    chosen = choose_primary([{"arm": f.arm, "result": f.primary.result, "treatment_mean": f.primary.treatment_mean,
                              "over_cap": f.primary.over_cap is not None, "reference": f.primary.rule == "reference"}
                             for f in finals], primary, crit.lower_is_better)
    if chosen is None:
        return None, None, None
    pick = next(f for f in finals if f.arm == chosen["arm"])
    j = pick.primary
    if pick.result == "success" and j.over_cap is not None:
        terms = conf.undecided_confidence(j.lean_z(), len(j.seeds), j.deterministic, crit.alpha, pick.terms.k)
        return "inconclusive", terms.confidence, pick
    return pick.result, pick.confidence, pick
