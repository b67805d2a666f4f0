"""Atlas hardening over HTTP (issue 13): hostile or malformed pushes get a clear 4xx and change
nothing; no push and no stored record breaks a page; verdicts claim no more than their data;
reads never write. Each case sends its input to a running app (TestClient), checks the status,
the message, that the stored records are unchanged, and that every page and API route still
answers 200 with strict JSON."""
import base64
import copy
import hashlib
import json
import sqlite3
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient

from quantatlas.atlas.ledger import Ledger, LedgerError, decode_tokens
from quantatlas.atlas.records import MAX_DEPTH, json_depth
from quantatlas.atlas.tokens import create_token
from quantatlas.web import create_app

ENV = {"python": "3.11", "packages": {"numpy": "2.4"}, "git_commit": "abc", "device": "cpu", "hostname": "h1",
       "platform": "Linux"}
SPEC = {"title": "RTN 3 vs 4 bits", "hypothesis": "Four-bit RTN has lower KLD than three-bit RTN.",
        "tags": ["rtn"], "model": "reference", "seeds": [0], "control": "rtn3",
        "arms": {"rtn3": {"codec": {"uniform": {"bits": 3}}}, "rtn4": {"codec": {"uniform": {"bits": 4}}}}}
SEEDED = {"title": "Hadamard before RTN", "hypothesis": "A Hadamard rotation with random signs lowers KLD.",
          "tags": ["hadamard"], "model": "reference", "seeds": [0], "control": "rtn4",
          "arms": {"rtn4": {"codec": {"uniform": {"bits": 4}}},
                   "had4": {"codec": {"uniform": {"bits": 4}}, "transforms": [{"hadamard": {}}]}}}
N = 2 * 255
MAX_REQUEST_TOKENS = 8 * N


def tok(scale: float, seed: int) -> np.ndarray:
    return (np.random.default_rng([seed, int(scale * 100)]).gamma(0.6, 0.02, N) * scale).astype(np.float32)


def per_token(values: np.ndarray) -> dict:
    raw = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return {"n": values.size, "sha256": hashlib.sha256(raw).hexdigest(),
            "zlib_f32_base64": base64.b64encode(zlib.compress(raw)).decode()}


def run_rec(exp: str, arm: str, seed: int, scale: float, **over) -> dict:
    t = tok(scale, seed)
    r = {"type": "run", "experiment": exp, "arm": arm, "seed": seed, "environment": ENV, "model_hash": "mh",
         "eval_fingerprint": "ef", "metrics": {"kld_mean": float(t.mean(dtype=np.float64)), "same_top": 0.9,
                                               "bits_per_weight": 4.125}, "extra": {"note": "ok"},
         "per_token_kld": per_token(t)}
    r.update(over)
    return r


def exp_rec(spec: dict, exp_id: str = "cexp_00000001", **over) -> dict:
    r = {"type": "experiment", "id": exp_id, "title": spec["title"], "hypothesis": spec["hypothesis"],
         "tags": list(spec.get("tags") or []), "spec": spec}
    r.update(over)
    return r


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def atlas(tmp_path):
    """A server holding alice's experiment (2 arms x 1 seed, deterministic RTN arms) and a
    hypothesis-only row; tokens for alice and bob."""
    path = tmp_path / "server.db"
    app = create_app(f"sqlite:///{path}", max_body_bytes=1 << 20, max_request_tokens=MAX_REQUEST_TOKENS)
    led = app.state.ledger
    tokens = {name: create_token(led, name) for name in ("alice", "bob")}
    with TestClient(app) as client:
        body = {"schema_version": 1, "experiments": [exp_rec(SPEC)],
                "runs": [run_rec("cexp_00000001", "rtn3", 0, 1.0), run_rec("cexp_00000001", "rtn4", 0, 0.6)]}
        r = client.post("/api/runs", json=body, headers=auth(tokens["alice"]))
        assert r.status_code == 200, r.text
        exp = r.json()["renamed"].get("cexp_00000001", "cexp_00000001")
        app.state.refresher.wait_idle()
        yield {"client": client, "led": led, "tokens": tokens, "exp": exp, "path": path, "app": app}


def snapshot(path) -> list[str]:
    """Every row of every table, as SQL text, in a stable order."""
    db = sqlite3.connect(path)
    try:
        return sorted(line for line in db.iterdump() if not line.startswith(("BEGIN", "COMMIT")))
    finally:
        db.close()


