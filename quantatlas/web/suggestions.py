"""Left to try: experiments nobody has run yet, ranked, each a ready-to-run spec; and the tables of
technique pairs never stacked and bit budgets not yet covered.

Candidates, per plot of the landscape (model hash x eval source x ctx x score; web/points.py):

    add     a measured arm A plus a technique T it lacks, T's config taken from an arm that holds it
            (anywhere in the atlas): the treatment A+T against A as control
    swap    the same where T is of a kind an arm holds one of (a solver, a codec, a recovery method, an
            option's value): T replaces A's; a codec only at a budget it produces (below)
    budget  A one budget up or down, where its codec produces it, against the best measured arm at that
            budget (A itself where that budget has none)

A reference arm (fp16, `reference: true`) is never a base and gives no budget. A candidate whose
technique set was measured at its budget on that plot is dropped. A budget is `techniques.bit_budget` of
bits per weight. The budgets a codec is proposed at are its config's (`techniques.codec_budgets`: its
`bits` option's range, a ggml type's one size) within BUDGET_STEP of one it was measured at: its
overheads (a VQ codebook's above all) grow with its bits and shrink with the model's matrices, so the
`bits` option is trusted near measurements only. A codec whose measured arms land elsewhere than its
`bits` option says (sparse24 stores 2 of every 4 weights), or whose config does not say (aqlm, fp8, a
gguf mixture), is proposed only at the budgets and configs it was measured with. A candidate's bits are
its base's moved by what the two codec configs store (`Atlas.bits_with`). Arms registered but never run
that would measure a candidate are listed with it.

Ranking: an additive model of log mean KLD over every measured point,

    log KLD = a_(plot, budget) + g * (bits - budget) + sum_t b_t [t in arm] + e,      e ~ N(0, s^2),

a level per plot and budget (flat prior), a slope g within a budget (Q4_0's 4.5 bits against uniform's
4.125), g ~ N(-ln 4, 0.5^2) (a bit more quarters the error), b_t ~ N(0, 1) (a technique's effect before
any measurement: within e^±2), s^2 from the residuals (a scaled inverse-chi^2 prior, 0.3 on 2 degrees of
freedom). The effects are thus measured at equal budget. A candidate's predicted log KLD is A's measured
one plus the effects it adds, minus those it removes, plus the change of level and of bits within the
budget (a budget the plot has no level at: along the prior slope); its standard deviation comes from the
posterior covariance and s (the interactions an additive model misses). The gain is log(frontier KLD at
the candidate's bits) minus the prediction: the plot's Pareto frontier, linear in log KLD between its
points and extended along g beyond its ends. Candidates rank by expected improvement
E[max(gain, 0)] = m Phi(m/sd) + sd phi(m/sd): a confident small gain over the frontier and an uncertain
large one both rank; a gap on the frontier (a budget with no good point) is a large gain.
"""
from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING

import numpy as np
import yaml

from quantatlas.canonical import canonical_json
from quantatlas.quant.config import ConfigError, identity_default, parse_config, registry
from quantatlas.spec import SpecError, arm_of, parse_spec, runnable_arm
from quantatlas.web.points import arm_points, pareto_front
from quantatlas.web.techniques import (KINDS_ONE_PER_ARM, bit_budget, codec_budgets, compatible, is_option, kind,
                                       nominal_bits, option_parts, techniques)

if TYPE_CHECKING:
    from quantatlas.atlas.ledger import Ledger

PRIOR_EFFECT_SD = 1.0
PRIOR_SLOPE, PRIOR_SLOPE_SD = -math.log(4.0), 0.5
PRIOR_NOISE_SD, PRIOR_NOISE_DOF = 0.3, 2.0
DEFAULT_LIMIT = 50
MIN_SEEDS = 3               # a seeded arm with fewer seeds is "inconclusive (too few seeds)" (atlas/verdict.py)
#: budget moves go this many whole bits from a measured budget at most (the additive model's bits slope
#: is a straight line in log KLD; real curves bend, so it is trusted only near what was measured)
BUDGET_STEP = 1


# ---- the additive model ------------------------------------------------------------------------

