"""Findings across architectures (issue 27, part 5): a spec naming several models (`models:`) is one
experiment per model with exactly the id, verdicts and reproductions of its `model: <name>` spelling;
the study is their family; the atlas shows each model's verdict, "holds on k of n architectures" with a
confidence that cannot overstate, groups the list by study, and filters and colours the landscape by
model family (the architecture each run recorded, stored on its run set; old rows: unknown).

Synthetic runs in a temporary SQLite ledger; no model is quantized here (the study runner's loop is
checked with a stand-in for run_spec)."""
import json
import re
import sqlite3
import textwrap

import numpy as np
import pytest
from fastapi.testclient import TestClient

from quantatlas.atlas import ids
from quantatlas.atlas.architecture import UNKNOWN, architecture_of
from quantatlas.atlas.ledger import Ledger, LedgerError
from quantatlas.atlas.records import RecordError, parse_line
from quantatlas.atlas.studies import ModelVerdict, format_study, holds_line, study
from quantatlas.atlas.verdict import own_model_confidence
from quantatlas.errors import UserError
from quantatlas.spec import SpecError, load_spec, parse_spec

SPEC = {
    "title": "GPTQ beats RTN at 4 bits", "hypothesis": "GPTQ lowers KLD against RTN at equal bits.",
    "tags": ["gptq"], "data": {"calib": {"samples": 16, "seq_len": 256}, "eval": {"tokens": 32768, "ctx": 512}},
    "seeds": [0, 1, 2], "control": "rtn4",
    "arms": {"rtn4": {"solver": "rtn", "codec": {"uniform": {"bits": 4, "group": 128}}},
             "gptq4": {"solver": "gptq", "codec": {"uniform": {"bits": 4, "group": 128}}}},
}
ZOO = ["reference", "reference-llama", "reference-moe"]
ENV = {"python": "3.11", "packages": {"numpy": "2"}, "git_commit": "abc", "device": "cpu", "hostname": "h",
       "platform": "Linux"}
N_TOK = 16 * 255


def synthetic(arm: str, seed: int, scale: float) -> tuple[dict, np.ndarray]:
    """Per-token KLD of one arm x seed: the same token difficulty scaled (rtn4 1.0; gptq4 `scale`)."""
    difficulty = np.random.default_rng(0).gamma(0.6, 0.02, N_TOK)
    tok = (difficulty * scale * np.random.default_rng([seed, len(arm), int(scale * 1000)]).lognormal(0, 0.1, N_TOK)
           ).astype(np.float32)
    return {"kld_mean": float(tok.mean(dtype=np.float64)), "bits_per_weight": 4.125, "bits_per_param": 4.6}, tok


def fill(led: Ledger, exp: str, model_hash: str, arch: str | None, gptq_scale: float, seeds=(0, 1, 2),
         refresh: bool = True) -> None:
    """Record the runs in one transaction and refresh the verdicts once (as an import does)."""
    def write(tx):
        for arm in ("rtn4", "gptq4"):
            for s in seeds:
                m, tok = synthetic(arm, s, 1.0 if arm == "rtn4" else gptq_scale)
                if arch is not None:
                    m["model_arch"] = arch
                tx.record(exp, arm, s, m, tok, ENV, model_hash, "eval-f", led.contributor)
    led.transact(write)
    if refresh:
        led.refresh_verdicts([exp])


# ---- the spec ------------------------------------------------------------------------------------

def test_models_runs_each_model_with_the_id_of_its_model_spelling():
    study_spec = parse_spec(dict(SPEC, models=ZOO))
    assert study_spec.is_study and study_spec.model_names() == ZOO
    assert parse_spec(study_spec.to_dict()) == study_spec           # a study's dump parses back (no `model:`)
    for name in ZOO:
        one = study_spec.for_model(name)
        alone = parse_spec(dict(SPEC, model=name))
        assert ids.normalise_spec(one.to_dict()) == ids.normalise_spec(alone.to_dict())
        assert one.spec_hash() == alone.spec_hash() and "models" not in one.to_dict()
        assert ids.family_hash(one.identity()) == ids.family_hash(parse_spec(dict(SPEC, model="x/y")).identity())
    # a spec with `model:` keeps its id: `models` is in no dump while unset
    assert "models" not in parse_spec(dict(SPEC, model="reference-llama")).to_dict()
    assert parse_spec(dict(SPEC)).spec_hash() == parse_spec(dict(SPEC, model="reference")).spec_hash()


