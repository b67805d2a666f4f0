"""The ledger on SQLite, and on PostgreSQL where a local server can be started (the `new_db`
fixture runs a test on both): schema and migrations, runs recorded and read back exactly, resume,
reproductions, model families, cached verdicts, a writer killed mid-way, two writers at once."""
import inspect
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from quantatlas.atlas.ledger import Ledger, LedgerError, environment_key

ROOT = Path(__file__).resolve().parents[1]

SPEC = {
    "title": "GPTQ beats RTN at 4 bits", "hypothesis": "GPTQ lowers KLD against RTN at equal bits.",
    "tags": ["gptq", "uniform"], "model": "reference",
    "data": {"calib": {"samples": 16, "seq_len": 256}, "eval": {"tokens": 32768, "ctx": 512}},
    "seeds": [0, 1, 2], "control": "rtn4",
    "arms": {"rtn4": {"solver": "rtn", "codec": {"uniform": {"bits": 4, "group": 128}}},
             "gptq4": {"solver": "gptq", "codec": {"uniform": {"bits": 4, "group": 128}}}},
    "criterion": {"metric": "kld_mean", "better": "lower", "min_effect": 0.05, "alpha": 0.01},
}
ENV = {"python": "3.11.7", "packages": {"numpy": "2.4", "torch": "2.13"}, "git_commit": "abc123",
       "device": "cpu:x86_64:2threads", "hostname": "host-a", "platform": "Linux"}
N_TOK = 64 * 255


def synthetic(arm: str, seed: int, n: int = N_TOK, scale: float | None = None):
    """Deterministic per-token KLD and metrics for one arm x seed (rtn4 1.0, gptq4 0.8 by default)."""
    scale = scale if scale is not None else {"rtn4": 1.0, "gptq4": 0.8}.get(arm, 1.0)
    difficulty = np.random.default_rng(0).gamma(0.6, 0.02, n)
    tok = (difficulty * scale * np.random.default_rng([seed, len(arm), int(scale * 1000)]).lognormal(0, 0.15, n)
           ).astype(np.float32)
    m = {"kld_mean": float(tok.mean(dtype=np.float64)), "kld_se": float(tok.std() / np.sqrt(n)),
         "kld_median": float(np.median(tok)), "kld_p99": float(np.quantile(tok, 0.99)), "kld_max": float(tok.max()),
         "same_top": 0.93, "rms_dp": 0.02, "ppl": 20.1, "ppl_base": 20.0, "ppl_ratio": 1.005,
         "bits_per_weight": 4.125, "bits_per_param": 4.6, "bytes_packed": 1e6, "bytes_zstd": 9e5,
         "bytes_brotli": 8.9e5, "seconds": 1.5 + seed}
    return m, tok


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'atlas.db'}"


def fill(led: Ledger, exp_id: str, env=ENV, seeds=(0, 1, 2), scales=None, contributor=None):
    for arm in ("rtn4", "gptq4"):
        for s in seeds:
            m, tok = synthetic(arm, s, scale=(scales or {}).get(arm))
            led.record_run(exp_id, arm, s, m, tok, env, "model-h", "eval-f", contributor=contributor)


