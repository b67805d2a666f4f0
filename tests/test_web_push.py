"""Contributor tokens, `POST /api/runs` (auth, ownership, validation, all-or-nothing), and the
push / pull clients and CLI: idempotent, exact round trips, a real server on loopback."""
import base64
import contextlib
import copy
import hashlib
import json
import socket
import sqlite3
import threading
import time
import zlib

import numpy as np
import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from quantatlas.atlas.io import experiment_record, run_records
from quantatlas.atlas.ledger import Ledger
from quantatlas.atlas.push import pull, push
from quantatlas.atlas.tokens import contributor_for_token, create_token, hash_token, list_tokens, revoke_token
from quantatlas.web import create_app
from quantatlas.web.cli import register

ENV = {"python": "3.11", "packages": {"numpy": "2.4"}, "git_commit": "abc", "device": "cpu", "hostname": "h1",
       "platform": "Linux"}
SPEC = {"title": "Hadamard before RTN", "hypothesis": "A Hadamard rotation before 4-bit RTN lowers KLD.",
        "tags": ["hadamard"], "model": "reference", "seeds": [0, 1], "control": "rtn4",
        "arms": {"rtn4": {"codec": {"uniform": {"bits": 4}}},
                 "had_rtn4": {"codec": {"uniform": {"bits": 4}}, "transforms": [{"hadamard": {}}]}}}
N = 512


def tok(arm: str, seed: int) -> np.ndarray:
    scale = 0.7 if arm.startswith("had") else 1.0
    return (np.random.default_rng([seed, len(arm)]).gamma(0.6, 0.02, N) * scale).astype(np.float32)


def fill(led, exp, contributor=None, env=ENV, seeds=(0, 1)):
    for arm in SPEC["arms"]:
        for s in seeds:
            t = tok(arm, s)
            led.record_run(exp, arm, s, {"kld_mean": float(t.mean(dtype=np.float64)), "bits_per_weight": 4.125,
                                         "ppl": float("inf") if arm == "rtn4" and s == 1 else 20.0},
                           t, env, "mh", "ef", contributor=contributor)


@pytest.fixture
def server(tmp_path):
    url = f"sqlite:///{tmp_path / 'server.db'}"
    app = create_app(url, max_body_bytes=1 << 20)
    led = app.state.ledger
    tokens = {name: create_token(led, name) for name in ("alice", "bob")}
    with TestClient(app) as client:
        yield client, led, tokens


@pytest.fixture
def local(tmp_path):
    led = Ledger(f"sqlite:///{tmp_path / 'local.db'}", contributor="alice")
    exp = led.register_experiment(SPEC)
    fill(led, exp)
    yield led, exp
    led.close()


def payload_of(led, exp) -> dict:
    with led.read() as q:
        e = experiment_record(q, q.experiment(exp))
    return {"schema_version": 1, "experiments": [e], "runs": run_records(led, [r["id"] for r in led.runs(exp)])}


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def n_runs(led) -> int:
    with led.read() as q:
        return len(q.run_ids())


# ---- tokens ------------------------------------------------------------------------------------

def test_tokens_are_stored_hashed_and_can_be_revoked(tmp_path):
    path = tmp_path / "t.db"
    led = Ledger(f"sqlite:///{path}")
    token = create_token(led, " alice ")
    assert token.startswith("qat_") and len(token) >= 40 and create_token(led, "alice") != token
    assert contributor_for_token(led, token) == "alice"
    assert contributor_for_token(led, token + "x") is None and contributor_for_token(led, None) is None
    db = sqlite3.connect(path)
    stored = db.execute("SELECT token_sha256, prefix FROM api_token").fetchall()
    raw = open(path, "rb").read() + (open(f"{path}-wal", "rb").read() if (tmp_path / "t.db-wal").exists() else b"")
    assert token.encode() not in raw                                   # the secret is nowhere in the file
    assert (hashlib.sha256(token.encode()).hexdigest(), token[:12]) in stored
    assert hash_token(token) == hashlib.sha256(token.encode()).hexdigest()
    assert [t["contributor"] for t in list_tokens(led)] == ["alice", "alice"]
    with pytest.raises(ValueError, match="at least 8"):
        revoke_token(led, "qat_")
    assert revoke_token(led, token) == "alice"
    assert contributor_for_token(led, token) is None
    with pytest.raises(ValueError, match="NAME"):
        create_token(led, "  ")
    led.close()


