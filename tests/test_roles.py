"""Tensor roles on tiny random models of each family (built from config classes, no network).

Expected roles, shapes and layer prefixes are written from each architecture's definition
(config fields, the published module layout), not read back from quantatlas.
"""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from transformers.pytorch_utils import Conv1D

from quantatlas.models.roles import (
    ROLES,
    UnmatchedModulesError,
    decoder_layers,
    find_roles,
    get_weight,
    is_tied,
    layer_prefix,
    quantizable,
    sequential_groups,
    set_weight,
)

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, N_LAYERS = 32, 4, 2, 16, 48, 100, 3
TOKEN_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _hf(config_cls, model_cls, **extra):
    def make(**overrides):
        kw = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=N_LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                  vocab_size=VOCAB, **TOKEN_IDS)
        kw.update(extra)
        kw.update(overrides)
        torch.manual_seed(0)
        return model_cls(config_cls(**kw)).eval()
    return make


def _gpt2(**overrides):
    torch.manual_seed(0)
    kw = dict(n_embd=HIDDEN, n_inner=INTER, n_layer=N_LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=64,
              **TOKEN_IDS)
    kw.update(overrides)
    return T.GPT2LMHeadModel(T.GPT2Config(**kw)).eval()


def _no_gqa(config_cls, model_cls, **extra):
    def make(**overrides):
        kw = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=N_LAYERS,
                  num_attention_heads=HEADS, vocab_size=VOCAB, **extra)
        kw.update(overrides)
        torch.manual_seed(0)
        return model_cls(config_cls(**kw)).eval()
    return make


def _opt(**overrides):
    torch.manual_seed(0)
    kw = dict(hidden_size=HIDDEN, ffn_dim=INTER, num_hidden_layers=N_LAYERS, num_attention_heads=HEADS,
              vocab_size=VOCAB, word_embed_proj_dim=HIDDEN, max_position_embeddings=64, **TOKEN_IDS)
    kw.update(overrides)
    return T.OPTForCausalLM(T.OPTConfig(**kw)).eval()


def _gptj(**overrides):
    torch.manual_seed(0)
    kw = dict(n_embd=HIDDEN, n_inner=INTER, n_layer=N_LAYERS, n_head=HEADS, vocab_size=VOCAB, rotary_dim=4,
              n_positions=64)
    kw.update(overrides)
    return T.GPTJForCausalLM(T.GPTJConfig(**kw)).eval()


SPLIT_ATTENTION = Counter(q=1, k=1, v=1, o=1)
SWIGLU = Counter(gate=1, up=1, down=1)
PLAIN_MLP = Counter(up=1, down=1)
FUSED = Counter(qkv=1, o=1)

q_out, kv_out = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
GQA_SHAPES = dict(q=(q_out, HIDDEN), k=(kv_out, HIDDEN), v=(kv_out, HIDDEN), o=(HIDDEN, q_out),
                  gate=(INTER, HIDDEN), up=(INTER, HIDDEN), down=(HIDDEN, INTER))
MHA_SHAPES = dict(q=(HIDDEN, HIDDEN), k=(HIDDEN, HIDDEN), v=(HIDDEN, HIDDEN), o=(HIDDEN, HIDDEN),
                  qkv=(3 * HIDDEN, HIDDEN), up=(INTER, HIDDEN), down=(HIDDEN, INTER))

