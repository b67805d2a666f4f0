"""Techniques are complete and the landscape is one plot per model and eval stream (issue 24, parts 4
and 6): option labels read from the typed configs (solver, codec, transform, KV-cache, activation,
recovery and allocation options), their compatibility rules, a composition matrix with an incoherence
column, and landscape plots that join runs of one model, eval source, ctx and scoring whatever their
token counts, each point with its SE, tokens and label, filtered by technique."""
import json
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient

from quantatlas.atlas.ledger import Ledger
from quantatlas.web import create_app
from quantatlas.web.landscape import composition, landscape, with_technique
from quantatlas.web.techniques import compatible, is_option, kind, option_parts, techniques

ENV = {"python": "3.11.7", "packages": {"numpy": "2.4"}, "git_commit": "abc", "device": "cpu", "hostname": "h",
       "platform": "Linux"}


# ---- option labels --------------------------------------------------------------------------------

@pytest.mark.parametrize("config, labels", [
    # incoherence on RTN and on GPTQ is one label: it composes with any codec
    ({"codec": {"e8p": {"bits": 2}}, "solver_options": {"incoherence": True}}, {"codec:e8p", "solver.incoherence"}),
    ({"solver": "gptq", "codec": {"uniform": {"bits": 4, "group": None}},
      "solver_options": {"incoherence": True, "act_order": True, "static_groups": False}},
     {"solver:gptq", "codec:uniform", "solver.incoherence", "solver.act_order", "codec.group=none",
      "propagation=layer"}),
    # a switch turned off, a choice, a dropped default; block_size and damp are settings, not techniques
    ({"solver": "gptq", "codec": {"uniform": {"bits": 3, "clip": "mse", "symmetric": False}},
      "solver_options": {"act_order": False, "static_groups": False, "importance_from_hessian": False,
                         "block_size": 256, "damp": 0.1}, "propagation": "parallel", "include_head": True},
     {"solver:gptq", "codec:uniform", "solver.no_importance_from_hessian", "codec.clip=mse", "codec.no_symmetric",
      "propagation=parallel", "include_head"}),
    # KV-cache sub-choices: codecs, placement, granularity, rotation, residual window, sinks (not its seed)
    ({"kv": {"k": "q4_0", "v": {"uniform": {"bits": 4}}, "placement": "pre_rope", "k_granularity": "channel",
             "residual": 32, "sinks": 4, "rotate": True, "rotation_seed": 7, "group_tokens": 64}},
     {"kv", "kv.k=q4_0", "kv.v=uniform", "kv.placement=pre_rope", "kv.k_granularity=channel", "kv.residual",
      "kv.sinks", "kv.rotate"}),
    ({"codec": {"uniform": {"bits": 4}}, "act": {"codec": {"uniform": {"bits": 8, "group": None}},
                                                 "roles": ["v", "q", "k"], "layers": [0, 3]}},
     {"codec:uniform", "act", "act.codec=uniform", "act.roles=k+q+v", "act.layers"}),
    ({"codec": {"uniform": {"bits": 4, "scale": "absmax"}}, "act": "W8A8"}, {"codec:uniform", "act", "act.scheme=W8A8"}),
    ({"codec": "q4_0", "recovery": {"method": "block_ap", "train": "weights", "steps": 50},
      "allocate": {"candidates": ["q6_k"], "target": {"bits_per_weight": 5}, "grouping": "role"}},
     {"codec:q4_0", "recovery:block_ap", "recovery.train=weights", "allocate", "allocate.grouping=role"}),
    ({"codec": {"uniform": {"bits": 4, "scale": "absmax"}},
      "transforms": [{"hadamard": {"residual": False}}, {"awq": {"codec": "q4_0"}}]},
     {"codec:uniform", "transform:hadamard", "transform:hadamard.no_residual", "transform:awq",
      "transform:awq.codec=q4_0"}),
    ({"codec": {"gguf": {"ftype": "Q4_K_M", "imatrix": True}}}, {"gguf:Q4_K_M", "codec.imatrix"}),
    ({"codec": {"trellis": {"bits": 2, "code": "3inst", "L": 12, "table_seed": 5}}},
     {"codec:trellis", "codec.code=3inst"}),
    # every option at its first default: the named techniques only
    ({"solver": "gptq", "codec": {"uniform": {"bits": 4, "group": 128, "symmetric": True, "clip": "minmax",
                                              "scale": "absmax"}}, "propagation": "sequential",
      "solver_options": {"act_order": False, "static_groups": False}, "transforms": [{"hadamard": {}}],
      "kv": {"k": "q8_0", "placement": "post_rope"}},
     {"solver:gptq", "codec:uniform", "transform:hadamard", "kv", "kv.k=q8_0"}),
])
def test_option_labels_are_read_from_the_typed_configs(config, labels):
    assert techniques(config) == labels