def routes_answer(a) -> None:
    """Every page and API route answers 200, and no JSON (API or embedded figure) holds NaN/Infinity."""
    client = a["client"]
    ids = [r["id"] for r in client.get("/api/experiments").json()]
    assert ids
    gets = ["/", "/?result=pending", "/landscape", "/landscape?bits=bits_per_param", "/composition", "/left-to-try",
            "/api", "/api/experiments", "/api/landscape", "/api/composition", "/api/left-to-try", "/api/runs/ids",
            "/api/records/experiments", "/api/openapi.json"]
    for i in ids:
        gets += [f"/experiments/{i}", f"/api/experiments/{i}", f"/api/experiments/{i}/kld"]
    for path in gets:
        r = client.get(path)
        assert r.status_code == 200, (path, r.status_code, r.text[:300])
        for bad in ("NaN", "Infinity"):
            assert bad not in r.text.replace("NaN%", ""), (path, bad)
        if path.startswith("/api/") and path != "/api/records/experiments":
            json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{path}: {c} in JSON"))
    run_ids = client.get("/api/runs/ids").json()["ids"]
    assert client.post("/api/records/runs", json={"ids": run_ids}).status_code == 200


def refused(a, body, status: int, words, who="alice", raw: bytes | None = None) -> str:
    """Push `body` (or raw bytes); check status, reason and that nothing stored changed; then that
    every route answers. Returns the reason."""
    before = snapshot(a["path"])
    headers = auth(a["tokens"][who])
    if raw is not None:
        r = a["client"].post("/api/runs", content=raw, headers={**headers, "Content-Type": "application/json"})
    else:
        r = a["client"].post("/api/runs", json=body, headers=headers)
    assert r.status_code == status, (r.status_code, r.text[:500])
    reason = r.json()["detail"]
    assert all(w in reason for w in words), reason
    a["app"].state.refresher.wait_idle()
    assert snapshot(a["path"]) == before
    routes_answer(a)
    return reason


def push(a, runs=(), experiments=(), who="alice"):
    """A push, then the wait for the verdict refresh it started."""
    r = a["client"].post("/api/runs", json={"schema_version": 1, "experiments": list(experiments),
                                            "runs": list(runs)}, headers=auth(a["tokens"][who]))
    assert a["app"].state.refresher.wait_idle()
    return r


# ---- 1. numbers -------------------------------------------------------------------------------

def test_numbers_out_of_float_range_or_out_of_their_metrics_range_are_refused(atlas):
    a, exp = atlas, atlas["exp"]
    huge = 10 ** 400
    cases = [
        ({"metrics": {"kld_mean": huge}}, ["metrics.kld_mean", "401 digits"]),
        ({"metrics": {"kld_mean": 0.1, "seconds": -huge}}, ["metrics.seconds", "digits"]),
        ({"metrics": {"kld_mean": -0.01}}, ["'kld_mean'", "out of its range", ">= 0"]),
        ({"metrics": {"kld_mean": 0.1, "kld_p99": "inf"}}, ["'kld_p99'", ">= 0 and finite"]),
        ({"metrics": {"kld_mean": 0.1, "same_top": 1.5}}, ["'same_top'", "[0, 1]"]),
        ({"metrics": {"kld_mean": 0.1, "same_top": "nan"}}, ["'same_top'"]),
        ({"metrics": {"kld_mean": 0.1, "bits_per_weight": 0}}, ["'bits_per_weight'", "> 0"]),
        ({"extra": {"kld_mean": 0.5}}, ["extra.kld_mean shadows the metric 'kld_mean'"]),
        ({"extra": {"bits_per_param": "4"}}, ["shadows the metric 'bits_per_param'"]),
        ({"extra": {"k" * 201: 1}}, ["extra", "200"]),
        ({"extra": {"deep": {"x": [1, huge]}}}, ["extra.deep.x[1]", "digits"]),
        ({"environment": dict(ENV, threads=huge)}, ["environment.threads", "digits"]),
    ]
    for over, words in cases:
        bad = run_rec(exp, "rtn4", 1, 0.6, **over)
        if "metrics" not in over:
            bad["metrics"] = run_rec(exp, "rtn4", 1, 0.6)["metrics"]
        refused(a, {"schema_version": 1, "runs": [bad]}, 422, words)
    neg = tok(0.6, 1).copy()
    neg[7] = -0.5
    refused(a, {"schema_version": 1, "runs": [run_rec(exp, "rtn4", 1, 0.6, per_token_kld=per_token(neg))]}, 422,
            ["per_token_kld", "negative"])
    inf = tok(0.6, 1).copy()
    inf[3] = np.inf
    refused(a, {"schema_version": 1, "runs": [run_rec(exp, "rtn4", 1, 0.6, per_token_kld=per_token(inf))]}, 422,
            ["non-finite"])
    refused(a, {"schema_version": 1, "experiments": [exp_rec(SPEC, "cexp_00000009", imported={"n": huge})]}, 422,
            ["imported.n", "digits"])
    raw = json.dumps({"schema_version": 1, "runs": [run_rec(exp, "rtn4", 1, 0.6)]}).replace('"ok"', "NaN").encode()
    refused(a, None, 422, ["extra"], raw=raw)
    # a perplexity that really overflowed may travel as "inf" (its range is (0, inf]); ranged KLD may not
    ok = run_rec(exp, "rtn4", 1, 0.6)
    ok["metrics"]["ppl"] = "inf"
    assert push(a, [ok]).status_code == 200


