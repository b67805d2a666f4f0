"""The atlas as a landscape: KLD against bits per model (Pareto frontier, llama.cpp reference
points), the composition matrix of techniques, and what is left to try.

One point is one arm of one experiment on one model hash and eval fingerprint (results are
comparable only within those): its metrics averaged over every run of the arm there (all
seeds, all run sets).
"""
from __future__ import annotations

import math
from collections import defaultdict
from itertools import combinations
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from quantatlas.atlas.models import Arm, Experiment, Metric, Run, RunSet
from quantatlas.web.techniques import bit_budget, compatible, is_llamacpp_format, techniques

if TYPE_CHECKING:
    from quantatlas.atlas.ledger import Ledger

#: x axes: weight bits, whole-model bits, and bits per stored KV-cache / activation value
BITS_METRICS = ("bits_per_weight", "bits_per_param", "kv_bits", "act_bits")
VERDICTS = ("success", "failure", "inconclusive", "conflict")


def arm_points(led: Ledger) -> list[dict]:
    """Every arm with runs, per model hash x eval fingerprint: mean kld_mean and bits (over its runs)."""
    names = ("kld_mean",) + BITS_METRICS
    with led._reading() as s:
        q = (select(Arm.id, RunSet.model_hash, RunSet.eval_fingerprint, Metric.name, func.avg(Metric.value),
                    func.count(Metric.value), func.count(Metric.nonfinite))
             .join(Run, Run.arm_id == Arm.id).join(RunSet, Run.run_set_id == RunSet.id)
             .join(Metric, Metric.run_id == Run.id).where(Metric.name.in_(names))
             .group_by(Arm.id, RunSet.model_hash, RunSet.eval_fingerprint, Metric.name))
        stats: dict[tuple, dict] = defaultdict(dict)
        for arm_id, mh, ef, name, mean, n, n_nonfinite in s.execute(q).all():
            stats[(arm_id, mh, ef)][name] = (None if n_nonfinite or mean is None else float(mean), int(n))
        runs = s.execute(select(Run.arm_id, RunSet.model_hash, RunSet.eval_fingerprint, func.count(Run.id))
                         .join(RunSet, Run.run_set_id == RunSet.id)
                         .group_by(Run.arm_id, RunSet.model_hash, RunSet.eval_fingerprint)).all()
        arm_ids = {a for a, _, _, _ in runs}
        arms = {a.id: a for a in s.scalars(select(Arm).where(Arm.id.in_(arm_ids)))} if arm_ids else {}
        exps = {e.id: e for e in s.scalars(select(Experiment).where(
            Experiment.id.in_({a.experiment_id for a in arms.values()})))} if arms else {}
        out = []
        for arm_id, mh, ef, n_runs in runs:
            a = arms[arm_id]
            e = exps[a.experiment_id]
            m = stats.get((arm_id, mh, ef), {})
            out.append({
                "experiment": e.id, "title": e.title, "model": e.model, "merged_into": e.merged_into,
                "arm": a.name, "control": a.is_control, "config": a.config,
                "techniques": sorted(techniques(a.config)), "llamacpp": is_llamacpp_format(a.config),
                "model_hash": mh, "eval_fingerprint": ef, "n_runs": int(n_runs),
                **{k: (m.get(k) or (None, 0))[0] for k in names},
            })
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower is better on both),
    ordered by the first coordinate. Exact duplicates of a frontier point are on it too."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best, last = [], math.inf, None
    for i in order:
        x, y = points[i]
        if y < best or (last is not None and (x, y) == points[last]):
            front.append(i)
            best, last = y, i
    return front


def landscape(led: Ledger, bits: str = "bits_per_weight") -> dict:
    """Per model hash x eval fingerprint: the points (mean KLD vs `bits`), the Pareto frontier,
    and how many arms could not be drawn (no bits, no KLD, KLD <= 0 on a log axis, non-finite)."""
    if bits not in BITS_METRICS:
        raise ValueError(f"bits {bits!r} is not one of {', '.join(BITS_METRICS)}")
    groups: dict[tuple, dict] = {}
    for p in arm_points(led):
        g = groups.setdefault((p["model_hash"], p["eval_fingerprint"]),
                              {"model_hash": p["model_hash"], "eval_fingerprint": p["eval_fingerprint"],
                               "models": set(), "points": [], "not_drawn": []})
        g["models"].add(p["model"] or "?")
        point = {k: p[k] for k in ("experiment", "title", "arm", "control", "techniques", "llamacpp", "n_runs",
                                   "kld_mean", "merged_into")}
        point["bits"] = p[bits]
        point["url"] = f"/experiments/{p['experiment']}"
        if point["bits"] is None or point["kld_mean"] is None or point["kld_mean"] <= 0:
            why = ("no " + bits) if point["bits"] is None else (
                "no finite kld_mean" if point["kld_mean"] is None else "kld_mean <= 0 (the fp arm?)")
            g["not_drawn"].append(dict(point, why=why))
            continue
        g["points"].append(point)
    out = []
    for g in sorted(groups.values(), key=lambda g: (-len(g["points"]), sorted(g["models"]), g["model_hash"])):
        pts = sorted(g["points"], key=lambda p: (p["bits"], p["kld_mean"], p["experiment"], p["arm"]))
        front = set(pareto_front([(p["bits"], p["kld_mean"]) for p in pts]))
        for i, p in enumerate(pts):
            p["pareto"] = i in front
        out.append({**g, "models": sorted(g["models"]), "points": pts,
                    "frontier": [{"bits": p["bits"], "kld_mean": p["kld_mean"], "experiment": p["experiment"],
                                  "arm": p["arm"]} for p in pts if p["pareto"]]})
    return {"bits": bits, "groups": out}


