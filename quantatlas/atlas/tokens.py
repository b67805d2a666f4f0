"""Contributor bearer tokens: who may push runs to a shared atlas server.

    token = create_token(led, "alice")        # printed once; only its sha256 is stored
    contributor_for_token(led, token)         # -> "alice" (None: unknown or revoked)

A token is `qat_` + 43 url-safe characters (256 random bits). Because it is random and long,
a plain sha256 of it is as good as a slow password hash: nothing can search the space, and
looking a token up by its hash leaks no timing about the secret itself.
"""
from __future__ import annotations

import hashlib
import secrets
from typing import TYPE_CHECKING

from sqlalchemy import select

from quantatlas.atlas.models import ApiToken, Contributor, utcnow

if TYPE_CHECKING:
    from quantatlas.atlas.ledger import Ledger

TOKEN_PREFIX = "qat_"
PREFIX_CHARS = 12          # stored in clear to tell tokens apart in `token list` / `token revoke`
MAX_NAME = 200


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: str) -> str:
    """A contributor name: 1-200 printable characters, no surrounding whitespace."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"contributor NAME must be a non-empty string, got {name!r}")
    name = name.strip()
    if len(name) > MAX_NAME or not name.isprintable():
        raise ValueError(f"contributor NAME {name[:40]!r} must be at most {MAX_NAME} printable characters")
    return name


def create_token(led: Ledger, name: str) -> str:
    """A new token for contributor `name` (created if new). Returned once, never stored."""
    name = check_name(name)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)

    def fn(s):
        who = led._contributor(s, name)
        s.add(ApiToken(contributor_id=who.id, token_sha256=hash_token(token), prefix=token[:PREFIX_CHARS]))

    led._writing(fn)
    return token


def contributor_for_token(led: Ledger, token: str | None) -> str | None:
    """The contributor a live token belongs to, or None."""
    if not token or not isinstance(token, str) or len(token) > 200:
        return None
    with led._reading() as s:
        row = s.execute(select(Contributor.name).join(ApiToken, ApiToken.contributor_id == Contributor.id)
                        .where(ApiToken.token_sha256 == hash_token(token), ApiToken.revoked_at.is_(None))).first()
        return None if row is None else row[0]


def list_tokens(led: Ledger) -> list[dict]:
    """Every token (prefix only, never the secret), oldest first."""
    with led._reading() as s:
        rows = s.execute(select(ApiToken.prefix, Contributor.name, ApiToken.created_at, ApiToken.revoked_at)
                         .join(Contributor, ApiToken.contributor_id == Contributor.id)
                         .order_by(ApiToken.created_at, ApiToken.id)).all()
    return [{"prefix": p, "contributor": n, "created_at": c.isoformat() if c else None,
             "revoked_at": r.isoformat() if r else None} for p, n, c, r in rows]


def revoke_token(led: Ledger, prefix: str) -> str:
    """Revoke the one live token starting with `prefix` (at least 8 characters); its contributor."""
    if not isinstance(prefix, str) or len(prefix) < 8:
        raise ValueError(f"token PREFIX must be at least 8 characters (see `atlas token list`), got {prefix!r}")

    def fn(s):
        p = prefix[:PREFIX_CHARS]
        rows = s.scalars(select(ApiToken).where(ApiToken.prefix.startswith(p, autoescape=True),
                                                ApiToken.revoked_at.is_(None))).all()
        if len(prefix) > PREFIX_CHARS:        # a whole token: match it exactly
            rows = [r for r in rows if r.token_sha256 == hash_token(prefix)]
        if not rows:
            raise ValueError(f"no live token starts with {prefix!r}")
        if len(rows) > 1:
            raise ValueError(f"token prefix {prefix!r} is ambiguous ({len(rows)} tokens); give more characters")
        rows[0].revoked_at = utcnow()
        return rows[0].contributor.name

    return led._writing(fn)