def test_token_cli_prints_the_token_once(tmp_path):
    root, atlas = typer.Typer(), typer.Typer()
    atlas.command("noop")(lambda: None)
    root.add_typer(atlas, name="atlas")
    register(root, atlas)
    db = f"sqlite:///{tmp_path / 'c.db'}"
    r = CliRunner().invoke(root, ["atlas", "token", "create", "carol", "--db", db])
    assert r.exit_code == 0, r.output
    token = r.stdout.splitlines()[0]
    with Ledger(db) as led:
        assert contributor_for_token(led, token) == "carol"
    listed = CliRunner().invoke(root, ["atlas", "token", "list", "--db", db])
    assert token[:12] in listed.stdout and token not in listed.stdout and "carol" in listed.stdout
    bad = CliRunner().invoke(root, ["atlas", "token", "create", "", "--db", db])
    assert bad.exit_code == 2 and "NAME" in bad.stderr


# ---- POST /api/runs ----------------------------------------------------------------------------

def test_push_needs_a_live_token(server, local):
    client, _, tokens = server
    body = payload_of(*local)
    assert client.post("/api/runs", json=body).status_code == 401
    r = client.post("/api/runs", json=body, headers=auth("qat_wrong"))
    assert r.status_code == 401 and "unknown" in r.json()["detail"]
    assert client.get("/api/whoami", headers=auth(tokens["bob"])).json() == {"contributor": "bob"}


def test_push_stores_runs_exactly_once_and_as_the_tokens_contributor(server, local):
    client, sled, tokens = server
    led, exp = local
    body = payload_of(led, exp)
    r = client.post("/api/runs", json=body, headers=auth(tokens["alice"]))
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["runs"], got["runs_existing"], got["experiments"]) == (4, 0, 1)
    assert sorted(got["run_ids"]) == sorted(x["id"] for x in led.runs(exp))     # same content-addressed ids
    again = client.post("/api/runs", json=body, headers=auth(tokens["alice"])).json()
    assert (again["runs"], again["runs_existing"], again["experiments"]) == (0, 4, 0)
    mine = {(x["arm"], x["seed"]): x for x in led.runs(exp)}
    theirs = sled.runs(exp)
    assert len(theirs) == 4
    for x in theirs:
        m = mine[(x["arm"], x["seed"])]
        assert x["contributor"] == "alice" and x["metrics"] == m["metrics"]            # inf survives as inf
        assert np.array_equal(x["per_token_kld"], m["per_token_kld"])
    assert any(x["metrics"]["ppl"] == float("inf") for x in theirs)


def test_a_contributor_cannot_push_alter_or_delete_anothers_runs(server, local):
    client, sled, tokens = server
    led, exp = local
    body = payload_of(led, exp)
    assert client.post("/api/runs", json=body, headers=auth(tokens["alice"])).status_code == 200
    before = {x["id"]: x for x in sled.runs(exp)}
    r = client.post("/api/runs", json=body, headers=auth(tokens["bob"]))        # alice's runs with bob's token
    assert r.status_code == 403 and "'alice'" in r.json()["detail"] and "'bob'" in r.json()["detail"]
    # the same arm x seed with other numbers, sent as bob: a new run of bob's; alice's is untouched
    forged = copy.deepcopy(body)
    for run in forged["runs"]:
        run["contributor"] = None
        run["metrics"]["kld_mean"] = 123.0
    r = client.post("/api/runs", json=forged, headers=auth(tokens["bob"]))
    assert r.status_code == 200 and r.json()["runs"] == 4
    after = {x["id"]: x for x in sled.runs(exp)}
    assert len(after) == 8 and all(after[i]["metrics"] == before[i]["metrics"] for i in before)
    assert {x["contributor"] for i, x in after.items() if i not in before} == {"bob"}
    # alice re-sending altered numbers for her own runs changes nothing either: stored runs are never overwritten
    altered = copy.deepcopy(body)
    altered["runs"][0]["metrics"]["kld_mean"] = 5.0
    assert client.post("/api/runs", json=altered, headers=auth(tokens["alice"])).json()["runs_existing"] == 4
    assert {i: x["metrics"] for i, x in ((i, x) for i, x in {y["id"]: y for y in sled.runs(exp)}.items())
            if i in before} == {i: x["metrics"] for i, x in before.items()}
    # and there is no route to delete or replace a run
    methods = {m for ops in client.get("/api/openapi.json").json()["paths"].values() for m in ops}
    assert methods == {"get", "post"}
    assert client.delete("/api/runs", headers=auth(tokens["alice"])).status_code == 405
    assert client.put("/api/runs", json=body, headers=auth(tokens["alice"])).status_code == 405