@pytest.mark.parametrize("extra, says", [
    ({"models": ZOO, "model": "reference"}, "field models: give either `model:`"),
    ({"models": []}, "field models: an empty list"),
    ({"models": ["reference", "reference-llama", "reference"]}, "'reference' named more than once"),
    ({"models": "reference"}, "field models: Input should be a valid list"),
    ({"models": ["reference", 3]}, "field models.1"),
])
def test_a_bad_models_list_is_refused_naming_the_field(extra, says):
    with pytest.raises(SpecError, match="field models") as e:
        parse_spec(dict(SPEC, **extra))
    assert says in str(e.value)


def test_an_unknown_model_name_is_refused_by_its_line_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "s.yaml"
    f.write_text(textwrap.dedent("""\
        title: t
        models:
          - reference
          - refernce-llama
        arms: {fp: {codec: null}}
        """))
    with pytest.raises(SpecError) as e:
        load_spec(f)
    assert str(e.value).startswith(f"{f}:4: field models.1: 'refernce-llama' is not an embedded model")
    assert e.value.field == "models.1"
    f.write_text("title: t\nmodels: [reference, hf:Qwen/Qwen3-0.6B, org/name]\narms: {fp: {codec: null}}\n")
    assert load_spec(f).models == ["reference", "hf:Qwen/Qwen3-0.6B", "org/name"]


def test_a_study_is_never_registered_as_one_experiment(tmp_path):
    with pytest.raises(ValueError, match="field models: a study"):
        ids.normalise_spec(dict(SPEC, models=ZOO))
    with Ledger(f"sqlite:///{tmp_path / 'a.db'}") as led, pytest.raises(ValueError, match="field models"):
        led.register_experiment(dict(SPEC, models=ZOO))


def test_the_runner_refuses_a_study_and_the_study_runs_each_models_spelling(tmp_path, monkeypatch):
    from quantatlas import study as study_mod
    from quantatlas.runner import Sweep

    with pytest.raises(UserError, match="field models: a study of 3 models"):
        Sweep(dict(SPEC, models=ZOO), ledger=False)
    seen = []

    def fake_run_spec(spec, json_path, **kw):    # stands in for quantizing: records what each model ran
        seen.append((spec.model, spec.spec_hash(), json_path))
        doc = {"model": spec.model, "experiment_id": ids.experiment_id(ids.spec_hash(spec.identity())), "arms": {}}
        json_path.write_text(json.dumps(doc))
        return doc

    monkeypatch.setattr("quantatlas.runner.run_spec", fake_run_spec)
    out = tmp_path / "r.json"
    doc = study_mod.run_study(dict(SPEC, models=ZOO[:2]), out, ledger=False)
    assert [m for m, _, _ in seen] == ZOO[:2]
    assert [h for _, h, _ in seen] == [parse_spec(dict(SPEC, model=m)).spec_hash() for m in ZOO[:2]]
    assert [p.name for _, _, p in seen] == ["r.reference.json", "r.reference-llama.json"]
    stored = json.loads(out.read_text())
    assert stored["study"] == ids.family_hash(parse_spec(dict(SPEC, model="a/b")).identity())
    assert stored["models"] == ZOO[:2] and set(stored["results"]) == set(ZOO[:2])
    assert stored["results"]["reference-llama"]["model"] == "reference-llama"
    assert stored["study_verdicts"] is None           # no ledger: no verdicts
    assert [p.name for p in study_mod.model_files(out, ["hf:a/b", "hf_a_b", "./m"]).values()] == \
        ["r.hf_a_b.json", "r.2-hf_a_b.json", "r.m.json"]
    # a one-model spec is run_spec's own document, as before
    seen.clear()
    assert study_mod.run_study(dict(SPEC, model="reference-llama"), out, ledger=False)["model"] == "reference-llama"
    assert seen[0][2] == out


