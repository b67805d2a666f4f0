"""The wire format of push and pull: ledger records (the shapes of `atlas export`) as pydantic
models, the server's checks on a push, and the records a pull fetches.

A push is checked completely before anything is written, then written in one transaction:
a rejected push changes nothing. Checks: the schema (unknown fields, wrong types), every JSON
number finite (a metric that is really NaN or infinite travels as the string "nan", "inf" or
"-inf", as `atlas export` writes it), per-token KLD that decompresses to exactly `n` finite
float32 values with the stated sha256, specs that validate, ids of the known form, and every
run's contributor equal to the token's holder: a contributor pushes only their own runs, and
since a run's id includes its contributor, nobody can address, alter or delete another's.
Stored runs are never overwritten; pushing a run again is a no-op.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import math
import zlib
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator
from sqlalchemy import select

from quantatlas.atlas import ids
from quantatlas.atlas.models import Arm, Experiment, Run

if TYPE_CHECKING:
    from quantatlas.atlas.ledger import Ledger

SCHEMA_VERSION = 1
MAX_TOKENS = 1 << 24            # per-token KLD values in one run (16.7 M: 64 MiB of float32)
MAX_RECORDS = 10_000            # experiments or runs in one push
ID = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:\-]{1,64}$")]
Name = Annotated[str, Field(min_length=1, max_length=200)]
MetricValue = Union[StrictInt, StrictFloat, Literal["nan", "inf", "-inf"]]
NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class PushRejected(Exception):
    """A push the server refuses: HTTP status and a one-line reason; nothing was written."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def check_finite(value: Any, where: str) -> None:
    """Every number in a free-form JSON value must be finite (nested dicts and lists too)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: non-finite number {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_finite(v, f"{where}[{i}]")


def _iso(value: str | None) -> str | None:
    if value is not None:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO 8601 date-time") from None
    return value


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class PerTokenKLD(_Record):
    """Per-token KLD of a run: float32 little-endian, zlib-compressed, base64."""
    n: int = Field(ge=1, le=MAX_TOKENS, description="number of float32 values")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the raw float32 bytes")
    zlib_f32_base64: str


class ExperimentRecord(_Record):
    """An experiment as `atlas export` writes it. `merged_into` is accepted and ignored: merges
    are a server's own curation, never pushed."""
    type: Literal["experiment"] = "experiment"
    id: ID
    title: str | None = Field(None, max_length=2000)
    hypothesis: str | None = Field(None, max_length=20000)
    notes: str | None = Field(None, max_length=100000)
    tags: list[Name] = Field(default_factory=list, max_length=100)
    spec: dict[str, Any] | None = None
    source: str | None = Field(None, max_length=20)
    imported: dict[str, Any] | None = None
    contributor: str | None = Field(None, max_length=200)
    created_at: str | None = None
    merged_into: str | None = Field(None, max_length=64)

    @field_validator("spec", "imported")
    @classmethod
    def _finite(cls, v, info):
        check_finite(v, info.field_name)
        return v

    @field_validator("created_at")
    @classmethod
    def _time(cls, v):
        return _iso(v)


class RunRecord(_Record):
    """One arm x seed as `atlas export` writes it. The server recomputes its id."""
    type: Literal["run"] = "run"
    id: str | None = Field(None, max_length=64, description="the sender's run id (informative)")
    experiment: ID
    arm: Name
    seed: StrictInt = Field(ge=-(2 ** 31), le=2 ** 31 - 1)
    contributor: str | None = Field(None, max_length=200, description="must be the token's holder (or absent)")
    environment: dict[str, Any]
    model_hash: str = Field(min_length=1, max_length=128)
    eval_fingerprint: str = Field(min_length=1, max_length=128)
    created_at: str | None = None
    metrics: dict[Name, MetricValue] = Field(max_length=1000)
    extra: dict[str, Any] | None = None
    per_token_kld: PerTokenKLD | None = None

    @field_validator("environment", "extra")
    @classmethod
    def _finite(cls, v, info):
        check_finite(v, info.field_name)
        return v

    @field_validator("metrics")
    @classmethod
    def _floats(cls, v):
        for k, x in v.items():
            if not isinstance(x, str) and not math.isfinite(float(x)):    # a huge integer overflows
                raise ValueError(f"metric {k!r}: {x} is not a finite float64")
        return v

    @field_validator("created_at")
    @classmethod
    def _time(cls, v):
        return _iso(v)