@dataclass
class EffectModel:
    """Posterior of the additive model (module doc): a level per plot and budget, the slope in bits within
    a budget, and each technique's effect on log KLD; mean and covariance over all of them."""
    levels: list[tuple]       # (plot, budget) of each level, in the order of `mean`
    names: list[str]          # techniques, after the levels and the slope
    mean: np.ndarray
    cov: np.ndarray
    noise_sd: float
    n_points: int

    def __post_init__(self):
        self.level_index = {lv: i for i, lv in enumerate(self.levels)}
        self.slope_index = len(self.levels)
        self.index = {t: self.slope_index + 1 + i for i, t in enumerate(self.names)}

    @property
    def slope(self) -> float:
        return float(self.mean[self.slope_index])

    def effect(self, technique: str) -> tuple[float, float]:
        """(mean, sd) of a technique's effect on log KLD (the prior where it was never measured)."""
        i = self.index.get(technique)
        return (0.0, PRIOR_EFFECT_SD) if i is None else (float(self.mean[i]), math.sqrt(self.cov[i, i]))

    def change(self, plot: tuple, old: tuple[int, float], new: tuple[int, float], added, removed) \
            -> tuple[float, float]:
        """(mean, sd) of the change in log KLD from an arm at (budget, bits) `old` to one at `new` on `plot`,
        adding and removing techniques; sd includes the noise of one new point. A budget the plot has no
        level at is reached along the prior slope, with PRIOR_SLOPE_SD per bit."""
        c = np.zeros(len(self.mean))
        c[self.slope_index] = (new[1] - new[0]) - (old[1] - old[0])    # bits within each budget
        extra_mean = extra_var = 0.0
        if new[0] != old[0]:
            i, j = self.level_index.get((plot, new[0])), self.level_index.get((plot, old[0]))
            if i is not None and j is not None:
                c[i] += 1.0
                c[j] -= 1.0
            else:
                extra_mean, extra_var = PRIOR_SLOPE * (new[0] - old[0]), (PRIOR_SLOPE_SD * (new[0] - old[0])) ** 2
        for sign, ts in ((1.0, added), (-1.0, removed)):
            for t in ts:
                i = self.index.get(t)
                if i is None:
                    extra_var += PRIOR_EFFECT_SD ** 2
                else:
                    c[i] += sign
        var = float(c @ self.cov @ c) + extra_var + self.noise_sd ** 2
        return float(c @ self.mean) + extra_mean, math.sqrt(max(var, 0.0))


def fit_effects(points: list[dict]) -> EffectModel:
    """The additive model (module doc) fitted on measured points: log kld_mean against the point's plot and
    budget (a level each), its bits within the budget and its techniques."""
    rows = [p for p in points if _usable(p) and p["techniques"]]
    names = sorted({t for p in rows for t in p["techniques"]})
    levels = sorted({(p["group"], bit_budget(p["bits_per_weight"])) for p in rows}, key=repr)
    li = {lv: i for i, lv in enumerate(levels)}
    slope = len(levels)
    ti = {t: slope + 1 + i for i, t in enumerate(names)}
    n, k = len(rows), slope + 1 + len(names)
    X = np.zeros((n, k))
    y = np.array([math.log(p["kld_mean"]) for p in rows])
    for r, p in enumerate(rows):
        budget = bit_budget(p["bits_per_weight"])
        X[r, li[(p["group"], budget)]] = 1.0
        X[r, slope] = p["bits_per_weight"] - budget
        for t in p["techniques"]:
            X[r, ti[t]] = 1.0
    precision = np.concatenate([np.full(len(levels), 1e-6), [PRIOR_SLOPE_SD ** -2],
                                np.full(len(names), PRIOR_EFFECT_SD ** -2)])
    prior_mean = np.zeros(k)
    prior_mean[slope] = PRIOR_SLOPE
    s2 = PRIOR_NOISE_SD ** 2
    for _ in range(6):      # the noise variance and the coefficients, to a fixed point
        A = X.T @ X / s2 + np.diag(precision)
        theta = np.linalg.solve(A, X.T @ y / s2 + precision * prior_mean)
        resid = y - X @ theta
        s2 = (float(resid @ resid) + PRIOR_NOISE_DOF * PRIOR_NOISE_SD ** 2) / (n + PRIOR_NOISE_DOF)
    A = X.T @ X / s2 + np.diag(precision)
    theta = np.linalg.solve(A, X.T @ y / s2 + precision * prior_mean)
    return EffectModel(levels, names, theta, np.linalg.inv(A), math.sqrt(s2), n)


def _usable(p: dict) -> bool:
    b, k = p.get("bits_per_weight"), p.get("kld_mean")
    return (p.get("merged_into") is None and k is not None and k > 0 and math.isfinite(k) and b is not None
            and math.isfinite(b) and bit_budget(b) is not None)


