"""The KV-cache and activation steps of a recipe: where they hook in, what they compute, and the
bits per stored value they report, against computations written here."""
from __future__ import annotations

import copy

import pytest
import torch



def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


TOKENS = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))


def _with_kv(model, **cfg):
    from quantatlas.quant.kv import KVCacheConfig, KVCacheQuantizer

    m = copy.deepcopy(model)
    q = KVCacheQuantizer(KVCacheConfig(**cfg))
    q.attach(m)
    return m, q


def test_kv_zero_values_equal_a_model_whose_v_proj_is_zero(tiny_reference):
    model = tiny_reference.model
    quantized, _ = _with_kv(model, v={"toy_zero": {}})
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for layer in zeroed.model.layers:
            layer.self_attn.v_proj.weight.zero_()      # V = 0, so attention outputs 0 into o_proj
    torch.testing.assert_close(_logits(quantized, TOKENS), _logits(zeroed, TOKENS), atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(model, TOKENS), _logits(zeroed, TOKENS), atol=1e-3)


def test_kv_without_codecs_changes_nothing_and_q8_0_changes_a_little(tiny_reference):
    model = tiny_reference.model
    same, q = _with_kv(model)
    assert torch.equal(_logits(same, TOKENS), _logits(model, TOKENS))
    assert q.bits(32) == {"kv_bits_k": 16.0, "kv_bits_v": 16.0, "kv_bits": 16.0}
    q8, q = _with_kv(model, k="q8_0", v="q8_0")
    diff = (_logits(q8, TOKENS) - _logits(model, TOKENS)).abs().max()
    assert 0 < diff < 0.05 * _logits(model, TOKENS).abs().max()
    assert q.bits(32) == {"kv_bits_k": 8.5, "kv_bits_v": 8.5, "kv_bits": 8.5}   # 34 bytes per 32 values


def test_kv_keys_are_quantized_after_rope(tiny_reference):
    """The hook sees the cached keys: K after k_norm and RoPE, one row per token and head."""
    from quantatlas.quant import kv as kv_module

    model = tiny_reference.model
    seen = {}
    original = kv_module.fake_quantize_heads

    def spy(x, codec):
        if codec is not None:
            seen.setdefault("k", x.detach().clone())
        return original(x, codec)

    attn = model.model.layers[0].self_attn
    captured = {}
    h = attn.k_proj.register_forward_hook(lambda m, a, o: captured.setdefault("k_proj", o.detach()))
    try:
        quantized, _ = _with_kv(model, k="q8_0")
        kv_module.fake_quantize_heads = spy
        _logits(quantized, TOKENS[:1])
    finally:
        kv_module.fake_quantize_heads = original
        h.remove()
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    k = attn.k_norm(captured["k_proj"].view(1, TOKENS.shape[1], -1, attn.head_dim)).transpose(1, 2)
    pos = torch.arange(TOKENS.shape[1])[None]
    cos, sin = model.model.rotary_emb(k, pos)
    _, k_rope = apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(seen["k"], k_rope, atol=1e-5, rtol=0)


def _direct_int8_per_token(x):
    out = torch.empty_like(x)
    for t in range(x.shape[0]):
        s = float(torch.tensor(float(x[t].abs().max()) / 127).half()) or 1.0
        out[t] = torch.clamp(torch.round(x[t] / s), -128, 127) * s
    return out


def test_activation_fake_quant_of_one_linear_is_per_token(tiny_reference):
    from quantatlas.quant.act import ActConfig, ActivationQuantizer

    model = copy.deepcopy(tiny_reference.model)
    down = model.model.layers[0].mlp.down_proj
    inputs = {}
    down.register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0].detach().clone()))
    outputs = {}
    down.register_forward_hook(lambda m, a, o: outputs.setdefault("y", o.detach().clone()))
    act = ActivationQuantizer(ActConfig(codec={"uniform": {"bits": 8, "group": None, "scale": "absmax"}}))
    act.attach(model)
    _logits(model, TOKENS[:1])
    x = inputs["x"].reshape(-1, down.in_features)
    want = _direct_int8_per_token(x) @ down.weight.detach().T
    torch.testing.assert_close(outputs["y"].reshape(-1, down.out_features), want, atol=1e-5, rtol=1e-5)
    widths = [64, 64, 64, 128, 64, 64, 128] * 2   # q, k, v, o (n_heads·head_dim = 128), gate, up, down
    want_bits = sum(w * (8 + 16 / w) for w in widths) / sum(widths)
    assert act.bits()["act_bits"] == pytest.approx(want_bits)
    assert "lm_head" not in [n for n, m in model.named_modules() if m._forward_pre_hooks and "head" in n]


def test_a_spec_with_kv_and_act_runs_and_reports_their_bits(tiny_reference):
    from quantatlas.runner import format_table, run_spec
    from quantatlas.spec import parse_spec

    spec = parse_spec({"title": "runtime", "data": {"eval": {"tokens": 2048, "ctx": 128}}, "control": "w8",
                       "arms": {"w8": {"codec": {"uniform": {"bits": 8, "group": None}}},
                                "w8a8": {"codec": {"uniform": {"bits": 8, "group": None}},
                                         "act": {"codec": {"uniform": {"bits": 8, "group": None}}}},
                                "kv4": {"kv": {"k": {"uniform": {"bits": 4, "group": 32}}}}}})
    doc = run_spec(spec, ledger=False, loaded=tiny_reference, compress=False, log=lambda m: None)
    r = {name: arm["seeds"]["0"] for name, arm in doc["arms"].items()}
    assert "kv_bits" not in r["w8"] and r["kv4"]["kv_bits_k"] == 4 + 16 / 32 and r["kv4"]["kv_bits_v"] == 16
    assert r["kv4"]["bits_per_weight"] == 16 and r["kv4"]["kld_mean"] > 0
    assert r["w8a8"]["act_bits"] > 8 and r["w8a8"]["kld_mean"] > r["w8"]["kld_mean"] > 0
    table = format_table(doc)
    assert "KV bits" in table and "act bits" in table
    assert [line.split()[3] for line in table.splitlines() if line.startswith("kv4")] == ["10.250"]
