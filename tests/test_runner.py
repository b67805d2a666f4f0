"""End to end: a spec runs arms x seeds on a local model, writes JSON, and resumes."""
import json

import numpy as np
import pytest
import torch

from quantatlas import runner
from quantatlas.spec import parse_spec


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Qwen3 saved as a local Hugging Face folder (byte vocabulary, no tokenizer)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # a less flat output distribution than the default init gives
        model.lm_head.weight.mul_(20)
    d = tmp_path_factory.mktemp("tiny_qwen3")
    model.save_pretrained(d)
    return d


def spec_for(model_dir, seeds=(0, 1)):
    return parse_spec({
        "title": "tiny baselines", "hypothesis": "more bits, less KLD", "model": str(model_dir),
        "data": {"eval": {"tokens": 4096, "ctx": 128}},
        "seeds": list(seeds),
        "arms": {
            "fp16": {"codec": None},
            "q8_0": {"codec": "q8_0"},
            "int4": {"codec": {"uniform": {"bits": 4, "group": 64}}},
            "int3": {"codec": {"uniform": {"bits": 3, "group": 64}}},
        },
    })


def test_run_orders_kld_by_bits_and_resumes(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    doc = runner.run_spec(spec_for(tiny_dir), out, compress=False, ledger=False)
    saved = json.loads(out.read_text())
    for key in ("spec_hash", "model_hash", "eval_fingerprint", "environment"):
        assert saved[key]
    assert {"packages", "git_commit", "device"} <= set(saved["environment"])
    a = {name: saved["arms"][name]["seeds"]["0"] for name in ("fp16", "q8_0", "int4", "int3")}
    for r in a.values():
        assert set(runner.RESULT_KEYS) - {"bytes_zstd", "bytes_brotli"} <= set(r)
    assert a["fp16"]["kld_mean"] == 0.0 and a["fp16"]["kld_max"] == 0.0 and a["fp16"]["same_top"] == 1.0
    assert a["fp16"]["ppl_ratio"] == 1.0 and a["fp16"]["bits_per_weight"] == 16.0
    assert 0 < a["q8_0"]["kld_mean"] < a["int4"]["kld_mean"] < a["int3"]["kld_mean"]
    assert [a[k]["bits_per_weight"] for k in ("q8_0", "int4", "int3")] == [8.5, 4.25, 3.25]
    assert a["int3"]["bits_per_param"] > a["int3"]["bits_per_weight"]  # fp16 embeddings and head count
    # RTN has nothing random: seed 1 is seed 0's result, not a recomputation
    assert saved["arms"]["int4"]["seeds"]["1"]["reused_from_seed"] == 0
    assert doc["arms"]["int4"]["seeds"]["1"]["kld_mean"] == a["int4"]["kld_mean"]

    def boom(*a, **k):
        raise AssertionError("a stored result was recomputed")
    monkeypatch.setattr(runner, "measure_arm", boom)
    again = runner.run_spec(spec_for(tiny_dir), out, compress=False, ledger=False)
    assert again["arms"]["int3"]["seeds"]["0"] == a["int3"]


def test_compressed_sizes_reported(tiny_dir, tmp_path):
    s = spec_for(tiny_dir, seeds=(0,))
    s.arms = {"int4": s.arms["int4"]}
    r = runner.run_spec(s, None, compress=True, ledger=False)["arms"]["int4"]["seeds"]["0"]
    assert 0 < r["bytes_zstd"] < r["bytes_packed"] and 0 < r["bytes_brotli"] < r["bytes_packed"]


def test_ledger_records_each_run_and_resumes_without_json(tiny_dir, tmp_path, monkeypatch):
    from quantatlas.atlas.ledger import Ledger

    db = f"sqlite:///{tmp_path / 'l.db'}"
    s = spec_for(tiny_dir, seeds=(0, 1, 2))
    s.control = "q8_0"
    doc = runner.run_spec(s, None, db_url=db, compress=False)
    runs = Ledger(db).runs(doc["experiment_id"])
    assert len(runs) == 4 * 3
    assert all(r["n_tokens"] == doc["eval_tokens_scored"] for r in runs)
    by_arm = {v["arm"]: v for v in doc["verdicts"]}
    assert by_arm["q8_0"]["result"] == "baseline"
    assert by_arm["int3"]["result"] in ("failure", "inconclusive")   # worse than the Q8_0 control
    with monkeypatch.context() as m:
        m.setattr(runner, "measure_arm", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
        again = runner.run_spec(s, None, db_url=db, compress=False)
    assert again["arms"]["int4"]["seeds"]["2"]["kld_mean"] == doc["arms"]["int4"]["seeds"]["2"]["kld_mean"]
    # another contributor on the same machine reproduces rather than reuses: one more run set
    monkeypatch.setenv("QUANTATLAS_CONTRIBUTOR", "second-contributor")
    assert runner.run_spec(s, None, db_url=db, compress=False)["experiment_id"] == doc["experiment_id"]
    runs = Ledger(db).runs(doc["experiment_id"])
    assert len(runs) == 2 * 4 * 3
    assert len({r["contributor"] for r in runs}) == 2 and runs[-1]["contributor"] == "second-contributor"
    assert len({r["run_set"] for r in runs}) == 2


def test_a_changed_spec_reuses_this_contributors_runs_of_unchanged_arms(tiny_reference, tmp_path):
    """An arm added to a spec makes a new experiment; the unchanged arms' runs (same config, seed,
    environment, model, eval tokens and calibration data) are copied from the ledger, per-token KLD
    included, so the new experiment has its verdicts without running them again."""
    from quantatlas.atlas.ledger import Ledger

    url = f"sqlite:///{tmp_path/'a.db'}"
    spec = {"title": "t", "data": {"eval": {"tokens": 1024, "ctx": 128}, "calib": {"samples": 2, "seq_len": 32}},
            "seeds": [0, 1, 2], "control": "rtn4",
            "arms": {"rtn4": {"codec": {"uniform": {"bits": 4, "group": 32}}},
                     "rtn3": {"codec": {"uniform": {"bits": 3, "group": 32}}}}}
    logs = []
    doc1 = runner.run_spec(spec, db_url=url, loaded=tiny_reference, compress=False, log=logs.append)
    spec2 = dict(spec, arms=dict(spec["arms"], rtn2={"codec": {"uniform": {"bits": 2, "group": 32}}}))
    logs.clear()
    doc2 = runner.run_spec(spec2, db_url=url, loaded=tiny_reference, compress=False, log=logs.append)
    assert doc2["experiment_id"] != doc1["experiment_id"]
    led = Ledger(url)
    runs1 = {(r["arm"], r["seed"]): r for r in led.runs(doc1["experiment_id"])}
    runs2 = {(r["arm"], r["seed"]): r for r in led.runs(doc2["experiment_id"])}
    assert set(runs2) == set(runs1) | {("rtn2", s) for s in (0, 1, 2)}
    for k, r in runs1.items():
        assert runs2[k]["metrics"] == r["metrics"]
        np.testing.assert_array_equal(runs2[k]["per_token_kld"], r["per_token_kld"])
    assert sum("stored result reused" in m for m in logs) == 6
    assert {v["arm"] for v in doc2["verdicts"]} == {"rtn4", "rtn3", "rtn2"}


def test_json_resume_recomputes_calibrated_arms_when_data_calib_changes(tiny_dir, tmp_path, monkeypatch):
    """An arm key leaves data.calib out: a JSON result of a GPTQ arm is not reused once the spec's
    calibration data changed, while an arm that never reads it (RTN) still is."""
    def spec(samples):
        s = spec_for(tiny_dir, seeds=(0,)).to_dict()
        s["data"]["calib"] = {"samples": samples, "seq_len": 64}
        s["arms"] = {"rtn4": {"codec": {"uniform": {"bits": 4, "group": 64}}},
                     "gptq4": {"codec": {"uniform": {"bits": 4, "group": 64}}, "solver": "gptq"}}
        return parse_spec(s)

    path = tmp_path / "r.json"
    first = runner.run_spec(spec(4), path, ledger=False, compress=False)
    calls = []
    real = runner.measure_arm
    monkeypatch.setattr(runner, "measure_arm", lambda *a, **k: calls.append(1) or real(*a, **k))
    same = runner.run_spec(spec(4), path, ledger=False, compress=False)
    assert calls == [] and same["arms"]["gptq4"]["seeds"]["0"] == first["arms"]["gptq4"]["seeds"]["0"]
    changed = runner.run_spec(spec(8), path, ledger=False, compress=False)
    assert calls == [1]   # gptq4 only
    assert changed["arms"]["rtn4"]["seeds"]["0"] == first["arms"]["rtn4"]["seeds"]["0"]
    assert changed["arms"]["gptq4"]["seeds"]["0"]["kld_mean"] != first["arms"]["gptq4"]["seeds"]["0"]["kld_mean"]


def test_a_changed_calibration_set_still_reuses_ledger_runs_of_arms_that_read_none(tiny_reference, tmp_path):
    """data.calib changed (a new experiment): the RTN arm's runs are copied from the ledger, the GPTQ
    arm, whose result depends on the calibration tokens, runs again."""
    url = f"sqlite:///{tmp_path/'c.db'}"
    spec = {"title": "t", "data": {"eval": {"tokens": 1024, "ctx": 128}, "calib": {"samples": 2, "seq_len": 32}},
            "seeds": [0], "arms": {"rtn4": {"codec": {"uniform": {"bits": 4, "group": 32}}},
                                   "gptq4": {"codec": {"uniform": {"bits": 4, "group": 32}}, "solver": "gptq"}}}
    runner.run_spec(spec, db_url=url, loaded=tiny_reference, compress=False, log=lambda m: None)
    logs = []
    spec2 = dict(spec, data=dict(spec["data"], calib={"samples": 3, "seq_len": 32}))
    runner.run_spec(spec2, db_url=url, loaded=tiny_reference, compress=False, log=logs.append)
    reused = [m for m in logs if "stored result reused" in m]
    assert len(reused) == 1 and "rtn4" in reused[0]