def test_fresh_ledger_is_migrated_in_wal_mode_and_matches_the_models(tmp_path, url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from quantatlas.atlas.db import VERSION_TABLE, head_revision
    from quantatlas.atlas.models import Base

    led = Ledger(url)
    with led.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        assert compare_metadata(ctx, Base.metadata) == []
        rev = ctx.get_current_revision()
    assert rev == head_revision()
    led.close()
    db = sqlite3.connect(tmp_path / "atlas.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    Ledger(url).close()     # opening again is a no-op


def test_the_migration_downgrades_and_upgrades_again(tmp_path, new_db):
    url = new_db()
    from alembic import command
    from sqlalchemy import inspect

    from quantatlas.atlas.db import _alembic_config

    led = Ledger(url)
    e = led.register_experiment(SPEC)
    with led.engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "base")
    assert set(inspect(led.engine).get_table_names()) <= {"atlas_schema_version"}
    led.close()
    led = Ledger(url)
    assert "experiment" in inspect(led.engine).get_table_names()
    assert led.register_experiment(SPEC) == e


def test_default_url_is_runs_atlas_db_under_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("QUANTATLAS_DB", raising=False)
    Ledger().close()
    assert (tmp_path / "runs" / "atlas.db").is_file()
    monkeypatch.setenv("QUANTATLAS_DB", f"sqlite:///{tmp_path / 'env.db'}")
    assert Ledger().url.endswith("env.db")


def test_bad_urls_are_value_errors(tmp_path):
    (tmp_path / "text.db").write_text("not a database " * 100)
    (tmp_path / "file").write_text("")
    for bad in ("not a url", "nosuchdialect://x/y", f"sqlite:///{tmp_path / 'text.db'}",
                f"sqlite:///{tmp_path / 'file' / 'sub' / 'x.db'}"):
        with pytest.raises(ValueError, match="--db"):
            Ledger(bad)


def test_a_schema_from_an_unknown_version_is_refused(tmp_path, url):
    Ledger(url).close()
    db = sqlite3.connect(tmp_path / "atlas.db")
    db.execute("UPDATE atlas_schema_version SET version_num = 'from_the_future'")
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="revision 'from_the_future'"):
        Ledger(url)


def test_runs_round_trip_exactly_and_record_is_idempotent(new_db):
    url = new_db()
    led = Ledger(url, contributor="ann")
    e = led.register_experiment(SPEC)
    m, tok = synthetic("rtn4", 0)
    m = dict(m, ppl=float("inf"), note="reused", reused_from_seed=0)
    key = environment_key(ENV)
    assert not led.has_run(e, "rtn4", 0, key)
    rid = led.record_run(e, "rtn4", 0, m, tok, ENV, "model-h", "eval-f")
    assert led.has_run(e, "rtn4", 0, key) and not led.has_run(e, "rtn4", 1, key)
    assert not led.has_run(e, "rtn4", 0, key, contributor="bob")
    assert led.record_run(e, "rtn4", 0, synthetic("rtn4", 5)[0], tok, ENV, "model-h", "eval-f") == rid
    (run,) = led.runs(e)
    assert run["id"] == rid and run["seed"] == 0 and run["arm"] == "rtn4"
    for k, v in m.items():
        if k == "note":
            assert run["extra"] == {"note": "reused"}
        else:
            assert run["metrics"][k] == v          # every number, bit for bit (inf included)
    assert run["per_token_kld"].dtype == np.float32 and np.array_equal(run["per_token_kld"], tok)


def test_record_run_names_the_mistake(new_db):
    url = new_db()
    led = Ledger(url)
    e = led.register_experiment(SPEC)
    m, tok = synthetic("rtn4", 0)
    with pytest.raises(LedgerError, match="unknown experiment id 'cexp_nope'"):
        led.record_run("cexp_nope", "rtn4", 0, m, tok, ENV, "h", "f")
    with pytest.raises(LedgerError, match="no arm 'q9'.*rtn4, gptq4"):
        led.record_run(e, "q9", 0, m, tok, ENV, "h", "f")
    led.record_run(e, "rtn4", 0, m, tok, ENV, "h", "f")
    with pytest.raises(LedgerError, match="100 tokens"):
        led.record_run(e, "gptq4", 0, m, tok[:100], ENV, "h", "f")
    with pytest.raises(LedgerError, match="seed"):
        led.record_run(e, "gptq4", "zero", m, tok, ENV, "h", "f")


def test_verdicts_for_the_runner_and_their_cache(new_db):
    url = new_db()
    led = Ledger(url)
    e = led.register_experiment(SPEC)
    m, tok = synthetic("rtn4", 0)
    led.record_run(e, "rtn4", 0, m, tok, ENV, "model-h", "eval-f")
    assert [d["result"] for d in led.verdicts(e)] == ["baseline"]
    assert led.rows()[0]["result"] is None                # treatments not run yet: pending
    fill(led, e, seeds=(0, 1))
    v = {d["arm"]: d for d in led.verdicts(e)}
    assert v["rtn4"]["result"] == "baseline"
    g = v["gptq4"]
    # GPTQ's calibration draw follows the seed: two seeds cannot tell seed luck from an effect
    assert g["n_seeds"] == 2 and g["result"] == "inconclusive" and g["rule"] == "too_few_seeds"
    assert g["text"].startswith("inconclusive (too few seeds)")
    assert {"result", "p_value", "effect", "ci", "confidence", "text"} <= set(g)
    assert led.verdicts(e) == led.verdicts(e)          # cached
    fill(led, e, seeds=(2,))                            # a new run: recomputed
    g = {d["arm"]: d for d in led.verdicts(e)}["gptq4"]
    assert g["n_seeds"] == 3 and g["result"] == "success"


