"""`quantatlas atlas ...`: list, show, export, import, merge, reproduce. Every command takes
`--db URL` (a SQLAlchemy URL; default $QUANTATLAS_DB, else sqlite:///runs/atlas.db).
User mistakes print one line on stderr and exit with status 2."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import typer

from quantatlas.atlas.confidence import FORMULA
from quantatlas.atlas.studies import format_study
from quantatlas.atlas.verdict import format_p
from quantatlas.tables import plain_table, render

app = typer.Typer(help="The atlas ledger: experiments, verdicts, confidence, reproductions, duplicates.",
                  no_args_is_help=True, add_completion=False)

DB_HELP = "Ledger database URL (sqlite:///file.db, postgresql://...); default $QUANTATLAS_DB or sqlite:///runs/atlas.db"


def user_errors(fn):
    """A user mistake (`quantatlas.errors.UserError`, any other ValueError, a missing file) -> one
    line on stderr, exit 2; no traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            typer.echo(f"error: {msg}", err=True)
            raise typer.Exit(2) from None
    return wrapper


def _ledger(db: str | None):
    from quantatlas.atlas.ledger import Ledger

    return Ledger(db)


def text_table(columns: Sequence[str | tuple[str, str]], rows: Sequence[Sequence], indent: int = 0) -> str:
    """Rows as a plain-text table (`quantatlas.tables`, rich): a column is a name, or (name,
    "right") for numbers. Never cut: as wide as its widest row."""
    t = plain_table(*((c, "left") if isinstance(c, str) else c for c in columns))
    for r in rows:
        t.add_row(*[str(x) for x in r])
    pad = " " * indent
    return "\n".join((pad + line).rstrip() for line in render(t, width=100_000).splitlines())