# family -> (builder, roles in every layer, roles outside layers, layer prefix, tied by default, matrix shapes)
FAMILIES = {
    "llama": (_hf(T.LlamaConfig, T.LlamaForCausalLM), SPLIT_ATTENTION + SWIGLU + Counter(norm=2),
              Counter(embed=1, norm=1, head=1), "model.layers", False, GQA_SHAPES),
    "qwen2": (_hf(T.Qwen2Config, T.Qwen2ForCausalLM), SPLIT_ATTENTION + SWIGLU + Counter(norm=2),
              Counter(embed=1, norm=1, head=1), "model.layers", False, GQA_SHAPES),
    "qwen3": (_hf(T.Qwen3Config, T.Qwen3ForCausalLM), SPLIT_ATTENTION + SWIGLU + Counter(norm=2, q_norm=1, k_norm=1),
              Counter(embed=1, norm=1, head=1), "model.layers", False, GQA_SHAPES),
    "mistral": (_hf(T.MistralConfig, T.MistralForCausalLM), SPLIT_ATTENTION + SWIGLU + Counter(norm=2),
                Counter(embed=1, norm=1, head=1), "model.layers", False, GQA_SHAPES),
    "gemma": (_hf(T.GemmaConfig, T.GemmaForCausalLM), SPLIT_ATTENTION + SWIGLU + Counter(norm=2),
              Counter(embed=1, norm=1, head=1), "model.layers", True, GQA_SHAPES),
    "gemma2": (_hf(T.Gemma2Config, T.Gemma2ForCausalLM), SPLIT_ATTENTION + SWIGLU + Counter(norm=4),
               Counter(embed=1, norm=1, head=1), "model.layers", True, GQA_SHAPES),
    "gemma3": (_hf(T.Gemma3TextConfig, T.Gemma3ForCausalLM),
               SPLIT_ATTENTION + SWIGLU + Counter(norm=4, q_norm=1, k_norm=1),
               Counter(embed=1, norm=1, head=1), "model.layers", True, GQA_SHAPES),
    "phi3": (_hf(T.Phi3Config, T.Phi3ForCausalLM), FUSED + Counter(gate_up=1, down=1, norm=2),
             Counter(embed=1, norm=1, head=1), "model.layers", False,
             dict(qkv=(q_out + 2 * kv_out, HIDDEN), o=(HIDDEN, q_out), gate_up=(2 * INTER, HIDDEN),
                  down=(HIDDEN, INTER))),
    "gpt2": (_gpt2, FUSED + PLAIN_MLP + Counter(norm=2), Counter(embed=1, pos_embed=1, norm=1, head=1),
             "transformer.h", True, MHA_SHAPES),
    "gpt_neox": (_no_gqa(T.GPTNeoXConfig, T.GPTNeoXForCausalLM), FUSED + PLAIN_MLP + Counter(norm=2),
                 Counter(embed=1, norm=1, head=1), "gpt_neox.layers", False, MHA_SHAPES),
    # further families, to show detection is by structure rather than a per-model table
    "phi": (_no_gqa(T.PhiConfig, T.PhiForCausalLM), SPLIT_ATTENTION + PLAIN_MLP + Counter(norm=1),
            Counter(embed=1, norm=1, head=1), "model.layers", False, MHA_SHAPES),
    "gptj": (_gptj, SPLIT_ATTENTION + PLAIN_MLP + Counter(norm=1), Counter(embed=1, norm=1, head=1),
             "transformer.h", False, MHA_SHAPES),
    "opt": (_opt, SPLIT_ATTENTION + PLAIN_MLP + Counter(norm=2), Counter(embed=1, pos_embed=1, norm=1, head=1),
            "model.decoder.layers", True, MHA_SHAPES),
    "falcon": (_no_gqa(T.FalconConfig, T.FalconForCausalLM, new_decoder_architecture=False, multi_query=False),
               FUSED + PLAIN_MLP + Counter(norm=1), Counter(embed=1, norm=1, head=1), "transformer.h", False,
               dict(MHA_SHAPES, up=(4 * HIDDEN, HIDDEN), down=(HIDDEN, 4 * HIDDEN))),
}
SEQUENTIAL = {
    "split_swiglu": [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]],
    "fused_swiglu": [["qkv"], ["o"], ["gate_up"], ["down"]],
    "fused_plain": [["qkv"], ["o"], ["up"], ["down"]],
    "split_plain": [["q", "k", "v"], ["o"], ["up"], ["down"]],
}


