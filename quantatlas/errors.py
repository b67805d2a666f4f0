"""Errors a user can fix. Every one of them derives from `UserError`, which carries the dotted
field it is about (`arms.int4.codec.uniform.bits`, `data.eval.tokens`, `model`) when there is one,
so the command line can point at the spec's line without reading the message."""
from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user gave (a spec, a model folder, eval data, a ledger request).
    The message is one line; `field` is the dotted spec path it concerns, or None."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field