def _phi(z: float) -> float:
    return math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _Phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def expected_improvement(mean: float, sd: float) -> float:
    """E[max(G, 0)] for G ~ N(mean, sd^2)."""
    if sd <= 0:
        return max(mean, 0.0)
    z = mean / sd
    return mean * _Phi(z) + sd * _phi(z)


# ---- the atlas as the candidates see it ---------------------------------------------------------

def normal_config(config: dict | None) -> dict | None:
    """An arm config with every option written (the typed Arm's JSON); None if it does not validate."""
    arm = arm_of(config)
    return None if arm is None else arm.model_dump(mode="json")


class Atlas:
    """The measured points, the registered arms and their specs, what each codec produces, and the
    frontier of each plot."""

    def __init__(self, led: Ledger):
        self.points = [p for p in arm_points(led) if p["merged_into"] is None]
        with led.read() as q:
            arms = q.arms(include_merged=False)
            exps = {e.id: e for e in q.experiments_with_specs({a.experiment_id for a in arms})}
        self.specs = {i: e.spec.data for i, e in exps.items()}
        self.models = {i: e.model for i, e in exps.items()}
        measured = {(p["experiment"], p["arm"]) for p in self.points}
        self.registered = [(a.experiment_id, a.name, a.config) for a in arms]
        self.unrun = [{"experiment": e, "arm": n, "model": self.models.get(e), "techniques": techniques(c),
                       "budget": _config_budget(c)} for e, n, c in self.registered if (e, n) not in measured]
        for p in self.points:
            p["budget"] = None if p["reference"] else bit_budget(p["bits_per_weight"])
        self.usable = [p for p in self.points if _usable(p)]
        self.plots: dict[tuple, list[dict]] = defaultdict(list)
        for p in self.usable:
            self.plots[p["group"]].append(p)
        self.plot_models = {g: sorted({p["model"] or "?" for p in ps}) for g, ps in self.plots.items()}
        self.frontiers: dict[tuple, list[tuple[float, float]]] = {}
        self.measured_keys = {(p["group"], frozenset(p["techniques"]), bit_budget(p["bits_per_weight"]))
                              for p in self.usable}
        self._codecs()

    def _codecs(self) -> None:
        """Which codecs' `bits` option predicts their measured budget, and the budgets each was measured at
        (arms whose bits are the codec's alone: no overrides, no allocation)."""
        self.trusted: dict[str, bool] = {}
        self.measured_codec: dict[str, dict[int, dict]] = defaultdict(dict)
        self.measured_bits: dict[str, float] = {}
        self.overheads: dict[str, list[float]] = defaultdict(list)
        for p in sorted(self.usable, key=lambda p: p["kld_mean"]):
            if p["reference"]:
                continue
            cfg = normal_config(p["config"])
            if cfg is None or not cfg.get("codec") or cfg.get("overrides") or cfg.get("allocate"):
                continue
            (name, _), = cfg["codec"].items()
            label = _codec_key(cfg["codec"])
            b = bit_budget(p["bits_per_weight"])
            self.measured_codec[label].setdefault(b, cfg["codec"])
            self.measured_bits.setdefault(canonical_json(cfg["codec"]), p["bits_per_weight"])
            if name != "gguf":
                nominal = nominal_bits(parse_config("codec", cfg["codec"]))
                self.trusted[name] = self.trusted.get(name, True) and bit_budget(nominal) == b
                if nominal is not None:
                    self.overheads[name].append(p["bits_per_weight"] - nominal)

    def producible(self, codec: dict, near: bool = False) -> dict[int, dict]:
        """Budget -> codec config for a codec written as in a spec (module doc). `near`: only budgets within
        BUDGET_STEP of one the codec was measured at (its overheads, a VQ codebook's above all, grow with
        its bits and shrink with the model's matrices, so its `bits` option is trusted near measurements)."""
        (name, _), = codec.items()
        measured = self.measured_codec.get(_codec_key(codec), {})
        if name != "gguf" and self.trusted.get(name, True):
            rule = codec_budgets(codec)
            if rule:
                if near:
                    rule = {b: c for b, c in rule.items() if any(abs(b - m) <= BUDGET_STEP for m in measured)}
                return rule
        return dict(measured)

    def codec_bits(self, codec: dict | None) -> float | None:
        """Bits per weight a codec config stores: as measured (an arm whose bits are the codec's alone), else
        what its config says plus the overhead its codec was measured with (the median over its arms)."""
        if codec is None:
            return None
        measured = self.measured_bits.get(canonical_json(codec))
        if measured is not None:
            return measured
        try:
            nominal = nominal_bits(parse_config("codec", codec))
        except ConfigError:
            return None
        if nominal is None:
            return None
        over = self.overheads.get(next(iter(codec)))
        return nominal + (float(np.median(over)) if over else 0.0)

    def bits_with(self, point: dict, old: dict | None, new: dict | None) -> float:
        """Bits per weight of a measured arm with its codec `old` replaced by `new`: `new`'s bits plus what the
        arm stores besides its codec (overrides, a head)."""
        a, b = self.codec_bits(old), self.codec_bits(new)
        if b is None:
            return point["bits_per_weight"]
        return b + (0.0 if a is None else point["bits_per_weight"] - a)

    def frontier_log_kld(self, plot: tuple, bits: float, slope: float) -> float:
        """log KLD the plot's Pareto frontier reaches at `bits`: linear in log KLD between its points (what
        the known arms promise between budgets), and along the slope beyond its first and last points."""
        front = self.frontiers.get(plot)
        if front is None:
            pts = [(p["bits_per_weight"], math.log(p["kld_mean"])) for p in self.plots.get(plot, [])]
            front = self.frontiers[plot] = [pts[i] for i in pareto_front(pts)]
        if bits <= front[0][0]:
            return front[0][1] + slope * (bits - front[0][0])
        if bits >= front[-1][0]:
            return front[-1][1] + slope * (bits - front[-1][0])
        for (x0, y0), (x1, y1) in zip(front, front[1:]):
            if x0 <= bits <= x1:
                return y0 if x1 == x0 else y0 + (y1 - y0) * (bits - x0) / (x1 - x0)
        return front[-1][1]


