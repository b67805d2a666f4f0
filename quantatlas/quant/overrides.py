"""Per-tensor overrides of an arm's codec (and solver): `overrides: [{match: k, codec: q8_0}]`.
A typed config the spec and allocation (quant/sensitivity.py) both build; no torch."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator

from quantatlas.quant.config import config_field, registry


def known_solver(name: str | None) -> str | None:
    known = registry("solver")
    if name is not None and name not in known:
        raise ValueError(f"unknown solver {name!r}; known: {', '.join(sorted(known))}")
    return name


class Override(BaseModel):
    model_config = ConfigDict(extra="forbid")
    match: str                                # a regex searched in the module name, or a role name (k, down, ...)
    codec: config_field("codec") = None       # null keeps the tensor in fp16
    solver: str | None = None

    _solver = field_validator("solver")(classmethod(lambda cls, v: known_solver(v)))