class PushPayload(_Record):
    """`POST /api/runs`: experiments (those the runs need, and any the server may lack) and runs."""
    schema_version: Literal[1] = Field(description="the push format's version; this server knows 1")
    experiments: list[ExperimentRecord] = Field(default_factory=list, max_length=MAX_RECORDS)
    runs: list[RunRecord] = Field(default_factory=list, max_length=MAX_RECORDS)


class PushSummary(BaseModel):
    contributor: str
    experiments: int = Field(description="experiments new to the server")
    experiments_existing: int
    runs: int = Field(description="runs new to the server")
    runs_existing: int = Field(description="runs the server already had (left as they were)")
    renamed: dict[str, str] = Field(description="experiment ids the server holds under another id (same spec)")
    run_ids: list[str] = Field(description="the server's id of each pushed run, in order")


def decode_per_token(p: PerTokenKLD, where: str) -> np.ndarray:
    """Exactly n finite float32 values, checked against the sha256. Decompression is bounded by n,
    so a small payload cannot inflate into gigabytes."""
    try:
        blob = base64.b64decode(p.zlib_f32_base64, validate=True)
    except (binascii.Error, ValueError):
        raise PushRejected(422, f"{where}.zlib_f32_base64: not valid base64") from None
    expect = 4 * p.n
    d = zlib.decompressobj()
    try:
        raw = d.decompress(blob, expect + 1)
    except zlib.error as e:
        raise PushRejected(422, f"{where}: not zlib data ({e})") from None
    if len(raw) != expect or d.unconsumed_tail or not d.eof:
        raise PushRejected(422, f"{where}: does not decompress to n={p.n} float32 values")
    if hashlib.sha256(raw).hexdigest() != p.sha256:
        raise PushRejected(422, f"{where}: sha256 does not match the values")
    values = np.frombuffer(raw, dtype="<f4")
    if not np.isfinite(values).all():
        raise PushRejected(422, f"{where}: {int((~np.isfinite(values)).sum())} non-finite value(s)")
    return values


def accept_push(led: Ledger, contributor: str, payload: PushPayload) -> dict:
    """Check the whole payload, then write it in one transaction (see the module doc)."""
    from quantatlas.atlas.ledger import LedgerError

    exps = []
    for i, e in enumerate(payload.experiments):
        where = f"experiments[{i}] ({e.id})"
        normal = None
        if e.spec is not None:
            try:
                normal = ids.normalise_spec(e.spec)
            except ValueError as err:
                raise PushRejected(422, f"{where}.spec: {err}") from None
        elif not e.hypothesis:
            raise PushRejected(422, f"{where}: needs a spec or a hypothesis")
        exps.append((e, normal, datetime.fromisoformat(e.created_at) if e.created_at else None))
    runs = []
    for i, r in enumerate(payload.runs):
        where = f"runs[{i}]"
        if r.contributor is not None and r.contributor != contributor:
            raise PushRejected(403, f"{where} is by contributor {r.contributor!r} but the token belongs to "
                                    f"{contributor!r}: a contributor pushes only their own runs")
        metrics = {k: NONFINITE[v] if isinstance(v, str) else v for k, v in r.metrics.items()}
        metrics.update(r.extra or {})
        tokens = decode_per_token(r.per_token_kld, f"{where}.per_token_kld") if r.per_token_kld else None
        runs.append((r, metrics, tokens, datetime.fromisoformat(r.created_at) if r.created_at else None))

    def write(s) -> dict:
        out = {"contributor": contributor, "experiments": 0, "experiments_existing": 0, "runs": 0,
               "runs_existing": 0, "renamed": {}, "run_ids": []}
        mapping: dict[str, str] = {}
        for i, (e, normal, created) in enumerate(exps):
            try:
                if normal is not None:
                    full, identity = normal
                    full = dict(full, title=e.title or full.get("title"), hypothesis=e.hypothesis or full.get("hypothesis"),
                                tags=list(dict.fromkeys((full.get("tags") or []) + e.tags)))
                    before = s.scalars(select(Experiment.id).where(
                        Experiment.spec_hash == ids.spec_hash(identity))).first()
                    got = led._register(s, full, identity, contributor, given_id=e.id, created_at=created)
                    new = before is None
                else:
                    got = e.id
                    new = led._add_hypothesis(s, e.id, e.hypothesis, (e.imported or {}).get("result"), e.title or "",
                                              e.tags, e.imported, created_at=created, contributor=contributor)
            except ValueError as err:
                raise PushRejected(422, f"experiments[{i}] ({e.id}): {err}") from None
            out["experiments" if new else "experiments_existing"] += 1
            mapping[e.id] = got
            if got != e.id:
                out["renamed"][e.id] = got
        for i, (r, metrics, tokens, created) in enumerate(runs):
            exp_id = mapping.get(r.experiment, r.experiment)
            try:
                rid, new = led._record(s, exp_id, r.arm, r.seed, metrics, tokens, r.environment, r.model_hash,
                                       r.eval_fingerprint, contributor, created_at=created)
            except (LedgerError, ValueError) as err:
                raise PushRejected(422, f"runs[{i}]: {err}") from None
            out["runs" if new else "runs_existing"] += 1
            out["run_ids"].append(rid)
        return out

    return led._writing(write)