def test_the_same_spec_resubmitted_is_a_reproduction_not_a_new_row(new_db):
    url = new_db()
    led = Ledger(url, contributor="ann")
    e = led.register_experiment(SPEC)
    fill(led, e)
    reordered = dict(reversed(list(SPEC.items())), title="Another title", hypothesis="other words", tags=["new"])
    other = Ledger(url, contributor="bob")
    assert other.register_experiment(reordered) == e
    fill(other, e, env=dict(ENV, hostname="host-b", device="cuda:H100"))
    rows = other.rows()
    # the experiment is the atlas's: bob's tag is stored as his, the original ones stay
    assert len(rows) == 1 and rows[0]["tags"] == ["gptq", "uniform"]
    assert rows[0]["contributed_tags"] == {"bob": ["new"]} and rows[0]["title"] == SPEC["title"]
    g = {d["arm"]: d for d in other.verdicts(e)}["gptq4"]
    assert g["reproductions"] == 1 and g["reproductions_agree"] == 1
    assert rows[0]["reproductions"] == 1
    alone = Ledger(new_db())
    e2 = alone.register_experiment(SPEC)
    fill(alone, e2)
    assert g["confidence"] > alone.verdicts(e2)[1]["confidence"]


def test_conflicting_reproductions_make_a_conflict(new_db):
    url = new_db()
    led = Ledger(url, contributor="ann")
    e = led.register_experiment(SPEC)
    fill(led, e)
    fill(led, e, env=dict(ENV, hostname="host-b"), scales={"gptq4": 1.3}, contributor="bob")
    g = {d["arm"]: d for d in led.verdicts(e)}["gptq4"]
    assert g["result"] == "conflict" and g["confidence"] == 0.0
    assert led.rows()[0]["result"] == "conflict"


def test_the_same_experiment_on_two_models_counts_models(new_db):
    url = new_db()
    led = Ledger(url)
    a = led.register_experiment(SPEC)
    b = led.register_experiment(dict(SPEC, model="hf:Qwen/Qwen3-0.6B"))
    assert a != b
    fill(led, a)
    assert {d["arm"]: d for d in led.verdicts(a)}["gptq4"]["models_total"] == 1
    fill(led, b)
    va = {d["arm"]: d for d in led.verdicts(a)}["gptq4"]
    assert (va["models"], va["models_total"]) == (2, 2) and "Holds on 2 of 2 models" in va["text"]
    assert all(r["duplicate_of"] is None for r in led.rows())   # a sibling, not a duplicate


def test_list_filters(new_db):
    url = new_db()
    led = Ledger(url)
    a = led.register_experiment(SPEC)
    b = led.register_experiment(dict(SPEC, model="other", tags=["x"], hypothesis="Something else entirely."))
    fill(led, a)
    assert [r["id"] for r in led.rows(tag="x")] == [b]
    assert [r["id"] for r in led.rows(model="reference")] == [a]
    assert [r["id"] for r in led.rows(result="success")] == [a]
    with pytest.raises(LedgerError, match="--result 'great'"):
        led.rows(result="great")


