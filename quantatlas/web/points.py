"""The atlas's measured points: one arm of one experiment on one model hash and eval fingerprint,
its metrics averaged over its runs there, and the plot it belongs on (model hash, eval source, ctx,
score: see web/landscape.py). Shared by the landscape and left-to-try (web/suggestions.py).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, get_args

from pydantic import ValidationError

from quantatlas.atlas.architecture import UNKNOWN, architecture_of
from quantatlas.quant.steps import is_reference
from quantatlas.runtimes import runtimes_of
from quantatlas.spec import EvalData, arm_of
from quantatlas.web.techniques import is_llamacpp_format, techniques

if TYPE_CHECKING:
    from quantatlas.atlas.ledger import Ledger

#: x axes: weight bits, whole-model bits, and bits per stored KV-cache / activation value
BitsMetric = Literal["bits_per_weight", "bits_per_param", "kv_bits", "act_bits"]
BITS_METRICS: tuple[str, ...] = get_args(BitsMetric)
#: eval sources that are one stream (the reference model's data: `stdlib`, also spelled `reference`)
SAME_SOURCE = {"reference": "stdlib"}


def eval_setup(spec: dict | None) -> dict | None:
    """The eval stream a stored spec scores: source, ctx, score, and tokens (stream tokens asked) and
    scored (tokens whose KLD is averaged: whole windows of ctx, each scoring ctx - 1 - ctx // 2 with
    second_half, ctx - 1 with all). None without a readable `data.eval`."""
    if not isinstance(spec, dict):
        return None
    try:
        ev = EvalData.model_validate(((spec.get("data") or {}).get("eval")) or {})
    except (ValidationError, AttributeError, TypeError):
        return None
    first = ev.ctx // 2 if ev.score == "second_half" else 0
    return {"source": SAME_SOURCE.get(ev.source, ev.source), "ctx": ev.ctx, "score": ev.score,
            "tokens": ev.tokens, "scored": (ev.tokens // ev.ctx) * (ev.ctx - 1 - first)}


def group_key(model_hash: str, ev: dict | None, eval_fingerprint: str) -> tuple:
    """Which plot a point is on: model hash, eval source, ctx, score; a point whose spec says no eval
    setup stays with its own fingerprint."""
    if ev is None:
        return (model_hash, "fingerprint", eval_fingerprint)
    return (model_hash, ev["source"], ev["ctx"], ev["score"])


def arm_points(led: Ledger) -> list[dict]:
    """Every arm with runs, per model hash x eval fingerprint: mean kld_mean, kld_se and bits (over its
    runs), its techniques, its model's family (`model_families`), whether it is a reference arm (fp16, `reference: true`) or a llama.cpp
    format, the runtimes its runs recorded that load it (`runs_on`, None for runs stored before it
    existed; `runtimes`: their names), its eval setup (`eval_setup`) and its plot (`group`)."""
    names = ("kld_mean", "kld_se") + BITS_METRICS
    with led.read() as q:
        means = q.arm_metric_means(names)
        runs_on = q.arm_runs_on()
        specs = {e.id: e.spec.data for e in q.experiments_with_specs({m.experiment_id for m in means})}
        family = model_families(q.run_set_arches())
    out = []
    for m in means:
        ev = eval_setup(specs.get(m.experiment_id))
        arm = arm_of(m.config)
        where = runs_on.get((m.experiment_id, m.arm, m.model_hash, m.eval_fingerprint))
        out.append({"experiment": m.experiment_id, "title": m.title, "model": m.model, "merged_into": m.merged_into,
                    "arm": m.arm, "control": m.is_control, "config": m.config,
                    "techniques": sorted(techniques(m.config)), "llamacpp": is_llamacpp_format(m.config),
                    "reference": arm is not None and is_reference(arm),
                    "runs_on": where, "runtimes": sorted(runtimes_of(where)),
                    "model_hash": m.model_hash, "family": family.get(m.model_hash, UNKNOWN),
                    "eval_fingerprint": m.eval_fingerprint, "n_runs": m.n_runs,
                    "eval": ev, "tokens": None if ev is None else ev["scored"],
                    "group": group_key(m.model_hash, ev, m.eval_fingerprint),
                    **{k: m.means.get(k) for k in names}})
    return out


def model_families(run_set_arches: list[tuple[str, str, str | None]]) -> dict[str, str]:
    """Model hash -> its family (architecture: atlas/architecture.py), from what its run sets recorded
    (`Reader.run_set_arches`); UNKNOWN where none did (run sets stored before it was recorded)."""
    seen: dict[str, list[str | None]] = {}
    for _exp, model_hash, arch in run_set_arches:
        seen.setdefault(model_hash, []).append(arch)
    return {h: architecture_of(archs) for h, archs in seen.items()}


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


def point_label(p: dict) -> str:
    """What a point is called on a plot: its arm and its experiment."""
    return f"{p['arm']} · {p['experiment']}"