def _bad_payloads(body):
    """(what, payload or raw bytes, expected status, words the reason must hold)."""
    out = []
    b = copy.deepcopy(body); b["runs"][1]["arm"] = "no_such_arm"
    out.append(("unknown arm", b, 422, ["runs[1]", "no_such_arm"]))
    b = copy.deepcopy(body); b["runs"][2]["surprise"] = 1
    out.append(("unknown field", b, 422, ["surprise"]))
    b = copy.deepcopy(body); b["schema_version"] = 2
    out.append(("unknown schema version", b, 422, ["schema_version"]))
    b = copy.deepcopy(body); b["runs"][0]["metrics"]["kld_mean"] = "0.1"
    out.append(("a number as text", b, 422, ["kld_mean"]))
    raw = json.dumps(body).replace('"bits_per_weight": 4.125', '"bits_per_weight": NaN', 1).encode()
    out.append(("NaN literal", raw, 422, ["bits_per_weight", "finite"]))
    raw = json.dumps(body).replace('"device": "cpu"', '"device": Infinity', 1).encode()
    out.append(("Infinity in the environment", raw, 422, ["environment"]))
    b = copy.deepcopy(body); b["runs"][3]["per_token_kld"]["sha256"] = "0" * 64
    out.append(("checksum", b, 422, ["runs[3]", "sha256"]))
    bomb = zlib.compress(b"\0" * (4 * N + 4000))
    b = copy.deepcopy(body); b["runs"][3]["per_token_kld"]["zlib_f32_base64"] = base64.b64encode(bomb).decode()
    out.append(("more values than n", b, 422, ["n=512"]))
    nan = np.full(N, np.nan, dtype="<f4").tobytes()
    b = copy.deepcopy(body)
    b["runs"][3]["per_token_kld"] = {"n": N, "sha256": hashlib.sha256(nan).hexdigest(),
                                     "zlib_f32_base64": base64.b64encode(zlib.compress(nan)).decode()}
    out.append(("non-finite per-token KLD", b, 422, ["non-finite"]))
    b = copy.deepcopy(body); b["experiments"][0]["spec"]["arms"]["rtn4"]["solver"] = 7
    out.append(("spec that does not validate", b, 422, ["experiments[0]", "spec"]))
    b = copy.deepcopy(body); b["experiments"] = []; b["runs"][0]["experiment"] = "cexp_00000000"
    out.append(("unknown experiment", b, 422, ["cexp_00000000"]))
    out.append(("not JSON", b"{not json", 422, []))
    big = copy.deepcopy(body); big["runs"][0]["extra"] = {"pad": "x" * (1 << 20)}
    out.append(("over the size limit", big, 413, ["limit"]))
    return out


def test_bad_pushes_are_refused_with_a_reason_and_write_nothing(server, local):
    client, sled, tokens = server
    body = payload_of(*local)
    for what, bad, status, words in _bad_payloads(body):
        if isinstance(bad, bytes):
            r = client.post("/api/runs", content=bad, headers={**auth(tokens["alice"]),
                                                                "Content-Type": "application/json"})
        else:
            r = client.post("/api/runs", json=bad, headers=auth(tokens["alice"]))
        assert r.status_code == status, (what, r.status_code, r.text[:300])
        reason = json.dumps(r.json()["detail"])
        assert all(w in reason for w in words), (what, reason[:500])
        assert n_runs(sled) == 0, what                  # good runs in the same payload were not written either
        with sled.read() as q:
            assert q.experiments() == [], what


