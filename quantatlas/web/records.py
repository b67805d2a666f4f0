"""The wire format of push and pull and the server's checks on a push. The records themselves
are the atlas's one record model (`quantatlas.atlas.records`: the shapes of `atlas export`,
with the rules on numbers, shape and size); the write is the one `atlas import` uses
(`quantatlas.atlas.io.write_records`).

A push is checked completely before anything is written, then written in one transaction:
a rejected push changes nothing. Checks, in order: the body's size (413, `BodyLimit`) and JSON
nesting (422, before it is parsed); the schema (unknown fields, wrong types, numbers finite and
in range, `extra` not shadowing a metric); every run's contributor equal to the token's holder
(403: a contributor pushes only their own runs, and since a run's id includes its contributor,
nobody can address, alter or delete another's); the request's per-token KLD in total at most
`max_request_tokens` values (413, from the declared `n`, before anything is decompressed);
specs validated by `quantatlas run`'s own parser; each array decoded by the bounded decoder.
Stored runs are never overwritten; pushing a run again is a no-op. A pushed experiment the
server holds already is left as it is (title, hypothesis, spec, tags): its new tags become the
pusher's tags and the answer's `kept` names what was not applied.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field
from sqlalchemy import select

from quantatlas.atlas.io import experiment_record as _experiment_record
from quantatlas.atlas.io import prepare_experiment, prepare_run, run_record, write_records
from quantatlas.atlas.models import Arm, Experiment, Run
from quantatlas.atlas.records import (MAX_TOKENS, SCHEMA_VERSION, ExperimentRecord, PerTokenKLD,  # noqa: F401
                                      RecordError, RunRecord, check_numbers)

if TYPE_CHECKING:
    from quantatlas.atlas.ledger import Ledger

MAX_RECORDS = 10_000            # experiments or runs in one push
DEFAULT_MAX_REQUEST_TOKENS = 1 << 25   # per-token KLD values in one push, all runs (128 MiB of float32)


class PushRejected(Exception):
    """A push the server refuses: HTTP status and a one-line reason; nothing was written."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def check_finite(value, where: str) -> None:
    """Every number in a free-form JSON value finite and within float range (nested too)."""
    check_numbers(value, where)


class PushPayload(BaseModel):
    """`POST /api/runs`: experiments (those the runs need, and any the server may lack) and runs."""
    model_config = {"extra": "forbid"}
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
    kept: dict[str, list[str]] = Field(default_factory=dict,
                                       description="per experiment the server already held: the fields of the "
                                                   "pushed record not applied (title, hypothesis, spec; tags are "
                                                   "stored as the pusher's own)")
    run_ids: list[str] = Field(description="the server's id of each pushed run, in order")


def accept_push(led: Ledger, contributor: str, payload: PushPayload,
                max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS) -> dict:
    """Check the whole payload, then write it in one transaction (see the module doc). Returns
    the summary and, under "touched", the experiments whose verdicts the write made stale."""
    for i, r in enumerate(payload.runs):
        if r.contributor is not None and r.contributor != contributor:
            raise PushRejected(403, f"runs[{i}] is by contributor {r.contributor!r} but the token belongs to "
                                    f"{contributor!r}: a contributor pushes only their own runs")
    total = sum(r.per_token_kld.n for r in payload.runs if r.per_token_kld is not None)
    if total > max_request_tokens:
        raise PushRejected(413, f"the push holds {total} per-token KLD values in all; this server takes at most "
                                f"{max_request_tokens} per request: push fewer runs at a time")
    try:
        exps = [(f"experiments[{i}] ({e.id})", prepare_experiment(e, f"experiments[{i}] ({e.id})"))
                for i, e in enumerate(payload.experiments)]
        runs = [(f"runs[{i}]", prepare_run(r, f"runs[{i}]")) for i, r in enumerate(payload.runs)]
        got = led._writing(lambda s: write_records(led, s, exps, runs, pusher=contributor))
    except RecordError as e:
        raise PushRejected(422, str(e)) from None
    summary = {k: got[k] for k in ("experiments", "experiments_existing", "runs", "runs_existing", "renamed",
                                   "kept", "run_ids")}
    return {"contributor": contributor, **summary, "touched": got["touched"]}


# ---- records for pull ------------------------------------------------------------------------

def experiment_record(e: Experiment) -> dict:
    """An experiment record as export writes it (`e` read in an open session)."""
    from sqlalchemy.orm import object_session

    return _experiment_record(object_session(e), e)


def experiment_records(led: Ledger) -> list[dict]:
    with led._reading() as s:
        return [_experiment_record(s, e)
                for e in s.scalars(select(Experiment).order_by(Experiment.created_at, Experiment.id))]


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
