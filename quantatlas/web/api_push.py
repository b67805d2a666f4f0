"""The JSON API contributors push to and pull from (the checks on a push: web/records.py)."""
from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field

from quantatlas.atlas import io
from quantatlas.atlas.ledger import Ledger
from quantatlas.atlas.records import plain
from quantatlas.web import records
from quantatlas.web.deps import get_ledger, get_max_request_tokens, get_refresher, token_contributor
from quantatlas.web.refresher import VerdictRefresher

MAX_IDS = 50_000
AS_TOKEN_OWNER = ("store every run as the token's contributor, whatever contributor it names (runs recorded "
                  "locally under another name, e.g. the login name); without it such a run is refused (403)")

router = APIRouter(prefix="/api")

LedgerDep = Annotated[Ledger, Depends(get_ledger)]
Contributor = Annotated[str, Depends(token_contributor)]


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


def ndjson(items: list[dict]) -> Response:
    body = "".join(json.dumps(plain(x), separators=(",", ":"), allow_nan=False) + "\n" for x in items)
    return Response(body, media_type="application/x-ndjson")


@router.get("/whoami", tags=["push"], summary="The token's contributor", response_model=WhoAmI)
def api_whoami(who: Contributor):
    return {"contributor": who}


@router.post("/runs", tags=["push"], summary="Push runs", response_model=records.PushSummary,
             responses={401: {"description": "missing or unknown token"},
                        403: {"description": "a run of another contributor"},
                        413: {"description": "body over the size limit"},
                        422: {"description": "invalid payload; the reason names the record and field"}})
def api_push(payload: records.PushPayload, who: Contributor, led: LedgerDep,
             refresher: Annotated[VerdictRefresher, Depends(get_refresher)],
             max_request_tokens: Annotated[int, Depends(get_max_request_tokens)],
             as_token_owner: bool = Query(False, description=AS_TOKEN_OWNER)):
    """Add runs (and the experiments they belong to) as the token's contributor, all or nothing.
    Runs the server holds already are left as they are (`runs_existing`): pushing twice adds
    nothing, and no push alters or deletes a stored run. An experiment the server holds is left
    as it is: the answer's `kept` names the fields not applied; new tags are stored as yours.
    A run that names another contributor is refused (403) unless `as_token_owner` is true."""
    if as_token_owner:
        payload = payload.model_copy(update={"runs": [r.model_copy(update={"contributor": who})
                                                      for r in payload.runs]})
    try:
        got = records.accept_push(led, who, payload, max_request_tokens)
    except records.PushRejected as e:
        if e.status != 403:
            raise
        raise records.PushRejected(403, f"{e.reason}; to store runs recorded under another name as yours, push "
                                        f"with ?as_token_owner=true (`quantatlas push --as-token-owner`)") from None
    refresher.schedule(got.pop("touched"))
    return got


@router.post("/known", tags=["push"], summary="Which of these runs and experiments the server holds",
             response_model=Known)
def api_known(body: KnownQuery, led: LedgerDep):
    return records.known(led, body.runs, body.experiments)


@router.get("/runs/ids", tags=["pull"], summary="Every run id", response_model=AllRunIds)
def api_run_ids(led: LedgerDep):
    return {"ids": records.all_run_ids(led)}


@router.get("/records/experiments", tags=["pull"], summary="Every experiment record (JSON lines)",
            response_class=Response, responses={200: {"content": {"application/x-ndjson": {}}}})
def api_experiment_records(led: LedgerDep):
    """Experiment records as `quantatlas atlas export` writes them, one per line."""
    return ndjson(io.experiment_records(led))


@router.post("/records/runs", tags=["pull"], summary="These runs' records (JSON lines)",
             response_class=Response, responses={200: {"content": {"application/x-ndjson": {}}}})
def api_run_records(body: RunIds, led: LedgerDep):
    """Run records (with per-token KLD) as `quantatlas atlas export` writes them, one per line."""
    return ndjson(io.run_records(led, body.ids))