def _matrix_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls on a loaded 2-core machine: waking a second thread costs ~15 ms per op.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    return {name: spec[0]() for name, spec in FAMILIES.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_matrix_has_exactly_one_role(models, family):
    model = models[family]
    names = [t.name for t in quantizable(model, include_head=True)]
    assert Counter(names) == Counter(_matrix_names(model))
    assert max(Counter(names).values()) == 1
    roles = find_roles(model)
    assert len({t.name for t in roles}) == len(roles)
    assert all(t.role in ROLES for t in roles)
    # model order: the order named_modules walks
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    assert [order[t.name] for t in roles] == sorted(order[t.name] for t in roles)
    # the head only when asked
    assert "head" not in {t.role for t in quantizable(model)}
    assert [t.role for t in quantizable(model, include_head=True)].count("head") == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_role_sets_per_layer(models, family):
    model = models[family]
    _, per_layer, outside, *_ = FAMILIES[family]
    roles = find_roles(model)
    for i in range(N_LAYERS):
        assert Counter(t.role for t in roles if t.layer == i) == per_layer, f"layer {i}"
    assert Counter(t.role for t in roles if t.layer is None) == outside
    assert {t.layer for t in roles} == {None, *range(N_LAYERS)}


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_layers_and_membership(models, family):
    model = models[family]
    prefix = FAMILIES[family][3]
    assert layer_prefix(model) == prefix
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers == N_LAYERS
    assert all(a is b for a, b in zip(layers, model.get_submodule(prefix)))
    for t in find_roles(model):
        inside = [i for i, block in enumerate(layers) if any(m is t.module for m in block.modules())]
        assert inside == ([] if t.layer is None else [t.layer]), t.name


def test_layer_prefix_prefers_the_largest_list_of_blocks():
    model = _hf(T.LlamaConfig, T.LlamaForCausalLM)()
    # a deeper, longer list of parameter-free blocks and a shallower list of small blocks
    model.model.layers[0].self_attn.dropouts = torch.nn.ModuleList(torch.nn.Dropout() for _ in range(8))
    model.extra_norms = torch.nn.ModuleList([torch.nn.LayerNorm(HIDDEN)])
    assert layer_prefix(model) == "model.layers"
    assert len(decoder_layers(model)) == N_LAYERS
    with pytest.raises(ValueError, match="decoder layers"):
        layer_prefix(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_are_out_in(models, family):
    model = models[family]
    expected = FAMILIES[family][5]
    for t in find_roles(model):
        if t.kind in ("linear", "conv1d") and t.role != "head":
            assert t.shape == expected[t.role], t.name
            assert tuple(get_weight(t).shape) == t.shape
        elif t.role in ("head", "embed"):
            assert t.shape == (VOCAB, HIDDEN), t.name
        elif t.role in ("q_norm", "k_norm"):
            assert t.shape == (HEAD_DIM,), t.name
        elif t.role == "norm":
            assert t.shape == (HIDDEN,), t.name


@pytest.mark.parametrize("family", FAMILIES)
def test_get_weight_is_the_forward_matrix(models, family):
    """module(x) == x @ W^T + b with W = get_weight: the [out, in] claim checked against the forward."""
    model = models[family]
    torch.manual_seed(1)
    for t in quantizable(model, include_head=True):
        w = get_weight(t)
        assert w.dtype == torch.float32
        x = torch.randn(5, w.shape[1])
        with torch.no_grad():
            y = t.module(x)
        torch.testing.assert_close(y, F.linear(x, w, getattr(t.module, "bias", None)), rtol=1e-5, atol=1e-5)


def test_kinds():
    kinds = {t.role: t.kind for t in find_roles(FAMILIES["gpt2"][0]())}
    assert kinds == dict(qkv="conv1d", o="conv1d", up="conv1d", down="conv1d", norm="norm",
                         embed="embedding", pos_embed="embedding", head="linear")
    assert {t.kind for t in quantizable(FAMILIES["llama"][0]())} == {"linear"}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_conv1d_set_weight_acts_like_the_equivalent_linear():
    model = _gpt2()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    for path in ("transformer.h.1.mlp.c_fc", "transformer.h.0.attn.c_attn", "transformer.h.2.mlp.c_proj"):
        written = copy.deepcopy(model)
        t = next(t for t in find_roles(written) if t.name == path)
        out_features, in_features = t.shape
        w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(3))
        set_weight(t, w)
        assert torch.equal(get_weight(t), w)
        assert torch.equal(t.module.weight, w.T)            # stored [in, out]
        # the same model with that Conv1D swapped for nn.Linear(weight=w, same bias)
        swapped = copy.deepcopy(model)
        parent_path, attr = path.rsplit(".", 1)
        conv = swapped.get_submodule(path)
        linear = torch.nn.Linear(in_features, out_features)
        with torch.no_grad():
            linear.weight.copy_(w)
            linear.bias.copy_(conv.bias)
        setattr(swapped.get_submodule(parent_path), attr, linear)
        after = _logits(written, ids)
        assert not torch.allclose(after, before, atol=1e-3)
        torch.testing.assert_close(after, _logits(swapped, ids), rtol=1e-5, atol=1e-5)


def test_set_weight_keeps_layout_dtype_and_copies():
    model = _hf(T.LlamaConfig, T.LlamaForCausalLM)().to(torch.bfloat16)
    t = next(t for t in find_roles(model) if t.role == "k" and t.layer == 1)
    w = torch.randn(t.shape)
    set_weight(t, w)
    assert t.module.weight.dtype == torch.bfloat16
    assert torch.equal(t.module.weight, w.to(torch.bfloat16))
    got = get_weight(t)
    assert got.dtype == torch.float32 and torch.equal(got, w.to(torch.bfloat16).float())
    got.zero_()                                              # a copy: the model is untouched
    assert torch.equal(t.module.weight, w.to(torch.bfloat16))
    for fp32 in (next(t for t in find_roles(_gpt2()) if t.role == "o"),                 # fp32 Conv1D
                 next(t for t in find_roles(_hf(T.LlamaConfig, T.LlamaForCausalLM)()) if t.role == "q")):
        before = fp32.module.weight.detach().clone()                                   # never a view
        get_weight(fp32).add_(1.0)
        assert torch.equal(fp32.module.weight, before)
    conv = next(t for t in find_roles(_gpt2().half()) if t.kind == "conv1d" and t.role == "up")
    set_weight(conv, torch.ones(conv.shape))
    assert conv.module.weight.dtype == torch.float16 and conv.module.weight.shape == (HIDDEN, INTER)


def test_set_weight_rejects_wrong_shape():
    t = next(t for t in find_roles(_gpt2()) if t.role == "up")
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.mlp\.c_fc.*\(48, 32\)"):
        set_weight(t, torch.zeros(HIDDEN, INTER))            # the stored [in, out] layout is not accepted


def test_unknown_linear_is_refused():
    model = _hf(T.LlamaConfig, T.LlamaForCausalLM)()
    model.model.layers[1].mlp.extra_proj = torch.nn.Linear(INTER, INTER)
    model.model.side_head = torch.nn.Linear(HIDDEN, 3)
    with pytest.raises(UnmatchedModulesError) as err:
        find_roles(model)
    from quantatlas.errors import UserError

    assert isinstance(err.value, UserError) and err.value.field == "model"  # the spec's model is what is at fault
    msg = str(err.value)
    assert "LlamaForCausalLM" in msg
    assert "model.layers.1.mlp.extra_proj" in msg and "model.side_head" in msg
    assert "model.layers.0" not in msg
    assert err.value.unmatched == ["model.layers.1.mlp.extra_proj (Linear)", "model.side_head (Linear)"]
    with pytest.raises(UnmatchedModulesError):
        quantizable(model)


def test_two_modules_claiming_one_role_are_refused():
    model = _hf(T.LlamaConfig, T.LlamaForCausalLM)()
    model.model.layers[2].mlp.w2 = torch.nn.Linear(INTER, HIDDEN)   # a second "down"
    with pytest.raises(UnmatchedModulesError, match=r"down_proj and model\.layers\.2\.mlp\.w2 are both 'down'"):
        find_roles(model)


def test_moe_router_and_fused_experts_of_an_unread_family_are_refused():
    # PhiMoE: an MoE family the layout does not read (Mixtral, Qwen2/3-MoE: tests/test_moe.py)
    model = T.PhimoeForCausalLM(T.PhimoeConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, vocab_size=VOCAB, num_local_experts=4, **TOKEN_IDS))
    with pytest.raises(UnmatchedModulesError) as err:
        find_roles(model)
    assert "model.layers.0.mlp.router" in str(err.value) and "model.layers.1.mlp.router" in str(err.value)
    assert "experts" in str(err.value)


