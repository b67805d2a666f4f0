"""The atlas as a landscape: KLD against bits per model and eval stream (Pareto frontier, llama.cpp
reference points), the composition matrix of techniques, and what is left to try (web/suggestions.py).

One plot is one model hash (of one model family, its architecture: filtered and coloured by it), eval
source, ctx and scoring: the mean KLD over more or fewer tokens of
the same stream estimates the same quantity (an eval set is the stream's first whole windows), so a
spec scored on 16,384 tokens and one on 65,536 meet in one plot. One point is one arm of one
experiment on one eval fingerprint: its metrics averaged over every run of the arm there (all seeds,
all run sets), with the token-level standard error of its mean KLD and the tokens it scored.
"""
from __future__ import annotations

from collections import defaultdict
from itertools import combinations
from typing import TYPE_CHECKING

from quantatlas.runtimes import DEPLOYABLE, runs_on_label
from quantatlas.web.points import BITS_METRICS, BitsMetric, arm_points, pareto_front, point_label
from quantatlas.web.suggestions import DEFAULT_LIMIT, left_to_try
from quantatlas.web.techniques import techniques

if TYPE_CHECKING:
    from quantatlas.atlas.ledger import Ledger

__all__ = ["BITS_METRICS", "BitsMetric", "DEFAULT_LIMIT", "DEPLOYABLE", "FRONTIERS", "arm_points", "composition",
           "deployable_on", "families", "landscape", "left_to_try", "pareto_front", "verdict_colour", "with_deployable",
           "with_family", "with_technique"]
VERDICTS = ("success", "failure", "inconclusive", "conflict")
#: which arms the Pareto frontier is drawn over: every arm, or those deployable on the chosen runtime
FRONTIERS = ("all", "deployable")


def landscape(led: Ledger, bits: BitsMetric = "bits_per_weight") -> dict:
    """Per model hash x eval source x ctx x score: the points (mean KLD vs `bits`, with the SE of the
    mean and the tokens scored), the Pareto frontier, and the arms that could not be drawn (no bits,
    no KLD, KLD <= 0 on a log axis, non-finite). A group lists its eval fingerprints (one per token
    count) and every technique its points hold (the page's filter)."""
    if bits not in BITS_METRICS:
        raise ValueError(f"bits {bits!r} is not one of {', '.join(BITS_METRICS)}")
    groups: dict[tuple, dict] = {}
    for p in arm_points(led):
        g = groups.setdefault(p["group"], {"model_hash": p["model_hash"], "family": p["family"],
                                           "eval": None if p["eval"] is None else
                                           {k: p["eval"][k] for k in ("source", "ctx", "score")},
                                           "fingerprints": set(), "models": set(), "points": [], "not_drawn": []})
        g["models"].add(p["model"] or "?")
        g["fingerprints"].add(p["eval_fingerprint"])
        point = {k: p[k] for k in ("experiment", "title", "arm", "control", "techniques", "llamacpp", "reference",
                                   "n_runs", "kld_mean", "kld_se", "tokens", "eval_fingerprint", "merged_into",
                                   "runs_on", "runtimes")}
        point["runs_on_label"] = runs_on_label(p["runs_on"])
        point["bits"] = p[bits]
        point["url"] = f"/experiments/{p['experiment']}"
        point["label"] = point_label(p)
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
        fingerprints = sorted(g.pop("fingerprints"))
        everyone = pts + g["not_drawn"]
        out.append({**g, "models": sorted(g["models"]), "points": pts,
                    "eval_fingerprints": fingerprints,
                    "eval_fingerprint": fingerprints[0] if len(fingerprints) == 1 else None,
                    "tokens": sorted({p["tokens"] for p in everyone if p["tokens"] is not None}),
                    "techniques": sorted({t for p in everyone for t in p["techniques"]}),
                    "frontier": [{"bits": p["bits"], "kld_mean": p["kld_mean"], "experiment": p["experiment"],
                                  "arm": p["arm"]} for p in pts if p["pareto"]]})
    return {"bits": bits, "groups": out}


def deployable_on(point: dict, on: str) -> bool:
    """Whether a point's recorded runs_on names runtime `on` ("any": any runtime at all)."""
    runtimes = point.get("runtimes") or []
    return bool(runtimes) if on == "any" else on in runtimes


def with_deployable(view: dict, on: str = "any", frontier: str = "all") -> dict:
    """The landscape's "deployable on" filter: `on` "llama.cpp" / "vllm" shows only the points whose runs
    recorded that runtime (`runs_on`), "any" every point; `frontier` "deployable" draws the Pareto frontier
    (and its rings) over the points deployable on `on` only (any runtime for "any"), "all" over every arm.
    Every group is kept (an empty one says so)."""
    if on not in DEPLOYABLE:
        raise ValueError(f"deployable {on!r} is not one of {', '.join(DEPLOYABLE)}")
    if frontier not in FRONTIERS:
        raise ValueError(f"frontier {frontier!r} is not one of {', '.join(FRONTIERS)}")
    groups = []
    for g in view["groups"]:
        pts = [dict(p) for p in g["points"]]
        if frontier == "deployable":
            over = [i for i, p in enumerate(pts) if deployable_on(p, on)]
            front = {over[j] for j in pareto_front([(pts[i]["bits"], pts[i]["kld_mean"]) for i in over])}
            for i, p in enumerate(pts):
                p["pareto"] = i in front
        keep = pts if on == "any" else [p for p in pts if deployable_on(p, on)]
        groups.append(dict(g, points=keep,
                           not_drawn=g["not_drawn"] if on == "any" else [p for p in g["not_drawn"]
                                                                       if deployable_on(p, on)],
                           frontier=[{k: p[k] for k in ("bits", "kld_mean", "experiment", "arm")}
                                     for p in pts if p["pareto"]]))
    return dict(view, groups=groups, deployable=on, frontier_over=frontier)


def families(view: dict) -> list[str]:
    """The model families (architectures) of a landscape's plots, for its filter menu."""
    return sorted({g["family"] for g in view["groups"]})


def with_family(view: dict, family: str | None) -> dict:
    """A landscape showing only the plots of models of `family` (an architecture: qwen3, llama, qwen3_moe; or
    `unknown`, the models whose runs recorded none): one plot is one model, so a family keeps whole plots."""
    if not family:
        return dict(view, family=None)
    return dict(view, groups=[g for g in view["groups"] if g["family"] == family], family=family)


def with_technique(view: dict, technique: str | None) -> dict:
    """A landscape showing only the points that hold `technique` (the frontier and its rings stay those
    of every arm, what the filtered points are measured against); every group is kept, so its menu of
    techniques still offers the others."""
    if not technique:
        return dict(view, technique=None)
    groups = [dict(g, points=[p for p in g["points"] if technique in p["techniques"]],
                   not_drawn=[p for p in g["not_drawn"] if technique in p["techniques"]]) for g in view["groups"]]
    return dict(view, groups=groups, technique=technique)


# ---- composition ---------------------------------------------------------------------------

def _judged_arms(led: Ledger) -> list[dict]:
    """Each treatment arm with a verdict: its techniques, those it adds to its control, the result."""
    rows = led.rows()
    with led.read() as q:
        arms = q.arms()
    by_exp: dict[str, dict[str, tuple]] = defaultdict(dict)
    for a in arms:
        by_exp[a.experiment_id][a.name] = (a.config, a.is_control)
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
    with led.read() as q:
        configs = [a.config for a in q.arms()]
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