def test_option_labels_measure_the_first_released_default():
    """GPTQ's act_order and static_groups were released off and are on by default now: the label says what
    the arm computes, and an old stored arm (explicitly off) keeps its labels when a default changes."""
    from quantatlas.quant.solvers.gptq import GPTQConfig

    field = GPTQConfig.model_fields["act_order"]
    first = (field.json_schema_extra or {}).get("first_default", field.default)
    assert first is False
    bare = techniques({"solver": "gptq", "codec": {"uniform": {"bits": 4}}})
    assert ("solver.act_order" in bare) == (field.default is True)
    assert "solver.act_order" not in techniques({"solver": "gptq", "codec": {"uniform": {"bits": 4}},
                                                 "solver_options": {"act_order": False, "static_groups": False}})


def test_label_parts_kinds_and_compatibility():
    assert option_parts("solver.no_act_order") == ("solver", "act_order", "false")
    assert option_parts("kv.placement=pre_rope") == ("kv", "placement", "pre_rope")
    assert option_parts("transform:hadamard.no_residual") == ("transform:hadamard", "residual", "false")
    assert option_parts("include_head") == (None, "include_head", "true") and not is_option("include_head")
    assert is_option("propagation=layer") and is_option("solver.incoherence") and not is_option("codec:e8p")
    assert kind("solver.act_order") == kind("solver.no_act_order") == "solver.act_order"
    assert kind("gguf:Q4_K_M") == kind("codec:e8p") == "codec" and kind("recovery:kd_ste") == "recovery"
    # what one arm can hold
    assert compatible("solver.incoherence", "codec:e8p") and compatible("solver.incoherence", "solver:gptq")
    assert compatible("solver.act_order", "solver:gptaq") and not compatible("solver.act_order", "solver:aqlm")
    assert compatible("codec.clip=mse", "codec:sparse24") and not compatible("codec.clip=mse", "codec:e8p")
    assert compatible("codec.imatrix", "gguf:Q4_K_M") and not compatible("codec.imatrix", "codec:uniform")
    assert not compatible("kv.k=q4_0", "kv.k=q8_0") and compatible("kv.k=q4_0", "kv.v=q8_0")
    assert not compatible("propagation=layer", "propagation=parallel")
    assert not compatible("solver.act_order", "solver.no_act_order")
    assert not compatible("act.scheme=W8A8", "act.codec=uniform")
    assert not compatible("recovery:kd_ste", "recovery:block_ap") and compatible("recovery:kd_ste", "allocate")
    assert compatible("kv", "kv.rotate") and compatible("transform:awq", "transform:hadamard")


# ---- composition ----------------------------------------------------------------------------------

def _kld(scale: float, seed: int, n: int = 1024) -> np.ndarray:
    base = np.random.default_rng(99).gamma(0.6, 0.02, n)
    return (base * scale * np.random.default_rng([seed, int(scale * 1000)]).lognormal(0, 0.05, n)).astype(np.float32)


def _record(led, exp, arm, scale, bits, seeds=(0, 1, 2), model_hash="mh", fingerprint="ev", se=None):
    for s in seeds:
        tok = _kld(scale, s)
        m = {"kld_mean": float(tok.mean(dtype=np.float64)), "bits_per_weight": bits,
             "kld_se": se if se is not None else float(tok.std() / np.sqrt(tok.size))}
        led.record_run(exp, arm, s, m, tok, ENV, model_hash, fingerprint)


