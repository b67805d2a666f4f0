"""CSV and JSON downloads of every table the pages show (each page links its tables' downloads).

    /download/experiments.csv|json                      the list (tag, model, result, q: as on /)
    /download/experiments/{id}/verdicts.csv|json        an experiment's verdicts
    /download/experiments/{id}/arms.csv|json            its arms
    /download/experiments/{id}/runs.csv|json            its runs, per seed (run_set=N: the page's run set N)
    /download/landscape.csv|json                        every arm point (bits; group=N: the page's plot N)
    /download/composition.csv|json                      one row per technique pair (cell of the matrix)
    /download/left-to-try/{table}.csv|json              each list the left-to-try page shows, by its name
                                                        in /api/left-to-try (e.g. untried_pairs)
    /download/sensitivity.csv|json                      every ROI row (experiment=ID; measurement=N)

A table is a list of flat rows computed from the view that the page and its JSON twin show
(web/views.py), with the same values in both formats: numbers unformatted, a missing or
non-finite number null (an empty CSV cell), a list of values joined by "; ", a list of records
as compact JSON, a nested mapping as dotted columns. The JSON download is the list of rows,
each with every column; the CSV has a header row, then the same rows, booleans as true/false.
A CSV text cell that a spreadsheet would take for a formula (it starts with = + - @, a tab or a
carriage return) gets a leading ' : the atlas holds text anyone with a token pushed.
"""
from __future__ import annotations

import csv
import io
import json
from typing import Annotated, Any, Iterable, Literal, Optional

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import Response
from pydantic import BeforeValidator

from quantatlas.atlas.ledger import Ledger
from quantatlas.atlas.records import plain
from quantatlas.web import api_read, views
from quantatlas.web import landscape as land
from quantatlas.web.deps import get_ledger

router = APIRouter(prefix="/download", tags=["download"])

LedgerDep = Annotated[Ledger, Depends(get_ledger)]
Format = Literal["csv", "json"]
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
LIST_SEP = "; "
MAX_NESTING = 2            # mapping levels spread into dotted columns
DOCUMENTS = ("spec", "config")      # mappings kept whole, as JSON: a spec is one thing to copy, not columns


# ---- rows --------------------------------------------------------------------------------------

def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, bool, int, float))


def cell(v: Any) -> Any:
    """One value as a table holds it: a scalar (non-finite numbers None); a list of scalars
    joined by "; "; a list holding records, or a mapping, as compact JSON (an empty one None)."""
    v = plain(v)
    if isinstance(v, list):
        if all(_scalar(x) for x in v):
            return LIST_SEP.join(csv_text(x) for x in v)
        return json.dumps(v, separators=(",", ":"), ensure_ascii=False)
    if isinstance(v, dict):
        return json.dumps(v, separators=(",", ":"), ensure_ascii=False) if v else None
    return v


def flat(record: dict, first: Iterable[str] = (), skip: Iterable[str] = (), prefix: str = "",
         depth: int = 0) -> dict:
    """A record as one row: the `first` keys in order, then every other key not in `skip` in the
    record's order; a nested mapping becomes dotted columns (two levels deep, then JSON)."""
    skip = set(skip)
    order = list(first) + [k for k in record if k not in skip and k not in first]
    row: dict[str, Any] = {}
    for k in order:
        v = record.get(k)
        if isinstance(v, dict) and v and depth < MAX_NESTING and k not in DOCUMENTS:
            row.update(flat(v, prefix=f"{prefix}{k}.", depth=depth + 1))
        else:
            row[f"{prefix}{k}"] = cell(v)
    return row


def table(rows: list[dict]) -> list[dict]:
    """Every row with every column (the union, in first-seen order; missing ones None). A column
    that is only ever empty where other rows spread the same key into dotted columns is dropped."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    spread = {c.split(".")[0] for c in columns if "." in c}
    columns = [c for c in columns if c not in spread or any(r.get(c) is not None for r in rows)]
    return [{c: r.get(c) for c in columns} for r in rows]


def csv_text(v: Any) -> str:
    """A value as a CSV cell: '' for None, true/false, numbers as Python's shortest round-trip repr."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return str(v)


def csv_cell(v: Any) -> str:
    text = csv_text(v)
    if isinstance(v, str) and text.startswith(FORMULA_START):
        return "'" + text
    return text


def to_csv(rows: list[dict], columns: list[str] | None = None) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n")
    columns = columns if columns is not None else list(rows[0]) if rows else []
    w.writerow(columns)
    for r in rows:
        w.writerow([csv_cell(r.get(c)) for c in columns])
    return out.getvalue()