def test_tied_embeddings():
    for model in (_gpt2(), _hf(T.LlamaConfig, T.LlamaForCausalLM)(tie_word_embeddings=True)):
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        roles = {t.role: t for t in find_roles(model) if t.layer is None and t.role in ("head", "embed")}
        assert is_tied(model) and roles["head"].tied and roles["embed"].tied
        # one tensor: writing the head writes the embedding
        w = torch.randn(roles["head"].shape)
        set_weight(roles["head"], w)
        assert torch.equal(get_weight(roles["embed"]), w)
    untied = _hf(T.LlamaConfig, T.LlamaForCausalLM)()
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert not is_tied(untied)
    assert not any(t.tied for t in find_roles(untied))


@pytest.mark.parametrize("family,shape", [
    ("llama", "split_swiglu"), ("qwen3", "split_swiglu"), ("gemma2", "split_swiglu"), ("phi3", "fused_swiglu"),
    ("gpt2", "fused_plain"), ("gpt_neox", "fused_plain"), ("falcon", "fused_plain"), ("opt", "split_plain"),
])
def test_sequential_groups_follow_the_forward(models, family, shape):
    """Groups are as GPTQ expects, and a forward pass reaches them in that order, each group on one input."""
    model = models[family]
    layer = 1
    roles = [t for t in find_roles(model) if t.layer == layer]
    groups = sequential_groups(list(reversed(roles)))            # input order must not matter
    assert [[t.role for t in g] for g in groups] == SEQUENTIAL[shape]

    calls = []
    handles = [t.module.register_forward_pre_hook(lambda m, args, name=t.name: calls.append((name, args[0].clone())))
               for g in groups for t in g]
    try:
        with torch.no_grad():
            model(torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0)))
    finally:
        for h in handles:
            h.remove()
    first_call = {}
    for i, (name, x) in enumerate(calls):
        first_call.setdefault(name, (i, x))
    starts = [min(first_call[t.name][0] for t in g) for g in groups]
    assert starts == sorted(starts)
    for g in groups[:-1]:          # a group ends before the next begins
        nxt = groups[groups.index(g) + 1]
        assert max(first_call[t.name][0] for t in g) < min(first_call[t.name][0] for t in nxt)
    for g in groups:
        x0 = first_call[g[0].name][1]
        assert all(torch.equal(first_call[t.name][1], x0) for t in g)


def test_sequential_groups_rejects_other_roles():
    roles = find_roles(FAMILIES["llama"][0]())
    with pytest.raises(ValueError, match="one decoder layer"):
        sequential_groups([t for t in roles if t.layer in (0, 1)])
    with pytest.raises(ValueError, match="one decoder layer"):
        sequential_groups([t for t in roles if t.role == "head"])
    assert sequential_groups([t for t in roles if t.role == "norm" and t.layer == 0]) == []
