"""Sensitivity (quant/sensitivity.py) against a direct loop, and the allocator (quant/allocate.py)
against brute force."""
from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch

from quantatlas.quant.allocate import allocate, exact_knapsack, greedy_allocate
from quantatlas.quant.config import build, parse_config
from quantatlas.quant.sensitivity import format_roi, measure_sensitivity, role_summary
from quantatlas.spec import parse_spec


def _brute(bits, loss, budget):
    best = None
    for choice in itertools.product(*(range(len(b)) for b in bits)):
        c = sum(bits[g][o] for g, o in enumerate(choice))
        lo = sum(loss[g][o] for g, o in enumerate(choice))
        if c <= budget and (best is None or lo < best[1] - 1e-12):
            best = (choice, lo)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_knapsack_matches_brute_force(seed):
    rng = random.Random(seed)
    n, k = rng.randint(1, 6), rng.randint(1, 4)
    bits = [sorted(rng.randint(1, 40) for _ in range(k)) for _ in range(n)]
    # more bits usually lose less, but not always (measured ΔKLD is noisy)
    loss = [[rng.uniform(0, 1) * (k - o) + rng.uniform(-0.2, 0.2) for o in range(k)] for _ in range(n)]
    budget = rng.randint(min(map(min, bits)) * n - 5, max(map(max, bits)) * n)
    want = _brute(bits, loss, budget)
    got = exact_knapsack(bits, loss, budget)
    if want is None:
        assert got is None and greedy_allocate(bits, loss, budget) is None
        return
    assert got.loss == pytest.approx(want[1], abs=1e-12) and got.bits <= budget
    assert sum(loss[g][o] for g, o in enumerate(got.choice)) == pytest.approx(got.loss)
    greedy = greedy_allocate(bits, loss, budget)
    assert greedy.bits <= budget and greedy.loss >= want[1] - 1e-12
    assert allocate(bits, loss, budget).loss == pytest.approx(want[1], abs=1e-12)


def test_exchange_pass_fixes_what_greedy_upgrades_miss():
    # greedy's best rate is group 0's small upgrade (rate 1.0) which blocks group 1's big one;
    # swapping the two (group 0 back down, group 1 up) is the optimum the exchange pass finds
    bits = [[0, 10], [0, 20]]
    loss = [[10.0, 0.0], [19.0, 0.0]]
    assert greedy_allocate(bits, loss, 20).choice == [0, 1] == exact_knapsack(bits, loss, 20).choice


def _kld_direct(fp, q, calib):
    """mean over calibration positions (all but each window's last) of sum_i P_i (log P_i - log Q_i), by a loop."""
    total, n = 0.0, 0
    with torch.no_grad():
        for x in calib:
            lp = torch.log_softmax(fp(x[None]).logits[0, :-1].double(), -1)
            lq = torch.log_softmax(q(x[None]).logits[0, :-1].double(), -1)
            for t in range(lp.shape[0]):
                total += float((lp[t].exp() * (lp[t] - lq[t])).sum())
                n += 1
    return total / n


def test_delta_kld_matches_a_direct_loop(tiny_reference):
    arm = parse_spec({"title": "t", "arms": {"a": {"codec": {"uniform": {"bits": 4, "group": 32}}}}}).arms["a"]
    cands = [parse_config("codec", {"uniform": {"bits": 2, "group": 32}}),
             parse_config("codec", {"uniform": {"bits": 8, "group": 32}})]
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 256, (3, 24), generator=g)
    s = measure_sensitivity(tiny_reference, arm, cands, calib, only=[r"^(down|q|gate)\.1$", r"^v\.0$"])
    assert sorted(x.group for x in s.groups) == ["down.1", "gate.1", "q.1", "v.0"]
    assert s.forward_passes == 2 + 4 * 2 and s.calib_tokens == 3 * 23

    fp = tiny_reference.model
    base_codec = build("codec", {"uniform": {"bits": 4, "group": 32}})
    names = [n for n, p in fp.named_parameters() if p.dim() == 2 and ".layers." in n]
    base = copy.deepcopy(fp)
    bp = dict(base.named_parameters())
    with torch.no_grad():
        for n in names:
            bp[n].copy_(base_codec.decode(base_codec.encode(bp[n].detach().float())))
    kld_base = _kld_direct(fp, base, calib)
    assert s.kld_base == pytest.approx(kld_base, rel=1e-6)
    roles = {"down": "mlp.down_proj", "gate": "mlp.gate_proj", "q": "self_attn.q_proj", "v": "self_attn.v_proj"}
    for group in s.groups:
        role, layer = group.group.split(".")
        name = f"model.layers.{layer}.{roles[role]}.weight"
        assert group.tensors == [name]
        for cfg, label in zip(cands, s.candidates):
            codec = cfg.build()
            moved = copy.deepcopy(base)
            with torch.no_grad():
                p = dict(moved.named_parameters())[name]
                packed = codec.encode(dict(fp.named_parameters())[name].detach().float())
                p.copy_(codec.decode(packed))
            want = _kld_direct(fp, moved, calib) - kld_base
            assert s.delta_kld[group.group][label] == pytest.approx(want, rel=1e-4, abs=1e-8)  # float32 logits
            assert group.bits[label] == 8 * packed.nbytes
    rows = s.rows()
    assert [r["roi"] for r in rows] == sorted((r["roi"] for r in rows), reverse=True)
    assert all(r["delta_kld"] > 0 for r in rows if r["candidate"].startswith("uniform(bits=2"))
    assert "down.1" in format_roi(s) and {r["role"] for r in role_summary(s)} == {"down", "gate", "q", "v"}


