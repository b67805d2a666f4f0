"""The JSON API for reading the atlas: each answer is the view function its page renders
(web/views.py), as plain JSON."""
from __future__ import annotations

from typing import Annotated, Optional

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BeforeValidator

from quantatlas.atlas.errors import LedgerError
from quantatlas.atlas.ledger import Ledger
from quantatlas.atlas.records import plain
from quantatlas.atlas.verdict import RESULTS
from quantatlas.web import landscape as land
from quantatlas.web import views
from quantatlas.web.deps import get_ledger
from quantatlas.web.pages import experiment_or_404

router = APIRouter(prefix="/api", tags=["read"])

LedgerDep = Annotated[Ledger, Depends(get_ledger)]


@router.get("/sensitivity", summary="Sensitivity measurements: ΔKLD and Δbits per tensor group")
def api_sensitivity(led: LedgerDep,
                    experiment: Optional[str] = Query(None, description="only this experiment")) -> list[dict]:
    try:
        return [{k: v for k, v in r.items() if k != "data"} for r in views.sensitivity_view(led, experiment)]
    except LedgerError as e:
        raise HTTPException(404, str(e)) from None


@router.get("/experiments", summary="The experiment list")
def api_experiments(led: LedgerDep,
                    tag: Optional[str] = Query(None, description="only experiments with this tag"),
                    model: Optional[str] = Query(None, description="only experiments on this model"),
                    result: Annotated[Optional[views.ListResult], BeforeValidator(lambda v: v or None),
                                      Query(description=f"{'|'.join(RESULTS)}|pending")] = None,
                    q: Optional[str] = Query(None, description="words that must all appear in the id, title, "
                                                                "hypothesis, model or tags"),
                    group: Annotated[Optional[views.ListGroup], BeforeValidator(lambda v: v or None),
                                     Query(description="study: the rows grouped by study (the same spec on "
                                                       "several models), each group with its line \"holds on k of "
                                                       "n architectures\"")] = None) -> list[dict]:
    """One row per experiment, newest first: id, hypothesis, result, confidence, reproductions,
    duplicate flags, per-arm verdicts and key metrics (as `quantatlas atlas list --json`). With
    `group=study`: one entry per study instead, {study, rows, models, holds}, in the order of its newest row."""
    rows = views.experiment_list(led, tag, model, result, q)
    return plain(views.study_groups(led, rows) if group == "study" else rows)


@router.get("/experiments/{exp_id}", summary="One experiment")
def api_experiment(exp_id: str, led: LedgerDep) -> dict:
    """Everything on the experiment page: spec, arms (with techniques), run sets with their
    environments and per-seed figures, verdicts with their reasoning, duplicates, and per run
    set and arm the empirical CDF of per-token KLD (points x, y with y = #{KLD <= x} / n)."""
    return plain(experiment_or_404(led, exp_id))


@router.get("/experiments/{exp_id}/kld", summary="Per-token KLD distributions")
def api_kld(exp_id: str, led: LedgerDep) -> list[dict]:
    """Per run set and arm: the empirical CDF of per-token KLD pooled over seeds."""
    return plain(experiment_or_404(led, exp_id)["kld_distributions"])


@router.get("/landscape", summary="KLD vs bits per model, with the Pareto frontier")
def api_landscape(led: LedgerDep,
                  bits: land.BitsMetric = Query("bits_per_weight",
                                                description="bits_per_weight | bits_per_param"),
                  technique: Optional[str] = Query(None, description="only the points that hold this technique"),
                  deployable: Annotated[views.Deployable, Query(description="only the points whose runs recorded "
                                                                           "this runtime (any: every point)")] = "any",
                  frontier: Annotated[views.Frontier, Query(description="the Pareto frontier over every arm (all) "
                                                                       "or the deployable ones")] = "all",
                  family: views.FamilyFilter = None) -> dict:
    """Per model hash x eval source x ctx x score (`eval`; its `eval_fingerprints`, one per token count):
    every arm a point (mean kld_mean, kld_se and bits over its runs, `tokens` scored), `pareto` on the
    frontier, `llamacpp` for llama.cpp formats (ggml types, gguf mixtures), `reference` for reference arms,
    `runs_on` / `runtimes` for the runtimes its runs recorded that load it, `not_drawn` for arms without
    bits or with KLD <= 0. Each plot names its model `family` (its architecture, `unknown` for runs that
    recorded none); `family` keeps only the plots of that family."""
    return plain(land.with_family(land.with_technique(views.landscape_view(led, bits, deployable, frontier),
                                                      technique), family))


@router.get("/composition", summary="Technique x technique verdicts")
def api_composition(led: LedgerDep) -> dict:
    """Cells (a, b): counts of verdicts of treatment arms that stacked a and b (holding both,
    adding at least one to their control); (a, a): arms that added a."""
    return plain(views.composition_view(led))


@router.get("/left-to-try", summary="Experiments left to try, ranked, each with its spec")
def api_left(led: LedgerDep,
             model: Optional[str] = Query(None, description="only suggestions on this model (name or hash prefix)"),
             limit: int = Query(land.DEFAULT_LIMIT, ge=1, le=1000, description="at most this many suggestions")
             ) -> dict:
    """`suggestions`: experiments nobody has run, ranked by expected improvement over the frontier under an
    additive model of log KLD (`model`: its measured technique effects), each with a spec that `quantatlas
    run` takes; compatible technique pairs no measured arm holds (with registered arms not run yet); bit
    budgets (floor(bits per weight + 1/4), reference arms excluded, only those the codec can produce) each
    stacked pair and each technique lacks."""
    return plain(land.left_to_try(led, limit, model or None))
