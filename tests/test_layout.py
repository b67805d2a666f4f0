"""The model layout: one adapter per family, checked against each architecture's definition.

Expected module paths, head counts and RoPE placement are written from the published model
code (transformers' modeling files), not read back from quantatlas; RoPE placement is also
checked on the forward pass.
"""
from __future__ import annotations

import pytest
import torch
import transformers as T

from quantatlas.models import layout as layout_module
from quantatlas.models.layout import GENERIC, layout
from quantatlas.models.roles import UnmatchedModulesError, find_roles, get_weight, set_weight

from test_roles import FAMILIES, HEAD_DIM, HEADS, HIDDEN, KV_HEADS, N_LAYERS, TOKEN_IDS, VOCAB, INTER


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    return {name: spec[0]() for name, spec in FAMILIES.items()}


def _roles(model):
    return [(t.name, t.role, t.layer, t.kind, t.tied) for t in find_roles(model)]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_adapters_agree_with_the_generic_reading(models, family, monkeypatch):
    """An adapter's declared paths name the same roles as the name-based fallback would."""
    model = models[family]
    declared = _roles(model)
    monkeypatch.setattr(layout_module, "family_of", lambda m: GENERIC)
    assert layout(model).family == "generic"
    assert _roles(model) == declared


# family -> (adapter, rope placement, layer norms: position -> path in block, attention path, mlp path)
EXPECTED = {
    "llama": ("llama", "post_proj", dict(attn_norm="input_layernorm", ffn_norm="post_attention_layernorm"),
              "self_attn", "mlp"),
    "qwen3": ("llama", "post_qk_norm", dict(attn_norm="input_layernorm", ffn_norm="post_attention_layernorm",
                                            q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"), "self_attn", "mlp"),
    "mistral": ("llama", "post_proj", dict(attn_norm="input_layernorm", ffn_norm="post_attention_layernorm"),
                "self_attn", "mlp"),
    "qwen2": ("llama", "post_proj", dict(attn_norm="input_layernorm", ffn_norm="post_attention_layernorm"),
              "self_attn", "mlp"),
    "phi3": ("llama", "post_proj", dict(attn_norm="input_layernorm", ffn_norm="post_attention_layernorm"),
             "self_attn", "mlp"),
    "gemma2": ("gemma2", "post_proj", dict(attn_norm="input_layernorm", post_attn_norm="post_attention_layernorm",
                                           ffn_norm="pre_feedforward_layernorm",
                                           post_ffn_norm="post_feedforward_layernorm"), "self_attn", "mlp"),
    "gemma3": ("gemma2", "post_qk_norm", dict(attn_norm="input_layernorm", post_attn_norm="post_attention_layernorm",
                                              ffn_norm="pre_feedforward_layernorm",
                                              post_ffn_norm="post_feedforward_layernorm",
                                              q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
               "self_attn", "mlp"),
    "gpt2": ("gpt2", None, dict(attn_norm="ln_1", ffn_norm="ln_2"), "attn", "mlp"),
    "gpt_neox": ("gpt_neox", "post_proj", dict(attn_norm="input_layernorm", ffn_norm="post_attention_layernorm"),
                 "attention", "mlp"),
    "opt": ("opt", None, dict(attn_norm="self_attn_layer_norm", ffn_norm="final_layer_norm"), "self_attn", ""),
    "gptj": ("generic", "post_proj", dict(attn_norm="ln_1"), "attn", "mlp"),
    "phi": ("generic", "post_proj", dict(attn_norm="input_layernorm"), "self_attn", "mlp"),
    "falcon": ("generic", "post_proj", dict(attn_norm="input_layernorm"), "self_attention", "mlp"),
}


@pytest.mark.parametrize("family", EXPECTED)
def test_layers_norms_and_blocks(models, family):
    model = models[family]
    adapter, rope, norms, attention, mlp = EXPECTED[family]
    prefix = FAMILIES[family][3]
    m = layout(model)
    assert (m.family, m.rope, m.prefix, m.n_layers) == (adapter, rope, prefix, N_LAYERS)
    for i, layer in enumerate(m.layers):
        base = f"{prefix}.{i}"
        assert layer.index == i and layer.name == base and layer.block is model.get_submodule(base)
        assert {pos: t.name for pos, t in layer.norms.items()} == {pos: f"{base}.{p}" for pos, p in norms.items()}
        assert layer.rope == rope
        assert layer.attention_name == f"{base}.{attention}"
        assert layer.attention is model.get_submodule(layer.attention_name)
        assert layer.mlp_name == (f"{base}.{mlp}" if mlp else base)
        per_layer = FAMILIES[family][1]
        assert set(layer.matrices) == {r for r in per_layer if r not in ("norm", "q_norm", "k_norm")}
        for role, t in layer.matrices.items():
            assert layer.module(role) is t.module and t.layer == i and t.role == role


@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_head_final_norm_and_tying(models, family):
    model = models[family]
    m = layout(model)
    assert m.embed.module is model.get_input_embeddings()
    assert m.head.module is model.get_output_embeddings()
    assert m.tied == (m.head.module.weight is m.embed.module.weight)
    assert m.config_tied == bool(model.config.tie_word_embeddings)
    final = {"gpt2": "transformer.ln_f", "gptj": "transformer.ln_f", "falcon": "transformer.ln_f",
             "gpt_neox": "gpt_neox.final_layer_norm", "opt": "model.decoder.final_layer_norm",
             "phi": "model.final_layernorm"}.get(family, "model.norm")
    assert m.final_norm.name == final and m.final_norm.layer is None
    assert (m.pos_embed is not None) == (family in ("gpt2", "opt"))


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "qwen2", "gemma2"])
def test_head_counts_gqa(models, family):
    m = layout(models[family])
    assert (m.n_heads, m.n_kv_heads, m.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    for layer in m.layers:
        assert (layer.n_heads, layer.n_kv_heads, layer.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
        assert layer.matrices["q"].shape[0] == layer.n_heads * layer.head_dim
        assert layer.matrices["k"].shape[0] == layer.n_kv_heads * layer.head_dim
    assert m.rope_theta == 10000.0 and m.rope_dim == HEAD_DIM


def test_partial_rotary_and_learned_positions(models):
    neox, gptj, gpt2 = layout(models["gpt_neox"]), layout(models["gptj"]), layout(models["opt"])
    assert (neox.n_heads, neox.n_kv_heads, neox.head_dim) == (HEADS, HEADS, HIDDEN // HEADS)
    assert neox.rope_dim == int(HIDDEN // HEADS * models["gpt_neox"].config.rope_parameters["partial_rotary_factor"])
    assert gptj.rope_dim == 4                                 # rotary_dim in the test config
    assert gpt2.rope is None and gpt2.rope_dim is None
    assert layout(models["gpt2"]).rope_theta is None


def _qwen3():
    torch.manual_seed(0)
    return T.Qwen3ForCausalLM(T.Qwen3Config(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                                            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                            head_dim=HEAD_DIM, vocab_size=VOCAB, **TOKEN_IDS)).eval()


def test_rope_placement_matches_the_forward():
    """post_qk_norm: q_norm sees q_proj's output per head, not yet rotated; the attention's q is rotated after."""
    model = _qwen3()
    layer = layout(model).layers[1]
    assert layer.rope == "post_qk_norm"
    seen = {}
    hooks = [layer.matrices["q"].module.register_forward_hook(lambda m, a, out: seen.__setitem__("q_proj", out)),
             layer.norms["q_norm"].module.register_forward_hook(
                 lambda m, a, out: seen.update(q_norm_in=a[0], q_norm_out=out))]
    try:
        with torch.no_grad():
            model(torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0)))
    finally:
        for h in hooks:
            h.remove()
    per_head = seen["q_proj"].view(1, 6, layer.n_heads, layer.head_dim)
    assert torch.equal(seen["q_norm_in"], per_head)               # RoPE not before q_norm
    # and RoPE after it: position 0 is unrotated (cos 0 = 1), later positions are not the norm's output
    cos, sin = model.model.rotary_emb(per_head, torch.arange(6)[None])
    rotated = T.models.qwen3.modeling_qwen3.apply_rotary_pos_emb(
        seen["q_norm_out"].transpose(1, 2), seen["q_norm_out"].transpose(1, 2), cos, sin)[0]
    assert torch.allclose(rotated[:, :, 0], seen["q_norm_out"].transpose(1, 2)[:, :, 0])
    assert not torch.allclose(rotated[:, :, 5], seen["q_norm_out"].transpose(1, 2)[:, :, 5])


def test_reference_model_layout():
    from quantatlas.reference.model import load_reference, reference_config

    cfg = reference_config()
    m = layout(load_reference())
    assert (m.family, m.arch, m.rope, m.tied, m.config_tied) == ("llama", "qwen3", "post_qk_norm", False, False)
    assert (m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim) == (cfg.num_hidden_layers, 4, 2, 64)
    assert all(set(layer.norms) == {"attn_norm", "ffn_norm", "q_norm", "k_norm"} for layer in m.layers)
    assert all(set(layer.matrices) == {"q", "k", "v", "o", "gate", "up", "down"} for layer in m.layers)


def test_norm_vectors_are_addressable_tensors():
    model = _qwen3()
    roles = find_roles(model)
    q_norms = [t for t in roles if t.role == "q_norm"]
    assert [t.layer for t in q_norms] == [0, 1]
    assert [t.name for t in q_norms] == [f"model.layers.{i}.self_attn.q_norm" for i in (0, 1)]
    t = q_norms[1]
    w = get_weight(t)
    assert w.shape == (HEAD_DIM,) and w.dtype == torch.float32
    w.add_(1.0)                                                   # a copy
    assert not torch.equal(t.module.weight, w)
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    new = torch.linspace(0.5, 1.5, HEAD_DIM)
    set_weight(t, new)
    assert torch.equal(t.module.weight, new) and torch.equal(get_weight(t), new)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, before)
    with pytest.raises(ValueError, match=r"expected \(16,\)"):
        set_weight(t, new[None, :])                               # a [1, n] matrix is not the vector
    final = layout(model).final_norm
    set_weight(final, torch.full((HIDDEN,), 2.0))
    assert torch.equal(model.model.norm.weight, torch.full((HIDDEN,), 2.0))


def test_unknown_modules_are_recorded_and_check_raises():
    # PhiMoE (sparsemixer routing) is an MoE family the layout does not read (Mixtral and Qwen-MoE it does:
    # tests/test_moe.py): its router and experts are recorded by name
    model = T.PhimoeForCausalLM(T.PhimoeConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, vocab_size=VOCAB, num_local_experts=4, **TOKEN_IDS))
    m = layout(model)                                             # structure is still readable
    assert m.n_experts == 4 and m.n_layers == 2 and m.n_kv_heads == KV_HEADS
    assert any("model.layers.0.mlp.router" in u for u in m.unmatched)
    with pytest.raises(UnmatchedModulesError):
        m.check()
    from quantatlas.quant.gguf_mix import model_shape

    shape = model_shape(model)
    assert (shape.n_layers, shape.n_expert, shape.n_gqa, shape.arch) == (2, 4, HEADS // KV_HEADS, "phimoe")


def test_model_shape_accepts_a_layout():
    from quantatlas.quant.gguf_mix import model_shape

    model = FAMILIES["qwen3"][0](tie_word_embeddings=True)
    m = layout(model)
    assert model_shape(m) == model_shape(model)
    assert (model_shape(m).n_layers, model_shape(m).n_gqa, model_shape(m).tied) == (N_LAYERS, HEADS // KV_HEADS, True)


def test_transforms_read_layers_from_the_layout(models):
    from quantatlas.quant.transforms import _llama

    with pytest.raises(ValueError, match=r"other norms \(post_attention_layernorm, post_feedforward_layernorm\)"):
        _llama.layers(models["gemma2"])               # Gemma 2's MLP reads pre_feedforward_layernorm
    model = _qwen3()
    for fold, layer in zip(_llama.layers(model), layout(model).layers):
        assert fold.input_norm is model.model.layers[layer.index].input_layernorm
        assert fold.post_norm is model.model.layers[layer.index].post_attention_layernorm
        assert fold.v is layer.module("v") and fold.down is model.model.layers[layer.index].mlp.down_proj
        assert (fold.n_heads, fold.n_kv_heads, fold.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert _llama.final_norm(model) is model.model.norm and _llama.head(model) is model.lm_head
    assert _llama.embedding(model) is model.model.embed_tokens


def _small(config_cls, model_cls, **kw):
    return lambda: model_cls(config_cls(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64, **kw))


@pytest.mark.parametrize("build,biases", [
    (_small(T.LlamaConfig, T.LlamaForCausalLM, attention_bias=True), True),
    (_small(T.Qwen2Config, T.Qwen2ForCausalLM), True),
    (_small(T.Qwen3Config, T.Qwen3ForCausalLM, head_dim=16, tie_word_embeddings=True), False),
    (_small(T.MistralConfig, T.MistralForCausalLM), False),
], ids=["llama_bias", "qwen2", "qwen3_tied", "mistral"])
def test_gguf_names_from_the_layout_match_the_converters_map(build, biases):
    """Names from layout roles == convert_hf_to_gguf.py's TensorNameMap on HF parameter names."""
    gguf = pytest.importorskip("gguf")
    from quantatlas.export.gguf import _arch_enum, gguf_arch, gguf_tensor_names

    model = build().eval()
    arch = gguf_arch(model)
    name_map = gguf.get_tensor_name_map(_arch_enum(arch), model.config.num_hidden_layers)
    names = gguf_tensor_names(model)
    assert names == {n: name_map.get_name(n, try_suffixes=(".weight", ".bias")) for n, _ in model.named_parameters()}
    assert any(g.endswith(".bias") for g in names.values()) == biases
    assert ("output.weight" in names.values()) == (not layout(model).tied)