def test_allocate_arm_meets_its_target_and_its_assignment_reruns_it(tiny_reference, tmp_path):
    from quantatlas import runner
    from quantatlas.spec import SpecError

    def spec(alloc):
        return parse_spec({"title": "t", "data": {"eval": {"tokens": 1024, "ctx": 128},
                                                  "calib": {"samples": 2, "seq_len": 32}},
                           "arms": {"alloc": {"codec": {"uniform": {"bits": 3, "group": 32}}, "allocate": alloc}}})

    alloc = {"candidates": [{"uniform": {"bits": 6, "group": 32}}], "target": {"bits_per_weight": 4.0},
             "grouping": "role"}
    quiet = dict(ledger=False, compress=False, log=lambda m: None)
    out = tmp_path / "alloc.json"
    doc = runner.run_spec(spec(alloc), out, loaded=tiny_reference, **quiet)
    arm = doc["arms"]["alloc"]
    # resumed from the JSON, the result keeps the allocation it was measured with
    resumed = runner.run_spec(spec(alloc), out, loaded=tiny_reference, **quiet)["arms"]["alloc"]
    assert resumed["seeds"] == arm["seeds"] and resumed["allocations"] == arm["allocations"]
    r, a = arm["seeds"]["0"], arm["allocations"]["0"]
    assert a["measured"] and a["forward_passes"] == 2 + 7 and set(a["assignment"]) == {
        "q", "k", "v", "o", "gate", "up", "down"}
    assert r["bits_per_weight"] == pytest.approx(a["groups_bits_per_weight"]) and 3.5 < r["bits_per_weight"] <= 4.0
    assert {next(iter(c.values()))["bits"] for c in a["assignment"].values()} == {3, 6}
    # the written assignment, pasted back into the spec, is the same model without measuring
    again = runner.run_spec(spec(dict(alloc, assignment=a["assignment"])), loaded=tiny_reference, **quiet)
    r2 = again["arms"]["alloc"]["seeds"]["0"]
    assert not again["arms"]["alloc"]["allocations"]["0"]["measured"]
    assert r2["kld_mean"] == r["kld_mean"] and r2["bits_per_weight"] == r["bits_per_weight"]
    with pytest.raises(SpecError, match="allocate.target"):
        spec(dict(alloc, target={"bits_per_weight": 4.0, "bits_per_param": 5.0}))
    with pytest.raises(SpecError, match="allocate"):
        parse_spec({"title": "t", "arms": {"a": {"codec": None, "allocate": alloc}}})


def _fake_sensitivity():
    from quantatlas.quant.sensitivity import GroupCost, Sensitivity

    groups = [GroupCost("down.0", ["model.layers.0.mlp.down_proj.weight"], 1000, {"q4_k": 4500, "q6_k": 6563}),
              GroupCost("q.0", ["model.layers.0.self_attn.q_proj.weight"], 1000, {"q4_k": 4500, "q6_k": 6563})]
    return Sensitivity("q4_k", ["q6_k"], "role_layer", groups, 0.02, {"down.0": {"q6_k": -0.004}, "q.0": {"q6_k": -0.001}},
                       {"down.0": {"q6_k": 0.0005}, "q.0": {"q6_k": 0.0002}}, 2000, 512, 4, 0)