def test_composition_shows_an_incoherence_column(tmp_path):
    """Issue 24's "does incoherence compose with E8P": an arm adding incoherence to E8P gets its cell."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    led = Ledger(url)
    exp = led.register_experiment({"title": "incoherence with E8P", "seeds": [0, 1, 2], "control": "e8p2",
                                   "data": {"eval": {"tokens": 4096, "ctx": 512}}, "arms": {
                                       "e8p2": {"codec": {"e8p": {"bits": 2}}},
                                       "e8p2_inc": {"codec": {"e8p": {"bits": 2}},
                                                    "solver_options": {"incoherence": True}}}})
    _record(led, exp, "e8p2", 1.0, 2.125)
    _record(led, exp, "e8p2_inc", 0.5, 2.125)
    verdict = {v["arm"]: v["result"] for v in led.verdicts(exp)}["e8p2_inc"]
    comp = composition(led)
    assert "solver.incoherence" in comp["techniques"]
    cells = {(c["a"], c["b"]): c for c in comp["cells"]}
    cell = cells[("codec:e8p", "solver.incoherence")]
    assert cell[verdict] == 1 and [x["arm"] for x in cell["experiments"]] == ["e8p2_inc"]
    assert cells[("solver.incoherence", "solver.incoherence")][verdict] == 1
    led.close()
    with TestClient(create_app(url)) as client:
        html = client.get("/composition").text
    assert re.search(r'<th class="col"><span>solver\.incoherence</span></th>', html)
    assert 'title="codec:e8p × solver.incoherence"' in html


# ---- the landscape: one plot per model, eval source, ctx and scoring -------------------------------

def _spec(title, arms, tokens, ctx=512, source=None, score=None, model="reference"):
    ev = {"tokens": tokens, "ctx": ctx}
    if source:
        ev["source"] = source
    if score:
        ev["score"] = score
    return {"title": title, "model": model, "seeds": [0, 1], "data": {"eval": ev}, "arms": arms}


@pytest.fixture()
def atlas(tmp_path):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    led = Ledger(url)
    ids = {}
    ids["base"] = led.register_experiment(_spec("baselines", {"fp16": {"codec": None}, "q8_0": {"codec": "q8_0"},
                                                              "int4": {"codec": {"uniform": {"bits": 4}}}}, 65536))
    _record(led, ids["base"], "fp16", 0.0, 16.0, (0, 1), "mh", "fp-65k", se=0.0)
    _record(led, ids["base"], "q8_0", 0.02, 8.5, (0, 1), "mh", "fp-65k")
    _record(led, ids["base"], "int4", 1.0, 4.125, (0, 1), "mh", "fp-65k")
    # the same model and stream on fewer tokens (spelled `reference`, the same data): the same plot
    ids["e8p"] = led.register_experiment(_spec("e8p", {"e8p3": {"codec": {"e8p": {"bits": 3}},
                                                                "solver_options": {"incoherence": True}},
                                                       "q3_k_m": {"codec": {"gguf": "Q3_K_M"}}}, 16384,
                                               source="reference"))
    _record(led, ids["e8p"], "e8p3", 1.2, 3.125, (0, 1), "mh", "fp-16k")
    _record(led, ids["e8p"], "q3_k_m", 1.5, 3.88, (0, 1), "mh", "fp-16k")
    # another ctx, another scoring, another model: three more plots
    ids["ctx"] = led.register_experiment(_spec("ctx 256", {"int4": {"codec": {"uniform": {"bits": 4}}}}, 16384,
                                               ctx=256))
    _record(led, ids["ctx"], "int4", 1.1, 4.125, (0,), "mh", "fp-ctx256")
    ids["all"] = led.register_experiment(_spec("score all", {"int4": {"codec": {"uniform": {"bits": 4}}}}, 16384,
                                               score="all"))
    _record(led, ids["all"], "int4", 1.05, 4.125, (0,), "mh", "fp-all")
    ids["other"] = led.register_experiment(_spec("other model", {"int4": {"codec": {"uniform": {"bits": 4}}}}, 65536,
                                                 model="hf:Qwen/Qwen3-0.6B"))
    _record(led, ids["other"], "int4", 0.9, 4.125, (0,), "mh-qwen", "fp-65k")
    yield led, url, ids
    led.close()


def test_runs_of_one_model_eval_source_and_ctx_are_one_plot(atlas):
    led, _, ids = atlas
    data = landscape(led)
    by = {(g["model_hash"], None if g["eval"] is None else tuple(g["eval"].values())): g for g in data["groups"]}
    assert set(by) == {("mh", ("stdlib", 512, "second_half")), ("mh", ("stdlib", 256, "second_half")),
                       ("mh", ("stdlib", 512, "all")), ("mh-qwen", ("stdlib", 512, "second_half"))}
    main = by[("mh", ("stdlib", 512, "second_half"))]
    assert main["eval_fingerprints"] == ["fp-16k", "fp-65k"] and main["eval_fingerprint"] is None
    assert {(p["experiment"], p["arm"]) for p in main["points"]} == \
        {(ids["base"], "q8_0"), (ids["base"], "int4"), (ids["e8p"], "e8p3"), (ids["e8p"], "q3_k_m")}
    assert [(p["arm"], p["why"]) for p in main["not_drawn"]] == [("fp16", "kld_mean <= 0 (the fp arm?)")]
    # tokens scored: whole windows of ctx, each scoring ctx - 1 - ctx // 2 (second_half) or ctx - 1 (all)
    tokens = {p["arm"]: p["tokens"] for p in main["points"]}
    assert tokens == {"q8_0": 128 * 255, "int4": 128 * 255, "e8p3": 32 * 255, "q3_k_m": 32 * 255}
    assert main["tokens"] == [8160, 32640]
    assert by[("mh", ("stdlib", 512, "all"))]["points"][0]["tokens"] == 32 * 511
    assert by[("mh", ("stdlib", 256, "second_half"))]["points"][0]["tokens"] == 64 * 127
    # each point: mean KLD and mean SE over its runs, checked against the stored runs
    for p in main["points"]:
        runs = [r for r in led.runs(p["experiment"]) if r["arm"] == p["arm"]]
        assert p["n_runs"] == len(runs) == 2
        assert p["kld_mean"] == pytest.approx(np.mean([r["metrics"]["kld_mean"] for r in runs]), rel=1e-12)
        assert p["kld_se"] == pytest.approx(np.mean([r["metrics"]["kld_se"] for r in runs]), rel=1e-12)
        assert p["label"] == f"{p['arm']} · {p['experiment']}"
    # one frontier over both token counts
    front = {(p["arm"]) for p in main["points"] if p["pareto"]}
    assert front == {"e8p3", "int4", "q8_0"}


def test_landscape_figure_has_error_bars_tokens_and_labels(atlas):
    _, url, ids = atlas
    with TestClient(create_app(url)) as client:
        html = client.get("/landscape").text
    figs = {int(i): json.loads(b) for i, b in
            re.findall(r'<script type="application/json" id="landscape-(\d+)-data">(.*?)</script>', html, re.S)}
    main = figs[1]
    traces = {t["name"]: t for t in main["data"]}
    assert set(traces) == {"Pareto frontier", "arms", "llama.cpp formats (reference)"}
    arms, refs = traces["arms"], traces["llama.cpp formats (reference)"]
    assert len(arms["x"]) == len(arms["error_y"]["array"]) == 2 and arms["error_y"]["visible"] is True
    assert all(se > 0 for se in arms["error_y"]["array"])
    hover = " ".join(arms["hovertext"] + refs["hovertext"])
    assert "32,640 tokens scored" in hover and "8,160 tokens scored" in hover
    # every frontier point and every llama.cpp point is labelled with its arm and experiment
    assert sorted(t for t in arms["text"] if t) == sorted([f"e8p3 · {ids['e8p']}", f"int4 · {ids['base']}"])
    assert sorted(refs["text"]) == sorted([f"q8_0 · {ids['base']}", f"q3_k_m · {ids['e8p']}"])
    assert "8,160 / 32,640 tokens scored" in html and "2 eval fingerprints" in html


def test_landscape_filters_by_technique(atlas):
    led, url, ids = atlas
    full = landscape(led)
    only = with_technique(full, "solver.incoherence")
    main = next(g for g in only["groups"] if g["eval"] and g["eval"]["ctx"] == 512 and g["model_hash"] == "mh"
                and g["eval"]["score"] == "second_half")
    assert [p["arm"] for p in main["points"]] == ["e8p3"]
    assert main["frontier"] == next(g for g in full["groups"] if g["model_hash"] == "mh" and g["eval"]
                                    and g["eval"]["ctx"] == 512 and g["eval"]["score"] == "second_half")["frontier"]
    assert all(not g["points"] for g in only["groups"] if g is not main)
    with TestClient(create_app(url)) as client:
        api = client.get("/api/landscape", params={"technique": "solver.incoherence"}).json()
        page = client.get("/landscape", params={"technique": "solver.incoherence"})
        everything = client.get("/landscape").text
    assert api["technique"] == "solver.incoherence"
    assert sum(len(g["points"]) for g in api["groups"]) == 1
    assert page.status_code == 200 and '<option value="solver.incoherence" selected>' in page.text
    assert '<option value="codec:e8p" >' in everything or '<option value="codec:e8p">' in everything
