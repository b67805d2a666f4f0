"""Studies: one hypothesis judged across models and architectures (issue 27).

A study is a family (ids.family_hash): the same spec on several models, each model its own experiment
with its own id, verdicts and reproductions (a spec's `models: [...]` runs one per model). Judged here,
from the verdicts each model's experiment already has (verdict_cache.py), never re-judged:

    holds on a model          its experiment's result is "success" (the primary arm: the spec's
                              `primary:`, else its best treatment; verdict.py). For each treatment arm
                              the same with that arm's verdict.
    the models counted (n)    those with a result (pending experiments are listed, not counted)
    holds on an architecture  on every counted model of that architecture (architecture.py: the
                              model_type its runs recorded). A model of unknown architecture (runs
                              stored before it was recorded) counts among the models, never as an
                              architecture: two such models may well be one architecture.

    "holds on k of n architectures (k' of n' models); confidence c"

The confidence of the study line (the rule, chosen so that it cannot overstate):

    c = min over the models where it holds of that model's own confidence

where a model's own confidence is its verdict's confidence from its own run sets alone
(`FinalVerdict.confidence_own`: the other models where it holds are NOT counted as confirmations, as
they are in the per-model confidence, confidence.py's k). So:

- c is never above the confidence of any single model's verdict it cites (the line claims every one
  of them at once, and a conjunction is no surer than its weakest part);
- more architectures never raise c (a minimum can only fall as models are added): the breadth of a
  finding is said by k of n, its strength by c, and neither is bought with the other;
- no independence between architectures is assumed (a product would assume it, a combination like
  confidence.py's k would count one model's luck again on another's);
- it holds on nothing: no confidence (None).

The per-model confidences stay as verdict.py states them; the study line is an addition. No torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from quantatlas.atlas.architecture import UNKNOWN, architecture_of
from quantatlas.atlas.store import Reader
from quantatlas.atlas.stored import StoredExperiment
from quantatlas.atlas.verdict import own_model_confidence
from quantatlas.atlas.verdict_cache import VerdictCache

HOLDS = "success"


@dataclass(frozen=True)
class ModelVerdict:
    """One model's verdict on a hypothesis (or on one arm): what a study line is judged from."""
    model: str
    architecture: str             # architecture.py: UNKNOWN when its runs recorded none
    result: str | None            # None: pending (no verdict yet)
    confidence_own: float | None  # from its own run sets alone (verdict.own_model_confidence)


def holds_line(verdicts: list[ModelVerdict]) -> dict:
    """The study line over these models' verdicts (module docstring): counts, the architectures where it
    holds, the confidence (the least own confidence of the models where it holds) and its text."""
    counted = [v for v in verdicts if v.result is not None]
    holding = [v for v in counted if v.result == HOLDS]
    by_arch: dict[str, list[ModelVerdict]] = {}
    for v in counted:
        if v.architecture != UNKNOWN:
            by_arch.setdefault(v.architecture, []).append(v)
    archs_holding = [a for a, vs in by_arch.items() if all(v.result == HOLDS for v in vs)]   # in the models' order
    unknown = sum(1 for v in counted if v.architecture == UNKNOWN)
    owns = [v.confidence_own for v in holding]
    confidence = None if not holding or any(c is None for c in owns) else min(owns)
    out = {"baseline": bool(counted) and all(v.result == "baseline" for v in counted),
           "architectures_holding": len(archs_holding), "architectures": len(by_arch),
           "holding_architectures": archs_holding, "architectures_counted": list(by_arch),
           "models_holding": len(holding), "models": len(counted), "pending": len(verdicts) - len(counted),
           "unknown_architecture": unknown, "confidence": confidence}
    out["text"] = holds_text(out)
    return out


def holds_text(h: dict) -> str:
    """"holds on 2 of 3 architectures (qwen3, llama; 2 of 3 models), confidence 0.61 (the least of its
    models' own)"."""
    models = f"{h['models_holding']} of {h['models']} model{'' if h['models'] == 1 else 's'}"
    if h.get("baseline"):   # reference points only (fp16, a published format): there is nothing to hold
        archs = f"{h['architectures']} architecture{'' if h['architectures'] == 1 else 's'}, " if h["architectures"] else ""
        return f"is not judged: a baseline on {archs}{h['models']} model{'' if h['models'] == 1 else 's'}"
    if h["architectures"]:
        where = f"{', '.join(h['holding_architectures'])}; " if h["holding_architectures"] else ""
        s = f"holds on {h['architectures_holding']} of {h['architectures']} architecture" \
            f"{'' if h['architectures'] == 1 else 's'} ({where}{models})"
    else:
        s = f"holds on {models}"
    if h["confidence"] is not None:
        s += f", confidence {h['confidence']:.2f} (the least of its models' own)"
    notes = []
    if h["unknown_architecture"]:
        notes.append(f"{h['unknown_architecture']} model{'' if h['unknown_architecture'] == 1 else 's'} of unknown "
                     "architecture, not counted as one")
    if h["pending"]:
        notes.append(f"{h['pending']} pending")
    return s + (f" [{'; '.join(notes)}]" if notes else "")