# ---- 2. shape ---------------------------------------------------------------------------------

def test_json_nested_past_the_limit_is_refused_at_the_door_in_every_field(atlas):
    a, exp = atlas, atlas["exp"]

    def nest(depth):
        v = 1
        for _ in range(depth):
            v = [v]
        return v

    for field in ("extra", "environment"):
        bad = run_rec(exp, "rtn4", 1, 0.6)
        bad[field] = dict(bad[field], deep=nest(MAX_DEPTH + 5))
        refused(a, {"schema_version": 1, "runs": [bad]}, 422, ["nested", str(MAX_DEPTH)])
    bad_spec = copy.deepcopy(SEEDED)
    bad_spec["notes"] = "x"
    bad_spec["arms"]["had4"]["transforms"] = [{"hadamard": {"x": nest(MAX_DEPTH + 5)}}]
    refused(a, {"schema_version": 1, "experiments": [exp_rec(bad_spec, "cexp_00000009")]}, 422, ["nested"])
    # 200 000 levels: a scan, not a recursion error (a 500) in the JSON parser
    raw = b'{"schema_version": 1, "runs": [' + b"[" * 200_000 + b"]" * 200_000 + b"]}"
    reason = refused(a, None, 422, ["200002 levels deep", f"limit is {MAX_DEPTH}"], raw=raw)
    assert "JSON body" in reason
    # brackets inside strings (escaped quotes and backslashes too) are not nesting
    assert json_depth(json.dumps({"a": "[[[[\\\"{{{{", "b": ["\\", {"c": "]]]"}]})) == 3


def test_stored_records_of_any_shape_still_render(atlas):
    """Records written before these rules (or by a local runner): NaN and infinite metrics, NaN in
    the environment, extra nested past the limit, a damaged per-token array. Every route answers
    200, figures carry no NaN or Infinity, and the plots still have their finite points."""
    a = atlas
    led, client = a["led"], a["client"]
    exp = led.register_experiment(dict(SPEC, title="legacy", seeds=[0, 1], model="hf:x/legacy"))
    for arm, s, kld in (("rtn3", 0, float("nan")), ("rtn4", 0, float("inf")), ("rtn3", 1, 0.02), ("rtn4", 1, 0.01)):
        t = tok(1.0 if arm == "rtn3" else 0.5, s)
        led.record_run(exp, arm, s, {"kld_mean": kld, "bits_per_weight": float("inf") if s == 0 else 4.1,
                                     "same_top": float("nan")}, t, dict(ENV, hostname="legacy"), "mh2", "ef2")
    db = sqlite3.connect(a["path"])
    deep = "[" * 60 + "1" + "]" * 60
    db.execute(f"UPDATE run SET extra = json('{{\"deep\": {deep}}}') WHERE seed = 1")
    db.execute("UPDATE environment SET full = '{\"device\": NaN, \"n\": 1e999}' WHERE hostname = 'legacy'")
    bomb = zlib.compress(b"\0" * (1 << 22))
    db.execute("UPDATE run SET per_token_kld = ? WHERE seed = 0 AND arm_id IN (SELECT id FROM arm WHERE name = "
               "'rtn3' AND experiment_id = ?)", (bomb, exp))
    db.commit()
    db.close()
    routes_answer(a)
    page = client.get(f"/experiments/{exp}").text
    assert "kld-1-data" in page                                   # the ECDF plot is still there
    fig = json.loads(page.split('id="kld-1-data">')[1].split("</script>")[0])
    assert any(len(t["x"]) > 10 for t in fig["data"])
    land = client.get("/landscape").text
    assert "landscape-1-data" in land
    # the ledger's own reader is the bounded decoder: a damaged blob is refused, not inflated
    with led.read() as q:
        run, = [r for r in q.runs(exp) if r.per_token_zlib == bomb]
    with pytest.raises(LedgerError, match="does not decompress to n=510"):
        decode_tokens(run.per_token_zlib, run.per_token_sha256, run.n_tokens)
    assert run.per_token() is None                                # pages and verdicts go on without it


