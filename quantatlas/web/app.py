"""The atlas server: server-rendered pages and a JSON API over one ledger.

    app = create_app("sqlite:///runs/atlas.db")      # uvicorn.run(app, host="127.0.0.1")

Pages: / (experiments), /experiments/{id}, /landscape, /composition, /left-to-try, /sensitivity,
/api (the API's reference, rendered from its OpenAPI document at /api/openapi.json); /download/... (each
page's tables as CSV or JSON, downloads.py).
Everything the pages load comes from this server: plotly.js from the installed plotly package, no CDN.
The routes are routers (pages.py, api_read.py, api_push.py, downloads.py) that take the ledger through
`Depends(get_ledger)` (deps.py); each page and its JSON twin call one view function (views.py).

At the door: request bodies over `max_body_bytes` are refused (413) and JSON nested deeper than
`records.MAX_DEPTH` (422) before it is parsed; a push's per-token KLD over `max_request_tokens`
values in all is refused (413) before it is decompressed. Whatever is stored renders: pages and
JSON answers go through `records.plain` (no NaN or Infinity, no nesting past the limit).
Reads never write; after a push a background thread refreshes the verdicts it made stale.
"""
from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from quantatlas.atlas.ledger import Ledger
from quantatlas.atlas.records import MAX_DEPTH, json_depth, plain
from quantatlas.web import api_push, api_read, downloads, pages, records
from quantatlas.web.refresher import VerdictRefresher
from quantatlas.web.rendering import HERE, Pages, plotly_js
from quantatlas.web.views import QUERY_CHOICES

DEFAULT_MAX_BODY = 64 << 20          # bytes in one request body (a push of ~200 runs of 65k tokens)


class StrictJSON(JSONResponse):
    """JSON answers through `records.plain`: stored data never makes a 500 (NaN, Infinity, depth)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(plain(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


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


# ---- errors ----------------------------------------------------------------------------------

async def http_error(request: Request, exc: HTTPException):
    """JSON for the API (and for 401, 403, 413 anywhere); the error page for a page."""
    if request.url.path.startswith("/api") or exc.status_code in (401, 403, 413):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
    return request.app.state.pages.render("error.html", status=exc.status_code, status_code=exc.status_code,
                                          detail=exc.detail)


def _choice_error(exc: RequestValidationError) -> str | None:
    """A query parameter outside its fixed set of values (a `Literal`), said as one line that
    names the parameter, the value and the choices."""
    errors = exc.errors()
    e = errors[0] if len(errors) == 1 else {}
    loc = tuple(e.get("loc", ()))
    if e.get("type") != "literal_error" or len(loc) != 2 or loc[0] != "query" or loc[1] not in QUERY_CHOICES:
        return None
    return f"{loc[1]} {e.get('input')!r} is not one of {', '.join(QUERY_CHOICES[loc[1]])}"


async def invalid_request(request: Request, exc: RequestValidationError):
    # a one-line reason naming each field; the offending input is not echoed (it may be NaN,
    # which JSON cannot carry, or megabytes long), except a query value outside its choices
    choice = _choice_error(exc)
    if choice is not None:
        return await http_error(request, HTTPException(422, choice))
    errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")).removeprefix("Value error, ")}
              for e in exc.errors()]
    reason = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:10])
    if len(errors) > 10:
        reason += f"; ... ({len(errors)} errors)"
    return StrictJSON({"detail": reason, "errors": errors[:100]}, status_code=422)


async def push_rejected(request: Request, exc: records.PushRejected):
    return JSONResponse({"detail": exc.reason}, status_code=exc.status)


# ---- the app ---------------------------------------------------------------------------------

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
    app.state.pages = Pages()
    app.state.plotly_path = plotly_js()
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(records.PushRejected, push_rejected)
    app.add_exception_handler(HTTPException, http_error)
    app.include_router(pages.router)
    app.include_router(api_read.router)
    app.include_router(api_push.router)
    app.include_router(downloads.router)
    return app
