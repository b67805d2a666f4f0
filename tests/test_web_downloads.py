"""CSV and JSON downloads of every table the pages show (issue 24 part 10): each page links its
tables' downloads; each CSV parses with the csv module, has a header row and the JSON download's
rows; the values are the JSON twins' (/api/...) numbers, unformatted."""
import csv
import io
import re

import pytest
from fastapi.testclient import TestClient
from test_web_api import ENV, build_atlas

from quantatlas.atlas.ledger import Ledger
from quantatlas.web import create_app

SENS_ROWS = [{"group": "layers.0.mlp.down", "candidate": "q8_0", "delta_kld": -0.00125, "delta_kld_se": 1e-4,
              "delta_bpw": 0.0625, "roi": 0.02},
             {"group": "layers.1.attn.v", "candidate": "q6_k", "delta_kld": -3.5e-05, "delta_kld_se": 2e-6,
              "delta_bpw": 0.03125, "roi": 0.00112}]
FORMULA_TITLE = '=HYPERLINK("http://x.example","click")'


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('dl') / 'atlas.db'}"
    ids = build_atlas(url)
    with Ledger(url, contributor="alice") as led:
        led.record_sensitivity(ids["hadamard"], "rtn4", 0, {"base": "uniform b4", "grouping": "tensor",
                                                            "kld_base": 0.0123, "calib_tokens": 4096,
                                                            "forward_passes": 9}, SENS_ROWS, "mh-ref")
        ids["formula"] = led.register_experiment({"title": FORMULA_TITLE, "hypothesis": "+1 for spreadsheets",
                                                  "model": "reference", "seeds": [0],
                                                  "arms": {"rtn2": {"codec": {"uniform": {"bits": 2}}}}})
        led.record_run(ids["formula"], "rtn2", 0, {"kld_mean": 0.5, "bits_per_weight": 2.125}, None, ENV,
                       "mh-ref", "eval-1")
    with TestClient(create_app(url)) as client:
        yield client, ids