def _codec_key(codec: dict) -> str:
    (name, opts), = codec.items()
    return f"gguf:{str((opts or {}).get('ftype', '?')).upper()}" if name == "gguf" else name


def _config_budget(config: dict | None) -> int | None:
    """The budget an unrun arm's codec alone says (None when it does not, or other tensors change it)."""
    arm = arm_of(config)
    if arm is None or arm.codec is None or arm.overrides or arm.allocate is not None:
        return None
    return bit_budget(nominal_bits(arm.codec))


# ---- grafting a technique onto an arm ----------------------------------------------------------

def _section(cfg: dict, scope: str | None) -> dict | None:
    """The mapping an option label's scope names inside an arm config (normal_config's JSON)."""
    if scope is None:
        return cfg
    if scope == "solver":
        return cfg.get("solver_options")
    if scope == "codec":
        codec = cfg.get("codec")
        return next(iter(codec.values())) if isinstance(codec, dict) and codec else None
    if scope.startswith("transform:"):
        name = scope.split(":", 1)[1]
        return next((opts for t in cfg.get("transforms") or [] for n, opts in t.items() if n == name), None)
    value = cfg.get(scope)
    return value if isinstance(value, dict) else None


def _accepts(cfg: dict, scope: str | None, option: str) -> bool:
    """Whether the config the scope names in `cfg` has that option (its typed config's fields)."""
    if scope in ("solver", "codec") or (scope or "").startswith("transform:"):
        if scope == "solver":
            family, name = "solver", cfg.get("solver") or "rtn"
        elif scope == "codec":
            family, name = "codec", next(iter(cfg.get("codec") or {"": None}))
        else:
            family, name = "transform", scope.split(":", 1)[1]
        cls = registry(family).get(name)
        return cls is not None and option in cls.model_fields
    return option in (_section(cfg, scope) or {})


def _override_label(o: dict) -> str:
    """What WeightsStep calls an override: its codec's name (a gguf mixture's file type), or fp16."""
    codec = o.get("codec")
    if not codec:
        return "fp16"
    key = _codec_key(codec)
    return key.split(":", 1)[1] if key.startswith("gguf:") else key


def _carry_solver_options(base: dict, example: dict) -> dict:
    """The example's solver options, with the base's own choices (away from first defaults) kept where
    the new solver has them."""
    out = dict(example.get("solver_options") or {})
    old = registry("solver").get(base.get("solver") or "rtn")
    new = registry("solver").get(example.get("solver") or "rtn")
    for k, v in (base.get("solver_options") or {}).items():
        if old is not None and new is not None and k in new.model_fields and k in old.model_fields \
                and v != identity_default(old.model_fields[k]):
            out[k] = v
    return out


