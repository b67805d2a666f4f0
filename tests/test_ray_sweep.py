"""Ray sweeps (quantatlas/sweep.py): arms x seeds as Ray tasks on a local Ray of 2 CPUs give the
serial run's document and ledger rows, resume like it, report failed tasks; without ray, one line."""
import json

import pytest
import torch

from quantatlas import runner, sweep
from quantatlas.spec import parse_spec


def spec_dict(**data):
    return {
        "title": "ray sweep", "hypothesis": "a Ray sweep equals a serial run", "model": "reference",
        "data": {"eval": {"tokens": 2048, "ctx": 128}, "calib": {"samples": 4, "seq_len": 64}, **data},
        "seeds": [0, 1], "control": "gptq4",
        "arms": {  # both depend on the seed: 4 tasks
            "gptq4": {"solver": "gptq", "codec": {"uniform": {"bits": 4, "group": 32}}},
            "turbo3": {"codec": {"turbo": {"bits": 3, "group": 32}}},
        },
    }


@pytest.fixture(scope="module")
def local_ray():
    pytest.importorskip("ray", reason="ray is in the test extra: pip install -e '.[test]'")
    ray, started = sweep.start_ray(None, num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


def _runs(db, exp_id):
    from quantatlas.atlas.ledger import Ledger

    return sorted(Ledger(db).runs(exp_id), key=lambda r: (r["arm"], r["seed"]))


def _without_seconds(metrics):
    return {k: v for k, v in metrics.items() if k != "seconds"}


def test_ray_sweep_equals_serial_run_and_resumes(tiny_reference, local_ray, tmp_path):
    spec = parse_spec(spec_dict())
    quiet = dict(loaded=tiny_reference, compress=False, log=lambda m: None)
    db_serial, db_ray = f"sqlite:///{tmp_path / 'serial.db'}", f"sqlite:///{tmp_path / 'ray.db'}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a task's threads: results on CPU depend on them, so does the environment key
    try:
        serial = runner.run_spec(spec, tmp_path / "serial.json", db_url=db_serial, **quiet)
    finally:
        torch.set_num_threads(threads)
    on_ray = sweep.run_spec_ray(spec, tmp_path / "ray.json", db_url=db_ray, task_cpus=1, **quiet)
    assert on_ray["environment"]["device"] == serial["environment"]["device"] == "cpu:" + \
        serial["environment"]["device"].split(":")[1] + ":1threads"

    assert "failures" not in on_ray
    assert on_ray["experiment_id"] == serial["experiment_id"]
    exp = serial["experiment_id"]
    a, b = _runs(db_serial, exp), _runs(db_ray, exp)
    assert [(r["id"], r["arm"], r["seed"]) for r in a] == [(r["id"], r["arm"], r["seed"]) for r in b]
    assert len(a) == 4 and len({r["id"] for r in a}) == 4
    for ra, rb in zip(a, b):
        assert _without_seconds(ra["metrics"]) == _without_seconds(rb["metrics"])   # exactly
        assert (ra["per_token_kld"] == rb["per_token_kld"]).all()
    assert a[0]["metrics"]["kld_mean"] != a[1]["metrics"]["kld_mean"]  # seeds differ: both really ran
    for name, arm in serial["arms"].items():
        assert on_ray["arms"][name]["key"] == arm["key"]
        assert {s: _without_seconds(r) for s, r in on_ray["arms"][name]["seeds"].items()} == \
               {s: _without_seconds(r) for s, r in arm["seeds"].items()}
    assert list(on_ray["arms"]) == list(serial["arms"])
    assert [v["result"] for v in on_ray["verdicts"]] == [v["result"] for v in serial["verdicts"]]

    # a partial Ray run (one result missing from the JSON) reruns only that one
    partial = json.loads((tmp_path / "ray.json").read_text())
    del partial["arms"]["turbo3"]["seeds"]["1"]
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    messages = []
    resumed = sweep.run_spec_ray(spec, tmp_path / "partial.json", ledger=False, loaded=tiny_reference,
                                 compress=False, log=messages.append)
    assert sorted(messages) == sorted(f"{n} seed {s}: stored result reused"
                                      for n, s in [("gptq4", 0), ("gptq4", 1), ("turbo3", 0)])
    for name, s in [("gptq4", 0), ("gptq4", 1), ("turbo3", 0)]:   # "seconds" too: kept, not recomputed
        assert resumed["arms"][name]["seeds"][str(s)] == on_ray["arms"][name]["seeds"][str(s)]
    assert _without_seconds(resumed["arms"]["turbo3"]["seeds"]["1"]) == \
        _without_seconds(on_ray["arms"]["turbo3"]["seeds"]["1"])

    # everything in the ledger already: nothing runs, nothing is written twice
    again = sweep.run_spec_ray(spec, None, db_url=db_ray, **quiet)
    assert again["arms"]["gptq4"]["seeds"]["1"] == on_ray["arms"]["gptq4"]["seeds"]["1"]
    assert [r["id"] for r in _runs(db_ray, exp)] == [r["id"] for r in b]


def test_failed_task_is_reported_and_the_others_kept(tiny_reference, local_ray, tmp_path):
    d = spec_dict(calib={"source": str(tmp_path / "missing.txt"), "samples": 4, "seq_len": 64})
    d["arms"]["rtn4"] = {"codec": {"uniform": {"bits": 4, "group": 32}}}   # needs no calibration
    del d["arms"]["turbo3"], d["control"]
    db = f"sqlite:///{tmp_path / 'l.db'}"
    doc = sweep.run_spec_ray(parse_spec(d), None, db_url=db, loaded=tiny_reference, compress=False,
                             log=lambda m: None, retries=1)
    assert [(f["arm"], f["seed"]) for f in doc["failures"]] == [("gptq4", 0), ("gptq4", 1)]
    assert all("ModelLoadError" in f["error"] and "missing.txt" in f["error"] for f in doc["failures"])
    assert "gptq4" not in doc["arms"] and set(doc["arms"]["rtn4"]["seeds"]) == {"0", "1"}
    assert [(r["arm"], r["seed"]) for r in _runs(db, doc["experiment_id"])] == [("rtn4", 0), ("rtn4", 1)]


def test_without_ray_the_cli_says_how_to_install(monkeypatch, tmp_path):
    import builtins

    from typer.testing import CliRunner

    from quantatlas.cli import app

    real_import = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(spec_dict()))   # JSON is YAML
    out = CliRunner().invoke(app, ["run", str(path), "--ray"])
    assert out.exit_code == 2
    assert out.output.strip().splitlines() == ["error: ray is not installed: pip install 'quantatlas[ray]'"]