def test_sensitivity_is_its_own_ledger_result_and_a_web_page(tmp_path):
    from fastapi.testclient import TestClient

    from quantatlas.atlas.ledger import Ledger
    from quantatlas.quant.sensitivity import Sensitivity
    from quantatlas.web.app import create_app

    sens = _fake_sensitivity()
    rows = sens.rows()
    assert [r["group"] for r in rows] == ["down.0", "q.0"]                    # 0.004 vs 0.001 KLD for the same bits
    assert rows[0]["roi"] == pytest.approx(0.004 / (2063 / 2000))
    assert Sensitivity.from_dict(sens.to_dict()) == sens
    db = f"sqlite:///{tmp_path / 'l.db'}"
    with Ledger(db, contributor="ana") as led:
        exp = led.register_experiment({"title": "s", "arms": {"a": {"codec": "q4_k"}}})
        led.record_sensitivity(exp, "a", 0, sens.to_dict(), rows, "m1")
        led.record_sensitivity(exp, "a", 0, sens.to_dict(), rows, "m1")  # a repeat replaces
        got = led.sensitivities(exp)
        assert len(got) == 1 and got[0]["rows"] == rows and got[0]["contributor"] == "ana"
        assert Sensitivity.from_dict(got[0]["data"]) == sens
    client = TestClient(create_app(db))
    html = client.get("/sensitivity").text
    assert html.index("down.0") < html.index("q.0") and "Sensitivity" in html
    api = client.get("/api/sensitivity", params={"experiment": exp}).json()
    assert [r["group"] for r in api[0]["rows"]] == ["down.0", "q.0"]
    assert client.get("/api/sensitivity", params={"experiment": "cexp_nope"}).status_code == 404


def test_sensitivity_cli_prints_the_roi_table_and_writes_json(tmp_path):
    import json

    import yaml
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from typer.testing import CliRunner

    from quantatlas.cli import app

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=128)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "m")
    spec = {"title": "s", "model": str(tmp_path / "m"), "data": {"calib": {"samples": 2, "seq_len": 16}},
            "arms": {"a": {"codec": {"uniform": {"bits": 3, "group": 32}},
                           "allocate": {"candidates": [{"uniform": {"bits": 8, "group": 32}}],
                                        "target": {"bits_per_weight": 4.0}, "grouping": "role"}}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    out = CliRunner().invoke(app, ["sensitivity", str(tmp_path / "s.yaml"), "--no-ledger", "--json",
                                   str(tmp_path / "s.json")])
    assert out.exit_code == 0, out.output
    assert "ROI" in out.output and "per role" in out.output
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["arm"] == "a" and doc["seeds"][0]["forward_passes"] == 2 + 7
    bad = CliRunner().invoke(app, ["sensitivity", str(tmp_path / "s.yaml"), "--no-ledger", "--grouping", "rows"])
    assert bad.exit_code == 2 and "grouping" in bad.output


def test_allocate_to_compressed_bytes_meets_the_cap_on_the_real_file(tiny_reference):
    from quantatlas import runner

    def spec(target, cap):
        return parse_spec({"title": "t", "data": {"eval": {"tokens": 1024, "ctx": 128},
                                                  "calib": {"samples": 2, "seq_len": 32}},
                           "artifact": {"max_bytes": cap, "compressor": "zstd-22"},
                           "arms": {"alloc": {"codec": {"uniform": {"bits": 3, "group": 32}}, "allocate": {
                               "candidates": [{"uniform": {"bits": 8, "group": 32}}], "grouping": "role",
                               "target": target}}}})

    quiet = dict(ledger=False, compress=False, log=lambda m: None)
    lo = runner.run_spec(spec({"bits_per_weight": 3.5}, 10**9), loaded=tiny_reference, **quiet)["arms"]["alloc"]
    size_lo = lo["seeds"]["0"]["artifact_bytes"]
    cap = int(size_lo * 1.15)
    doc = runner.run_spec(spec({"bytes": cap}, cap), loaded=tiny_reference, **quiet)
    r, a = doc["arms"]["alloc"]["seeds"]["0"], doc["arms"]["alloc"]["allocations"]["0"]
    assert a["predicted_bytes"] <= cap
    assert r["over_cap"] == 0.0 and size_lo < r["artifact_bytes"] <= cap      # spends the room, stays under
    assert abs(r["artifact_bytes"] - a["predicted_bytes"]) < 0.05 * cap         # the estimate is close
    with pytest.raises(Exception, match="exactly one"):
        spec({"bytes": 10, "bits_per_weight": 3.0}, 10)