# ---- 3. size ----------------------------------------------------------------------------------

def test_per_token_values_are_bounded_per_request_before_decompressing(atlas):
    a, exp = atlas, atlas["exp"]
    runs = [run_rec(exp, "rtn4", s, 0.6) for s in range(1, 10)]          # 9 x 510 values > 8 x 510
    reason = refused(a, {"schema_version": 1, "runs": runs}, 413, [str(9 * N), str(MAX_REQUEST_TOKENS),
                                                                   "fewer runs"])
    assert "per-token" in reason
    # declared counts are what is checked: the blobs are never decompressed (garbage is not even read)
    junk = [dict(r, per_token_kld=dict(r["per_token_kld"], zlib_f32_base64="AAAA")) for r in runs]
    refused(a, {"schema_version": 1, "runs": junk}, 413, ["per-token"])
    # within the limit it is taken; a blob inflating past its n is refused by the same bounded decoder
    assert push(a, runs[:8]).status_code == 200
    bomb = zlib.compress(b"\0" * (4 * N * 1000))
    bad = run_rec(exp, "rtn4", 20, 0.6)
    bad["per_token_kld"]["zlib_f32_base64"] = base64.b64encode(bomb).decode()
    refused(a, {"schema_version": 1, "runs": [bad]}, 422, ["runs[0].per_token_kld", f"n={N}"])
    # ... which `atlas import` (and so pull) uses too, with the same words
    with pytest.raises(LedgerError, match=f"x:1: run.per_token_kld: does not decompress to n={N}"):
        a["led"].import_lines([json.dumps(bad)], "x")


# ---- 4. ownership -----------------------------------------------------------------------------

def test_a_push_adds_runs_to_an_experiment_but_cannot_change_it(atlas):
    a, led, exp = atlas, atlas["led"], atlas["exp"]
    before = led.describe(exp)
    hijack = exp_rec(SPEC, exp, title="Owned", hypothesis="Something else entirely.", tags=["rtn", "mine", "spam"],
                     contributed_tags={"alice": ["forged"], "bob": ["bobs"]})
    r = push(a, [run_rec(exp, "rtn3", 0, 1.0), run_rec(exp, "rtn4", 0, 0.62)], [hijack], who="bob")
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["runs"], got["experiments"], got["experiments_existing"]) == (2, 0, 1)
    assert got["kept"] == {exp: ["title", "hypothesis", "tags"]}
    after = led.describe(exp)
    for key in ("title", "hypothesis", "spec", "tags", "contributor"):
        assert after[key] == before[key], key
    # bob's tags are his, shown as his; nobody can add tags in alice's name
    assert after["contributed_tags"] == {"bob": ["bobs", "mine", "spam"]}
    page = a["client"].get(f"/experiments/{exp}").text
    assert "· bob</small>" in page and "forged" not in page
    assert len(after["run_sets"]) == 2                                    # the runs did land
    routes_answer(a)


def test_an_imported_claim_is_shown_as_unverified_never_as_a_verdict(atlas):
    a = atlas
    row = {"type": "experiment", "id": "cexp_c1a1e5", "hypothesis": "Our secret sauce beats GPTQ by 40 %.",
           "imported": {"result": "success", "reproductions_column": "5/5"}}
    assert push(a, experiments=[row], who="bob").status_code == 200
    listed = {r["id"]: r for r in a["client"].get("/api/experiments").json()}["cexp_c1a1e5"]
    assert listed["result"] is None and listed["confidence"] is None
    assert (listed["claim"], listed["claim_status"]) == ("success", "imported claim, unverified")
    succ = a["client"].get("/api/experiments", params={"result": "success"}).json()
    assert "cexp_c1a1e5" not in {r["id"] for r in succ}
    assert "imported claim, unverified: success" in a["client"].get("/").text
    page = a["client"].get("/experiments/cexp_c1a1e5").text
    assert "imported claim, unverified: success" in page and 'class="badge success"' not in page
    # pushing it again with other words changes nothing
    before = snapshot(a["path"])
    again = push(a, experiments=[dict(row, hypothesis="Rewritten.", imported={"result": "failure"})], who="alice")
    assert again.status_code == 200 and again.json()["kept"] == {"cexp_c1a1e5": ["hypothesis"]}
    assert snapshot(a["path"]) == before
    routes_answer(a)


