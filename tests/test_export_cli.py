"""`quantatlas export`: one arm x seed, quantized as `run` quantizes it, written as GGUF."""
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from quantatlas.cli import app


def _tiny_qwen3(path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    Qwen3ForCausalLM(cfg).save_pretrained(path)


def _exported(tmp_path, arms: str, arm: str):
    """A tiny Qwen3 and a spec with these `arms` (YAML lines); `arm` exported as GGUF. Returns the spec's
    path, the file's tensors by name, and the arm quantized as `run` quantizes it."""
    import gguf

    from quantatlas.models import load_model
    from quantatlas.measure import quantize_arm
    from quantatlas.spec import load_spec

    _tiny_qwen3(tmp_path / "m")
    spec = tmp_path / "s.yaml"
    spec.write_text(f"title: t\nmodel: {tmp_path / 'm'}\narms:\n{arms}")
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(app, ["export", str(spec), "--arm", arm, "--out", str(out)])
    assert r.exit_code == 0, r.output
    s = load_spec(spec)
    return spec, {t.name: t for t in gguf.GGUFReader(out).tensors}, quantize_arm(load_model(s.model), s, arm, 0)


def test_export_gguf_matches_the_arm(tmp_path):
    import gguf

    arms = "  q8: {codec: {gguf: Q8_0}}\n  int4: {codec: {uniform: {bits: 4, group: 64}}}\n"
    spec, tensors, qm = _exported(tmp_path, arms, "q8")
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    want = qm.model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    t = tensors["blk.1.ffn_down.weight"]
    got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
    assert np.array_equal(got, want)
    # a uniform-grid arm has no GGUF type: a one-line error, exit 2
    bad = CliRunner().invoke(app, ["export", str(spec), "--arm", "int4", "--out", str(tmp_path / "x.gguf")])
    assert bad.exit_code == 2 and "uniform" in bad.stderr and "Traceback" not in bad.output
    missing = CliRunner().invoke(app, ["export", str(spec), "--arm", "nope", "--out", str(tmp_path / "x.gguf")])
    assert missing.exit_code == 2 and "'nope' is not one of the arms" in missing.stderr


@pytest.mark.parametrize("fmt, arm, field, words", [
    ("gguf", "{codec: {uniform: {bits: 4, group: 64}}}", "arms.a.codec", "not a ggml block type"),
    ("gguf", "{codec: q8_0, overrides: [{match: down, codec: {uniform: {bits: 8, group: 64}}}]}",
     "arms.a.overrides.0.codec", "not a ggml block type"),
    ("gguf", "{codec: q8_0, solver: gptq, solver_options: {incoherence: true}}", "arms.a.solver_options.incoherence",
     "stores no rotation"),
    ("gguf", "{codec: q8_0, transforms: [{hadamard: {online: [down]}}]}", "arms.a.transforms.0",
     "hadamard.online"),
    ("gguf", "{codec: q8_0, recovery: {method: roste, steps: 2}}", "arms.a.recovery.rotation",
     "RoSTE may rotate down_proj's input online"),
    ("compressed-tensors", "{codec: {uniform: {bits: 4, group: 64}}, recovery: {method: roste, rotation: hadamard, "
     "steps: 2}}", "arms.a.recovery.rotation", "RoSTE may rotate"),
    ("gguf", "{codec: {uniform: {bits: 5, group: 64}}, freeze_dry: {tol: 0.5}}", "arms.a.codec", "not a ggml"),
])
def test_export_refuses_what_the_format_cannot_carry_before_any_compute(tmp_path, monkeypatch, fmt, arm, field, words):
    import quantatlas.measure
    import quantatlas.models

    def never(*a, **k):
        raise AssertionError("computed before refusing")

    monkeypatch.setattr(quantatlas.measure, "quantize_arm", never)
    monkeypatch.setattr(quantatlas.models, "load_model", never)
    spec = tmp_path / "s.yaml"
    spec.write_text(f"title: t\nmodel: {tmp_path / 'm'}\narms:\n  ok: {{codec: q8_0}}\n  a: {arm}\n")
    r = CliRunner().invoke(app, ["export", str(spec), "--arm", "a", "--format", fmt, "--out", str(tmp_path / "x")])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1
    assert f"{spec}:5:" in r.stderr and field in r.stderr and words in r.stderr
    assert not (tmp_path / "x").exists()


def test_freeze_dry_is_refused_by_name_on_a_ggml_codec_arm():
    from quantatlas.errors import UserError
    from quantatlas.export.gguf import check_arm
    from quantatlas.spec import parse_spec

    arm = parse_spec({"title": "t", "arms": {"a": {"codec": {"uniform": {"bits": 5, "group": 64}},
                                                   "freeze_dry": {"tol": 0.5}}}}, "spec").arms["a"]
    arm.codec = parse_spec({"title": "t", "arms": {"a": {"codec": "q8_0"}}}, "spec").arms["a"].codec
    with pytest.raises(UserError, match="arms.a.freeze_dry: a freeze-dried matrix") as e:
        check_arm(arm, "arms.a")
    assert e.value.field == "arms.a.freeze_dry"


def test_an_f16_override_is_written_as_f16(tmp_path):
    import gguf

    _, tensors, qm = _exported(tmp_path, "  a: {codec: q8_0, overrides: [{match: down, codec: f16}]}\n", "a")
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    down = tensors["blk.1.ffn_down.weight"]
    assert down.tensor_type == gguf.GGMLQuantizationType.F16
    assert "model.layers.1.mlp.down_proj.weight" in qm.packed      # stored by the f16 codec, written as F16
    want = qm.model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    assert np.array_equal(np.asarray(down.data).reshape(want.shape).astype(np.float32), want)