def graft(base: dict, technique: str, example: dict, budget: int | None, codec_at) -> dict | None:
    """`base` (normal_config) with `technique` as `example` (normal_config) holds it; None where it cannot
    be written so. `codec_at(codec, budget)` gives a codec config at `budget` (a swap keeps the budget)."""
    cfg = copy.deepcopy(base)
    if is_option(technique):
        scope, option, _ = option_parts(technique)
        src, dst = _section(example, scope), _section(cfg, scope)
        if src is None or dst is None or option not in src or not _accepts(cfg, scope, option):
            return None
        dst[option] = copy.deepcopy(src[option])
        return cfg
    name, _, what = technique.partition(":")
    if name == "solver":
        cfg["solver"], cfg["solver_options"] = example["solver"], _carry_solver_options(base, example)
    elif name in ("codec", "gguf"):
        if not example.get("codec") or budget is None:
            return None
        codec = codec_at(example["codec"], budget)
        if codec is None:
            return None
        cfg["codec"] = codec
    elif name == "transform":
        entry = next((t for t in example.get("transforms") or [] if what in t), None)
        if entry is None:
            return None
        cfg["transforms"] = list(cfg.get("transforms") or []) + [copy.deepcopy(entry)]
    elif name == "override":
        entries = [o for o in example.get("overrides") or [] if _override_label(o) == what]
        if not entries:
            return None
        cfg["overrides"] = list(cfg.get("overrides") or []) + copy.deepcopy(entries)
    elif name == "recovery":
        cfg["recovery"] = copy.deepcopy(example.get("recovery"))
    elif technique in example and example[technique] not in (None, [], {}):   # kv, act, allocate, a new step
        cfg[technique] = copy.deepcopy(example[technique])
    else:
        return None
    return cfg


# ---- candidates -----------------------------------------------------------------------------------

@dataclass
class Candidate:
    what: str                 # add | swap | budget
    technique: str | None
    plot: tuple
    base: dict                # the measured point it starts from
    config: dict              # the treatment arm (normal_config)
    techniques: frozenset
    budget: int
    bits: float
    change: tuple[float, float] = (0.0, 0.0)
    gain: tuple[float, float] = (0.0, 0.0)
    score: float = 0.0

    def key(self) -> tuple:
        return (self.plot, self.techniques, self.budget)


def _same_kind_replaced(base_t: frozenset, technique: str) -> set[str]:
    k = kind(technique)
    return {t for t in base_t if kind(t) == k and (k in KINDS_ONE_PER_ARM or is_option(t))}


def _candidates(atlas: Atlas, model: EffectModel) -> list[Candidate]:
    examples: dict[str, list[dict]] = defaultdict(list)
    for p in sorted(atlas.usable, key=lambda p: p["kld_mean"]):
        cfg = normal_config(p["config"])
        if cfg is not None:
            for t in p["techniques"]:
                examples[t].append(cfg)
    for _, _, c in atlas.registered:
        cfg = normal_config(c)
        if cfg is not None:
            for t in techniques(c):
                if cfg not in examples[t]:
                    examples[t].append(cfg)
    labels = sorted(examples)

    def codec_at(codec: dict, budget: int) -> dict | None:
        return atlas.producible(codec, near=True).get(budget)

    out = []
    for p in atlas.usable:
        if p["reference"] or p["budget"] is None:
            continue
        base = normal_config(p["config"])
        if base is None:
            continue
        base_t = frozenset(p["techniques"])
        for t in labels:
            if t in base_t:
                continue
            replaced = _same_kind_replaced(base_t, t)
            if any(not compatible(t, u) for u in base_t - replaced):
                continue
            cfg = next((c for c in (graft(base, t, ex, p["budget"], codec_at) for ex in examples[t][:3])
                        if c is not None), None)
            if cfg is None:
                continue
            approx = frozenset((base_t - replaced) | {t})
            bits = atlas.bits_with(p, base.get("codec"), cfg.get("codec")) if kind(t) == "codec" else \
                p["bits_per_weight"]
            if t == "allocate":     # the allocation's target is the arm's bits: only at the base's budget
                bits = (cfg["allocate"].get("target") or {}).get("bits_per_weight") or math.nan
                if bit_budget(bits) != p["budget"]:
                    continue
            budget = bit_budget(bits)
            if budget is not None:
                out.append(Candidate("swap" if replaced else "add", t, p["group"], p, cfg, approx, budget, bits))
        codec = base.get("codec")
        if codec and not base.get("allocate"):
            for b, c in sorted(atlas.producible(codec, near=True).items()):
                bits = atlas.bits_with(p, codec, c)
                budget = bit_budget(bits)
                if budget is None or budget == p["budget"] or abs(budget - p["budget"]) > BUDGET_STEP:
                    continue
                cfg = dict(copy.deepcopy(base), codec=c)
                out.append(Candidate("budget", None, p["group"], p, cfg, base_t, budget, bits))
    for c in out:
        _score(c, atlas, model)
    return out


