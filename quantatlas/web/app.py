"""The atlas server: server-rendered pages and a JSON API over one ledger.

    app = create_app("sqlite:///runs/atlas.db")      # uvicorn.run(app, host="127.0.0.1")

Pages: / (experiments), /experiments/{id}, /landscape, /composition, /left-to-try, /api (the
API's reference, rendered from its OpenAPI document at /api/openapi.json). Everything the
pages load comes from this server: plotly.js from the installed plotly package, no CDN.

At the door: request bodies over `max_body_bytes` are refused (413) and JSON nested deeper than
`records.MAX_DEPTH` (422) before it is parsed; a push's per-token KLD over `max_request_tokens`
values in all is refused (413) before it is decompressed. Whatever is stored renders: pages and
JSON answers go through `records.plain` (no NaN or Infinity, no nesting past the limit).
Reads never write; after a push a background thread refreshes the verdicts it made stale.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from contextlib import asynccontextmanager
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
from quantatlas.atlas.records import MAX_DEPTH, json_depth, plain
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


class StrictJSON(JSONResponse):
    """JSON answers through `records.plain`: stored data never makes a 500 (NaN, Infinity, depth)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(plain(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


class VerdictRefresher:
    """Refreshes cached verdicts after pushes, off the request path: pushes hand over the
    experiments they touched; one thread recomputes them once pushes have paused for `delay_s`
    (at most `max_wait_s` after the first), so a burst of pushes costs one pass, not one each."""

    def __init__(self, led: Ledger, delay_s: float = 0.5, max_wait_s: float = 10.0):
        self.led, self.delay_s, self.max_wait_s = led, delay_s, max_wait_s
        self._last = 0.0
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = False
        self._thread: threading.Thread | None = None

    def schedule(self, exp_ids) -> None:
        exp_ids = set(exp_ids)
        if not exp_ids:
            return
        with self._lock:
            self._pending |= exp_ids
            self._last = time.monotonic()
            self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="verdict-refresher", daemon=True)
                self._thread.start()
        self._wake.set()

    def _loop(self) -> None:
        try:                       # Linux: this thread yields the CPU to request handlers
            import os

            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while not self._stop:
            self._wake.wait()
            self._wake.clear()
            if self._stop:
                break
            first = time.monotonic()
            while not self._stop:                        # let a burst of pushes land first
                quiet = time.monotonic() - self._last
                if quiet >= self.delay_s or time.monotonic() - first >= self.max_wait_s:
                    break
                time.sleep(min(self.delay_s - quiet, 0.1) if quiet < self.delay_s else 0.01)
            with self._lock:
                todo, self._pending = self._pending, set()
            try:
                self.led.refresh_verdicts(sorted(todo))
            except Exception:                            # the cache stays stale; reads compute in memory
                logging.getLogger("quantatlas.web").exception("verdict refresh failed")
            with self._lock:
                if not self._pending:
                    self._idle.set()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        return self._idle.wait(timeout)

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)


