"""Command-line options a user can get wrong (--device, --seed(s), a results file that is not one): one line,
exit 2, no traceback, before the model is loaded."""
import pytest
from typer.testing import CliRunner

from quantatlas.cli import app

SPEC = """\
title: t
seeds: [0]
data: {calib: {samples: 4, seq_len: 64}, eval: {tokens: 1024, ctx: 128}}
arms:
  int4: {codec: {uniform: {bits: 4, group: 128}}}
  al: {codec: {uniform: {bits: 4, group: 128}}, allocate: {candidates: [{uniform: {bits: 3, group: 128}}],
                                                           target: {bits_per_weight: 3.5}}}
"""


@pytest.fixture
def spec(tmp_path, monkeypatch):
    import quantatlas.models

    def never(*a, **k):
        raise AssertionError("the model was loaded before the option was refused")
    monkeypatch.setattr(quantatlas.models, "load_model", never)
    path = tmp_path / "s.yaml"
    path.write_text(SPEC)
    return path


def refused(args) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    return r.stderr.strip()


@pytest.mark.parametrize("device, words", [
    ("tpu", "error: --device: 'tpu' is not a torch device (cpu, cuda, cuda:1 ...)"),
    ("meta", "error: --device: 'meta' holds no numbers to compute with"),
])
@pytest.mark.parametrize("command", ["run", "export", "sensitivity"])
def test_a_device_torch_cannot_compute_on_is_refused_first(spec, tmp_path, command, device, words):
    extra = {"run": [], "export": ["--arm", "int4", "--out", tmp_path / "x.gguf"], "sensitivity": []}[command]
    assert refused([command, spec, "--device", device, *extra]) == words


def test_a_cuda_device_this_machine_lacks_is_refused(spec):
    import torch

    bad = f"cuda:{torch.cuda.device_count()}"        # one past the last GPU (cuda:0 where there is none)
    assert refused(["run", spec, "--device", bad]).startswith(f"error: --device: {bad!r} is not available here (")


def test_seeds_on_the_command_line_are_checked(spec, tmp_path):
    assert refused(["sensitivity", spec, "--seeds", "a,b", "--no-ledger"]) == \
        "error: --seeds 'a,b': comma-separated integers from 0 to 2^32 - 1 (e.g. 0,1,2)"
    assert refused(["sensitivity", spec, "--seeds=-1", "--no-ledger"]) == \
        "error: --seeds '-1': a seed must be an integer from 0 to 2^32 - 1"
    r = CliRunner().invoke(app, ["export", str(spec), "--arm", "int4", "--seed", "-5", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--seed" in r.output and "Traceback" not in r.output


def test_context_slope_names_a_file_that_is_not_a_results_document(spec, tmp_path):
    assert refused(["context-slope", spec]) == \
        f"error: {spec}: not a results JSON of `quantatlas run --json` (Expecting value: line 1 column 1 (char 0))"
    listed = tmp_path / "l.json"
    listed.write_text("[1, 2]")
    assert refused(["context-slope", listed]) == \
        f"error: {listed}: not a results JSON of `quantatlas run --json` (no 'arms' mapping)"