def _score(c: Candidate, atlas: Atlas, model: EffectModel) -> None:
    base_t = frozenset(c.base["techniques"])
    c.change = model.change(c.plot, (c.base["budget"], c.base["bits_per_weight"]), (c.budget, c.bits),
                            c.techniques - base_t, base_t - c.techniques)
    predicted = math.log(c.base["kld_mean"]) + c.change[0]
    c.gain = (atlas.frontier_log_kld(c.plot, c.bits, model.slope) - predicted, c.change[1])
    c.score = expected_improvement(*c.gain)


def _short(technique: str) -> str:
    return technique.split(":", 1)[1] if ":" in technique and not is_option(technique) else technique


def _control_for(c: Candidate, atlas: Atlas) -> dict:
    """The arm a candidate is judged against: its base, or for a budget move the best measured arm (not a
    reference) at that budget on the plot (the base where there is none)."""
    if c.what != "budget":
        return c.base
    at = [p for p in atlas.plots[c.plot] if not p["reference"] and p["budget"] == c.budget]
    return min(at, key=lambda p: p["kld_mean"]) if at else c.base


def _spec(c: Candidate, atlas: Atlas, control: dict, name: str, control_name: str, model_name: str) -> dict | None:
    base_spec = atlas.specs.get(c.base["experiment"])
    ctrl_cfg = normal_config(control["config"])
    if not isinstance(base_spec, dict) or ctrl_cfg is None:
        return None
    treat_arm, ctrl_arm = arm_of(c.config), arm_of(ctrl_cfg)
    # at least MIN_SEEDS: a seeded arm needs them for a verdict, and a seed-independent one runs once
    # and is reused for every seed (runner), so they cost it nothing
    seeds = sorted(set(base_spec.get("seeds") or [0]) | set(range(MIN_SEEDS)))
    lo, hi = (math.exp(c.change[0] + s * 2 * c.change[1]) for s in (-1, 1))
    what = {"add": f"adding {c.technique} to {c.base['arm']}", "swap": f"{c.technique} in {c.base['arm']}",
            "budget": f"{c.base['arm']} at {c.budget} bits"}[c.what]
    spec = {"title": f"Left to try: {what}",
            "hypothesis": (f"{name} lowers mean KLD against {control_name} on {model_name}. The atlas's additive "
                           f"model predicts KLD x{math.exp(c.change[0]):.3g} against {c.base['arm']} of "
                           f"{c.base['experiment']} (x{lo:.3g} .. x{hi:.3g}, 2 sd)."),
            "tags": ["left-to-try"],
            "notes": f"written by quantatlas suggest from {c.base['experiment']} / {c.base['arm']}",
            "model": base_spec.get("model", "reference"), "data": base_spec.get("data") or {}, "seeds": seeds,
            "arms": {control_name: runnable_arm(ctrl_arm), name: runnable_arm(treat_arm)},
            "control": control_name, "primary": name}
    for k in ("criterion", "artifact"):
        if base_spec.get(k) is not None:
            spec[k] = base_spec[k]
    try:
        parse_spec(spec)
    except SpecError:
        return None
    return spec


def _arm_name(c: Candidate) -> str:
    if c.what == "budget":
        return f"{c.base['arm']}@{c.budget}bit"
    return f"{c.base['arm']}+{_short(c.technique)}"


