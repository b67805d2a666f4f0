"""Export and import the ledger as JSON lines, and the one write path that import and a push
share. The record shapes and their checks are `quantatlas.atlas.records` (one model for export,
import, push and pull).

Import takes experiment and run records (as export writes them) and hypothesis-only rows with
no "type", shaped like another platform's listing:
    {"id": "cexp_2067d8", "hypothesis": "...", "result": "inconclusive", "reproductions_column": "1/5",
     "metrics_column": "..."}
and keeps their ids; a result such a row states is stored as an imported claim (shown as
"imported claim, unverified"), never as a verdict. Every line is checked before anything is
written; the import then runs in one transaction, so a bad file changes nothing. An experiment
whose spec is already in the ledger under another id is the same experiment: its runs land there
(as reproductions), and the stored experiment is left as it is (see `write_records`).
"""
from __future__ import annotations

import base64
from datetime import datetime
from typing import Iterable

from quantatlas.atlas import ids
from quantatlas.atlas.errors import LedgerError
from quantatlas.atlas.records import ExperimentRecord, ListingRow, RecordError, RunRecord, parse_line, plain
from quantatlas.atlas.store import Reader, Store, Transaction
from quantatlas.atlas.stored import StoredExperiment, StoredRun, isoformat
from quantatlas.quant.config import fill_first_defaults


# ---- export (and pull) ---------------------------------------------------------------------------

def experiment_record(q: Reader, e: StoredExperiment) -> dict:
    """An experiment as export writes it and a pull fetches it (`q`: the read it came from)."""
    return plain({
        "type": "experiment", "id": e.id, "title": e.title, "hypothesis": e.hypothesis, "notes": e.notes,
        "tags": list(e.tags), "contributed_tags": q.contributed_tags(e.id), "spec": e.spec.data,
        "source": e.source, "imported": e.imported, "contributor": e.contributor,
        "created_at": isoformat(e.created_at), "merged_into": e.merged_into,
    })


def run_record(r: StoredRun) -> dict:
    """A run as export writes it and a pull fetches it: non-finite metrics as the strings 'nan',
    'inf', '-inf'; the per-token KLD as stored (zlib of float32), only base64-encoded."""
    tokens = None
    if r.per_token_zlib is not None:
        tokens = {"n": r.n_tokens, "sha256": r.per_token_sha256,
                  "zlib_f32_base64": base64.b64encode(r.per_token_zlib).decode()}
    rs = r.run_set
    return {"type": "run", "id": r.id, "experiment": r.experiment_id, "arm": r.arm, "seed": r.seed,
            "contributor": rs.contributor, "environment": plain(rs.environment or {}),
            "model_hash": rs.model_hash, "eval_fingerprint": rs.eval_fingerprint,
            "created_at": isoformat(r.created_at), "metrics": r.metrics_as_stored, "extra": plain(r.extra),
            "per_token_kld": tokens}


def export_records(store: Store) -> Iterable[dict]:
    """Every experiment (oldest first), then every run of each, from one snapshot."""
    with store.read() as q:
        exps = q.experiments()
        for e in exps:
            yield experiment_record(q, e)
        for e in exps:
            for r in q.runs(e.id):
                yield run_record(r)


def experiment_records(store: Store) -> list[dict]:
    """Every experiment's record, oldest first."""
    with store.read() as q:
        return [experiment_record(q, e) for e in q.experiments()]


def run_records(store: Store, run_ids: list[str]) -> list[dict]:
    """The records of the runs with these ids that the ledger holds, in ledger order."""
    with store.read() as q:
        return [run_record(r) for r in q.runs_by_id(run_ids)]


# ---- checking records before a write -------------------------------------------------------------

def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def prepare_experiment(rec: ExperimentRecord | ListingRow, where: str) -> tuple:
    """(record, normalised spec or None, created_at): the spec validated with the typed configs of
    `quantatlas run` (`quantatlas.spec.parse_spec`); its error is passed on word for word."""
    normal = None
    if isinstance(rec, ExperimentRecord) and rec.spec is not None:
        try:
            # a record's spec is a stored one (possibly by an older quantatlas): read it as it was run
            normal = ids.normalise_spec(fill_first_defaults(rec.spec))
        except ValueError as e:
            raise RecordError(f"{where}.spec: {e}") from None
    created = _time(rec.created_at) if isinstance(rec, ExperimentRecord) else None
    return rec, normal, created


def prepare_run(rec: RunRecord, where: str) -> tuple:
    """(record, metrics, per-token KLD array or None, created_at), through the bounded decoder."""
    tokens = rec.per_token_kld.decode(f"{where}.per_token_kld") if rec.per_token_kld is not None else None
    return rec, rec.metric_values(), tokens, _time(rec.created_at)


# ---- the one write path --------------------------------------------------------------------------