@pytest.mark.parametrize("argv, address", [(["S", "--ray"], None), (["--ray", "S", "--quiet"], None),
                                            (["S", "--ray", "--quiet"], None), (["S", "--ray", "auto"], "auto")])
def test_cli_ray_address_is_optional(monkeypatch, tmp_path, argv, address):
    from typer.testing import CliRunner

    from quantatlas.cli import app

    seen = {}

    def fake(spec, json_path, address=None, **k):
        seen["address"] = address
        return {"title": "t", "model": "m", "model_hash": "h", "eval_fingerprint": "f", "eval_tokens_scored": 1,
                "environment": {"device": "cpu"}, "arms": {}, "failures": [{"arm": "a", "seed": 0, "error": "E: x"}]}

    monkeypatch.setattr(sweep, "run_spec_ray", fake)
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(spec_dict()))
    out = CliRunner().invoke(app, ["run"] + [str(path) if a == "S" else a for a in argv])
    assert seen == {"address": address}
    assert out.exit_code == 1 and "failed: a seed 0: E: x" in out.output   # a failed task: reported, exit 1


def test_an_address_nothing_answers_is_a_one_line_error_before_ray_starts():
    import socket

    with socket.socket() as s:   # a port nobody listens on: bound, then closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ValueError, match=rf"--ray {address}: nothing answers at 127.0.0.1:{port}"):
            sweep._check_reachable(address)
    with socket.socket() as s:   # something listening: no error
        s.bind(("127.0.0.1", 0))
        s.listen()
        sweep._check_reachable(f"127.0.0.1:{s.getsockname()[1]}")
    sweep._check_reachable("auto")   # no port: left to Ray
    with pytest.raises(ValueError, match="port 99999 is not a TCP port"):
        sweep._check_reachable("127.0.0.1:99999")


def test_a_task_larger_than_the_local_ray_is_refused_before_anything_runs():
    pytest.importorskip("ray", reason="ray is in the test extra: pip install -e '.[test]'")
    with pytest.raises(ValueError, match="--task-cpus 3: more than the local Ray's 2 CPUs"):
        sweep.run_spec_ray(spec_dict(), None, num_cpus=2, task_cpus=3, ledger=False)