def suggestions(led: Ledger, limit: int = DEFAULT_LIMIT, model: str | None = None,
                atlas: Atlas | None = None, effects: EffectModel | None = None) -> list[dict]:
    """The ranked experiments left to try (module doc), at most `limit`, on plots whose model name or
    model hash starts with `model` (all when None); each with its spec (a dict `quantatlas.spec.parse_spec`
    accepts) and the registered arms that would measure it without being run yet."""
    atlas = atlas or Atlas(led)
    effects = effects or fit_effects(atlas.points)
    cands = _candidates(atlas, effects)
    if model:
        cands = [c for c in cands if c.plot[0].startswith(model) or model in atlas.plot_models.get(c.plot, [])]
    cands.sort(key=lambda c: (-c.score, -c.gain[0], c.base["experiment"], c.base["arm"], c.technique or ""))
    out, seen = [], set()
    for c in cands:
        if len(out) >= limit:
            break
        if c.key() in seen or c.key() in atlas.measured_keys:
            continue
        arm = arm_of(c.config)
        if arm is None:
            continue
        real = techniques(c.config)
        if c.technique is not None and c.technique not in real:
            continue
        if real != c.techniques:         # the graft brought more (or fewer) techniques than the label
            c.techniques = real
            _score(c, atlas, effects)
        if c.key() in seen or c.key() in atlas.measured_keys:
            continue
        seen.add(c.key())
        control = _control_for(c, atlas)
        name, control_name = _arm_name(c), control["arm"]
        if control_name == name:
            control_name += "_control"
        models = atlas.plot_models.get(c.plot, ["?"])
        spec = _spec(c, atlas, control, name, control_name, models[0])
        if spec is None:
            continue
        planned = [{"experiment": u["experiment"], "arm": u["arm"]} for u in atlas.unrun
                   if u["model"] in models and u["techniques"] == c.techniques
                   and (u["budget"] is None or u["budget"] == c.budget)]
        out.append({"rank": len(out) + 1, "what": c.what, "technique": c.technique,
                    "model_hash": c.plot[0], "models": models, "eval": None if c.base["eval"] is None else
                    {k: c.base["eval"][k] for k in ("source", "ctx", "score")},
                    "base": {k: c.base[k] for k in ("experiment", "arm", "kld_mean", "bits_per_weight")},
                    "control": {"experiment": control["experiment"], "arm": control["arm"], "name": control_name},
                    "arm": name, "techniques": sorted(c.techniques),
                    "added": sorted(c.techniques - frozenset(c.base["techniques"])),
                    "removed": sorted(frozenset(c.base["techniques"]) - c.techniques),
                    "budget": c.budget, "bits": c.bits,
                    "predicted_kld": c.base["kld_mean"] * math.exp(c.change[0]),
                    "log_kld_change": {"mean": c.change[0], "sd": c.change[1]},
                    "kld_factor": {"mean": math.exp(c.change[0]), "low": math.exp(c.change[0] - 2 * c.change[1]),
                                   "high": math.exp(c.change[0] + 2 * c.change[1])},
                    "frontier_gain": {"mean": c.gain[0], "sd": c.gain[1]},
                    "p_beats_frontier": _Phi(c.gain[0] / c.gain[1]) if c.gain[1] > 0 else float(c.gain[0] > 0),
                    "expected_improvement": c.score, "planned": planned,
                    "spec": spec, "spec_yaml": yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)})
    return out


def merged_spec(chosen: list[dict]) -> dict:
    """One spec from suggestions: the first's, plus the treatment arm of every other suggestion with the
    same base experiment and control (one run measures them all against one control)."""
    first = chosen[0]
    spec = copy.deepcopy(first["spec"])
    for s in chosen[1:]:
        if s["base"]["experiment"] == first["base"]["experiment"] and s["control"] == first["control"] \
                and s["arm"] not in spec["arms"]:
            spec["arms"][s["arm"]] = copy.deepcopy(s["spec"]["arms"][s["arm"]])
            spec["seeds"] = sorted(set(spec["seeds"]) | set(s["spec"]["seeds"]))
    if len(spec["arms"]) > 2:
        spec["title"] = f"Left to try: {len(spec['arms']) - 1} arms against {first['control']['name']}"
        spec["hypothesis"] = " ".join(s["spec"]["hypothesis"] for s in chosen if s["arm"] in spec["arms"])
        spec.pop("primary", None)
    return spec


# ---- the tables: pairs never stacked, budgets not covered ----------------------------------------