def as_csv_text(v) -> str:
    """How the CSV writes a JSON value (the module's rule, restated): null empty, booleans
    true/false, numbers as Python's repr, text starting like a formula behind a '."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return "'" + v if v.startswith(("=", "+", "-", "@", "\t", "\r")) else v


def download(client, path: str, params=None) -> tuple[list[dict], list[list[str]]]:
    """(the JSON rows, the CSV rows with the header first) of one table; checks they agree."""
    j = client.get(f"/download/{path}.json", params=params)
    c = client.get(f"/download/{path}.csv", params=params)
    assert j.status_code == 200 and c.status_code == 200, (path, j.text[:300], c.text[:300])
    assert c.headers["content-type"].startswith("text/csv") and j.headers["content-type"] == "application/json"
    assert c.headers["content-disposition"].startswith("attachment;") and ".csv" in c.headers["content-disposition"]
    rows = j.json()
    table = list(csv.reader(io.StringIO(c.text, newline="")))
    assert table, path
    header, body = table[0], table[1:]
    assert len(body) == len(rows), path
    for r in rows:
        assert list(r) == header, path                                # every JSON row has every column, in order
    for r, line in zip(rows, body):
        assert line == [as_csv_text(v) for v in r.values()], (path, r, line)
        for v, text in zip(r.values(), line):
            if isinstance(v, float):
                assert float(text) == v                               # numbers unformatted: exact round trip
    return rows, table


def by(rows, *keys):
    return {tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]]: r for r in rows}


def test_the_list_download_is_the_list_with_its_filters(atlas):
    client, ids = atlas
    api = client.get("/api/experiments").json()
    rows, table = download(client, "experiments")
    assert [r["id"] for r in rows] == [r["id"] for r in api]          # the page's order, newest first
    assert table[0][:7] == ["id", "title", "hypothesis", "model", "tags", "result", "confidence"]
    mine = by(rows, "id")
    for a in api:
        r = mine[a["id"]]
        assert (r["result"], r["confidence"], r["primary"], r["key_metrics"]) == \
            (a["result"], a["confidence"], a.get("primary"), a.get("key_metrics"))
        assert r["tags"] == "; ".join(a["tags"])
        if a.get("primary"):
            verdict = next(v for v in a["arms"] if v["arm"] == a["primary"])
            assert r["primary.effect"] == verdict["effect"]
            assert r["primary.kld_mean"] == a["metrics"][a["primary"]]["kld_mean"]
    gptq, _ = download(client, "experiments", {"tag": "gptq", "q": "qwen"})
    assert [r["id"] for r in gptq] == [r["id"] for r in client.get("/api/experiments",
                                                                    params={"tag": "gptq", "q": "qwen"}).json()]
    assert [r["id"] for r in gptq] == [ids["qwen"]]
    none, table = download(client, "experiments", {"tag": "no-such-tag"})
    assert none == [] and table[0][0] == "id"                         # an empty table still has its header


def test_an_experiments_verdicts_arms_and_runs_downloads(atlas):
    client, ids = atlas
    exp = ids["hadamard"]
    api = client.get(f"/api/experiments/{exp}").json()
    verdicts, _ = download(client, f"experiments/{exp}/verdicts")
    assert [v["arm"] for v in verdicts] == [v["arm"] for v in api["verdicts"]]
    for v, a in zip(verdicts, api["verdicts"]):
        assert (v["result"], v["effect"], v["p_value"], v["p_adjusted"], v["confidence"], v["text"]) == \
            (a["result"], a["effect"], a["p_value"], a["p_adjusted"], a["confidence"], a["text"])
        assert [v["ci_low"], v["ci_high"]] == (a["ci"] or [None, None])
        assert v["primary"] == (a["arm"] == api.get("primary"))
    arms, _ = download(client, f"experiments/{exp}/arms")
    assert [(a["arm"], a["control"]) for a in arms] == [(a["arm"], a["control"]) for a in api["arms_config"]]
    assert arms[1]["techniques"] == "; ".join(api["arms_config"][1]["techniques"])
    runs, _ = download(client, f"experiments/{exp}/runs")
    want = [(i, r["arm"], r["seed"], r["metrics"]["kld_mean"]) for i, rs in enumerate(api["run_sets"], 1)
            for r in rs["runs"]]
    assert [(r["run_set"], r["arm"], r["seed"], r["kld_mean"]) for r in runs] == want and len(want) == 12
    second, _ = download(client, f"experiments/{exp}/runs", {"run_set": 2})
    assert {r["contributor"] for r in second} == {"bob"} and len(second) == 6
    assert client.get("/download/experiments/cexp_nope/verdicts.csv").status_code == 404
    assert client.get(f"/download/experiments/{exp}/verdicts.xlsx").status_code == 422
    assert client.get(f"/download/experiments/{exp}/secrets.csv").status_code == 422


def test_landscape_composition_left_to_try_and_sensitivity_downloads(atlas):
    client, ids = atlas
    land = client.get("/api/landscape").json()
    points, _ = download(client, "landscape")
    want = [(i, g["model_hash"], p["experiment"], p["arm"], p["bits"], p["kld_mean"], drawn)
            for i, g in enumerate(land["groups"], 1) for drawn, key in ((True, "points"), (False, "not_drawn"))
            for p in g[key]]
    assert [(r["group"], r["group.model_hash"], r["experiment"], r["arm"], r["bits"], r["kld_mean"], r["drawn"])
            for r in points] == want
    assert {r["bits_metric"] for r in points} == {"bits_per_weight"}
    first, _ = download(client, "landscape", {"group": 1, "bits": "bits_per_param"})
    assert {r["group"] for r in first} == {1} and {r["bits_metric"] for r in first} == {"bits_per_param"}

    comp = client.get("/api/composition").json()
    cells, _ = download(client, "composition")
    assert [(c["a"], c["b"], c["success"], c["failure"], c["inconclusive"], c["conflict"]) for c in cells] == \
        [(c["a"], c["b"], c["success"], c["failure"], c["inconclusive"], c["conflict"]) for c in comp["cells"]]

    left = client.get("/api/left-to-try").json()
    untried, _ = download(client, "left-to-try/untried_pairs")
    assert [(r["a"], r["b"]) for r in untried] == [(p["a"], p["b"]) for p in left["untried_pairs"]]
    budgets, _ = download(client, "left-to-try/technique_budgets")
    assert [r["covered"] for r in budgets] == ["; ".join(map(str, t["covered"])) for t in left["technique_budgets"]]
    download(client, "left-to-try/pair_budget_gaps")
    suggestions, _ = download(client, "left-to-try/suggestions", {"limit": 3})
    assert [r["rank"] for r in suggestions] == [x["rank"] for x in client.get("/api/left-to-try",
                                                                              params={"limit": 3}).json()["suggestions"]]
    assert len(suggestions) == 3
    effects, _ = download(client, "left-to-try/model.effects")
    assert [(r["technique"], r["mean"]) for r in effects] == [(e["technique"], e["mean"]) for e in left["model"]["effects"]]
    r = client.get("/download/left-to-try/nothing.csv")
    assert r.status_code == 404 and "untried_pairs" in r.text

    sens, table = download(client, "sensitivity")
    assert [(r["rank"], r["group"], r["delta_kld"], r["roi"]) for r in sens] == \
        [(i, x["group"], x["delta_kld"], x["roi"]) for i, x in enumerate(SENS_ROWS, 1)]
    assert table[1][table[0].index("delta_kld")] == "-0.00125"        # negative numbers are numbers, not formulas
    api = client.get("/api/sensitivity").json()
    assert {r["measurement"] for r in sens} == {api[0]["id"]} and sens[0]["experiment_id"] == ids["hadamard"]
    assert download(client, "sensitivity", {"measurement": api[0]["id"] + 1})[0] == []


def test_text_a_spreadsheet_would_run_as_a_formula_is_quoted_in_the_csv_only(atlas):
    client, ids = atlas
    rows, table = download(client, "experiments")
    row = by(rows, "id")[ids["formula"]]
    assert row["title"] == FORMULA_TITLE and row["hypothesis"] == "+1 for spreadsheets"
    line = next(line for line in table[1:] if line[0] == ids["formula"])
    assert line[1] == "'" + FORMULA_TITLE and line[2] == "'+1 for spreadsheets"


def test_every_page_links_each_of_its_tables_downloads(atlas):
    client, ids = atlas
    exp = client.get(f"/api/experiments/{ids['hadamard']}").json()
    left = client.get("/api/left-to-try").json()
    pages = {"/": 1, f"/experiments/{ids['hadamard']}": 2 + len(exp["run_sets"]),
             "/landscape": len(client.get("/api/landscape").json()["groups"]), "/composition": 1,
             "/left-to-try": 1 + sum(bool(x) for x in (left["suggestions"], left["model"]["effects"],
                                                       left["untried_pairs"], left["pair_budget_gaps"])),
             "/sensitivity": len(client.get("/api/sensitivity").json())}
    assert pages["/left-to-try"] == 5 and pages["/landscape"] == 2 and pages[f"/experiments/{ids['hadamard']}"] == 4
    for page, tables in pages.items():
        html = client.get(page).text
        links = [h.replace("&amp;", "&") for h in re.findall(r'href="(/download/[^"]+)"', html)]
        assert len(links) == 2 * tables, (page, links)
        assert len([h for h in links if ".csv" in h]) == tables
        for h in links:
            r = client.get(h)
            assert r.status_code == 200 and "attachment" in r.headers["content-disposition"], (page, h)
    # a link keeps the page's filters
    html = client.get("/", params={"tag": "gptq", "q": "qwen"}).text
    assert 'href="/download/experiments.csv?tag=gptq&amp;q=qwen"' in html
    html = client.get("/landscape", params={"technique": "solver:gptq"}).text
    assert "/download/landscape.csv?bits=bits_per_weight&amp;technique=solver%3Agptq&amp;group=1" in html
