"""Transforms keep the fp function and, on models with outlier channels, lower the quantization error."""
import copy
import hashlib

import pytest
import torch
from torch import nn

from quantatlas.context import RunContext
from quantatlas.quant.codecs import make_codec
from quantatlas.quant.hadamard import RandomizedHadamard
from quantatlas.quant.transforms import _llama, make_transform, transform_names

VOCAB, HIDDEN = 128, 64


def tiny(kind: str, seed: int = 0, tie: bool = False):
    """2-layer Llama/Qwen3 with GQA, random weights and random (non-unit) norm gains."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=160, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
               tie_word_embeddings=tie)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(attention_bias=True, **cfg))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
            else:
                p.normal_(0, 0.1)
    return model.eval()


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


TOKENS = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
CASES = [
    ("hadamard", {}),
    ("hadamard", {"block": 16, "online": ["o", "down"]}),
    ("hadamard", {"residual": False, "heads": True, "online": []}),
    ("equalize", {"alpha": 0.5}),
    ("awq", {"grid": 4, "codec": {"uniform": {"bits": 4, "group": 32}}}),
]


@pytest.mark.parametrize("kind,tie", [("llama", True), ("qwen3", False)])
@pytest.mark.parametrize("name,opts", CASES)
def test_logits_unchanged(kind, tie, name, opts):
    model = tiny(kind, tie=tie)
    before = logits(model, TOKENS)
    make_transform(name, opts).apply(model, TOKENS, RunContext(3))
    after = logits(model, TOKENS)
    assert (after - before).abs().max() < 1e-4 * before.abs().max()
    fresh = tiny(kind, tie=tie).state_dict()
    changed = any(not torch.equal(v, fresh[k]) for k, v in model.state_dict().items() if k in fresh)
    assert changed  # something was actually re-parametrised


def test_residual_rotation_folds_gains_and_rotates_stream():
    model = tiny("qwen3")
    ref = copy.deepcopy(model)
    make_transform("hadamard", {"heads": False, "online": []}).apply(model, None, RunContext(3))
    layers = _llama.layers(model)
    for norm in [l.input_norm for l in layers] + [l.post_norm for l in layers] + [_llama.final_norm(model)]:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    # the embedding rows are Q e_t with Q the seeded residual rotation
    digest = hashlib.sha256(b"3/residual").digest()   # the seed of run 3's residual rotation, written out
    q = RandomizedHadamard(HIDDEN, int.from_bytes(digest[:8], "little") >> 1).matrix().float()
    assert torch.allclose(model.model.embed_tokens.weight, ref.model.embed_tokens.weight @ q.T, atol=1e-6)
    # a reader: W' = W diag(γ) Qᵀ
    gamma = _llama.layers(ref)[0].input_norm.weight
    want = ref.model.layers[0].self_attn.q_proj.weight * gamma @ q.T
    assert torch.allclose(layers[0].q.weight, want, atol=1e-5)


def test_online_rotation_is_a_hook_that_calibration_sees():
    from quantatlas.models.calib import input_statistics
    from quantatlas.models.roles import find_roles

    model = tiny("llama")
    down = model.model.layers[1].mlp.down_proj
    h_before = input_statistics(model, {"down": down}, TOKENS)["down"].hessian.double()
    make_transform("hadamard", {"residual": False, "heads": False, "online": ["down"]}).apply(model, TOKENS, RunContext(0))
    assert type(down) is nn.Linear and down is model.model.layers[1].mlp.down_proj
    assert {t.role for t in find_roles(model)} >= {"q", "k", "v", "o", "gate", "up", "down"}
    q = down.input_rotation.rotation.matrix()
    h_after = input_statistics(model, {"down": down}, TOKENS)["down"].hessian.double()
    assert torch.allclose(h_after, q @ h_before @ q.T, atol=1e-4 * h_before.abs().max())
    with pytest.raises(ValueError, match="already rotated"):
        make_transform("hadamard", {"residual": False, "heads": False, "online": ["down"]}).apply(model, TOKENS)


def test_equalize_scales_are_h_diagonal_to_the_alpha():
    from quantatlas.models.calib import input_statistics

    model = tiny("qwen3")
    q_proj = model.model.layers[0].self_attn.q_proj
    h0 = 2 * input_statistics(model, {"q": q_proj}, TOKENS, hessian=False)["q"].sq_mean.double()
    w0 = q_proj.weight.detach().double().clone()
    make_transform("equalize", {"alpha": 0.25, "roles": ["qkv"]}).apply(model, TOKENS)
    s = h0 ** 0.25
    assert torch.allclose(q_proj.weight.double(), w0 * s, rtol=1e-5)
    # the solver's view: H ← diag(1/s) H diag(1/s)
    h1 = 2 * input_statistics(model, {"q": q_proj}, TOKENS, hessian=False)["q"].sq_mean.double()
    assert torch.allclose(h1, h0 / s ** 2, rtol=1e-4)


def _quantize_linears(model, codec):
    with torch.no_grad():
        for layer in _llama.layers(model):
            for lin in layer.linears().values():
                lin.weight.copy_(codec.decode(codec.encode(lin.weight.float())))


def _kld(model, ref_logits):
    lp, lr = torch.log_softmax(logits(model, TOKENS), -1), torch.log_softmax(ref_logits, -1)
    return float((lr.exp() * (lr - lp)).sum(-1).mean())


def _outlier_model(where: str):
    """Weight outliers: 3 input columns ×10 in every linear. Activation outliers: 3 norm-gain channels ×30."""
    model = tiny("llama", seed=1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in _llama.layers(model):
            if where == "weights":
                for lin in layer.linears().values():
                    lin.weight[:, torch.randperm(lin.in_features, generator=gen)[:3]] *= 10
            else:
                for norm in (layer.input_norm, layer.post_norm):
                    norm.weight[torch.randperm(HIDDEN, generator=gen)[:3]] *= 30
    return model


@pytest.mark.parametrize("where,name,opts", [
    ("weights", "hadamard", {}),
    ("activations", "equalize", {"alpha": 0.15}),
    ("activations", "awq", {"grid": 10, "codec": {"uniform": {"bits": 3, "group": 32}}}),
])
def test_transform_lowers_quantization_error_with_outliers(where, name, opts):
    codec = make_codec("uniform", {"bits": 3, "group": 32})
    base = _outlier_model(where)
    ref = logits(base, TOKENS)
    plain = copy.deepcopy(base)
    _quantize_linears(plain, codec)
    transformed = copy.deepcopy(base)
    transform = make_transform(name, opts)
    transform.apply(transformed, TOKENS, RunContext(0))
    _quantize_linears(transformed, codec)
    assert _kld(transformed, ref) < 0.85 * _kld(plain, ref)
    if name == "awq":
        assert set(transform.chosen) == {(i, g) for i in (0, 1) for g in ("qkv", "gate_up", "o", "down")}
        assert any(a > 0 for a in transform.chosen.values())


def test_awq_never_worse_than_no_scales_on_its_objective():
    model = tiny("qwen3", seed=2)
    awq = make_transform("awq", {"grid": 5, "codec": {"turbo": {"bits": 2, "group": 16}}, "roles": ["down"]})
    from quantatlas.models.calib import input_statistics

    layer = _llama.layers(model)[0]
    st = input_statistics(model, {"d": layer.down}, TOKENS)["d"]
    s = awq.search(layer, "down", st.abs_mean, st.hessian)
    ones = torch.ones(layer.down.in_features)
    w = [layer.down.weight.detach().float()]
    h = st.hessian.double()
    assert awq._output_error(w, s.float(), h) <= awq._output_error(w, ones, h) + 1e-12


def test_equalize_refuses_inputs_rotated_online():
    model = tiny("llama")
    make_transform("hadamard", {"online": ["down"]}).apply(model, None)
    with pytest.raises(ValueError, match="before hadamard"):
        make_transform("equalize", {"alpha": 0.1}).apply(model, TOKENS)
    make_transform("equalize", {"alpha": 0.1, "roles": ["qkv", "gate_up", "o"]}).apply(model, TOKENS)


@pytest.mark.parametrize("name,opts,match", [
    ("rotate", {}, "unknown transform"),
    ("hadamard", {"block": 0}, "hadamard.block"),
    ("hadamard", {"online": ["q"]}, "hadamard.online"),
    ("hadamard", {"residual": "yes"}, "hadamard.residual"),
    ("hadamard", {"spin": True}, "hadamard"),
    ("equalize", {"alpha": -0.1}, "equalize.alpha"),
    ("equalize", {"roles": ["mlp"]}, "equalize.roles"),
    ("awq", {"grid": 0}, "awq.grid"),
    ("awq", {"codec": {"uniform": {"bits": 4}, "turbo": {}}}, "awq.codec"),
    ("awq", {"codec": {"nope": {}}}, "unknown codec"),
])
def test_bad_options(name, opts, match):
    with pytest.raises(ValueError, match=match):
        make_transform(name, opts)


def test_runtime_errors_name_the_problem():
    model = tiny("llama")
    with pytest.raises(ValueError, match="awq.codec is not set"):
        make_transform("awq", {}).apply(model, TOKENS)
    with pytest.raises(ValueError, match="calibration tokens"):
        make_transform("equalize", {}).apply(model, None)
    with pytest.raises(ValueError, match="hadamard: width"):  # 64 is not a multiple of 48
        make_transform("hadamard", {"block": 48}).apply(model, None)
    assert torch.equal(logits(model, TOKENS), logits(tiny("llama"), TOKENS))  # refused before any edit


def test_refuses_other_layouts():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=32)).eval()
    for name in transform_names():
        with pytest.raises(ValueError, match="Llama/Qwen-style"):
            make_transform(name, {"codec": {"uniform": {"bits": 4}}} if name == "awq" else {}).apply(gpt2, TOKENS)