def answer(rows: list[dict], fmt: str, name: str, empty_columns: Iterable[str] = ()) -> Response:
    """The table as a download named quantatlas-`name`.csv|json."""
    rows = table(rows)
    headers = {"Content-Disposition": f'attachment; filename="quantatlas-{name}.{fmt}"'}
    if fmt == "json":
        body = json.dumps(rows, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return Response(body, media_type="application/json", headers=headers)
    return Response(to_csv(rows, None if rows else list(empty_columns)), media_type="text/csv; charset=utf-8",
                    headers=headers)


# ---- the tables --------------------------------------------------------------------------------

LIST_FIRST = ("id", "title", "hypothesis", "model", "tags", "result", "confidence", "primary", "reproductions",
              "reproductions_agree", "claim", "key_metrics")


def list_rows(rows: list[dict]) -> list[dict]:
    """The list: each experiment's columns, then its primary arm's verdict and metrics
    (`primary.effect`, `primary.kld_mean`, ...)."""
    out = []
    for r in rows:
        row = flat(r, LIST_FIRST, skip=("arms", "metrics"))
        primary = r.get("primary")
        verdict = next((a for a in r.get("arms") or [] if a.get("arm") == primary), None) or {}
        row.update(flat(verdict, skip=("arm",), prefix="primary."))
        row.update(flat((r.get("metrics") or {}).get(primary) or {}, prefix="primary."))
        out.append(row)
    return out


def verdict_rows(e: dict) -> list[dict]:
    out = []
    for v in e.get("verdicts") or []:
        ci = v.get("ci") or [None, None]
        row = flat(v, ("arm",), skip=("details", "ci", "text"))
        row = {"arm": row.pop("arm"), "primary": v.get("arm") == e.get("primary"), **row,
               "ci_low": cell(ci[0]), "ci_high": cell(ci[1]), "text": v.get("text")}
        out.append(row)
    return out


def arm_rows(e: dict) -> list[dict]:
    """As the page: the config written compactly (options left at null, false or empty omitted), as JSON."""
    return [flat(dict(a, config=cell(a.get("compact", a.get("config")) or None)),
                 ("arm", "control", "techniques", "llamacpp"), skip=("compact",)) for a in e.get("arms_config") or []]


def run_rows(e: dict, run_set: int | None = None) -> list[dict]:
    """Per seed as the page's run set tables: the run set (its number on the page), then the run
    and its metrics (the page's columns first)."""
    out = []
    shown = list(e.get("seed_columns") or [])
    for i, rs in enumerate(e.get("run_sets") or [], 1):
        if run_set is not None and i != run_set:
            continue
        head = {"run_set": i, "run_set_id": rs.get("id"), "role": rs.get("role")}
        head.update(flat(rs, ("contributor", "hostname", "device", "git_commit", "model_hash", "eval_fingerprint"),
                         skip=("id", "role", "runs", "packages", "environment_key")))
        for r in rs.get("runs") or []:
            metrics = r.get("metrics") or {}
            row = dict(head, run=r.get("id"), arm=r.get("arm"), seed=r.get("seed"), n_tokens=r.get("n_tokens"))
            row.update({c: cell(metrics.get(c)) for c in shown + sorted(k for k in metrics if k not in shown)})
            out.append(row)
    return out


def landscape_rows(data: dict, group: int | None = None) -> list[dict]:
    """Every point of every plot (drawn, and the arms not drawn with why); `group` is the plot's
    number on the page, `group.*` its columns."""
    out = []
    for i, g in enumerate(data.get("groups") or [], 1):
        if group is not None and i != group:
            continue
        head = {"group": i, **flat(g, ("models", "model_hash"), skip=("points", "not_drawn", "frontier", "figure"),
                                   prefix="group.")}
        for drawn, key in ((True, "points"), (False, "not_drawn")):
            for p in g.get(key) or []:
                out.append({**head, "bits_metric": data.get("bits"),
                            **flat(p, ("experiment", "arm", "techniques", "bits", "kld_mean"), skip=("url",)),
                            "drawn": drawn})
    return out


def composition_rows(data: dict) -> list[dict]:
    return [flat(c, ("a", "b", "colour", "success", "failure", "inconclusive", "conflict"))
            for c in data.get("cells") or []]


def left_tables(data: dict) -> dict[str, list[dict]]:
    """The left-to-try view's lists of records, by name (one level down too: `model.effects`)."""
    out = {}
    for k, v in data.items():
        if isinstance(v, list) and all(isinstance(x, dict) for x in v):
            out[k] = v
        elif isinstance(v, dict):
            out.update({f"{k}.{k2}": v2 for k2, v2 in v.items()
                        if isinstance(v2, list) and v2 and all(isinstance(x, dict) for x in v2)})
    return out


def sensitivity_rows(measurements: list[dict], measurement: int | None = None) -> list[dict]:
    out = []
    for m in measurements:
        if measurement is not None and m.get("id") != measurement:
            continue
        head = flat(m, ("id", "experiment_id", "arm", "seed"), skip=("rows", "data"))
        head = {"measurement": head.pop("id"), **head}
        for rank, r in enumerate(m.get("rows") or [], 1):
            out.append({**head, "rank": rank, **flat(r)})
    return out


# ---- routes: each table from the answer of its page's JSON twin (api_read.py) --------------------

DOWNLOAD = {200: {"description": "the table", "content": {"text/csv": {}, "application/json": {}}}}


@router.get("/experiments.{fmt}", summary="The experiment list as CSV or JSON", responses=DOWNLOAD,
            response_class=Response)
def download_list(fmt: Format, led: LedgerDep,
                  tag: Optional[str] = Query(None, description="only experiments with this tag"),
                  model: Optional[str] = Query(None, description="only experiments on this model"),
                  result: Annotated[Optional[views.ListResult], BeforeValidator(lambda v: v or None),
                                    Query(description="a result, or pending")] = None,
                  q: Optional[str] = Query(None, description="words that must all appear")):
    """One row per experiment as on / (newest first), then its primary arm's verdict and metrics."""
    rows = api_read.api_experiments(led, tag=tag, model=model, result=result, q=q)
    return answer(list_rows(rows), fmt, "experiments", LIST_FIRST)


@router.get("/experiments/{exp_id}/{name}.{fmt}", summary="An experiment's verdicts, arms or runs as CSV or JSON",
            responses=DOWNLOAD, response_class=Response)
def download_experiment(exp_id: str, name: Literal["verdicts", "arms", "runs"], fmt: Format, led: LedgerDep,
                        run_set: Optional[int] = Query(None, ge=1, description="runs: only the page's run set N")):
    e = api_read.api_experiment(exp_id, led)
    rows = {"verdicts": verdict_rows, "arms": arm_rows, "runs": lambda e: run_rows(e, run_set)}[name](e)
    return answer(rows, fmt, f"{e['id']}-{name}", ("arm",))


@router.get("/landscape.{fmt}", summary="The landscape's points as CSV or JSON", responses=DOWNLOAD,
            response_class=Response)
def download_landscape(fmt: Format, led: LedgerDep, bits: land.BitsMetric = "bits_per_weight",
                       technique: Optional[str] = Query(None, description="only the points that hold this technique"),
                       group: Optional[int] = Query(None, ge=1, description="only the page's plot N"),
                       deployable: Annotated[views.Deployable, Query(description="only the points deployable on "
                                                                                "this runtime")] = "any",
                       frontier: Annotated[views.Frontier, Query(description="the frontier over every arm or the "
                                                                            "deployable ones")] = "all",
                       family: views.FamilyFilter = None):
    data = api_read.api_landscape(led, bits=bits, technique=technique, deployable=deployable, frontier=frontier,
                                  family=family)
    return answer(landscape_rows(data, group), fmt, "landscape", ("group", "experiment", "arm", "bits", "kld_mean"))


@router.get("/composition.{fmt}", summary="The composition matrix's cells as CSV or JSON", responses=DOWNLOAD,
            response_class=Response)
def download_composition(fmt: Format, led: LedgerDep):
    return answer(composition_rows(api_read.api_composition(led)), fmt, "composition", ("a", "b"))


@router.get("/left-to-try/{name}.{fmt}", summary="A left-to-try table as CSV or JSON", responses=DOWNLOAD,
            response_class=Response)
def download_left(name: str, fmt: Format, led: LedgerDep,
                  model: Optional[str] = Query(None, description="only suggestions on this model"),
                  limit: int = Query(land.DEFAULT_LIMIT, ge=1, le=1000, description="at most this many suggestions")):
    """`name`: a list of records in /api/left-to-try (e.g. suggestions, untried_pairs, model.effects)."""
    tables = left_tables(api_read.api_left(led, model=model, limit=limit))
    if name not in tables:
        raise HTTPException(404, f"no left-to-try table {name!r}; the tables: {', '.join(sorted(tables))}")
    return answer([flat(r) for r in tables[name]], fmt, f"left-to-try-{name}")


@router.get("/sensitivity.{fmt}", summary="Sensitivity ROI rows as CSV or JSON", responses=DOWNLOAD,
            response_class=Response)
def download_sensitivity(fmt: Format, led: LedgerDep,
                         experiment: Optional[str] = Query(None, description="only this experiment"),
                         measurement: Optional[int] = Query(None, description="only this measurement")):
    data = api_read.api_sensitivity(led, experiment=experiment)
    return answer(sensitivity_rows(data, measurement), fmt, "sensitivity",
                  ("measurement", "experiment_id", "arm", "seed", "rank"))