def left_to_try(led: Ledger, limit: int = DEFAULT_LIMIT, model: str | None = None) -> dict:
    """The ranked suggestions (`suggestions`), the effects the ranking uses, and the coverage tables:
    compatible technique pairs no measured arm has stacked (with the arms registered, not run yet, that
    would), and the budgets each stacked pair and each technique lacks among the budgets the atlas has
    measured (reference arms give none) that its codec, if it names one, can produce."""
    atlas = Atlas(led)
    effects = fit_effects(atlas.points)
    names = sorted({t for _, _, c in atlas.registered for t in techniques(c)})
    pair_budgets: dict[tuple, set] = defaultdict(set)
    tech_budgets: dict[str, set] = defaultdict(set)
    budgets = set()
    for p in atlas.points:
        if p["reference"]:
            continue
        b = p["budget"]
        for t in p["techniques"]:
            tech_budgets[t]
            if b is not None:
                tech_budgets[t].add(b)
        for a, c in combinations(p["techniques"], 2):
            pair_budgets[(a, c)]
            if b is not None:
                pair_budgets[(a, c)].add(b)
        if b is not None:
            budgets.add(b)
    all_budgets = sorted(budgets)
    can = _budgets_of_techniques(atlas, names, all_budgets)
    planned: dict[tuple, list] = defaultdict(list)
    for u in atlas.unrun:
        for a, c in combinations(sorted(u["techniques"]), 2):
            planned[(a, c)].append({"experiment": u["experiment"], "arm": u["arm"]})
    untried, gaps = [], []
    for a, c in combinations(names, 2):
        if not compatible(a, c):
            continue
        if (a, c) not in pair_budgets:
            untried.append({"a": a, "b": c, "planned": planned.get((a, c), [])})
        else:
            missing = [b for b in all_budgets if b not in pair_budgets[(a, c)] and b in can[a] and b in can[c]]
            if missing:
                gaps.append({"a": a, "b": c, "covered": sorted(pair_budgets[(a, c)]), "missing": missing})
    per_technique = [{"technique": t, "covered": sorted(tech_budgets.get(t, ())),
                      "missing": [b for b in all_budgets if b not in tech_budgets.get(t, ()) and b in can[t]]}
                     for t in names]
    ranked = suggestions(led, limit, model, atlas, effects)
    measured_effects = sorted(({"technique": t, "mean": m, "sd": sd, "factor": math.exp(m)}
                               for t in effects.names for m, sd in [effects.effect(t)]), key=lambda e: e["mean"])
    return {"techniques": names, "budgets": all_budgets, "suggestions": ranked,
            "model": {"points": effects.n_points, "slope": effects.slope, "noise_sd": effects.noise_sd,
                      "effects": measured_effects},
            "untried_pairs": untried, "pair_budget_gaps": gaps, "technique_budgets": per_technique}


def _budgets_of_techniques(atlas: Atlas, names: list[str], all_budgets: list[int]) -> dict[str, set]:
    """Technique -> the budgets an arm holding it can be at: a codec's (`Atlas.producible`, from the codec
    configs the atlas holds it with); any budget for a technique that names no codec."""
    configs: dict[str, list[dict]] = defaultdict(list)
    for _, _, c in atlas.registered:
        cfg = normal_config(c)
        if cfg is not None and cfg.get("codec"):
            for t in techniques(c):
                if kind(t) == "codec" and not is_option(t):
                    configs[t].append(cfg["codec"])
    out = {}
    for t in names:
        if t in configs:
            out[t] = {b for codec in configs[t] for b in atlas.producible(codec)}
        else:
            out[t] = set(all_budgets)
    return out


def format_suggestions(rows: list[dict]) -> str:
    """The ranked suggestions as a plain-text table (`quantatlas suggest`)."""
    from quantatlas.tables import plain_table, render

    t = plain_table(("#", "right"), ("Arm", "left"), ("vs", "left"), ("Model", "left"), ("Budget", "right"),
                    ("Pred. KLD", "right"), ("×KLD", "right"), ("Gain ± sd", "right"), ("EI", "right"),
                    ("From", "left"), ("Registered, not run", "left"))
    for s in rows:
        t.add_row(str(s["rank"]), s["arm"], s["control"]["name"], ", ".join(s["models"]), str(s["budget"]),
                  f"{s['predicted_kld']:.4g}", f"{s['kld_factor']['mean']:.2f}",
                  f"{s['frontier_gain']['mean']:+.2f} ± {s['frontier_gain']['sd']:.2f}",
                  f"{s['expected_improvement']:.3f}", f"{s['base']['experiment']} {s['base']['arm']}",
                  ", ".join(f"{x['experiment']} {x['arm']}" for x in s["planned"]) or "–")
    return render(t, width=100_000)