WRITER = textwrap.dedent("""
    import sys, time
    class NoTorch:                                   # the ledger must not need torch: as if not installed
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is not installed here")
    sys.meta_path.insert(0, NoTorch())
    import numpy as np
    from quantatlas.atlas.ledger import Ledger, environment_key
    SPEC, ENV, N_TOK = {spec!r}, {env!r}, {n_tok!r}
""") + inspect.getsource(synthetic) + textwrap.dedent("""
    url, arm, first, last, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    led = Ledger(url, contributor="writer")
    exp = led.register_experiment(SPEC)
    key = environment_key(ENV)
    skipped = 0
    for seed in range(first, last):
        if led.has_run(exp, arm, seed, key):
            skipped += 1
            continue
        m, tok = synthetic(arm, seed, n=2048)
        led.record_run(exp, arm, seed, m, tok, ENV, "model-h", "eval-f")
        print("committed", seed, flush=True)
        time.sleep(pause)
    print("done skipped", skipped, flush=True)
""")


def _writer(tmp_path, *args) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER.replace("{spec!r}", repr(SPEC)).replace("{env!r}", repr(ENV))
                      .replace("{n_tok!r}", repr(N_TOK)))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)


def _check_intact(url, arm, seeds):
    led = Ledger(url)
    exp = led.register_experiment(SPEC)
    runs = [r for r in led.runs(exp) if r["arm"] == arm]
    assert sorted(r["seed"] for r in runs) == sorted(set(r["seed"] for r in runs))   # no duplicates
    assert set(seeds) <= {r["seed"] for r in runs}
    for r in runs:
        m, tok = synthetic(arm, r["seed"], n=2048)
        assert r["metrics"] == m and np.array_equal(r["per_token_kld"], tok)
    return {r["seed"] for r in runs}


def test_a_killed_writer_loses_no_committed_run_and_a_rerun_resumes(tmp_path, new_db):
    url = new_db()
    proc = _writer(tmp_path, url, "gptq4", 0, 80, 0.0)
    committed = []
    while len(committed) < 15:
        line = proc.stdout.readline()
        assert line, "writer ended early"
        committed.append(int(line.split()[1]))
    time.sleep(0.013)                                  # somewhere inside a later transaction
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    if url.startswith("sqlite"):
        db = sqlite3.connect(url.removeprefix("sqlite:///"))
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
    stored = _check_intact(url, "gptq4", committed)
    assert len(stored) < 80
    proc = _writer(tmp_path, url, "gptq4", 0, 80, 0.0)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert out.strip().splitlines()[-1] == f"done skipped {len(stored)}"
    assert _check_intact(url, "gptq4", range(80)) == set(range(80))


def test_two_processes_writing_at_once_lose_nothing(tmp_path, new_db):
    url = new_db()
    # both also race to create the schema, and both write arm rtn4 seeds 0..9 (one copy must survive)
    a = _writer(tmp_path, url, "gptq4", 0, 30, 0.0)
    b = _writer(tmp_path, url, "rtn4", 0, 30, 0.0)
    c = _writer(tmp_path, url, "rtn4", 0, 10, 0.0)
    for p in (a, b, c):
        p.communicate(timeout=180)
        assert p.returncode == 0
    assert _check_intact(url, "gptq4", range(30)) == set(range(30))
    assert _check_intact(url, "rtn4", range(30)) == set(range(30))


def test_processes_opening_a_fresh_ledger_at_once_create_the_schema_once(tmp_path, new_db):
    url = new_db()
    start = time.time() + 3.0                          # every process imports first, then all open at once
    code = ("import sys, time\nsys.modules['torch'] = None\nfrom quantatlas.atlas.ledger import Ledger\n"
            "from quantatlas.atlas.db import head_revision\nhead_revision()\n"      # alembic loaded: a tight race
            f"time.sleep(max(0.0, {start!r} - time.time()))\nLedger({url!r}).close()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, "\n".join(errors)
    from quantatlas.atlas.db import current_revision, head_revision
    with Ledger(url) as led:
        assert current_revision(led.engine) == head_revision()


def test_a_local_postgres_that_cannot_start_says_why_and_cleans_up():
    import socket

    from quantatlas.atlas.local_postgres import LocalPostgres, unavailable

    if unavailable():
        pytest.skip(unavailable())
    with socket.socket() as busy:                      # the port it was given is taken
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        pg = LocalPostgres()
        pg.port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match="(?s)pg_ctl failed.*server log:.*TCP/IP"):
            pg.start()
    assert not pg.tmp.exists()
