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

from quantatlas.atlas.errors import LedgerError
from quantatlas.atlas.store import Store

TOKEN_PREFIX = "qat_"
PREFIX_CHARS = 12          # stored in clear to tell tokens apart in `token list` / `token revoke`
MAX_NAME = 200


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: str) -> str:
    """A contributor name: 1-200 printable characters, no surrounding whitespace."""
    if not isinstance(name, str) or not name.strip():
        raise LedgerError(f"contributor NAME must be a non-empty string, got {name!r}")
    name = name.strip()
    if len(name) > MAX_NAME or not name.isprintable():
        raise LedgerError(f"contributor NAME {name[:40]!r} must be at most {MAX_NAME} printable characters")
    return name


def create_token(led: Store, name: str) -> str:
    """A new token for contributor `name` (created if new). Returned once, never stored."""
    name = check_name(name)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    led.transact(lambda tx: tx.add_token(name, hash_token(token), token[:PREFIX_CHARS]))
    return token


def contributor_for_token(led: Store, token: str | None) -> str | None:
    """The contributor a live token belongs to, or None."""
    if not token or not isinstance(token, str) or len(token) > 200:
        return None
    with led.read() as q:
        return q.token_owner(hash_token(token))


def list_tokens(led: Store) -> list[dict]:
    """Every token (prefix only, never the secret), oldest first."""
    with led.read() as q:
        rows = q.tokens()
    return [{"prefix": t.prefix, "contributor": t.contributor,
             "created_at": t.created_at.isoformat() if t.created_at else None,
             "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None} for t in rows]


def revoke_token(led: Store, prefix: str) -> str:
    """Revoke the one live token starting with `prefix` (at least 8 characters); its contributor."""
    if not isinstance(prefix, str) or len(prefix) < 8:
        raise LedgerError(f"token PREFIX must be at least 8 characters (see `atlas token list`), got {prefix!r}")

    def fn(tx):
        rows = tx.live_tokens(prefix[:PREFIX_CHARS])
        if len(prefix) > PREFIX_CHARS:        # a whole token: match it exactly
            rows = [r for r in rows if r.token_sha256 == hash_token(prefix)]
        if not rows:
            raise LedgerError(f"no live token starts with {prefix!r}")
        if len(rows) > 1:
            raise LedgerError(f"token prefix {prefix!r} is ambiguous ({len(rows)} tokens); give more characters")
        return tx.revoke_token(rows[0].id)

    return led.transact(fn)
