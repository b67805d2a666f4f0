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

from quantatlas.atlas.io import prepare_experiment, prepare_run, write_records
from quantatlas.atlas.records import ExperimentRecord, RecordError, RunRecord

if TYPE_CHECKING:
    from quantatlas.atlas.ledger import Ledger

MAX_RECORDS = 10_000            # experiments or runs in one push
DEFAULT_MAX_REQUEST_TOKENS = 1 << 25   # per-token KLD values in one push, all runs (128 MiB of float32)


class PushRejected(Exception):
    """A push the server refuses: HTTP status and a one-line reason; nothing was written."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


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
        got = led.transact(lambda tx: write_records(tx, exps, runs, led.contributor, pusher=contributor))
    except RecordError as e:
        raise PushRejected(422, str(e)) from None
    summary = {k: got[k] for k in ("experiments", "experiments_existing", "runs", "runs_existing", "renamed",
                                   "kept", "run_ids")}
    return {"contributor": contributor, **summary, "touched": got["touched"]}


# ---- records for pull ------------------------------------------------------------------------

def known(led: Ledger, run_ids: list[str], experiment_ids: list[str]) -> dict:
    """Which of these run and experiment ids the ledger holds."""
    with led.read() as q:
        return q.known(run_ids, experiment_ids)


def all_run_ids(led: Ledger) -> list[str]:
    with led.read() as q:
        return q.run_ids()