def _cut(text: str, width: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _conf(c) -> str:
    return "–" if c is None else f"{c:.2f}"


def _repro(row: dict) -> str:
    if row.get("reproductions") is None:
        return row.get("reproductions_column") or "–"
    n, agree = row["reproductions"], row.get("reproductions_agree") or 0
    return "0" if n == 0 else f"{agree}/{n} agree"


def format_rows(rows: list[dict], hypothesis_width: int = 58) -> str:
    """The OpenQuant-style table: ID, hypothesis, result, confidence, reproductions, key metrics."""
    body = []
    for r in rows:
        result = r["result"] or "pending"
        if r.get("result_via"):
            result += "*"
        if r.get("duplicate_of"):
            result += " (dup?)"
        body.append([r["id"], _cut(r["hypothesis"] or r.get("title") or "", hypothesis_width), result,
                     _conf(r["confidence"]), _repro(r), r.get("key_metrics") or ""])
    out = [text_table(["ID", "Hypothesis", "Result", ("Conf.", "right"), "Reprod.", "Metrics"], body)]
    notes = []
    if any(r.get("duplicate_of") for r in rows):
        notes.append("(dup?) possible duplicate: " + ", ".join(
            f"{r['id']} ~ {r['duplicate_of']} ({r['duplicate_score']:.2f})" for r in rows if r.get("duplicate_of")))
    if any(r.get("source") == "import" and not r.get("result_via") for r in rows):
        notes.append("confidence – : a hypothesis-only row imported from elsewhere; its result and reproductions "
                     "are as its source reported them")
    if any(r.get("result_via") for r in rows):
        notes.append("* result of a merged experiment: " + ", ".join(
            f"{r['id']} <- {r['result_via']}" for r in rows if r.get("result_via")))
    return "\n".join(out + notes)


@app.command("list")
@user_errors
def list_(tag: Optional[str] = typer.Option(None, "--tag", help="only experiments with this tag"),
          model: Optional[str] = typer.Option(None, "--model", help="only experiments on this model"),
          result: Optional[str] = typer.Option(None, "--result", help="success|failure|inconclusive|baseline|conflict"),
          as_json: bool = typer.Option(False, "--json", help="print a JSON array of rows"),
          all_rows: bool = typer.Option(False, "--all", help="include experiments merged into others"),
          db: Optional[str] = typer.Option(None, "--db", help=DB_HELP)):
    """The experiments: ID, hypothesis, result, confidence, reproductions, key metrics."""
    with _ledger(db) as led:
        rows = led.rows(tag=tag, model=model, result=result, include_merged=all_rows)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
    elif not rows:
        typer.echo("no experiments")
    else:
        typer.echo(format_rows(rows))


def _fmt(v, digits: int = 5) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def format_show(d: dict) -> str:
    L = []
    L.append(f"{d['id']}  {d.get('title') or ''}".rstrip())
    L.append(f"hypothesis: {' '.join((d['hypothesis'] or '').split())}")
    if d.get("notes"):
        L.append(f"notes: {' '.join(d['notes'].split())}")
    spec = d.get("spec") or {}
    crit = spec.get("criterion") or {}
    if spec:
        L.append(f"model: {d.get('model')}   control: {d.get('control')}   seeds: {spec.get('seeds')}   "
                 f"criterion: {crit.get('metric')} ({crit.get('better')} is better), min_effect "
                 f"{100 * crit.get('min_effect', 0):.1f} %, alpha {crit.get('alpha')}")
    L.append(f"tags: {', '.join(d.get('tags') or []) or '–'}   source: {d.get('source')}   "
             f"contributor: {d.get('contributor') or '–'}   created: {d.get('created_at')}")
    L.append(f"result: {d.get('result') or 'pending'}   confidence: {_conf(d.get('confidence'))}   "
             f"reproductions: {_repro(d)}"
             + (f"   (result of merged {d['result_via']})" if d.get("result_via") else ""))
    if d.get("imported"):
        L.append("imported: " + ", ".join(f"{k}={v}" for k, v in d["imported"].items()))
    if d.get("merged_into"):
        L.append(f"merged into: {d['merged_into']}")
    if d.get("aliases"):
        L.append(f"merged here: {', '.join(d['aliases'])}")
    for f in d.get("duplicate_flags") or []:
        L.append(f"possible duplicate of {f['other']} (hypothesis similarity {f['score']:.2f}, {f['status']})"
                 + (f"; merge with: quantatlas atlas merge {f['other']} {d['id']}" if f["status"] == "flagged" else ""))
    for f in d.get("duplicated_by") or []:
        L.append(f"{f['other']} may duplicate this (similarity {f['score']:.2f}, {f['status']})")
    if d.get("arms_config"):
        L.append("")
        L.append("arms:")
        L.append(text_table(["arm", "role", "config"], [
            [a["arm"], "control" if a["control"] else "",
             json.dumps({k: v for k, v in (a["config"] or {}).items() if v not in (None, [], {}, False)},
                        separators=(",", ":"))] for a in d["arms_config"]], indent=2))
    cols = ("kld_mean", "kld_se", "kld_p99", "same_top", "ppl_ratio", "bits_per_weight", "bits_per_param")
    for i, rs in enumerate(d.get("run_sets") or []):
        L.append("")
        role = "primary" if i == 0 else "reproduction"
        L.append(f"run set {i + 1} ({role}): {rs['contributor']}@{rs['hostname']} "
                 f"device {rs['device']}, commit {rs['git_commit']}, model {rs['model_hash']}, "
                 f"eval {rs['eval_fingerprint']}")
        L.append(text_table(["arm", ("seed", "right"), *((c, "right") for c in cols)],
                            [[r["arm"], r["seed"], *(_fmt(r["metrics"].get(c)) for c in cols)] for r in rs["runs"]],
                            indent=2))
    if d.get("verdicts"):
        L.append("")
        L.append("verdicts:")
        table = []
        for v in d["verdicts"]:
            ci = "–" if not v.get("ci") else f"[{100 * v['ci'][0]:+.1f} %, {100 * v['ci'][1]:+.1f} %]"
            eff = "–" if v.get("effect") is None else f"{100 * v['effect']:+.2f} %"
            table.append([v["arm"], v["result"], eff, ci, format_p(v.get("p_value")), format_p(v.get("p_adjusted")),
                          _conf(v.get("confidence"))])
        L.append(text_table(["arm", "result", ("effect", "right"), "CI", ("p", "right"), ("Holm p", "right"),
                             ("confidence", "right")], table, indent=2))
        for v in d["verdicts"]:
            L.append("")
            L.append(f"  {v['arm']}: {v['text']}")
            for ps in (v.get("details") or {}).get("per_seed") or []:
                pci = ps.get("ci")
                seed_ci = "" if not pci else f", token-bootstrap CI [{100 * pci[0]:+.1f} %, {100 * pci[1]:+.1f} %]"
                token_p = "" if ps.get("p_tokens") is None else f", token p {format_p(ps['p_tokens'])}"
                L.append(f"      seed {ps['seed']}: control {_fmt(ps.get('control'))}, arm {_fmt(ps.get('treatment'))}"
                         + token_p + seed_ci)
        L.append("")
        L.append("confidence: " + FORMULA)
    if d.get("study"):
        L.append("")
        L.append(format_study(d["study"]))
    return "\n".join(L)


@app.command()
@user_errors
def show(exp_id: str = typer.Argument(..., help="experiment id (or a unique prefix)"),
         as_json: bool = typer.Option(False, "--json", help="print JSON"),
         db: Optional[str] = typer.Option(None, "--db", help=DB_HELP)):
    """Arms, per-seed figures, the verdict and its reasoning, confidence and its terms."""
    with _ledger(db) as led:
        d = led.describe(exp_id)
    typer.echo(json.dumps(d, indent=1) if as_json else format_show(d))


@app.command()
@user_errors
def export(out: Optional[Path] = typer.Option(None, "--out", "-o", help="file to write (default: stdout)"),
           db: Optional[str] = typer.Option(None, "--db", help=DB_HELP)):
    """Write the whole ledger as JSON lines (experiments, then runs with per-token KLD)."""
    with _ledger(db) as led:
        stream = open(out, "w") if out else sys.stdout
        n = 0
        try:
            for rec in led.export_records():
                stream.write(json.dumps(rec, separators=(",", ":")) + "\n")
                n += 1
        finally:
            if out:
                stream.close()
    if out:
        typer.echo(f"wrote {n} records to {out}")


@app.command("import")
@user_errors
def import_(file: Path = typer.Argument(..., help="JSON lines: exported records or hypothesis-only rows"),
            db: Optional[str] = typer.Option(None, "--db", help=DB_HELP)):
    """Import JSON lines; hypothesis-only rows (id, hypothesis, result, ...) keep their ids."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    with _ledger(db) as led, open(file, encoding="utf-8") as fh:
        summary = led.import_lines(fh, str(file))
    typer.echo(f"imported {summary['experiments']} experiment(s) ({summary['existing']} already present), "
               f"{summary['runs']} run(s) ({summary['runs_existing']} already present), "
               f"{summary['merged']} merge(s)")
    for old, new in summary["renamed"].items():
        typer.echo(f"  {old} -> {new} (same spec already in the ledger, or the id was taken)")
    for f in summary["flagged"]:
        typer.echo(f"  possible duplicate: {f['id']} ~ {f['duplicate_of']} (similarity {f['score']:.2f})")


@app.command()
@user_errors
def merge(keep: str = typer.Argument(..., help="the experiment that stays"),
          other: str = typer.Argument(..., help="the duplicate, merged into KEEP"),
          db: Optional[str] = typer.Option(None, "--db", help=DB_HELP)):
    """Merge a duplicate OTHER into KEEP (after looking at both with `atlas show`)."""
    with _ledger(db) as led:
        r = led.merge(keep, other)
    typer.echo(f"merged {r['merged']} into {r['kept']} (hypothesis similarity {r['similarity']:.2f})")


@app.command()
@user_errors
def reproduce(exp_id: str = typer.Argument(..., help="experiment id"),
              device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, ... (default: best available)"),
              db: Optional[str] = typer.Option(None, "--db", help=DB_HELP)):
    """Re-run an experiment from its stored spec (a reproduction if machine, commit or contributor differ)."""
    with _ledger(db) as led:
        exp_id = led.resolve(exp_id)
        spec = led.spec(exp_id)
        before = len(led.runs(exp_id))
    from quantatlas.runner import run_spec   # torch: only when a run is asked for

    kwargs = {"db_url": db, "json_path": None}
    if device is not None:
        kwargs["device"] = device
    doc = run_spec(spec, **kwargs)
    with _ledger(db) as led:
        new = len(led.runs(exp_id)) - before
        rows = [r for r in led.rows(include_merged=True) if r["id"] == exp_id]
    got = doc.get("experiment_id") if isinstance(doc, dict) else None
    if got is not None and got != exp_id:
        typer.echo(f"warning: the stored spec now registers as {got}, not {exp_id}", err=True)
    if new == 0:
        typer.echo("no new runs: this environment and contributor already have every arm × seed "
                   "(a reproduction needs another machine, commit, package set or contributor)")
    else:
        typer.echo(f"recorded {new} run(s)")
    if rows:
        typer.echo(format_rows(rows))
