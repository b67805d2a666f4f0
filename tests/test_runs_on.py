"""Which runtimes load an arm as measured (`runs_on`, issue 26 part 4): derived from what the arm
stores when it is measured, stored with the run, validated on push, shown on the experiment page,
and the landscape's "deployable on" filter with a Pareto frontier over the deployable arms."""
import copy
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from quantatlas.atlas.ledger import Ledger
from quantatlas.export.runtimes import planned_runs_on, runs_on, vllm_kernel
from quantatlas.quant.codecs.base import Packed
from quantatlas.quant.incoherence import IncoherentPacked
from quantatlas.runtimes import check_runs_on, runs_on_label
from quantatlas.spec import parse_spec

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {"python": "3.11", "packages": {"numpy": "2.4"}, "git_commit": "abc", "device": "cpu", "hostname": "h",
       "platform": "Linux"}


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _arm(d: dict):
    return parse_spec({"title": "t", "arms": {"a": d}}, "spec").arms["a"]


def _packs(model, codec: str, config: dict, include_head=False) -> dict:
    """A pack (its codec and config; no data: runs_on reads no bytes) for every decoder Linear."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and (include_head or name != "lm_head"):
            out[f"{name}.weight"] = Packed(codec, config, tuple(m.weight.shape))
    return out


UNIFORM4 = {"bits": 4, "group": 128, "symmetric": True}


@pytest.mark.parametrize("arm, codec, config, want", [
    ({"codec": {"uniform": UNIFORM4}}, "uniform", UNIFORM4,
     [{"runtime": "vllm", "format": "compressed-tensors", "schemes": ["W4A16"], "min_sm": 80, "gpu": "Ampere"}]),
    ({"codec": {"uniform": {"bits": 4, "group": 64, "symmetric": False}}}, "uniform",
     {"bits": 4, "group": 64, "symmetric": False},
     [{"runtime": "vllm", "format": "compressed-tensors", "schemes": ["W4A16_ASYM"], "min_sm": 80, "gpu": "Ampere"}]),
    ({"codec": {"uniform": {"bits": 8, "group": None}}, "act": "W8A8"}, "uniform", {"bits": 8, "group": None},
     [{"runtime": "vllm", "format": "compressed-tensors", "schemes": ["W8A8"], "min_sm": 75, "gpu": "Turing"}]),
    ({"codec": {"fp8": {}}, "act": "FP8_DYNAMIC"}, "fp8", {"format": "e4m3", "group": None},
     [{"runtime": "vllm", "format": "compressed-tensors", "schemes": ["FP8_DYNAMIC"], "min_sm": 89, "gpu": "Ada"}]),
    ({"codec": {"fp8": {}}}, "fp8", {"format": "e4m3", "group": None},
     [{"runtime": "vllm", "format": "compressed-tensors", "schemes": ["FP8_W8A16"], "min_sm": 80, "gpu": "Ampere"}]),
    ({"codec": {"fp8": {"granularity": "tensor"}}, "act": {"codec": {"fp8": {"granularity": "tensor"}}, "static": True}},
     "fp8", {"format": "e4m3", "granularity": "tensor"},
     [{"runtime": "vllm", "format": "compressed-tensors", "schemes": ["FP8"], "min_sm": 89, "gpu": "Ada"}]),
    ({"codec": {"fp8": {"granularity": "block"}}, "act": {"codec": {"fp8": {"group": 128}}}},
     "fp8", {"format": "e4m3", "granularity": "block"},
     [{"runtime": "vllm", "format": "compressed-tensors", "schemes": ["FP8_BLOCK"], "min_sm": 89, "gpu": "Ada"}]),
    ({"codec": {"nvfp4": {}}}, "nvfp4", {"block": 16},
     [{"runtime": "vllm", "format": "compressed-tensors", "schemes": ["NVFP4A16"], "min_sm": 80, "gpu": "Ampere"}]),
    ({"codec": {"nvfp4": {}}, "act": {"codec": {"nvfp4": {}}, "static": True}}, "nvfp4", {"block": 16},
     [{"runtime": "vllm", "format": "compressed-tensors", "schemes": ["NVFP4"], "min_sm": 100,
       "gpu": "Blackwell"}]),
    ({"codec": {"mx": {}}}, "mx", {"element": "fp4_e2m1", "block": 32},
     [{"runtime": "vllm", "format": "compressed-tensors", "schemes": ["MXFP4A16"], "min_sm": 80, "gpu": "Ampere"}]),
    ({"codec": {"mx": {"element": "fp8_e4m3"}}}, "mx", {"element": "fp8_e4m3", "block": 32}, []),
    ({"codec": {"fp8": {"format": "e5m2"}}}, "fp8", {"format": "e5m2"}, []),
    ({"codec": "q4_k"}, "q4_k", {}, [{"runtime": "llama.cpp", "format": "gguf", "types": ["q4_k"]}]),
    ({"codec": "mxfp4"}, "mxfp4", {}, [{"runtime": "llama.cpp", "format": "gguf", "types": ["mxfp4"]}]),
    ({"codec": "q8_0", "act": "llamacpp_cpu", "kv": {"k": "q8_0", "v": "q8_0"}}, "q8_0", {},
     [{"runtime": "llama.cpp", "format": "gguf", "types": ["q8_0"]}]),
    # research formats: no runtime kernel for the codec, the activations, the cache or the rotation
    ({"codec": {"uniform": {"bits": 3, "group": 128}}}, "uniform", {"bits": 3, "group": 128}, []),
    ({"codec": {"uniform": {"bits": 4, "group": 256}}}, "uniform", {"bits": 4, "group": 256}, []),
    ({"codec": {"trellis": {"bits": 2}}}, "trellis", {"bits": 2}, []),
    ({"codec": "q8_0", "act": "W8A8"}, "q8_0", {}, []),
    ({"codec": {"uniform": UNIFORM4}, "kv": {"k": {"fp8": {}}, "v": {"fp8": {}}}}, "uniform", UNIFORM4, []),
    ({"codec": {"uniform": UNIFORM4}, "transforms": [{"hadamard": {}}]}, "uniform", UNIFORM4, []),
    ({"codec": "q4_0", "kv": {"k": "q4_0", "v": "q4_0", "residual": 32}}, "q4_0", {}, []),
    # RoSTE may rotate down_proj's input at run time unless its rotation is none
    ({"codec": "q4_0", "recovery": {"method": "roste", "steps": 2}}, "q4_0", {}, []),
    ({"codec": {"uniform": UNIFORM4}, "recovery": {"method": "roste", "rotation": "hadamard", "steps": 2}}, "uniform",
     UNIFORM4, []),
    ({"codec": "q4_0", "recovery": {"method": "roste", "rotation": "none", "steps": 2}}, "q4_0", {},
     [{"runtime": "llama.cpp", "format": "gguf", "types": ["q4_0"]}]),
])
def test_runs_on_from_what_is_stored(tiny, arm, codec, config, want):
    got = runs_on(_packs(tiny, codec, config), _arm(arm), tiny)
    assert got == want
    assert check_runs_on(got) == got


def test_runs_on_special_cases(tiny):
    # an fp arm loads everywhere; a quantized head or rotated codes are loaded by no runtime here
    assert runs_on({}, _arm({"codec": None}), tiny) == [
        {"runtime": "llama.cpp", "format": "gguf", "types": ["f16"]},
        {"runtime": "vllm", "format": "compressed-tensors", "schemes": ["unquantized"], "min_sm": 70,
         "gpu": "Volta"}]
    head = _packs(tiny, "uniform", UNIFORM4, include_head=True)
    assert runs_on(head, _arm({"codec": {"uniform": UNIFORM4}, "include_head": True}), tiny) == []
    rotated = _packs(tiny, "uniform", UNIFORM4)
    rotated = {k: IncoherentPacked.__new__(IncoherentPacked) for k in rotated}
    for p in rotated.values():
        p.codec, p.config = "uniform", UNIFORM4
    assert runs_on(rotated, _arm({"codec": {"uniform": UNIFORM4}}), tiny) == []
    # a mixture: the highest capability any of its kernels needs
    mixed = _packs(tiny, "uniform", UNIFORM4)
    mixed["model.layers.0.mlp.down_proj.weight"] = Packed("uniform", {"bits": 8, "group": None}, (64, 128))
    got = runs_on(mixed, _arm({"codec": {"uniform": UNIFORM4}}), tiny)
    assert got == [{"runtime": "vllm", "format": "compressed-tensors", "schemes": ["W4A16", "W8A16"], "min_sm": 80,
                    "gpu": "Ampere"}]
    # the FP4 / block FP8 kernels
    nv = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
          "dynamic": False}
    assert vllm_kernel(nv, None) == ("NVFP4A16", 80) and vllm_kernel(nv, dict(nv, dynamic="local")) == ("NVFP4", 100)
    block = {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128], "symmetric": True,
             "dynamic": False, "group_size": None}
    act = {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128, "dynamic": True, "symmetric": True}
    assert vllm_kernel(block, act) == ("FP8_BLOCK", 89)
    assert vllm_kernel(block, dict(act, group_size=64)) is None


@pytest.mark.parametrize("bad, words", [
    ("vllm", "must be a list"),
    ([{"runtime": "tensorrt"}], "runtime must be one of"),
    ([{"runtime": "llama.cpp", "format": "gguf", "types": ["q4_x"]}], "types"),
    ([{"runtime": "llama.cpp", "format": "gguf", "types": []}], "types"),
    ([{"runtime": "vllm", "format": "compressed-tensors", "schemes": ["W4A16"], "min_sm": 81, "gpu": "Ampere"}],
     "min_sm"),
    ([{"runtime": "vllm", "format": "compressed-tensors", "schemes": ["W4A16"], "min_sm": 80, "gpu": "Hopper"}],
     "gpu must be 'Ampere'"),
    ([{"runtime": "vllm", "format": "compressed-tensors", "schemes": ["W4A16"], "min_sm": 80, "gpu": "Ampere",
       "speed": 3}], "unknown fields"),
    ([{"runtime": "llama.cpp", "format": "gguf", "types": ["q4_k"]}] * 2, "twice"),
])
def test_check_runs_on_names_the_field_and_value(bad, words):
    with pytest.raises(ValueError, match=words):
        check_runs_on(bad)


def test_a_measured_run_stores_runs_on(tmp_path):
    """`quantatlas run`: the result and the ledger's run hold the arm's runs_on."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantatlas import runner

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
                     ).save_pretrained(tmp_path / "m")
    spec = parse_spec({"title": "t", "model": str(tmp_path / "m"), "data": {"eval": {"tokens": 512, "ctx": 64}},
                       "arms": {"int4": {"codec": {"uniform": {"bits": 4, "group": 64}}},
                                "q4_0": {"codec": "q4_0"}, "int3": {"codec": {"uniform": {"bits": 3, "group": 64}}}}},
                      "spec")
    db = f"sqlite:///{tmp_path / 'l.db'}"
    doc = runner.run_spec(spec, None, db_url=db, compress=False, progress=False)
    got = {name: arm["seeds"]["0"]["runs_on"] for name, arm in doc["arms"].items()}
    assert got["int4"][0]["schemes"] == ["W4A16"] and got["q4_0"][0]["types"] == ["q4_0"] and got["int3"] == []
    with Ledger(db) as led:
        stored = {r["arm"]: r["extra"]["runs_on"] for r in led.runs(doc["experiment_id"])}
        assert stored == got
        assert all("runs_on" not in r["metrics"] for r in led.runs(doc["experiment_id"]))