# ---- 5. specs ---------------------------------------------------------------------------------

def test_specs_on_push_are_validated_like_quantatlas_run(atlas):
    from quantatlas.spec import SpecError, parse_spec

    a = atlas

    def spec_message(spec):
        try:
            parse_spec(spec, "spec")
        except SpecError as e:
            return str(e)
        return None

    bad = copy.deepcopy(SPEC)
    bad["arms"]["rtn4"]["solver"] = "nope"
    msg = spec_message(bad)
    assert msg is not None
    reason = refused(a, {"schema_version": 1, "experiments": [exp_rec(bad, "cexp_00000009")]}, 422, [])
    assert reason == f"experiments[0] (cexp_00000009).spec: {msg}"
    # bits: 99 is refused exactly when `quantatlas run` refuses it, with its message
    b99 = copy.deepcopy(SPEC)
    b99["arms"]["rtn4"]["codec"] = {"uniform": {"bits": 99}}
    msg = spec_message(b99)
    assert msg == "spec: field arms.rtn4.codec.uniform.bits: Input should be less than or equal to 8 (value: 99)"
    body = {"schema_version": 1, "experiments": [exp_rec(b99, "cexp_00000099")]}
    assert refused(a, body, 422, []) == f"experiments[0] (cexp_00000099).spec: {msg}"


# ---- 6. reads never write ---------------------------------------------------------------------

def test_reads_never_write_and_verdicts_are_refreshed_on_write(atlas):
    a, led, exp = atlas, atlas["led"], atlas["exp"]
    v = {x["arm"]: x for x in led.verdicts(exp)}
    assert v["rtn4"]["result"] == "success"                           # deterministic RTN, one seed
    assert led.verdicts_current(exp)                                    # refreshed on push
    # a run written behind the cache's back: reads compute the fresh verdict and store nothing
    for arm in ("rtn3", "rtn4"):
        with led.write() as tx:
            tx.record(exp, arm, 1, {"kld_mean": 0.5, "bits_per_weight": 4.125}, tok(9.0, 1), ENV, "mh", "ef", "alice")
    assert not led.verdicts_current(exp)
    before = snapshot(a["path"])
    routes_answer(a)
    rows = {r["id"]: r for r in led.rows()}
    assert rows[exp]["verdict_stale"] is True
    assert {x["arm"]: x["n_seeds"] for x in led.verdicts(exp)}["rtn4"] == 2
    led.describe(exp)
    assert snapshot(a["path"]) == before
    # the next write refreshes the cache
    assert push(a, [run_rec(exp, "rtn3", 2, 1.0)]).json()["runs"] == 1
    assert not any(r["verdict_stale"] for r in led.rows())


# ---- 7. verdicts with few seeds, 12.7 primary arm ---------------------------------------------

def test_a_seeded_arm_with_one_seed_is_inconclusive_over_http(atlas):
    a = atlas
    r = push(a, [run_rec("cexp_00000005", "rtn4", 0, 1.0), run_rec("cexp_00000005", "had4", 0, 0.5)],
             [exp_rec(SEEDED, "cexp_00000005")])
    assert r.status_code == 200, r.text
    exp = r.json()["renamed"].get("cexp_00000005", "cexp_00000005")
    a["app"].state.refresher.wait_idle()
    d = a["client"].get(f"/api/experiments/{exp}").json()
    had = next(v for v in d["verdicts"] if v["arm"] == "had4")
    assert had["result"] == "inconclusive" and had["rule"] == "too_few_seeds"
    assert had["text"].startswith("inconclusive (too few seeds)")
    assert had["details"]["p_tokens"] < 1e-6                             # the token test alone would say success
    assert "(too few seeds)" in a["client"].get(f"/experiments/{exp}").text


