"""`quantatlas export`: one arm x seed, quantized as `run` quantizes it, written as GGUF."""
import numpy as np
import torch
from typer.testing import CliRunner

from quantatlas.cli import app


def test_export_gguf_matches_the_arm(tmp_path):
    import gguf
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from quantatlas.models import load_model
    from quantatlas.measure import quantize_arm
    from quantatlas.spec import load_spec

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "m")
    spec = tmp_path / "s.yaml"
    spec.write_text(f"title: t\nmodel: {tmp_path / 'm'}\narms:\n  q8: {{codec: {{gguf: Q8_0}}}}\n"
                    "  int4: {codec: {uniform: {bits: 4, group: 64}}}\n")
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(app, ["export", str(spec), "--arm", "q8", "--out", str(out)])
    assert r.exit_code == 0, r.output
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    s = load_spec(spec)
    qm = quantize_arm(load_model(s.model), s, "q8", 0)
    model, packed = qm.model, qm.packed
    want = model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    t = tensors["blk.1.ffn_down.weight"]
    got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
    assert np.array_equal(got, want)
    # a uniform-grid arm has no GGUF type: a one-line error, exit 2
    bad = CliRunner().invoke(app, ["export", str(spec), "--arm", "int4", "--out", str(tmp_path / "x.gguf")])
    assert bad.exit_code == 2 and "uniform" in bad.stderr and "Traceback" not in bad.output
    missing = CliRunner().invoke(app, ["export", str(spec), "--arm", "nope", "--out", str(tmp_path / "x.gguf")])
    assert missing.exit_code == 2 and "'nope' is not one of the arms" in missing.stderr
