"""Export and import the ledger as JSON lines.

One record per line:
    {"type": "experiment", "id", "title", "hypothesis", "notes", "tags", "spec", "contributor",
     "created_at", "merged_into", "source", "imported"}
    {"type": "run", "id", "experiment", "arm", "seed", "contributor", "environment", "model_hash",
     "eval_fingerprint", "created_at", "metrics", "extra", "per_token_kld": {n, sha256, zlib_f32_base64} | null}
Import also takes hypothesis-only rows with no "type", shaped like another platform's listing:
    {"id": "cexp_2067d8", "hypothesis": "...", "result": "inconclusive", "reproductions_column": "1/5",
     "metrics_column": "..."}
and keeps their ids. Every line is checked before anything is written; the import then runs in
one transaction, so a bad file changes nothing. An experiment whose spec is already in the
ledger under another id is the same experiment: its runs land there (as reproductions).
"""
from __future__ import annotations

import json
import math
import re
from datetime import datetime
from typing import TYPE_CHECKING, Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from quantatlas.atlas import ids
from quantatlas.atlas.models import DuplicateFlag, Experiment
from quantatlas.atlas.verdict import RESULTS

if TYPE_CHECKING:
    from quantatlas.atlas.ledger import Ledger

ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


def export_records(led: Ledger) -> Iterable[dict]:
    from quantatlas.atlas.ledger import _iso, _jsonable, _metric_value, decode_tokens, encode_tokens_b64

    with led._reading() as s:
        exps = s.scalars(select(Experiment).order_by(Experiment.created_at, Experiment.id)).all()
        for e in exps:
            yield _jsonable({
                "type": "experiment", "id": e.id, "title": e.title, "hypothesis": e.hypothesis, "notes": e.notes,
                "tags": [t.name for t in e.tags], "spec": e.spec, "source": e.source, "imported": e.imported,
                "contributor": e.contributor.name if e.contributor else None, "created_at": _iso(e.created_at),
                "merged_into": e.merged_into,
            })
        for e in exps:
            for r in led._runs(s, e.id):
                rs = r.run_set
                metrics = {}
                for m in r.metrics:
                    v = _metric_value(m)
                    metrics[m.name] = v if math.isfinite(v) else m.nonfinite
                tokens = None if r.per_token_kld is None else decode_tokens(r.per_token_kld, r.per_token_sha256)
                yield {
                    "type": "run", "id": r.id, "experiment": e.id, "arm": r.arm.name, "seed": r.seed,
                    "contributor": rs.contributor.name, "environment": rs.environment.full or {},
                    "model_hash": rs.model_hash, "eval_fingerprint": rs.eval_fingerprint,
                    "created_at": _iso(r.created_at), "metrics": metrics, "extra": r.extra,
                    "per_token_kld": encode_tokens_b64(tokens),
                }


class _Bad(ValueError):
    pass


def _need(obj: dict, key: str, kind, what: str, optional: bool = False):
    v = obj.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise _Bad(f"{what} field {key!r} must be {getattr(kind, '__name__', kind)}, got {v!r}")
    return v


def _time(obj: dict) -> datetime | None:
    v = obj.get("created_at")
    if v is None:
        return None
    try:
        return datetime.fromisoformat(v)
    except (TypeError, ValueError):
        raise _Bad(f"created_at {v!r} is not an ISO date-time") from None


def _check_id(v) -> str:
    if not isinstance(v, str) or not ID_PATTERN.match(v):
        raise _Bad(f"id {v!r} must be 1-64 characters of letters, digits, _ . : -")
    return v