def study_members(q: Reader, exp: StoredExperiment) -> list[StoredExperiment]:
    """The experiments of `exp`'s study: itself and the unmerged experiments of its family, oldest first."""
    members = [exp, *q.siblings(exp)] if exp.family_hash is not None else [exp]
    return sorted(members, key=lambda e: (e.created_at is None, e.created_at, e.id))


def architectures(q: Reader, exp_ids: set[str] | None = None) -> dict[str, str]:
    """Experiment id -> the architecture of its model, from its run sets (UNKNOWN without one recorded)."""
    seen: dict[str, list[str | None]] = {}
    for exp_id, _model_hash, arch in q.run_set_arches():
        if exp_ids is None or exp_id in exp_ids:
            seen.setdefault(exp_id, []).append(arch)
    return {e: architecture_of(archs) for e, archs in seen.items()} | \
        {e: UNKNOWN for e in (exp_ids or ()) if e not in seen}


def study(q: Reader, cache: VerdictCache, exp: StoredExperiment) -> dict:
    """`exp`'s study: its family hash, one row per model (experiment, model, architecture, result, confidence,
    own confidence, primary arm, each arm's result), the line for the hypothesis (`holds`) and one per
    treatment arm (`arms`)."""
    members = study_members(q, exp)
    arch = architectures(q, {m.id for m in members})
    rows, per_arm = [], {}
    for m in members:
        state = cache.state(q, m) if m.spec.present else {"summaries": [], "details": {}, "result": m.result,
                                                          "confidence": m.confidence, "primary": None}
        summaries = {v["arm"]: v for v in state["summaries"] if v.get("arm")}
        details = state["details"]
        primary = summaries.get(state["primary"])
        own = None
        if primary is not None and state["confidence"] is not None:   # never above the experiment's own
            mine = own_model_confidence(primary, details.get(primary["arm"]))
            own = state["confidence"] if mine is None else min(mine, state["confidence"])
        row = {"experiment": m.id, "model": m.model or "?", "architecture": arch.get(m.id, UNKNOWN),
               "result": state["result"], "confidence": state["confidence"], "confidence_own": own,
               "primary": state["primary"], "merged_into": m.merged_into,
               "arms": {a: {"result": v.get("result"), "confidence": v.get("confidence"),
                            "confidence_own": own_model_confidence(v, details.get(a))} for a, v in summaries.items()}}
        rows.append(row)
        for a, v in summaries.items():
            if v.get("result") != "baseline":
                per_arm.setdefault(a, {})[m.id] = row["arms"][a]
    holds = holds_line([ModelVerdict(r["model"], r["architecture"], r["result"], r["confidence_own"])
                        for r in rows])
    named = all(m.spec.present and m.spec.primary for m in members)
    judged = list(dict.fromkeys(r["primary"] for r in rows if r["primary"] and r["result"] not in (None, "baseline")))
    if judged and not named:   # the spec names no primary: say which arm the line judges, so it cannot be read as more
        holds["judged_on"] = judged
        holds["text"] += (f" — judged on {'arm' if len(judged) == 1 else 'arms'} {', '.join(judged)}, each model's "
                          "best treatment (the spec names no `primary:`)")
    arm_lines = []
    for a, by_exp in per_arm.items():
        line = holds_line([ModelVerdict(r["model"], r["architecture"],
                                        (by_exp.get(r["experiment"]) or {}).get("result"),
                                        (by_exp.get(r["experiment"]) or {}).get("confidence_own")) for r in rows])
        arm_lines.append({"arm": a, **line})
    return {"study": exp.family_hash, "experiment": exp.id, "models": rows, "holds": holds, "arms": arm_lines}


def format_study(s: dict) -> str:
    """The study as the command line prints it: each model's verdict, the line for the hypothesis, one per arm."""
    arms = [a["arm"] for a in s["arms"]]
    head = ["model", "architecture", "experiment", "result", "confidence", "own", *arms]
    rows = [[r["model"], r["architecture"], r["experiment"], r["result"] or "pending", _conf(r["confidence"]),
             _conf(r["confidence_own"]), *[(r["arms"].get(a) or {}).get("result") or "–" for a in arms]]
            for r in s["models"]]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = [f"study {(s['study'] or '')[:12]}: {len(s['models'])} models"]
    lines += ["  " + "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    lines.append(f"  the hypothesis {s['holds']['text']}")
    lines += [f"  arm {a['arm']}: {a['text']}" for a in s["arms"]]
    return "\n".join(lines)


def _conf(c: float | None) -> str:
    return "–" if c is None else f"{c:.2f}"