# ---- push and pull clients ---------------------------------------------------------------------

def test_push_sends_only_what_the_server_lacks_and_pull_round_trips_exactly(server, local, tmp_path):
    client, sled, tokens = server
    led, exp = local
    fill(led, exp, contributor="bob", env=dict(ENV, hostname="h2"))       # someone else's runs, here too
    planned = led.register_experiment(dict(SPEC, title="no runs yet", hypothesis="Runless.",
                                           arms={"rtn3": {"codec": {"uniform": {"bits": 3}}}}, control=None))
    s1 = push(led, "http://testserver", tokens["alice"], client=client, batch_bytes=3000)
    assert (s1["runs"], s1["runs_existing"], s1["skipped_other_contributors"]) == (4, 0, 4)
    assert s1["experiments"] == 2 and s1["batches"] >= 2                  # small batches: several requests
    assert sorted(x["id"] for x in sled.runs(exp)) == sorted(x["id"] for x in led.runs(exp) if x["contributor"] == "alice")
    assert sled.resolve(planned) == planned
    s2 = push(led, "http://testserver", tokens["alice"], client=client)
    assert (s2["runs"], s2["experiments"], s2["batches"]) == (0, 0, 0)   # nothing the server lacks: nothing sent
    s3 = push(led, "http://testserver", tokens["bob"], client=client)    # bob pushes his own
    assert (s3["runs"], s3["skipped_other_contributors"]) == (4, 4)
    with pytest.raises(ValueError, match="--token"):
        push(led, "http://testserver", None, client=client)
    with pytest.raises(ValueError, match="401"):
        push(led, "http://testserver", "qat_nope", client=client)

    other = Ledger(f"sqlite:///{tmp_path / 'other.db'}", contributor="carol")
    p1 = pull(other, "http://testserver", client=client)
    assert (p1["runs"], p1["experiments"]) == (8, 2)
    p2 = pull(other, "http://testserver", client=client)
    assert (p2["runs"], p2["experiments"], p2["runs_existing"]) == (0, 0, 0)
    want = {x["id"]: x for x in led.runs(exp)}
    got = {x["id"]: x for x in other.runs(exp)}
    assert set(got) == set(want)
    for i, x in got.items():
        assert x["contributor"] == want[i]["contributor"] and x["metrics"] == want[i]["metrics"]
        assert np.array_equal(x["per_token_kld"], want[i]["per_token_kld"])
    assert other.verdicts(exp) == sled.verdicts(exp)
    other.close()


def test_pull_records_are_the_ledger_export_records(server, local):
    client, sled, tokens = server
    assert push(local[0], "http://testserver", tokens["alice"], client=client)["runs"] == 4
    exported = list(sled.export_records())
    lines = client.get("/api/records/experiments").text.splitlines()
    ids = client.get("/api/runs/ids").json()["ids"]
    lines += client.post("/api/records/runs", json={"ids": ids}).text.splitlines()
    assert sorted(map(json.dumps, map(json.loads, lines))) == sorted(map(json.dumps, exported))
    known = client.post("/api/known", json={"runs": ids[:2] + ["run_x"], "experiments": [local[1], "cexp_x"]}).json()
    assert sorted(known["runs"]) == sorted(ids[:2]) and known["experiments"] == [local[1]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app):
    """`app` served by uvicorn on a free loopback port; yields its URL."""
    import uvicorn

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.started
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


def cli() -> typer.Typer:
    root, atlas = typer.Typer(), typer.Typer()
    atlas.command("noop")(lambda: None)
    root.add_typer(atlas, name="atlas")
    register(root, atlas)
    return root


