"""The ledger's user-facing error (a leaf module: the store, its database opener and the
modules around them all raise it without importing each other)."""
from __future__ import annotations

from quantatlas.errors import UserError


class LedgerError(UserError):
    """A user mistake against the ledger (unknown id, unknown arm, a bad database URL, ...): one
    line that names the value."""