def write_records(tx: Transaction, experiments: list[tuple], runs: list[tuple], local: str,
                  pusher: str | None = None) -> dict:
    """Write prepared experiments [(where, (record, normal, created))] and runs
    [(where, (record, metrics, tokens, created))] in the transaction `tx`.

    Ownership: an experiment the ledger holds (same spec; or the same id of a hypothesis-only
    row) is left as it is: title, hypothesis, spec and tags. Tags a record adds are stored as
    the contributor's tags; the fields it would have changed are listed in `kept`.
    `pusher` (a push): runs and new experiments are the pusher's, contributed tags are the
    pusher's only, merges are not applied. Without it (import): as the records say, and
    `local` (the ledger's contributor) where they say nothing.
    Errors raise RecordError naming `where`."""
    out = {"experiments": 0, "experiments_existing": 0, "runs": 0, "runs_existing": 0, "renamed": {},
           "run_ids": [], "kept": {}, "merged": 0, "flagged": []}
    mapping: dict[str, str] = {}
    created_ids: set[str] = set()
    merges = []
    touched: set[str] = set()
    for where, (rec, normal, created) in experiments:
        try:
            owner = pusher or (rec.contributor if isinstance(rec, ExperimentRecord) else None)
            tagger = owner or local
            if normal is not None:
                full, identity = normal
                old = tx.experiment_with_spec(identity)
            else:
                old = tx.experiment_or_none(rec.id)
            if old is not None:
                got = old.id
                kept = [f for f, mine in (("title", old.title), ("hypothesis", old.hypothesis))
                        if (getattr(rec, f) or "").strip() not in ("", mine)]
                if normal is not None and not old.spec.present:
                    kept.append("spec")
                added = tx.add_tags(old.id, tagger, rec.tags)
                if added:
                    kept.append("tags")
                if kept:
                    out["kept"][rec.id] = kept
                out["experiments_existing"] += 1
            elif normal is not None:
                full = dict(full, title=rec.title or full.get("title"),
                            hypothesis=rec.hypothesis or full.get("hypothesis"),
                            tags=list(dict.fromkeys((full.get("tags") or []) + rec.tags)))
                got = tx.register((full, identity), owner, given_id=rec.id, created_at=created)
                out["experiments"] += 1
                created_ids.add(got)
            else:
                if isinstance(rec, ListingRow):
                    tx.add_hypothesis(rec.id, rec.hypothesis, rec.result, rec.title or "", rec.tags,
                                      {k: v for k, v in rec.imported().items() if k != "result"})
                else:
                    imported = rec.imported or {}
                    tx.add_hypothesis(rec.id, rec.hypothesis or "", imported.get("result") or None,
                                      rec.title or "", rec.tags, {k: v for k, v in imported.items() if k != "result"},
                                      created_at=created, contributor=owner)
                got = rec.id
                out["experiments"] += 1
                created_ids.add(got)
            for who, tags in getattr(rec, "contributed_tags", {}).items():
                if pusher is None or who == pusher:
                    tx.add_tags(got, who, tags)
            mapping[rec.id] = got
            if got != rec.id:
                out["renamed"][rec.id] = got
            if pusher is None and getattr(rec, "merged_into", None):
                merges.append((where, rec.merged_into, rec.id))
        except ValueError as e:         # LedgerError, and a spec or value the store refuses
            raise RecordError(f"{where}: {e}") from None
    for where, (rec, metrics, tokens, created) in runs:
        exp_id = mapping.get(rec.experiment, rec.experiment)
        try:
            rid, new = tx.record(exp_id, rec.arm, rec.seed, metrics, tokens, rec.environment, rec.model_hash,
                                 rec.eval_fingerprint, pusher or rec.contributor or local,
                                 created_at=created, extra=rec.extra)
        except ValueError as e:
            raise RecordError(f"{where}: {e}") from None
        out["runs" if new else "runs_existing"] += 1
        out["run_ids"].append(rid)
        if new:
            touched.add(exp_id)
    for where, keep, other in merges:
        keep, other = mapping.get(keep, keep), mapping.get(other, other)
        a, b = tx.experiment_or_none(keep), tx.experiment_or_none(other)
        if a is None:
            raise RecordError(f"{where}: merged_into {keep!r} is not in the file or the ledger")
        if b.merged_into is None and a.id != b.id:
            try:
                tx.merge(a.id, b.id)
            except ValueError as e:
                raise RecordError(f"{where}: {e}") from None
            out["merged"] += 1
            touched |= {a.id, b.id}
    for f in tx.flags_of(created_ids):
        out["flagged"].append({"id": f.experiment_id, "duplicate_of": f.other_id, "score": f.score})
    out["touched"] = sorted(touched)
    return out


def read_lines(lines: Iterable[str], source: str = "<input>") -> tuple[list[tuple], list[tuple]]:
    """Every line checked and prepared for `write_records`: (experiments, runs). Errors are
    LedgerError naming `source:line`."""
    experiments, runs = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{n}"
        try:
            rec = parse_line(line)
            if isinstance(rec, RunRecord):
                runs.append((where, prepare_run(rec, "run")))
            else:
                experiments.append((where, prepare_experiment(rec, "experiment")))
        except RecordError as e:
            raise LedgerError(f"{where}: {e}") from None
    return experiments, runs


def import_lines(store: Store, lines: Iterable[str], source: str = "<input>") -> dict:
    """Check every line, then import all in one transaction. Errors name `source:line`. The
    summary's "touched": the experiments whose verdicts the import made stale."""
    experiments, runs = read_lines(lines, source)
    try:
        got = store.transact(lambda tx: write_records(tx, experiments, runs, store.contributor))
    except RecordError as e:
        raise LedgerError(str(e)) from None
    return {"experiments": got["experiments"], "existing": got["experiments_existing"], "runs": got["runs"],
            "runs_existing": got["runs_existing"], "merged": got["merged"], "renamed": got["renamed"],
            "flagged": got["flagged"], "kept": got["kept"], "touched": got["touched"]}
