"""`quantatlas atlas ...` through typer's test runner on synthetic ledgers: list (table and
JSON, filters), show, export/import round trip, openquant rows, merge, reproduce, user mistakes."""
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from quantatlas.atlas.cli import app
from quantatlas.atlas.confidence import FORMULA
from quantatlas.atlas.ledger import Ledger

LISTING = Path(__file__).resolve().parents[2] / "shared" / "data" / "openquant_listing.jsonl"
if not LISTING.is_file():
    LISTING = Path("/work/shared/data/openquant_listing.jsonl")

SPEC = {"title": "Hadamard before RTN", "hypothesis": "A Hadamard rotation before 4-bit RTN lowers KLD by 5 %.",
        "tags": ["hadamard", "rtn"], "model": "reference", "seeds": [0, 1, 2], "control": "rtn4",
        "data": {"eval": {"tokens": 32768, "ctx": 512}},
        "arms": {"rtn4": {"codec": {"uniform": {"bits": 4}}},
                 "had_rtn4": {"codec": {"uniform": {"bits": 4}}, "transforms": [{"hadamard": {}}]}},
        "criterion": {"metric": "kld_mean", "min_effect": 0.05, "alpha": 0.01}}
BASELINE = {"title": "Q8_0 reference", "hypothesis": "Q8_0 is near-lossless.", "tags": ["q8_0"], "model": "reference",
            "seeds": [0, 1, 2], "arms": {"q8_0": {"codec": "q8_0"}}}
ENV = {"python": "3.11", "packages": {"numpy": "2.4"}, "git_commit": "abc", "device": "cpu", "hostname": "h1",
       "platform": "Linux"}


def runs(led, exp, arm, scale, bits, env=ENV, seeds=(0, 1, 2)):
    base = np.random.default_rng(0).gamma(0.6, 0.02, 64 * 255)
    for s in seeds:
        noise = np.random.default_rng([s, int(scale * 100)]).lognormal(0, 0.1, base.size)
        tok = (base * scale * noise).astype(np.float32)
        led.record_run(exp, arm, s, {"kld_mean": float(tok.mean(dtype=np.float64)), "bits_per_param": bits,
                                     "bits_per_weight": bits - 0.4, "ppl_ratio": 1 + float(tok.mean()),
                                     "same_top": 0.95}, tok, env, "model-h", "eval-f")


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'atlas.db'}"
    led = Ledger(url, contributor="ann")
    e = led.register_experiment(SPEC)
    runs(led, e, "rtn4", 1.0, 4.6)
    runs(led, e, "had_rtn4", 0.75, 4.6)
    runs(led, e, "rtn4", 1.0, 4.6, env=dict(ENV, hostname="h2"))
    runs(led, e, "had_rtn4", 0.76, 4.6, env=dict(ENV, hostname="h2"))
    b = led.register_experiment(BASELINE)
    runs(led, b, "q8_0", 0.01, 8.5)
    led.close()
    return url, e, b


cli = CliRunner()


def test_list_table_and_json(db):
    url, e, b = db
    res = cli.invoke(app, ["list", "--db", url])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split()[:5] == ["ID", "Hypothesis", "Result", "Conf.", "Reprod."]
    row = next(line for line in lines if line.startswith(e))
    assert "success" in row and "1/1 agree" in row and "had_rtn4: KLD" in row
    assert "baseline" in next(line for line in lines if line.startswith(b))
    res = cli.invoke(app, ["list", "--json", "--db", url])
    rows = json.loads(res.stdout)
    assert {"id", "hypothesis", "result", "confidence", "reproductions", "duplicate_of", "metrics"} <= set(rows[0])
    by = {r["id"]: r for r in rows}
    assert by[e]["result"] == "success" and 0 < by[e]["confidence"] <= 1 and by[e]["reproductions"] == 1
    assert by[e]["metrics"]["had_rtn4"]["bits_per_param"] == pytest.approx(4.6)
    assert by[b]["result"] == "baseline" and by[b]["duplicate_of"] is None
    for args, want in ((["--tag", "q8_0"], [b]), (["--model", "reference"], [e, b]), (["--result", "success"], [e])):
        res = cli.invoke(app, ["list", "--json", "--db", url, *args])
        assert [r["id"] for r in json.loads(res.stdout)] == want


def test_show_prints_arms_seeds_verdict_and_the_confidence_formula(db):
    url, e, _ = db
    res = cli.invoke(app, ["show", e[:9], "--db", url])       # a unique prefix is enough
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert out.startswith(e) and "hypothesis: A Hadamard rotation" in out
    assert "run set 1 (primary): ann@h1" in out and "run set 2 (reproduction): ann@h2" in out
    assert out.count("\n  had_rtn4 ") >= 6                       # per-seed rows in both run sets
    assert "success: had_rtn4 vs control rtn4 on kld_mean" in out and "Reproductions: 1 of 1 agree" in out
    assert FORMULA in out
    shown = json.loads(cli.invoke(app, ["show", e, "--json", "--db", url]).stdout)
    assert shown["verdicts"][0]["arm"] == "rtn4" and shown["verdicts"][1]["details"]["confidence_terms"]["k"] == 2