def _parse(line: str) -> tuple[str, dict]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Bad(f"malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _Bad(f"expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if kind == "experiment":
        _check_id(obj.get("id"))
        if obj.get("spec") is not None:
            obj["_normal"] = ids.normalise_spec(obj["spec"])
        else:
            _need(obj, "hypothesis", str, "experiment")
        for key in ("title", "hypothesis", "notes", "contributor", "merged_into"):
            _need(obj, key, str, "experiment", optional=True)
        tags = obj.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise _Bad(f"tags must be a list of strings, got {tags!r}")
        if obj.get("result") is not None and obj["result"] not in RESULTS:
            raise _Bad(f"result {obj['result']!r} is not one of {', '.join(RESULTS)}")
        obj["_time"] = _time(obj)
        return "experiment", obj
    if kind == "run":
        _need(obj, "experiment", str, "run")
        _need(obj, "arm", str, "run")
        _need(obj, "seed", int, "run")
        _need(obj, "metrics", dict, "run")
        _need(obj, "environment", dict, "run")
        _need(obj, "model_hash", str, "run")
        _need(obj, "eval_fingerprint", str, "run")
        _need(obj, "contributor", str, "run", optional=True)
        metrics = {}
        for k, v in obj["metrics"].items():
            if isinstance(v, str) and v in ("nan", "inf", "-inf"):
                v = float(v)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise _Bad(f"metric {k!r} must be a number, got {v!r}")
            metrics[k] = v
        metrics.update(obj.get("extra") or {})
        obj["_metrics"] = metrics
        from quantatlas.atlas.ledger import decode_tokens_b64

        try:
            obj["_tokens"] = decode_tokens_b64(obj.get("per_token_kld"))
        except (KeyError, TypeError, ValueError) as e:
            raise _Bad(f"per_token_kld: {e}") from None
        obj["_time"] = _time(obj)
        return "run", obj
    if kind is not None:
        raise _Bad(f"unknown record type {kind!r} (experiment or run)")
    if "id" in obj and "hypothesis" in obj:
        _check_id(obj["id"])
        _need(obj, "hypothesis", str, "row")
        if obj.get("result") is not None and obj["result"] not in RESULTS:
            raise _Bad(f"result {obj['result']!r} is not one of {', '.join(RESULTS)}")
        return "hypothesis", obj
    raise _Bad("not an experiment, run or hypothesis row (needs 'type', or 'id' and 'hypothesis')")


def import_lines(led: Ledger, lines: Iterable[str], source: str = "<input>") -> dict:
    """Check every line, then import all in one transaction. Errors name `source:line`."""
    from quantatlas.atlas.ledger import LedgerError

    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append((n, *_parse(line)))
        except (_Bad, ValueError) as e:
            raise LedgerError(f"{source}:{n}: {e}") from None

    def fn(s: Session) -> dict:
        summary = {"experiments": 0, "existing": 0, "runs": 0, "runs_existing": 0, "merged": 0,
                   "renamed": {}, "flagged": []}
        mapping: dict[str, str] = {}
        created: set[str] = set()
        merges = []
        for n, kind, obj in records:
            try:
                if kind == "hypothesis":
                    imported = {k: v for k, v in obj.items()
                                if k not in ("id", "hypothesis", "result", "title", "tags")}
                    new = led._add_hypothesis(s, obj["id"], obj["hypothesis"], obj.get("result"),
                                              obj.get("title") or "", obj.get("tags"), imported)
                    summary["experiments" if new else "existing"] += 1
                    mapping[obj["id"]] = obj["id"]
                    if new:
                        created.add(obj["id"])
                elif kind == "experiment":
                    if obj.get("spec") is not None:
                        full, identity = obj["_normal"]
                        full = dict(full, title=obj.get("title") or full.get("title"),
                                    hypothesis=obj.get("hypothesis") or full.get("hypothesis"),
                                    tags=list(dict.fromkeys((full.get("tags") or []) + (obj.get("tags") or []))))
                        h = ids.spec_hash(identity)
                        before = s.scalars(select(Experiment.id).where(Experiment.spec_hash == h)).first()
                        got = led._register(s, full, identity, obj.get("contributor"), given_id=obj["id"],
                                            created_at=obj["_time"])
                        summary["existing" if before else "experiments"] += 1
                        if not before:
                            created.add(got)
                        if got != obj["id"]:
                            summary["renamed"][obj["id"]] = got
                        mapping[obj["id"]] = got
                    else:
                        new = led._add_hypothesis(s, obj["id"], obj.get("hypothesis") or "",
                                                  (obj.get("imported") or {}).get("result") or obj.get("result"),
                                                  obj.get("title") or "", obj.get("tags"), obj.get("imported"),
                                                  created_at=obj["_time"], contributor=obj.get("contributor"))
                        summary["experiments" if new else "existing"] += 1
                        mapping[obj["id"]] = obj["id"]
                        if new:
                            created.add(obj["id"])
                    if obj.get("merged_into"):
                        merges.append((n, obj["merged_into"], obj["id"]))
                else:
                    exp_id = mapping.get(obj["experiment"], obj["experiment"])
                    _, new = led._record(s, exp_id, obj["arm"], obj["seed"], obj["_metrics"], obj["_tokens"],
                                         obj["environment"], obj["model_hash"], obj["eval_fingerprint"],
                                         obj.get("contributor") or led.contributor, created_at=obj["_time"])
                    summary["runs" if new else "runs_existing"] += 1
            except ValueError as e:
                raise LedgerError(f"{source}:{n}: {e}") from None
        for n, keep, other in merges:
            keep, other = mapping.get(keep, keep), mapping.get(other, other)
            a, b = s.get(Experiment, keep), s.get(Experiment, other)
            if a is None:
                raise LedgerError(f"{source}:{n}: merged_into {keep!r} is not in the file or the ledger")
            if b.merged_into is None and a.id != b.id:
                try:
                    led._merge(s, a, b)
                except ValueError as e:
                    raise LedgerError(f"{source}:{n}: {e}") from None
                summary["merged"] += 1
        s.flush()
        for f in s.scalars(select(DuplicateFlag).where(DuplicateFlag.experiment_id.in_(created))
                           .order_by(DuplicateFlag.experiment_id)).all():
            summary["flagged"].append({"id": f.experiment_id, "duplicate_of": f.other_id, "score": f.score})
        return summary

    return led._writing(fn)