class BodyLimit:
    """Reject a request body larger than `limit` bytes with 413 before the app reads it, and a
    JSON body nested deeper than `records.MAX_DEPTH` with 422 before anything parses it."""

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
        depth = json_depth(body) if body else 0
        if depth > MAX_DEPTH:
            return await self._reject(send, size, status=422, reason=f"the JSON body is nested {depth} levels deep; "
                                                                     f"the limit is {MAX_DEPTH}")

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _reject(self, send, size: int, status: int = 413, reason: str | None = None):
        reason = reason or (f"request body of {size} bytes is over this server's limit of {self.limit} "
                            f"bytes: push fewer runs at a time")
        msg = json.dumps({"detail": reason}).encode()
        await send({"type": "http.response.start", "status": status,
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
    # figures and other embedded JSON: strict (plotly.js's JSON.parse refuses NaN and Infinity)
    env.policies["json.dumps_function"] = lambda obj, **kw: json.dumps(plain(obj), allow_nan=False, **kw)
    return env


def create_app(db_url: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
               max_request_tokens: int = records.DEFAULT_MAX_REQUEST_TOKENS) -> FastAPI:
    """The atlas server over the ledger at `db_url` (None: $QUANTATLAS_DB, else sqlite:///runs/atlas.db),
    migrated on open. Request bodies over `max_body_bytes` are refused with 413, and so is a push
    whose runs hold more than `max_request_tokens` per-token KLD values in all (checked on the
    declared counts, before anything is decompressed)."""
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1024:
        raise ValueError(f"max_body_bytes must be an integer >= 1024, got {max_body_bytes!r}")
    if isinstance(max_request_tokens, bool) or not isinstance(max_request_tokens, int) or max_request_tokens < 1:
        raise ValueError(f"max_request_tokens must be a positive integer, got {max_request_tokens!r}")
    led = Ledger(db_url)
    refresher = VerdictRefresher(led)
    env = _templates()
    from quantatlas import __version__ as version

    @asynccontextmanager
    async def lifespan(app):
        yield
        refresher.stop()

    app = FastAPI(title="quantatlas", version=version, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json", default_response_class=StrictJSON, lifespan=lifespan,
                  description="The quantatlas ledger: experiments, verdicts, the KLD-vs-bits landscape, the "
                              "composition matrix, what is left to try; and a push API for contributors "
                              "(bearer tokens from `quantatlas atlas token create NAME`).")
    app.state.ledger = led
    app.state.refresher = refresher
    app.state.max_request_tokens = max_request_tokens
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
            # pending: a spec waiting for runs (a hypothesis-only row is not pending: it has no spec to run)
            return [r for r in views.experiment_rows(led, tag, model, None, q)
                    if r["result"] is None and r.get("source") != "import"]
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
        errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")).removeprefix("Value error, ")}
                  for e in exc.errors()]
        reason = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:10])
        if len(errors) > 10:
            reason += f"; ... ({len(errors)} errors)"
        return StrictJSON({"detail": reason, "errors": errors[:100]}, status_code=422)

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

    @app.get("/sensitivity", response_class=HTMLResponse, include_in_schema=False)
    def sensitivity_page(experiment: Optional[str] = None, limit: int = Query(40, ge=1, le=10000)):
        """Stored sensitivity measurements, each as its ranked ROI table (issue 17)."""
        try:
            data = led.sensitivities(experiment)
        except LedgerError as e:
            raise HTTPException(404, str(e)) from None
        return page("sensitivity.html", nav="sensitivity", data=data, limit=limit)

    @app.get("/api/sensitivity", tags=["read"], summary="Sensitivity measurements: ΔKLD and Δbits per tensor group")
    def api_sensitivity(experiment: Optional[str] = Query(None, description="only this experiment")) -> list[dict]:
        try:
            return [{k: v for k, v in r.items() if k != "data"} for r in led.sensitivities(experiment)]
        except LedgerError as e:
            raise HTTPException(404, str(e)) from None

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
        return plain(rows(tag, model, result_filter(result), q))

    @app.get("/api/experiments/{exp_id}", tags=["read"], summary="One experiment")
    def api_experiment(exp_id: str) -> dict:
        """Everything on the experiment page: spec, arms (with techniques), run sets with their
        environments and per-seed figures, verdicts with their reasoning, duplicates, and per run
        set and arm the empirical CDF of per-token KLD (points x, y with y = #{KLD <= x} / n)."""
        return plain(experiment_or_404(exp_id))

    @app.get("/api/experiments/{exp_id}/kld", tags=["read"], summary="Per-token KLD distributions")
    def api_kld(exp_id: str) -> list[dict]:
        """Per run set and arm: the empirical CDF of per-token KLD pooled over seeds."""
        return plain(experiment_or_404(exp_id)["kld_distributions"])

    @app.get("/api/landscape", tags=["read"], summary="KLD vs bits per model, with the Pareto frontier")
    def api_landscape(bits: str = Query("bits_per_weight", description="bits_per_weight | bits_per_param")) -> dict:
        """Per model hash x eval fingerprint: every arm a point (mean kld_mean and bits over its runs),
        `pareto` on the frontier, `llamacpp` for llama.cpp formats (ggml types, gguf mixtures),
        `not_drawn` for arms without bits or with KLD <= 0."""
        if bits not in land.BITS_METRICS:
            raise HTTPException(422, f"bits {bits!r} is not one of {', '.join(land.BITS_METRICS)}")
        return plain(land.landscape(led, bits))

    @app.get("/api/composition", tags=["read"], summary="Technique x technique verdicts")
    def api_composition() -> dict:
        """Cells (a, b): counts of verdicts of treatment arms that stacked a and b (holding both,
        adding at least one to their control); (a, a): arms that added a."""
        return plain(land.composition(led))

    @app.get("/api/left-to-try", tags=["read"], summary="Technique pairs and bit budgets not yet covered")
    def api_left() -> dict:
        """Compatible technique pairs no measured arm holds; bit budgets (floor of bits per weight)
        each stacked pair and each technique lacks."""
        return plain(land.left_to_try(led))

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
        nothing, and no push alters or deletes a stored run. An experiment the server holds is left
        as it is: the answer's `kept` names the fields not applied; new tags are stored as yours."""
        got = records.accept_push(led, who, payload, max_request_tokens)
        refresher.schedule(got.pop("touched"))
        return got

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
    body = "".join(json.dumps(plain(x), separators=(",", ":"), allow_nan=False) + "\n" for x in items)
    return Response(body, media_type="application/x-ndjson")