def test_push_and_pull_commands_against_a_server_on_loopback(tmp_path, local):
    server_db = f"sqlite:///{tmp_path / 'served.db'}"
    app = create_app(server_db)
    token = create_token(app.state.ledger, "alice")
    with serving(app) as url:
        root = cli()
        runner = CliRunner()
        r = runner.invoke(root, ["push", "--to", url, "--token", token, "--db", local[0].url])
        assert r.exit_code == 0 and "pushed 4 new run(s) as alice (0 already there)" in r.stdout, r.output
        r = runner.invoke(root, ["push", "--to", url, "--db", local[0].url], env={"QUANTATLAS_TOKEN": token})
        assert r.exit_code == 0 and "pushed 0 new run(s)" in r.stdout, r.output
        fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
        r = runner.invoke(root, ["pull", "--from", url, "--db", fresh])
        assert r.exit_code == 0 and "pulled 4 new run(s)" in r.stdout, r.output
        r = runner.invoke(root, ["pull", "--from", url, "--db", fresh])
        assert r.exit_code == 0 and "pulled 0 new run(s)" in r.stdout, r.output
        r = runner.invoke(root, ["push", "--to", url, "--token", "qat_bad", "--db", local[0].url])
        assert r.exit_code == 2 and "401" in r.stderr and "Traceback" not in r.output
        r = runner.invoke(root, ["pull", "--from", f"http://127.0.0.1:{_free_port()}", "--db", fresh])
        assert r.exit_code == 2 and "cannot reach" in r.stderr


# ---- runs recorded under another name than the token's (issue 24 part 8) ------------------------

@pytest.fixture
def login_named(tmp_path):
    """A ledger whose own runs were recorded under the login name 'ubuntu' (4 runs), with 2 runs
    of 'carol' pulled from elsewhere."""
    led = Ledger(f"sqlite:///{tmp_path / 'login.db'}", contributor="ubuntu")
    exp = led.register_experiment(SPEC)
    fill(led, exp)
    fill(led, exp, contributor="carol", env=dict(ENV, hostname="h2"), seeds=(0,))
    yield led, exp
    led.close()


def test_a_contributor_is_the_env_variable_else_the_login_name(tmp_path, monkeypatch):
    import getpass

    monkeypatch.setenv("QUANTATLAS_CONTRIBUTOR", "dana")
    with Ledger(f"sqlite:///{tmp_path / 'a.db'}") as led:
        assert led.contributor == "dana"
    monkeypatch.delenv("QUANTATLAS_CONTRIBUTOR")
    with Ledger(f"sqlite:///{tmp_path / 'a.db'}") as led:
        assert led.contributor == getpass.getuser()


def test_push_finding_no_runs_of_the_token_says_why_and_how_to_fix_it(server, login_named):
    client, sled, tokens = server
    led, exp = login_named
    s = push(led, "http://testserver", tokens["alice"], client=client)
    assert (s["runs"], s["experiments"], s["skipped_other_contributors"]) == (0, 1, 6)
    assert n_runs(sled) == 0 and s["local_contributors"] == {"ubuntu": 4, "carol": 2}
    hint = s["hint"]
    assert "\n" not in hint and hint.startswith("0 runs pushed")
    for words in ("'alice'", "'ubuntu' (4)", "'carol' (2)", "QUANTATLAS_CONTRIBUTOR=alice", "--as-token-owner"):
        assert words in hint, (words, hint)
    # the same ledger opened under a name that holds no run: the fix names the local name that does
    with Ledger(led.url, contributor="newname") as renamed:
        s = push(renamed, "http://testserver", tokens["alice"], client=client, as_token_owner=True)
    assert s["runs"] == 0 and s["as_token_owner"] is None
    assert "no run here is recorded as 'newname'" in s["hint"]
    assert "QUANTATLAS_CONTRIBUTOR=ubuntu quantatlas push --as-token-owner" in s["hint"]
    # a ledger whose runs are all the token's: no hint
    assert push(led, "http://testserver", tokens["alice"], client=client, as_token_owner=True)["hint"] is None


