"""The atlas server: server-rendered pages and a JSON API over one ledger.

    app = create_app("sqlite:///runs/atlas.db")      # uvicorn.run(app, host="127.0.0.1")

Pages: / (experiments), /experiments/{id}, /landscape, /composition, /left-to-try, /api (the
API's reference, rendered from its OpenAPI document at /api/openapi.json). Everything the
pages load comes from this server: plotly.js from the installed plotly package, no CDN.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, Field

from quantatlas.atlas.ledger import Ledger, LedgerError
from quantatlas.atlas.tokens import contributor_for_token
from quantatlas.atlas.verdict import RESULTS
from quantatlas.web import landscape as land
from quantatlas.web import records, views
from quantatlas.web.figures import kld_ecdf_figure, landscape_figure

HERE = Path(__file__).resolve().parent
DEFAULT_MAX_BODY = 64 << 20          # bytes in one request body (a push of ~200 runs of 65k tokens)
MAX_IDS = 50_000


def plotly_js() -> Path:
    """plotly.min.js as shipped inside the installed plotly package."""
    import plotly

    path = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise RuntimeError(f"plotly.min.js not found at {path}: reinstall plotly")
    return path


class BodyLimit:
    """Reject a request body larger than `limit` bytes with 413 before the app reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send, int(declared))
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._reject(send, size)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _reject(self, send, size: int):
        msg = json.dumps({"detail": f"request body of {size} bytes is over this server's limit of {self.limit} "
                                    f"bytes: push fewer runs at a time"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(msg)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": msg})


class RunIds(BaseModel):
    ids: list[str] = Field(max_length=MAX_IDS, description="run ids")


class KnownQuery(BaseModel):
    runs: list[str] = Field(default_factory=list, max_length=MAX_IDS, description="run ids")
    experiments: list[str] = Field(default_factory=list, max_length=MAX_IDS, description="experiment ids")


class Known(BaseModel):
    runs: list[str] = Field(description="the asked run ids the server holds")
    experiments: list[str] = Field(description="the asked experiment ids the server holds")


class AllRunIds(BaseModel):
    ids: list[str]


class WhoAmI(BaseModel):
    contributor: str


# ---- template helpers ------------------------------------------------------------------------

def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e7 or abs(v) < 1e-4):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:+.1f} %"


def _short(v: Any, n: int = 12) -> str:
    s = "" if v is None else str(v)
    return s if len(s) <= n else s[:n] + "…"


def _repro(row: dict) -> str:
    if row.get("reproductions") is None:
        return row.get("reproductions_column") or "–"
    n, agree = row["reproductions"], row.get("reproductions_agree") or 0
    return "0" if n == 0 else f"{agree}/{n} agree"


def _templates() -> Environment:
    env = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=_fmt, pct=_pct, short=_short, repro=_repro)
    return env