# ---- the atlas: push, experiment page, landscape ---------------------------------------------------

W4 = [{"runtime": "vllm", "format": "compressed-tensors", "schemes": ["W4A16"], "min_sm": 80, "gpu": "Ampere"}]
Q4 = [{"runtime": "llama.cpp", "format": "gguf", "types": ["q4_k"]}]


def _tok(scale, seed, n=256):
    return (np.random.default_rng(seed).gamma(0.6, 0.02, n) * scale).astype(np.float32)


@pytest.fixture
def atlas(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    led = Ledger(url, contributor="alice")
    exp = led.register_experiment({"title": "deployable", "model": "reference", "seeds": [0, 1],
                                   "data": {"eval": {"tokens": 4096, "ctx": 512}}, "arms": {
                                       "w4": {"codec": {"uniform": {"bits": 4}}},
                                       "q4k": {"codec": "q4_k"},
                                       "trellis": {"codec": {"trellis": {"bits": 4}}},
                                       "old": {"codec": {"uniform": {"bits": 3}}}}})
    # bits, KLD scale, runs_on (None: a run stored before runs_on existed)
    for arm, bits, scale, where in (("w4", 4.125, 1.0, W4), ("q4k", 4.5, 0.8, Q4), ("trellis", 4.0, 0.5, []),
                                    ("old", 3.125, 3.0, None)):
        for s in (0, 1):
            t = _tok(scale, s)
            m = {"kld_mean": float(t.mean(dtype=np.float64)), "kld_se": 0.001, "bits_per_weight": bits}
            if where is not None:
                m["runs_on"] = where
            led.record_run(exp, arm, s, m, t, ENV, "mh", "ev")
    yield led, url, exp
    led.close()


def test_push_validates_runs_on(atlas, tmp_path):
    from quantatlas.atlas.io import experiment_record, run_records
    from quantatlas.atlas.tokens import create_token
    from quantatlas.web import create_app

    led, _, exp = atlas
    with led.read() as q:
        e = experiment_record(q, q.experiment(exp))
    body = {"schema_version": 1, "experiments": [e], "runs": run_records(led, [r["id"] for r in led.runs(exp)])}
    assert any((r.get("extra") or {}).get("runs_on") == W4 for r in body["runs"])
    app = create_app(f"sqlite:///{tmp_path / 'server.db'}")
    token = create_token(app.state.ledger, "alice")
    with TestClient(app) as client:
        for bad, words in ((["vllm"], "extra.runs_on[0].runtime"),
                           ([dict(W4[0], gpu="Blackwell")], "extra.runs_on[0].gpu"),
                           ({"runtime": "vllm"}, "extra.runs_on must be a list")):
            b = copy.deepcopy(body)
            i = next(i for i, r in enumerate(b["runs"]) if (r.get("extra") or {}).get("runs_on"))
            b["runs"][i]["extra"]["runs_on"] = bad
            r = client.post("/api/runs", json=b, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 422 and words in json.dumps(r.json()["detail"]), (bad, r.text[:300])
        ok = client.post("/api/runs", json=body, headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200, ok.text[:300]
        stored = {r["arm"]: (r["extra"] or {}).get("runs_on") for r in app.state.ledger.runs(exp)}
    assert stored["w4"] == W4 and stored["q4k"] == Q4 and stored["trellis"] == [] and stored["old"] is None


def test_experiment_page_shows_runs_on(atlas):
    from quantatlas.web import create_app

    _, url, exp = atlas
    with TestClient(create_app(url)) as client:
        html = client.get(f"/experiments/{exp}").text
        api = client.get(f"/api/experiments/{exp}").json()
    labels = {a["arm"]: a["runs_on_label"] for a in api["arms_config"]}
    assert labels == {"w4": "vLLM W4A16 (Ampere+)", "q4k": "llama.cpp (q4_k)", "trellis": "research format",
                      "old": "not recorded"}
    for label in labels.values():
        assert f'<td class="runs-on">{label}</td>' in html
    assert runs_on_label(W4 + Q4) == "vLLM W4A16 (Ampere+) · llama.cpp (q4_k)"


def test_landscape_deployable_filter_and_frontier(atlas):
    from quantatlas.web import create_app
    from quantatlas.web.landscape import landscape, with_deployable

    led, url, _ = atlas
    full = landscape(led)
    (g,) = full["groups"]
    assert {p["arm"]: p["runtimes"] for p in g["points"]} == {"w4": ["vllm"], "q4k": ["llama.cpp"], "trellis": [],
                                                              "old": []}
    # every arm: trellis (4.0 bits, lowest KLD) and old (3.125 bits) make the frontier
    assert {p["arm"] for p in g["points"] if p["pareto"]} == {"old", "trellis"}
    vllm = with_deployable(full, "vllm")["groups"][0]
    assert [p["arm"] for p in vllm["points"]] == ["w4"] and vllm["frontier"] == g["frontier"]
    over = with_deployable(full, "any", "deployable")["groups"][0]
    assert {p["arm"] for p in over["points"]} == {"w4", "q4k", "trellis", "old"}
    assert {p["arm"] for p in over["points"] if p["pareto"]} == {"w4", "q4k"}
    assert [f["arm"] for f in over["frontier"]] == ["w4", "q4k"]
    only = with_deployable(full, "llama.cpp", "deployable")["groups"][0]
    assert [(p["arm"], p["pareto"]) for p in only["points"]] == [("q4k", True)]
    with pytest.raises(ValueError, match="deployable 'tensorrt'"):
        with_deployable(full, "tensorrt")
    with TestClient(create_app(url)) as client:
        api = client.get("/api/landscape", params={"deployable": "vllm", "frontier": "deployable"}).json()
        page = client.get("/landscape", params={"deployable": "llama.cpp", "frontier": "deployable"})
        bad = client.get("/api/landscape", params={"deployable": "tpu"})
        csv = client.get("/download/landscape.csv", params={"deployable": "vllm"}).text
    assert [p["arm"] for p in api["groups"][0]["points"]] == ["w4"] and api["groups"][0]["points"][0]["pareto"]
    assert page.status_code == 200 and '<option value="llama.cpp" selected>' in page.text
    assert '<option value="deployable" selected>' in page.text and "llama.cpp (q4_k)" in page.text
    assert bad.status_code == 422 and "deployable 'tpu' is not one of any, llama.cpp, vllm" in bad.text
    assert "w4" in csv and "q4k" not in csv


def test_no_runtime_for_a_model_whose_inputs_are_rotated_online_or_a_freeze_dried_pack(tiny):
    """Whatever put an online rotation on the model (here hadamard's, as RoSTE's chosen down rotations
    would), and whatever the arm says, a runtime reading the file would feed the rotated weights unrotated
    inputs; a freeze-dried matrix rebuilds dropped weights on load, which neither runtime does."""
    from quantatlas.context import RunContext
    from quantatlas.quant.freeze_dry import FrozenPacked
    from quantatlas.quant.transforms import make_transform

    plain = _arm({"codec": "q4_0"})
    assert runs_on(_packs(tiny, "q4_0", {}), plain, tiny) == [{"runtime": "llama.cpp", "format": "gguf",
                                                               "types": ["q4_0"]}]
    rotated = copy.deepcopy(tiny)
    make_transform("hadamard", {"residual": False, "heads": False, "online": ["down"]}).apply(rotated, None,
                                                                                            RunContext(0))
    assert runs_on(_packs(rotated, "q4_0", {}), plain, rotated) == []
    int4 = _arm({"codec": {"uniform": UNIFORM4}})
    frozen = _packs(tiny, "uniform", UNIFORM4)
    assert runs_on(frozen, int4, tiny)[0]["runtime"] == "vllm"
    name = "model.layers.0.mlp.down_proj.weight"
    frozen[name] = FrozenPacked.__new__(FrozenPacked)
    frozen[name].codec, frozen[name].config = "uniform", UNIFORM4
    assert runs_on(frozen, int4, tiny) == []
    assert planned_runs_on(int4, tiny)[0]["runtime"] == "vllm"
    assert planned_runs_on(_arm({"codec": {"uniform": UNIFORM4}, "freeze_dry": {"tol": 0.5}}), tiny) == []