def test_the_server_refuses_others_runs_unless_asked_to_store_them_as_the_tokens(server, login_named):
    client, sled, tokens = server
    led, exp = login_named
    body = payload_of(led, exp)
    ubuntu = [r for r in body["runs"] if r["contributor"] == "ubuntu"]
    r = client.post("/api/runs", json=dict(body, runs=ubuntu), headers=auth(tokens["alice"]))
    detail = r.json()["detail"]
    assert r.status_code == 403 and "'ubuntu'" in detail and "'alice'" in detail and "as_token_owner" in detail
    assert n_runs(sled) == 0
    r = client.post("/api/runs", json=dict(body, runs=ubuntu), headers=auth(tokens["alice"]),
                    params={"as_token_owner": "false"})
    assert r.status_code == 403 and n_runs(sled) == 0
    r = client.post("/api/runs", json=dict(body, runs=ubuntu), headers=auth(tokens["alice"]),
                    params={"as_token_owner": "true"})
    assert r.status_code == 200 and r.json()["runs"] == 4
    assert {x["contributor"] for x in sled.runs(exp)} == {"alice"}


def test_push_as_token_owner_stores_the_login_named_runs_as_the_tokens_contributor(server, login_named):
    from quantatlas.atlas.ids import environment_key, run_id

    client, sled, tokens = server
    led, exp = login_named
    s = push(led, "http://testserver", tokens["alice"], client=client, as_token_owner=True)
    assert (s["runs"], s["runs_existing"], s["experiments"], s["hint"]) == (4, 0, 1, None)
    assert s["as_token_owner"] == {"local": "ubuntu", "runs": 4, "existing": 0}
    assert s["skipped_other_contributors"] == 2                        # carol's runs stay hers, here only
    mine = {(x["arm"], x["seed"]): x for x in led.runs(exp) if x["contributor"] == "ubuntu"}
    theirs = sled.runs(exp)
    assert len(theirs) == 4 and {x["contributor"] for x in theirs} == {"alice"}
    for x in theirs:
        m = mine[(x["arm"], x["seed"])]
        # the id a run recorded as alice would have had, computed from its parts
        assert x["id"] == run_id(exp, x["arm"], x["seed"], environment_key(ENV), "alice", "mh", "ef") != m["id"]
        assert x["metrics"] == m["metrics"] and np.array_equal(x["per_token_kld"], m["per_token_kld"])
    again = push(led, "http://testserver", tokens["alice"], client=client, as_token_owner=True)
    assert (again["runs"], again["batches"]) == (0, 0)                 # the server's ids were asked: nothing sent
    assert again["as_token_owner"] == {"local": "ubuntu", "runs": 0, "existing": 4}
    # bob's token with the flag takes ubuntu's runs as bob's: the flag says whose they become
    s = push(led, "http://testserver", tokens["bob"], client=client, as_token_owner=True)
    assert s["runs"] == 4 and {x["contributor"] for x in sled.runs(exp)} == {"alice", "bob"}


def test_push_command_explains_zero_runs_and_pushes_as_the_token_owner_when_asked(tmp_path, login_named):
    led, exp = login_named
    app = create_app(f"sqlite:///{tmp_path / 'served.db'}")
    token = create_token(app.state.ledger, "alice")
    with serving(app) as url:
        runner, root = CliRunner(), cli()
        args = ["push", "--to", url, "--token", token, "--db", led.url]
        env = {"QUANTATLAS_CONTRIBUTOR": "ubuntu"}
        r = runner.invoke(root, args, env=env)
        assert r.exit_code == 0 and "pushed 0 new run(s) as alice" in r.stdout, r.output
        why = [line for line in r.stdout.splitlines() if "0 runs pushed" in line]
        assert len(why) == 1 and "'ubuntu' (4)" in why[0] and "--as-token-owner" in why[0], r.output
        assert "QUANTATLAS_CONTRIBUTOR=alice" in why[0]
        r = runner.invoke(root, args + ["--as-token-owner"], env=env)
        assert r.exit_code == 0, r.output
        assert "pushed 4 new run(s) as alice" in r.stdout and "pushed 4 run(s) of ubuntu as alice" in r.stdout
        r = runner.invoke(root, args + ["--as-token-owner"], env=env)
        assert r.exit_code == 0 and "pushed 0 run(s) of ubuntu as alice (4 already there)" in r.stdout, r.output
    assert {x["contributor"] for x in app.state.ledger.runs(exp)} == {"alice"}
