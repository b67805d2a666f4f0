"""The HTML pages. Each renders the view function its JSON twin answers with (web/views.py)."""
from __future__ import annotations

from typing import Annotated, Optional

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse
from pydantic import BeforeValidator

from quantatlas.atlas.errors import LedgerError
from quantatlas.atlas.ledger import Ledger
from quantatlas.atlas.listing import format_metric, measured_first
from quantatlas.atlas.verdict import RESULTS
from quantatlas.web import landscape as land
from quantatlas.web import views
from quantatlas.web.deps import get_ledger, get_pages
from quantatlas.web.figures import family_colour, kld_ecdf_figure, landscape_figure
from quantatlas.web.rendering import Pages

router = APIRouter(include_in_schema=False)

LedgerDep = Annotated[Ledger, Depends(get_ledger)]
PagesDep = Annotated[Pages, Depends(get_pages)]
#: the list form sends result= for "any result"
ResultFilter = Annotated[Optional[views.ListResult], BeforeValidator(lambda v: v or None)]


def experiment_or_404(led: Ledger, exp_id: str) -> dict:
    try:
        return views.experiment_view(led, exp_id)
    except LedgerError as e:
        raise HTTPException(404, str(e)) from None


@router.get("/vendor/plotly.min.js")
def plotly(request: Request):
    return FileResponse(request.app.state.plotly_path, media_type="text/javascript",
                        headers={"Cache-Control": "public, max-age=86400"})


@router.get("/", response_class=HTMLResponse)
def list_page(led: LedgerDep, pages: PagesDep, tag: Optional[str] = None, model: Optional[str] = None,
              result: ResultFilter = None, q: Optional[str] = None,
              group: Annotated[Optional[views.ListGroup], BeforeValidator(lambda v: v or None)] = None):
    rows = measured_first(views.experiment_list(led, tag, model, result, q))   # imported claims below ours
    groups = views.study_groups(led, rows) if group == "study" else [{"study": None, "rows": rows, "holds": None}]
    return pages.render("list.html", nav="list", rows=rows, groups=groups, group=group or "",
                        facets=views.facets(led), results=RESULTS + ("pending",),
                        filters={"tag": tag or "", "model": model or "", "result": result or "", "q": q or ""})


@router.get("/experiments/{exp_id}", response_class=HTMLResponse)
def experiment_page(exp_id: str, led: LedgerDep, pages: PagesDep):
    import yaml

    d = experiment_or_404(led, exp_id)
    figures = [{"run_set": dist["run_set"], "figure": kld_ecdf_figure(dist),
                "tokens": {a["arm"]: a["n"] for a in dist["arms"]}} for dist in d["kld_distributions"]]
    spec_yaml = yaml.safe_dump(d["spec"], sort_keys=False, allow_unicode=True) if d.get("spec") else None
    return pages.render("experiment.html", nav="list", e=d, figures=figures, spec_yaml=spec_yaml,
                        metric=format_metric)


@router.get("/landscape", response_class=HTMLResponse)
def landscape_page(led: LedgerDep, pages: PagesDep, bits: land.BitsMetric = "bits_per_weight",
                   technique: Optional[str] = None, deployable: views.Deployable = "any",
                   frontier: views.Frontier = "all", family: views.FamilyFilter = None):
    everything = views.landscape_view(led, bits, deployable, frontier)
    options = sorted({t for g in everything["groups"] for t in g["techniques"]})
    data = land.with_family(land.with_technique(everything, technique), family)
    for g in data["groups"]:
        g["figure"] = landscape_figure(g, bits)
        g["family_colour"] = family_colour(g["family"])
    return pages.render("landscape.html", nav="landscape", data=data, bits_options=land.BITS_METRICS,
                        technique_options=options, deployable_options=land.DEPLOYABLE,
                        frontier_options=land.FRONTIERS, family_options=land.families(everything))


@router.get("/composition", response_class=HTMLResponse)
def composition_page(led: LedgerDep, pages: PagesDep):
    data = views.composition_view(led)
    cells = {(c["a"], c["b"]): c for c in data["cells"]}
    return pages.render("composition.html", nav="composition", data=data, cells=cells)


@router.get("/left-to-try", response_class=HTMLResponse)
def left_page(led: LedgerDep, pages: PagesDep, model: Optional[str] = None,
              limit: int = Query(land.DEFAULT_LIMIT, ge=1, le=1000)):
    return pages.render("left.html", nav="left", data=land.left_to_try(led, limit, model or None),
                        filters={"model": model or "", "limit": limit})


@router.get("/sensitivity", response_class=HTMLResponse)
def sensitivity_page(led: LedgerDep, pages: PagesDep, experiment: Optional[str] = None,
                     limit: int = Query(40, ge=1, le=10000)):
    """Stored sensitivity measurements, each as its ranked ROI table (issue 17)."""
    try:
        data = views.sensitivity_view(led, experiment)
    except LedgerError as e:
        raise HTTPException(404, str(e)) from None
    return pages.render("sensitivity.html", nav="sensitivity", data=data, limit=limit)


@router.get("/api", response_class=HTMLResponse)
def api_page(request: Request, pages: PagesDep):
    return pages.render("api.html", nav="api", spec=request.app.openapi())