# ---- records for pull ------------------------------------------------------------------------

def experiment_record(e: Experiment) -> dict:
    from quantatlas.atlas.ledger import _iso, _jsonable

    return _jsonable({
        "type": "experiment", "id": e.id, "title": e.title, "hypothesis": e.hypothesis, "notes": e.notes,
        "tags": [t.name for t in e.tags], "spec": e.spec, "source": e.source, "imported": e.imported,
        "contributor": e.contributor.name if e.contributor else None, "created_at": _iso(e.created_at),
        "merged_into": e.merged_into,
    })


def run_record(r: Run) -> dict:
    """A run as `atlas export` writes it (non-finite metrics as the strings 'nan', 'inf', '-inf';
    the per-token KLD as stored, re-encoded only in base64)."""
    from quantatlas.atlas.ledger import _iso, _jsonable

    metrics = {m.name: m.value if m.nonfinite is None else m.nonfinite for m in r.metrics}
    tokens = None
    if r.per_token_kld is not None:
        tokens = {"n": r.n_tokens, "sha256": r.per_token_sha256,
                  "zlib_f32_base64": base64.b64encode(r.per_token_kld).decode()}
    rs = r.run_set
    return {"type": "run", "id": r.id, "experiment": r.arm.experiment_id, "arm": r.arm.name, "seed": r.seed,
            "contributor": rs.contributor.name, "environment": rs.environment.full or {},
            "model_hash": rs.model_hash, "eval_fingerprint": rs.eval_fingerprint, "created_at": _iso(r.created_at),
            "metrics": metrics, "extra": _jsonable(r.extra), "per_token_kld": tokens}


def experiment_records(led: Ledger) -> list[dict]:
    with led._reading() as s:
        return [experiment_record(e) for e in s.scalars(select(Experiment).order_by(Experiment.created_at,
                                                                                   Experiment.id))]


def run_records(led: Ledger, run_ids: list[str]) -> list[dict]:
    """The runs with these ids that the ledger holds, in ledger order."""
    out = []
    with led._reading() as s:
        for i in range(0, len(run_ids), 2000):
            q = (select(Run).join(Arm, Run.arm_id == Arm.id).where(Run.id.in_(run_ids[i:i + 2000]))
                 .order_by(Arm.experiment_id, Run.run_set_id, Arm.position, Run.seed))
            out += [run_record(r) for r in s.scalars(q)]
    return out


def known(led: Ledger, run_ids: list[str], experiment_ids: list[str]) -> dict:
    """Which of these run and experiment ids the ledger holds."""
    out = {"runs": [], "experiments": []}
    with led._reading() as s:
        for key, column, asked in (("runs", Run.id, run_ids), ("experiments", Experiment.id, experiment_ids)):
            for i in range(0, len(asked), 2000):        # stay under SQLite's bound-parameter limit
                out[key] += list(s.scalars(select(column).where(column.in_(asked[i:i + 2000]))))
    return out


def all_run_ids(led: Ledger) -> list[str]:
    with led._reading() as s:
        return list(s.scalars(select(Run.id).order_by(Run.id)))
