"""What the routes depend on (`fastapi.Depends`): the app's ledger, its verdict refresher, its
page renderer, its push limit, and the contributor a bearer token belongs to."""
from __future__ import annotations

from typing import Optional

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from quantatlas.atlas.ledger import Ledger
from quantatlas.atlas.tokens import contributor_for_token
from quantatlas.web.refresher import VerdictRefresher
from quantatlas.web.rendering import Pages

bearer = HTTPBearer(auto_error=False, scheme_name="contributor token",
                    description="`Authorization: Bearer <token>`; a token from `quantatlas atlas token create NAME`")


def get_ledger(request: Request) -> Ledger:
    return request.app.state.ledger


def get_refresher(request: Request) -> VerdictRefresher:
    return request.app.state.refresher


def get_pages(request: Request) -> Pages:
    return request.app.state.pages


def get_max_request_tokens(request: Request) -> int:
    return request.app.state.max_request_tokens


def token_contributor(creds: Optional[HTTPAuthorizationCredentials] = Security(bearer),
                      led: Ledger = Depends(get_ledger)) -> str:
    """The contributor of the request's live bearer token; 401 without one."""
    if creds is None:
        raise HTTPException(401, "missing bearer token (Authorization: Bearer <token>); "
                                 "create one with `quantatlas atlas token create NAME` on the server",
                            headers={"WWW-Authenticate": "Bearer"})
    who = contributor_for_token(led, creds.credentials)
    if who is None:
        raise HTTPException(401, "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"})
    return who