def test_export_then_import_reproduces_the_ledger(db, tmp_path):
    url, e, b = db
    out = tmp_path / "atlas.jsonl"
    res = cli.invoke(app, ["export", "--out", str(out), "--db", url])
    assert res.exit_code == 0, res.output
    kinds = [json.loads(line)["type"] for line in out.read_text().splitlines()]
    assert kinds.count("experiment") == 2 and kinds.count("run") == 15
    url2 = f"sqlite:///{tmp_path / 'copy.db'}"
    res = cli.invoke(app, ["import", str(out), "--db", url2])
    assert res.exit_code == 0, res.output
    assert "imported 2 experiment(s)" in res.stdout and "15 run(s)" in res.stdout
    old, new = Ledger(url), Ledger(url2)
    keys = ("id", "result", "confidence", "reproductions", "key_metrics", "tags", "duplicate_of")
    assert [{k: r[k] for k in keys} for r in new.rows()] == [{k: r[k] for k in keys} for r in old.rows()]
    for a, c in zip(old.runs(e), new.runs(e)):
        assert a["id"] == c["id"] and a["metrics"] == c["metrics"]
        assert np.array_equal(a["per_token_kld"], c["per_token_kld"])
    res = cli.invoke(app, ["import", str(out), "--db", url2])       # again: nothing new
    assert "imported 0 experiment(s) (2 already present), 0 run(s) (15 already present)" in res.stdout


def test_import_openquant_rows_and_merge(tmp_path):
    url = f"sqlite:///{tmp_path / 'oq.db'}"
    res = cli.invoke(app, ["import", str(LISTING), "--db", url])
    assert res.exit_code == 0, res.output
    assert res.stdout.count("possible duplicate:") == 4
    rows = json.loads(cli.invoke(app, ["list", "--json", "--db", url]).stdout)
    assert len(rows) == 17 and sum(1 for r in rows if r["duplicate_of"]) == 4
    res = cli.invoke(app, ["merge", "cexp_2067d8", "cexp_194e36", "--db", url])
    assert res.exit_code == 0 and "merged cexp_194e36 into cexp_2067d8" in res.stdout
    rows = json.loads(cli.invoke(app, ["list", "--json", "--db", url]).stdout)
    assert len(rows) == 16 and next(r for r in rows if r["id"] == "cexp_2067d8")["aliases"] == ["cexp_194e36"]
    res = cli.invoke(app, ["reproduce", "cexp_2067d8", "--db", url])
    assert res.exit_code == 2 and "hypothesis-only row: it has no spec" in res.stderr


def test_user_mistakes_are_one_line_and_exit_2(db, tmp_path):
    url, e, _ = db
    bad = tmp_path / "bad.jsonl"
    good = LISTING.read_text().splitlines()
    bad.write_text("\n".join(good[:2] + ['{"id": "cexp_1", "hypothesis": "x",'] + good[2:4]) + "\n")
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    cases = [
        (["show", "cexp_nope", "--db", url], "unknown experiment id 'cexp_nope'"),
        (["list", "--db", "definitely not a url"], "is not a database URL"),
        (["list", "--result", "great", "--db", url], "--result 'great'"),
        (["import", str(bad), "--db", fresh], f"{bad}:3: malformed JSON"),
        (["import", str(tmp_path / "missing.jsonl"), "--db", url], "no such file"),
        (["merge", e, e, "--db", url], "into itself"),
        (["reproduce", "cexp_nope", "--db", url], "unknown experiment id"),
    ]
    for args, message in cases:
        res = cli.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert res.stderr.startswith("error: ") and message in res.stderr and res.stderr.count("\n") == 1
        assert "Traceback" not in res.output
    assert json.loads(cli.invoke(app, ["list", "--json", "--db", fresh]).stdout) == []   # nothing half-imported
    run_line = json.dumps({"type": "run", "experiment": e, "arm": "nope", "seed": 0, "metrics": {},
                           "environment": ENV, "model_hash": "m", "eval_fingerprint": "f"})
    bad.write_text(run_line + "\n")
    res = cli.invoke(app, ["import", str(bad), "--db", url])
    assert res.exit_code == 2 and f"{bad}:1: experiment {e} has no arm 'nope'" in res.stderr


def test_reproduce_runs_the_stored_spec(db, monkeypatch):
    url, e, _ = db
    calls = []

    def run_spec(spec, db_url=None, json_path=None, **kw):
        calls.append((spec, db_url, json_path))
        led = Ledger(db_url, contributor="bob")
        exp = led.register_experiment(spec)
        runs(led, exp, "rtn4", 1.0, 4.6, env=dict(ENV, hostname="elsewhere"))
        runs(led, exp, "had_rtn4", 0.74, 4.6, env=dict(ENV, hostname="elsewhere"))
        return {"experiment_id": exp}

    monkeypatch.setitem(sys.modules, "quantatlas.runner", types.SimpleNamespace(run_spec=run_spec))
    res = cli.invoke(app, ["reproduce", e, "--db", url])
    assert res.exit_code == 0, res.output
    (spec, db_url, json_path), = calls
    assert db_url == url and json_path is None
    assert spec["arms"] == Ledger(url).spec(e)["arms"] and spec["hypothesis"] == SPEC["hypothesis"]
    assert "recorded 6 run(s)" in res.stdout and "2/2 agree" in res.stdout