def test_the_list_shows_the_primary_arm_never_fp16_against_the_control(tmp_path):
    frontier = {"title": "frontier", "hypothesis": "llama.cpp formats trace the frontier.", "model": "reference",
                "control": "q4", "arms": {"fp16": {"codec": None}, "q8": {"codec": "q8_0"}, "q4": {"codec": "q4_0"},
                                          "q3": {"codec": {"uniform": {"bits": 3}}}}}
    led = Ledger(f"sqlite:///{tmp_path / 'p.db'}")
    e = led.register_experiment(frontier)
    p = led.register_experiment(dict(frontier, title="with primary", primary="q3", model="hf:x/y"))
    for exp in (e, p):
        for arm, scale, bits in (("fp16", 0.0, 16.0), ("q8", 0.05, 8.5), ("q4", 1.0, 4.5), ("q3", 2.0, 3.1)):
            t = tok(scale, 0) if scale else np.zeros(N, np.float32)
            led.record_run(exp, arm, 0, {"kld_mean": float(t.mean(dtype=np.float64)), "bits_per_param": bits}, t,
                           ENV, "mh", "ef")
    rows = {r["id"]: r for r in led.rows()}
    assert rows[e]["primary"] == "q8" and rows[e]["key_metrics"].startswith("q8: KLD")
    assert "fp16" not in rows[e]["key_metrics"]
    assert rows[p]["primary"] == "q3" and rows[p]["key_metrics"].startswith("q3: KLD")
    led.close()


# ---- 9. one record model ----------------------------------------------------------------------

def test_push_and_import_share_one_record_model_and_its_messages(atlas):
    a, exp = atlas, atlas["exp"]
    bad = run_rec(exp, "rtn4", 3, 0.6, extra={"same_top": 1})
    reason = refused(a, {"schema_version": 1, "runs": [bad]}, 422, ["shadows the metric 'same_top'"])
    with pytest.raises(LedgerError, match="f:1: extra.same_top shadows the metric 'same_top'"):
        a["led"].import_lines([json.dumps(bad)], "f")
    assert "extra" in reason
    # export -> import round trip through the same model keeps every record (contributed tags too)
    push(a, experiments=[exp_rec(SPEC, exp, tags=["extra-tag"])], who="bob")
    lines = [json.dumps(r) for r in a["led"].export_records()]
    other = Ledger(f"sqlite:///{a['path'].parent / 'copy.db'}")
    other.import_lines(lines, "export")
    assert [json.dumps(r, sort_keys=True) for r in other.export_records()] == \
        [json.dumps(r, sort_keys=True) for r in a["led"].export_records()]
    other.close()


def test_figures_are_plotly_figure_objects_with_the_same_numbers_and_no_non_finite_points():
    from quantatlas.web.figures import kld_ecdf_figure, landscape_figure

    pts = [{"experiment": "e", "title": "t", "arm": a, "techniques": [], "n_runs": 1, "url": "/experiments/e",
            "llamacpp": a == "q4", "pareto": a != "b", "bits": b, "kld_mean": k}
           for a, b, k in (("a", 4.125, 0.02), ("b", 3.5, float("inf")), ("q4", 4.5, 0.015), ("c", 8.5, 0.001))]
    fig = landscape_figure({"points": pts, "frontier": [{"bits": 4.125, "kld_mean": 0.02},
                                                        {"bits": 8.5, "kld_mean": 0.001}]}, "bits_per_weight")
    text = json.dumps(fig, allow_nan=False)                   # strict JSON
    assert "template" not in fig["layout"] and fig["layout"]["yaxis"]["type"] == "log"
    arms = next(t for t in fig["data"] if t["name"] == "arms")
    assert (arms["x"], arms["y"]) == ([4.125, 8.5], [0.02, 0.001])      # the infinite point is left out
    assert [t["name"] for t in fig["data"]] == ["Pareto frontier", "arms", "llama.cpp formats (reference)"]
    assert "Infinity" not in text and "NaN" not in text
    ecdf = kld_ecdf_figure({"arms": [{"arm": "<b>x</b>", "x": [0.001, 0.01, float("nan")], "y": [0.5, 1.0, 1.0]}]})
    assert ecdf["data"][0]["x"] == [0.001, 0.01] and ecdf["data"][0]["y"] == [0.5, 1.0]
    assert ecdf["data"][0]["name"] == "&lt;b&gt;x&lt;/b&gt;" and ecdf["data"][0]["line"]["shape"] == "hv"