def test_an_arm_refused_on_a_later_model_stops_the_study_before_the_first_runs(tmp_path, monkeypatch):
    """An override of a dense-MLP role matches nothing on reference-moe: refused there, and that is found before
    reference runs."""
    from quantatlas import study as study_mod

    ran = []
    monkeypatch.setattr("quantatlas.runner.run_spec",
                        lambda spec, json_path, **kw: ran.append(spec.model) or {"model": spec.model})
    spec = dict(SPEC, models=["reference", "reference-moe"],
                arms={**SPEC["arms"], "eq": {"codec": {"uniform": {"bits": 4}},
                                             "overrides": [{"match": "down", "codec": {"uniform": {"bits": 8}}}]}})
    with pytest.raises(UserError, match=r"arms\.eq\.overrides\.0\.match: 'down' .*matches no tensor") as e:
        study_mod.run_study(spec, tmp_path / "r.json", ledger=False)
    assert e.value.field.startswith("arms.eq.overrides") and ran == []
    spec["models"] = ["reference", "reference-llama"]        # both take it: nothing refused, both run
    study_mod.run_study(spec, tmp_path / "r.json", ledger=False)
    assert ran == ["reference", "reference-llama"]


# ---- the model's architecture, stored ------------------------------------------------------------

def test_the_architecture_is_stored_on_the_run_set_and_old_rows_read_unknown(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    with Ledger(url) as led:
        a = led.register_experiment(dict(SPEC, model="reference-llama"))
        fill(led, a, "mh-llama", None, 0.8, seeds=(0,))            # stored before architectures were
        assert [rs.model_arch for rs in led.run_sets(a)] == [None]
        with led.read() as q:
            assert study(q, led.verdict_cache, q.experiment(a))["models"][0]["architecture"] == UNKNOWN
        fill(led, a, "mh-llama", "llama", 0.8, seeds=(1,))        # a new run teaches its run set its own
        assert [rs.model_arch for rs in led.run_sets(a)] == ["llama"]
        m, tok = synthetic("rtn4", 2, 1.0)
        with pytest.raises(LedgerError, match="recorded as 'llama'"):
            led.record_run(a, "rtn4", 2, dict(m, model_arch="qwen3"), tok, ENV, "mh-llama", "eval-f")
        with pytest.raises(LedgerError, match="not an architecture name"):
            led.record_run(a, "rtn4", 2, dict(m, model_arch="x" * 65), tok, ENV, "mh-llama", "eval-f")
    db = sqlite3.connect(tmp_path / "a.db")
    assert db.execute("SELECT model_arch FROM run_set").fetchall() == [("llama",)]
    db.close()
    assert architecture_of([None, None]) == UNKNOWN and architecture_of(["llama", None]) == "llama"
    assert architecture_of(["llama", "qwen3"]) == UNKNOWN      # one name, two models: not counted as either


@pytest.mark.parametrize("arch, says", [(7, "must be a string"), ("", "not an architecture name"),
                                        ("qwen3<script>", "not an architecture name"),
                                        ("a" * 5000, "not an architecture name"), ("unknown", "not an architecture")])
def test_a_pushed_architecture_is_checked(arch, says):
    line = {"type": "run", "experiment": "cexp_12345678", "arm": "a", "seed": 0, "environment": {},
            "model_hash": "m", "eval_fingerprint": "e", "metrics": {"kld_mean": 0.1}, "extra": {"model_arch": arch}}
    with pytest.raises(RecordError, match=says):
        parse_line(json.dumps(line))
    assert parse_line(json.dumps(dict(line, extra={"model_arch": "qwen3_moe"}))).extra == {"model_arch": "qwen3_moe"}


# ---- holds on k of n architectures ---------------------------------------------------------------

def test_holds_counts_architectures_and_its_confidence_is_the_least_own():
    v = [ModelVerdict("reference", "qwen3", "success", 0.6), ModelVerdict("reference-llama", "llama", "success", 0.4),
         ModelVerdict("reference-moe", "qwen3_moe", "failure", 0.7), ModelVerdict("hf:a/b", "qwen3", "success", 0.5)]
    h = holds_line(v)
    assert (h["architectures_holding"], h["architectures"], h["models_holding"], h["models"]) == (2, 3, 3, 4)
    assert h["holding_architectures"] == ["qwen3", "llama"] and h["confidence"] == 0.4
    assert h["text"].startswith("holds on 2 of 3 architectures (qwen3, llama; 3 of 4 models), confidence 0.40")
    # an architecture holds only where every one of its models does
    h = holds_line(v + [ModelVerdict("hf:c/d", "llama", "inconclusive", 0.05)])
    assert h["holding_architectures"] == ["qwen3"]
    # models of unknown architecture count among the models, never as architectures; pending ones not at all
    h = holds_line([ModelVerdict("a", UNKNOWN, "success", 0.7), ModelVerdict("b", UNKNOWN, "success", 0.7),
                    ModelVerdict("c", "llama", None, None)])
    assert (h["architectures"], h["models_holding"], h["models"], h["pending"]) == (0, 2, 2, 1)
    assert "2 models of unknown architecture" in h["text"]
    assert holds_line([ModelVerdict("a", "qwen3", "failure", 0.9)])["confidence"] is None
    # reference points only (every result "baseline"): the line reads "the hypothesis is not judged: ...", not "holds on 0"
    h = holds_line([ModelVerdict("a", "qwen3", "baseline", 0.9), ModelVerdict("b", "llama", "baseline", 0.9)])
    assert h["baseline"] and h["text"] == "is not judged: a baseline on 2 architectures, 2 models"
    assert not holds_line(v)["baseline"]


def test_the_study_confidence_never_overstates():
    """Adding a model where it holds never raises the study's confidence, and it is never above the
    confidence of any model where it holds (random verdicts, 300 draws)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 6))
        vs = [ModelVerdict(f"m{i}", ["qwen3", "llama", "qwen3_moe", UNKNOWN][int(rng.integers(4))],
                           ["success", "failure", "inconclusive", None][int(rng.integers(4))],
                           round(float(rng.uniform(0.1, 0.95)), 3)) for i in range(n)]
        h = holds_line(vs)
        holding = [v for v in vs if v.result == "success"]
        if not holding:
            assert h["confidence"] is None
            continue
        assert all(h["confidence"] <= v.confidence_own for v in holding)
        more = holds_line(vs + [ModelVerdict("new", "llama", "success", round(float(rng.uniform(0.1, 0.95)), 3))])
        assert more["confidence"] <= h["confidence"]
        assert more["architectures_holding"] <= h["architectures_holding"] + 1


def test_own_confidence_leaves_the_other_models_out_of_k(tmp_path):
    """The per-model confidence counts the other models where it holds (confidence.py k); the study's line
    takes each model's confidence from its own runs: the same as the model's alone, below the counted one."""
    with Ledger(f"sqlite:///{tmp_path / 'a.db'}") as led:
        alone = led.register_experiment(dict(SPEC, model="reference", title="alone"))
        fill(led, alone, "mh-q", "qwen3", 0.8)
        solo = {v["arm"]: v for v in led.verdicts(alone)}["gptq4"]
    with Ledger(f"sqlite:///{tmp_path / 'b.db'}") as led:
        exps = {m: led.register_experiment(dict(SPEC, model=m)) for m in ZOO}
        for (m, e), arch in zip(exps.items(), ("qwen3", "llama", "qwen3_moe")):
            fill(led, e, "mh-" + m, arch, 0.8, refresh=False)
        led.refresh_verdicts()
        v = {x["arm"]: x for x in led.verdicts(exps["reference"])}["gptq4"]
        assert v["result"] == "success" and v["models"] == 3
        assert v["confidence_own"] == solo["confidence"] < v["confidence"]
        # a verdict cached before `confidence_own` was kept: recomputed from its terms, the same value
        details = led.describe(exps["reference"])["verdicts"][1]["details"]
        assert own_model_confidence({k: x for k, x in v.items() if k != "confidence_own"}, details) == \
            pytest.approx(solo["confidence"], abs=0.002)
        with led.read() as q:
            s = study(q, led.verdict_cache, q.experiment(exps["reference-llama"]))
    assert [m["model"] for m in s["models"]] == ZOO
    assert [m["architecture"] for m in s["models"]] == ["qwen3", "llama", "qwen3_moe"]
    assert s["holds"]["text"].startswith("holds on 3 of 3 architectures (qwen3, llama, qwen3_moe; 3 of 3 models)")
    assert s["holds"]["confidence"] == min(m["confidence_own"] for m in s["models"]) <= solo["confidence"]
    assert [a["arm"] for a in s["arms"]] == ["gptq4"]
    assert "the hypothesis holds on 3 of 3 architectures" in format_study(s)
    # no `primary:` in the spec: the line says which arm it judged (each model's best treatment), never more
    assert s["holds"]["judged_on"] == ["gptq4"] and "judged on arm gptq4, each model's best treatment" in s["holds"]["text"]


def test_a_study_with_a_primary_arm_says_nothing_more(tmp_path):
    with Ledger(f"sqlite:///{tmp_path / 'p.db'}") as led:
        exps = {m: led.register_experiment(dict(SPEC, model=m, primary="gptq4")) for m in ZOO[:2]}
        for (m, e), arch in zip(exps.items(), ("qwen3", "llama")):
            fill(led, e, "mh-" + m, arch, 0.8, refresh=False)
        led.refresh_verdicts()
        with led.read() as q:
            s = study(q, led.verdict_cache, q.experiment(exps["reference"]))
    assert s["holds"]["text"].startswith("holds on 2 of 2 architectures")
    assert "judged on" not in s["holds"]["text"] and "judged_on" not in s["holds"]


# ---- the atlas pages -----------------------------------------------------------------------------

@pytest.fixture
def zoo_atlas(tmp_path):
    url = f"sqlite:///{tmp_path / 'atlas.db'}"
    with Ledger(url) as led:
        exps = {m: led.register_experiment(dict(SPEC, model=m)) for m in ZOO}
        for (m, e), arch, scale in zip(exps.items(), ("qwen3", "llama", "qwen3_moe"), (0.8, 0.8, 1.3)):
            fill(led, e, "mh-" + m, arch, scale, refresh=False)
        other = led.register_experiment(dict(SPEC, title="RTN 3 vs 4", hypothesis="Three bits cost KLD.",
                                             arms={"rtn4": SPEC["arms"]["rtn4"],
                                                   "gptq4": {"solver": "rtn", "codec": {"uniform": {"bits": 3}}}}))
        fill(led, other, "mh-old", None, 1.5, seeds=(0,), refresh=False)       # stored before architectures
        led.refresh_verdicts()
    return url, exps, other


def test_the_experiment_page_shows_each_models_verdict_and_the_line(zoo_atlas):
    url, exps, other = zoo_atlas
    with TestClient(__import__("quantatlas.web", fromlist=["create_app"]).create_app(url)) as client:
        d = client.get(f"/api/experiments/{exps['reference-llama']}").json()
        assert [(m["model"], m["architecture"], m["result"]) for m in d["study"]["models"]] == \
            [("reference", "qwen3", "success"), ("reference-llama", "llama", "success"),
             ("reference-moe", "qwen3_moe", "failure")]
        line = d["study"]["holds"]["text"]
        assert line.startswith("holds on 2 of 3 architectures (qwen3, llama; 2 of 3 models), confidence")
        page = client.get(f"/experiments/{exps['reference-llama']}").text
        assert "Across models" in page and line.replace("'", "&#39;") in page
        assert client.get(f"/api/experiments/{other}").json()["study"] is None   # one model: no study


def test_atlas_show_prints_each_models_verdict_and_the_line(zoo_atlas):
    """`quantatlas atlas show` of one model's experiment ends with its study, as `run` prints it."""
    from quantatlas.atlas.cli import format_show

    url, exps, other = zoo_atlas
    with Ledger(url) as led:
        d = led.describe(exps["reference-moe"])
        text = format_show(d)
        assert d["study"]["holds"]["text"].startswith("holds on 2 of 3 architectures (qwen3, llama; 2 of 3 models)")
        assert text.endswith(format_study(d["study"]))
        assert f"the hypothesis {d['study']['holds']['text']}" in text
        for m, arch, result in (("reference", "qwen3", "success"), ("reference-moe", "qwen3_moe", "failure")):
            assert any(line.split()[:2] == [m, arch] and result in line.split() for line in text.splitlines())
        lone = led.describe(other)
        assert lone["study"] is None and "study " not in format_show(lone)


def test_the_list_groups_by_study(zoo_atlas):
    url, exps, other = zoo_atlas
    from quantatlas.web import create_app

    with TestClient(create_app(url)) as client:
        rows = client.get("/api/experiments").json()
        assert len(rows) == 4 and "rows" not in rows[0]                          # ungrouped: as before
        groups = client.get("/api/experiments", params={"group": "study"}).json()
        fam = {tuple(sorted(r["id"] for r in g["rows"])): g for g in groups}
        zoo = fam[tuple(sorted(exps.values()))]
        assert zoo["holds"]["architectures"] == 3 and sorted(zoo["models"]) == sorted(ZOO)
        assert fam[(other,)]["holds"] is None
        assert client.get("/api/experiments", params={"group": "nope"}).status_code == 422
        page = client.get("/", params={"group": "study"}).text
        assert page.count('class="study-head"') == 2 and "holds on 2 of 3 architectures" in page


def test_the_landscape_is_filtered_and_coloured_by_model_family(zoo_atlas):
    url, exps, other = zoo_atlas
    from quantatlas.web import create_app
    from quantatlas.web.figures import FAMILY_COLOURS

    with TestClient(create_app(url)) as client:
        data = client.get("/api/landscape").json()
        assert sorted(g["family"] for g in data["groups"]) == ["llama", "qwen3", "qwen3_moe", "unknown"]
        only = client.get("/api/landscape", params={"family": "llama"}).json()
        assert [g["family"] for g in only["groups"]] == ["llama"] and only["family"] == "llama"
        assert [g["model_hash"] for g in only["groups"]] == ["mh-reference-llama"]
        assert client.get("/api/landscape", params={"family": "x" * 65}).status_code == 422
        assert client.get("/api/landscape", params={"family": "<b>"}).status_code == 422
        page = client.get("/landscape", params={"family": "qwen3_moe"}).text
        assert f'style="color: {FAMILY_COLOURS["qwen3_moe"]}"' in page and "● qwen3_moe" in page
        figure = json.loads(re.search(r'<script type="application/json" id="landscape-1-data">(.*?)</script>',
                                      page, re.S).group(1))
        arms = next(t for t in figure["data"] if t["name"] == "arms")
        assert arms["marker"]["color"] == FAMILY_COLOURS["qwen3_moe"] != FAMILY_COLOURS["llama"]
        csv = client.get("/download/landscape.csv", params={"family": "llama"}).text
        assert "group.family" in csv.splitlines()[0] and "mh-reference-llama" in csv


def test_the_command_line_refuses_a_bad_study_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from quantatlas.cli import app

    monkeypatch.chdir(tmp_path)
    f = tmp_path / "s.yaml"
    f.write_text("title: t\nmodel: reference\nmodels: [reference, reference-llama]\narms: {fp: {codec: null}}\n")
    out = CliRunner().invoke(app, ["run", str(f), "--quiet"])
    assert out.exit_code == 2 and out.stderr.strip() == \
        f"error: {f}:3: field models: give either `model:` (one model) or `models:` (a study of several), not " \
        "both; model: 'reference' (value: ['reference', 'reference-llama'])"
    f.write_text("title: t\nmodels: [reference, reference-llama]\narms: {fp: {codec: null}}\n")
    out = CliRunner().invoke(app, ["export", str(f), "--arm", "fp", "--out", str(tmp_path / "x.gguf")])
    assert out.exit_code == 2 and out.stderr.startswith(f"error: {f}:2: field models: export works on one model")