def create_app(db_url: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY) -> FastAPI:
    """The atlas server over the ledger at `db_url` (None: $QUANTATLAS_DB, else sqlite:///runs/atlas.db),
    migrated on open. Request bodies over `max_body_bytes` are refused with 413."""
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1024:
        raise ValueError(f"max_body_bytes must be an integer >= 1024, got {max_body_bytes!r}")
    led = Ledger(db_url)
    env = _templates()
    from quantatlas import __version__ as version

    app = FastAPI(title="quantatlas", version=version, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json",
                  description="The quantatlas ledger: experiments, verdicts, the KLD-vs-bits landscape, the "
                              "composition matrix, what is left to try; and a push API for contributors "
                              "(bearer tokens from `quantatlas atlas token create NAME`).")
    app.state.ledger = led
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    plotly_path = plotly_js()
    bearer = HTTPBearer(auto_error=False, scheme_name="contributor token",
                        description="`Authorization: Bearer <token>`; a token from `quantatlas atlas token create NAME`")

    def page(name: str, status: int = 200, **context) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(**context), status_code=status)

    def contributor(creds: Optional[HTTPAuthorizationCredentials] = Security(bearer)) -> str:
        if creds is None:
            raise HTTPException(401, "missing bearer token (Authorization: Bearer <token>); "
                                     "create one with `quantatlas atlas token create NAME` on the server",
                                headers={"WWW-Authenticate": "Bearer"})
        who = contributor_for_token(led, creds.credentials)
        if who is None:
            raise HTTPException(401, "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"})
        return who

    def result_filter(result: Optional[str]) -> Optional[str]:
        if result and result not in RESULTS and result != "pending":
            raise HTTPException(422, f"result {result!r} is not one of {', '.join(RESULTS)}, pending")
        return result or None

    def rows(tag, model, result, q) -> list[dict]:
        if result == "pending":
            return [r for r in views.experiment_rows(led, tag, model, None, q) if r["result"] is None]
        return views.experiment_rows(led, tag, model, result, q)

    def experiment_or_404(exp_id: str) -> dict:
        try:
            return views.experiment_view(led, exp_id)
        except LedgerError as e:
            raise HTTPException(404, str(e)) from None

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        # a one-line reason naming each field; the offending input is not echoed (it may be NaN,
        # which JSON cannot carry, or megabytes long)
        errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()]
        reason = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:10])
        if len(errors) > 10:
            reason += f"; ... ({len(errors)} errors)"
        return JSONResponse({"detail": reason, "errors": errors[:100]}, status_code=422)

    @app.exception_handler(records.PushRejected)
    async def _rejected(request: Request, exc: records.PushRejected):
        return JSONResponse({"detail": exc.reason}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        if request.url.path.startswith("/api") or exc.status_code in (401, 403, 413):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return page("error.html", status=exc.status_code, status_code=exc.status_code, detail=exc.detail)

    # ---- static -------------------------------------------------------------------------------

    @app.get("/vendor/plotly.min.js", include_in_schema=False)
    def _plotly():
        return FileResponse(plotly_path, media_type="text/javascript",
                            headers={"Cache-Control": "public, max-age=86400"})

    # ---- pages --------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def list_page(tag: Optional[str] = None, model: Optional[str] = None, result: Optional[str] = None,
                  q: Optional[str] = None):
        result = result_filter(result)
        return page("list.html", nav="list", rows=rows(tag, model, result, q), facets=views.facets(led),
                    results=RESULTS + ("pending",), filters={"tag": tag or "", "model": model or "",
                                                             "result": result or "", "q": q or ""})

    @app.get("/experiments/{exp_id}", response_class=HTMLResponse, include_in_schema=False)
    def experiment_page(exp_id: str):
        d = experiment_or_404(exp_id)
        figures = [{"run_set": dist["run_set"], "figure": kld_ecdf_figure(dist),
                    "tokens": {a["arm"]: a["n"] for a in dist["arms"]}} for dist in d["kld_distributions"]]
        import yaml

        spec_yaml = yaml.safe_dump(d["spec"], sort_keys=False, allow_unicode=True) if d.get("spec") else None
        return page("experiment.html", nav="list", e=d, figures=figures, spec_yaml=spec_yaml)

    @app.get("/landscape", response_class=HTMLResponse, include_in_schema=False)
    def landscape_page(bits: str = "bits_per_weight"):
        if bits not in land.BITS_METRICS:
            raise HTTPException(422, f"bits {bits!r} is not one of {', '.join(land.BITS_METRICS)}")
        data = land.landscape(led, bits)
        for g in data["groups"]:
            g["figure"] = landscape_figure(g, bits)
        return page("landscape.html", nav="landscape", data=data, bits_options=land.BITS_METRICS)

    @app.get("/composition", response_class=HTMLResponse, include_in_schema=False)
    def composition_page():
        data = land.composition(led)
        cells = {(c["a"], c["b"]): c for c in data["cells"]}
        return page("composition.html", nav="composition", data=data, cells=cells)

    @app.get("/left-to-try", response_class=HTMLResponse, include_in_schema=False)
    def left_page():
        return page("left.html", nav="left", data=land.left_to_try(led))

    @app.get("/api", response_class=HTMLResponse, include_in_schema=False)
    def api_page():
        return page("api.html", nav="api", spec=app.openapi())

    # ---- JSON API: reading --------------------------------------------------------------------

    @app.get("/api/experiments", tags=["read"], summary="The experiment list")
    def api_experiments(tag: Optional[str] = Query(None, description="only experiments with this tag"),
                        model: Optional[str] = Query(None, description="only experiments on this model"),
                        result: Optional[str] = Query(None, description=f"{'|'.join(RESULTS)}|pending"),
                        q: Optional[str] = Query(None, description="words that must all appear in the id, title, "
                                                                    "hypothesis, model or tags")) -> list[dict]:
        """One row per experiment, newest first: id, hypothesis, result, confidence, reproductions,
        duplicate flags, per-arm verdicts and key metrics (as `quantatlas atlas list --json`)."""
        return rows(tag, model, result_filter(result), q)

    @app.get("/api/experiments/{exp_id}", tags=["read"], summary="One experiment")
    def api_experiment(exp_id: str) -> dict:
        """Everything on the experiment page: spec, arms (with techniques), run sets with their
        environments and per-seed figures, verdicts with their reasoning, duplicates, and per run
        set and arm the empirical CDF of per-token KLD (points x, y with y = #{KLD <= x} / n)."""
        return experiment_or_404(exp_id)

    @app.get("/api/experiments/{exp_id}/kld", tags=["read"], summary="Per-token KLD distributions")
    def api_kld(exp_id: str) -> list[dict]:
        """Per run set and arm: the empirical CDF of per-token KLD pooled over seeds."""
        return experiment_or_404(exp_id)["kld_distributions"]

    @app.get("/api/landscape", tags=["read"], summary="KLD vs bits per model, with the Pareto frontier")
    def api_landscape(bits: str = Query("bits_per_weight", description="bits_per_weight | bits_per_param")) -> dict:
        """Per model hash x eval fingerprint: every arm a point (mean kld_mean and bits over its runs),
        `pareto` on the frontier, `llamacpp` for llama.cpp formats (ggml types, gguf mixtures),
        `not_drawn` for arms without bits or with KLD <= 0."""
        if bits not in land.BITS_METRICS:
            raise HTTPException(422, f"bits {bits!r} is not one of {', '.join(land.BITS_METRICS)}")
        return land.landscape(led, bits)

    @app.get("/api/composition", tags=["read"], summary="Technique x technique verdicts")
    def api_composition() -> dict:
        """Cells (a, b): counts of verdicts of treatment arms that stacked a and b (holding both,
        adding at least one to their control); (a, a): arms that added a."""
        return land.composition(led)

    @app.get("/api/left-to-try", tags=["read"], summary="Technique pairs and bit budgets not yet covered")
    def api_left() -> dict:
        """Compatible technique pairs no measured arm holds; bit budgets (floor of bits per weight)
        each stacked pair and each technique lacks."""
        return land.left_to_try(led)

    # ---- JSON API: push and pull --------------------------------------------------------------

    @app.get("/api/whoami", tags=["push"], summary="The token's contributor", response_model=WhoAmI)
    def api_whoami(who: str = Depends(contributor)):
        return {"contributor": who}

    @app.post("/api/runs", tags=["push"], summary="Push runs", response_model=records.PushSummary,
              responses={401: {"description": "missing or unknown token"},
                         403: {"description": "a run of another contributor"},
                         413: {"description": "body over the size limit"},
                         422: {"description": "invalid payload; the reason names the record and field"}})
    def api_push(payload: records.PushPayload, who: str = Depends(contributor)):
        """Add runs (and the experiments they belong to) as the token's contributor, all or nothing.
        Runs the server holds already are left as they are (`runs_existing`): pushing twice adds
        nothing, and no push alters or deletes a stored run."""
        return records.accept_push(led, who, payload)

    @app.post("/api/known", tags=["push"], summary="Which of these runs and experiments the server holds",
              response_model=Known)
    def api_known(body: KnownQuery):
        return records.known(led, body.runs, body.experiments)

    @app.get("/api/runs/ids", tags=["pull"], summary="Every run id", response_model=AllRunIds)
    def api_run_ids():
        return {"ids": records.all_run_ids(led)}

    @app.get("/api/records/experiments", tags=["pull"], summary="Every experiment record (JSON lines)",
             response_class=Response, responses={200: {"content": {"application/x-ndjson": {}}}})
    def api_experiment_records():
        """Experiment records as `quantatlas atlas export` writes them, one per line."""
        return _ndjson(records.experiment_records(led))

    @app.post("/api/records/runs", tags=["pull"], summary="These runs' records (JSON lines)",
              response_class=Response, responses={200: {"content": {"application/x-ndjson": {}}}})
    def api_run_records(body: RunIds):
        """Run records (with per-token KLD) as `quantatlas atlas export` writes them, one per line."""
        return _ndjson(records.run_records(led, body.ids))

    return app


def _ndjson(items: list[dict]) -> Response:
    body = "".join(json.dumps(x, separators=(",", ":"), allow_nan=False) + "\n" for x in items)
    return Response(body, media_type="application/x-ndjson")