# ---- composition ---------------------------------------------------------------------------

def _judged_arms(led: Ledger) -> list[dict]:
    """Each treatment arm with a verdict: its techniques, those it adds to its control, the result."""
    rows = led.rows()
    with led._reading() as s:
        arms = s.execute(select(Arm.experiment_id, Arm.name, Arm.config, Arm.is_control)).all()
    by_exp: dict[str, dict[str, tuple]] = defaultdict(dict)
    for exp_id, name, config, is_control in arms:
        by_exp[exp_id][name] = (config, is_control)
    out = []
    for r in rows:
        cfgs = by_exp.get(r["id"], {})
        control = r.get("control")
        if control is None or control not in cfgs:
            continue
        base = techniques(cfgs[control][0])
        for v in r.get("arms") or []:
            if v.get("result") not in VERDICTS or v["arm"] not in cfgs:
                continue
            mine = techniques(cfgs[v["arm"]][0])
            out.append({"experiment": r["id"], "title": r.get("title") or "", "arm": v["arm"], "control": control,
                        "result": v["result"], "techniques": mine, "added": mine - base})
    return out


def composition(led: Ledger) -> dict:
    """Technique x technique, from every treatment arm with a verdict. A pair (a, b) collects the
    arm's verdict when the arm holds both and adds at least one of them to its control (the pair
    is what the experiment stacked); the diagonal (a, a) collects arms that add a."""
    judged = _judged_arms(led)
    with led._reading() as s:
        configs = s.scalars(select(Arm.config)).all()
    names = sorted({t for c in configs for t in techniques(c)})
    cells: dict[tuple[str, str], dict] = {}

    def add(a, b, j):
        key = tuple(sorted((a, b)))
        cell = cells.setdefault(key, {"a": key[0], "b": key[1], **{r: 0 for r in VERDICTS}, "experiments": []})
        cell[j["result"]] += 1
        cell["experiments"].append({k: j[k] for k in ("experiment", "title", "arm", "control", "result")})

    for j in judged:
        for a in j["added"]:
            add(a, a, j)
        for a, b in combinations(sorted(j["techniques"]), 2):
            if a in j["added"] or b in j["added"]:
                add(a, b, j)
    for cell in cells.values():
        cell["colour"] = verdict_colour(cell)
    return {"techniques": names, "cells": sorted(cells.values(), key=lambda c: (c["a"], c["b"]))}


def verdict_colour(cell: dict) -> str:
    """success only: green; failure only: red; both, or a conflict: amber; only inconclusive: grey."""
    s, f, c = cell.get("success", 0), cell.get("failure", 0), cell.get("conflict", 0)
    if c or (s and f):
        return "mixed"
    if s:
        return "success"
    if f:
        return "failure"
    return "inconclusive"


# ---- left to try ----------------------------------------------------------------------------

def left_to_try(led: Ledger) -> dict:
    """Compatible technique pairs no arm with runs has stacked (and those only registered so far),
    the bit budgets each stacked pair and each technique has not been measured at, among the
    budgets the atlas has measured anything at. A budget is floor(bits per weight)."""
    with led._reading() as s:
        registered = s.execute(select(Arm.experiment_id, Arm.name, Arm.config)
                               .join(Experiment, Arm.experiment_id == Experiment.id)
                               .where(Experiment.merged_into.is_(None))).all()
    measured = [p for p in arm_points(led) if p["merged_into"] is None]
    names = sorted({t for _, _, c in registered for t in techniques(c)})
    pair_budgets: dict[tuple, set] = defaultdict(set)
    tech_budgets: dict[str, set] = defaultdict(set)
    budgets = set()
    measured_arms = set()
    for p in measured:
        b = bit_budget(p["bits_per_weight"])
        measured_arms.add((p["experiment"], p["arm"]))
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
    planned: dict[tuple, list] = defaultdict(list)
    for exp_id, arm, config in registered:
        if (exp_id, arm) in measured_arms:
            continue
        for a, c in combinations(sorted(techniques(config)), 2):
            if (exp_id, arm) not in planned[(a, c)]:
                planned[(a, c)].append({"experiment": exp_id, "arm": arm})
    all_budgets = sorted(budgets)
    untried, gaps = [], []
    for a, c in combinations(names, 2):
        if not compatible(a, c):
            continue
        if (a, c) not in pair_budgets:
            untried.append({"a": a, "b": c, "planned": planned.get((a, c), [])})
        else:
            missing = [b for b in all_budgets if b not in pair_budgets[(a, c)]]
            if missing:
                gaps.append({"a": a, "b": c, "covered": sorted(pair_budgets[(a, c)]), "missing": missing})
    per_technique = [{"technique": t, "covered": sorted(tech_budgets.get(t, ())),
                      "missing": [b for b in all_budgets if b not in tech_budgets.get(t, ())]} for t in names]
    return {"techniques": names, "budgets": all_budgets, "untried_pairs": untried, "pair_budget_gaps": gaps,
            "technique_budgets": per_technique}
