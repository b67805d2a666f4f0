"""llama.cpp file-type mixtures and the importance matrix.

The expected types come from a table written here by hand from src/llama-quant.cpp
(llama_tensor_get_type_impl, tensor_type_fallback), with the layers that use_more_bits picks
spelled out as literal sets -- not from calling the code under test.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quantatlas.quant.gguf_mix import GGUFMixture, ModelShape, use_more_bits

# use_more_bits(i, n) = i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2, evaluated by hand:
MORE_32 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
MORE_8 = {0, 3, 6, 7}
ALL = None  # a rule that applies to every layer


def _qwen3(n_layers=32, hidden=256, heads=4, kv_heads=1, tied=False, meta=True):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=258, hidden_size=hidden, intermediate_size=512, num_hidden_layers=n_layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                      tie_word_embeddings=tied)
    if meta:
        with torch.device("meta"):
            return Qwen3ForCausalLM(cfg)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg).eval()


# ftype -> (base type, output type, {category: [(layers, type), ...]}); the first matching rule wins,
# categories not listed (and layers no rule covers) get the base type. n_layers = 32, GQA = 4.
TABLE_32_GQA4 = {
    "Q2_K": ("q2_k", "q6_k", {"v": [(ALL, "q4_k")], "down": [(ALL, "q3_k")], "o": [(ALL, "q3_k")]}),
    "Q3_K_S": ("q3_k", "q6_k", {}),
    "Q3_K_M": ("q3_k", "q6_k", {"v": [({0, 1}, "q5_k"), (ALL, "q4_k")],
                                "down": [({0, 1}, "q5_k"), (ALL, "q4_k")],   # i < 32/16
                                "o": [(ALL, "q4_k")]}),
    "Q3_K_L": ("q3_k", "q6_k", {"v": [(ALL, "q5_k")], "down": [(ALL, "q5_k")], "o": [(ALL, "q5_k")]}),
    "Q4_K_S": ("q4_k", "q6_k", {"v": [({0, 1, 2, 3}, "q5_k")], "down": [({0, 1, 2, 3}, "q5_k")]}),
    "Q4_K_M": ("q4_k", "q6_k", {"v": [(MORE_32, "q6_k")], "down": [(MORE_32, "q6_k")]}),
    "Q5_K_S": ("q5_k", "q6_k", {}),
    "Q5_K_M": ("q5_k", "q6_k", {"v": [(MORE_32, "q6_k")], "down": [(MORE_32, "q6_k")]}),
    "Q6_K": ("q6_k", "q6_k", {}),
    "Q8_0": ("q8_0", "q8_0", {}),
    "Q4_0": ("q4_0", "q6_k", {}),
    "Q4_1": ("q4_1", "q6_k", {}),
    "Q5_0": ("q5_0", "q6_k", {}),
    "Q5_1": ("q5_1", "q6_k", {}),
    "IQ4_NL": ("iq4_nl", "q6_k", {"v": [(ALL, "q5_k")], "down": [({0, 1, 2, 3}, "q5_k")]}),
    "IQ4_XS": ("iq4_xs", "q6_k", {"v": [(ALL, "q5_k")], "down": [({0, 1, 2, 3}, "q5_k")]}),
}
# with an imatrix, only these entries change
TABLE_32_GQA4_IMATRIX = {
    "Q4_0": ("q4_0", "q6_k", {"down": [({0, 1, 2, 3}, "q4_1")]}),
    "Q5_0": ("q5_0", "q6_k", {"down": [({0, 1, 2, 3}, "q5_1")]}),
    "IQ4_NL": ("iq4_nl", "q6_k", {"v": [(ALL, "q5_k")]}),
    "IQ4_XS": ("iq4_xs", "q6_k", {"v": [(ALL, "q5_k")]}),
    "Q2_K_S": ("q2_k", "q6_k", {"v": [(ALL, "q4_k")], "down": [({0, 1, 2, 3}, "q4_k")]}),
}


def _expected(entry, role, layer):
    base, output, rules = entry
    if role == "head":
        return output
    if role == "embed":
        return base
    if role in ("norm", "q_norm", "k_norm"):
        return "f32"
    for layers, typ in rules.get(role, []):
        if layers is ALL or layer in layers:
            return typ
    return base


def _check_plan(model, mixture, table_entry):
    from quantatlas.models.roles import find_roles

    plan = mixture.plan(model)
    roles = find_roles(model)
    assert set(plan) == {t.name for t in roles}
    wrong = {t.name: (plan[t.name], _expected(table_entry, t.role, t.layer)) for t in roles
             if plan[t.name] != _expected(table_entry, t.role, t.layer)}
    assert not wrong, wrong


def test_use_more_bits_matches_hand_evaluation():
    assert {i for i in range(32) if use_more_bits(i, 32)} == MORE_32
    assert {i for i in range(8) if use_more_bits(i, 8)} == MORE_8


@pytest.mark.parametrize("ftype", sorted(TABLE_32_GQA4))
def test_mixture_32_layers_gqa4(ftype):
    _check_plan(_qwen3(32), GGUFMixture(ftype), TABLE_32_GQA4[ftype])


@pytest.mark.parametrize("ftype", sorted(TABLE_32_GQA4_IMATRIX))
def test_mixture_32_layers_with_imatrix(ftype):
    _check_plan(_qwen3(32), GGUFMixture(ftype, imatrix=True), TABLE_32_GQA4_IMATRIX[ftype])


@pytest.mark.parametrize("ftype, entry", [
    # without GQA the Q2_K attn_v bump is Q3_K and IQ4 attn_v keep their type
    ("Q2_K", ("q2_k", "q6_k", {"v": [(ALL, "q3_k")], "down": [(ALL, "q3_k")], "o": [(ALL, "q3_k")]})),
    ("IQ4_XS", ("iq4_xs", "q6_k", {"down": [({0}, "q5_k")]})),                  # i < 8/8
    ("Q4_K_M", ("q4_k", "q6_k", {"v": [(MORE_8, "q6_k")], "down": [(MORE_8, "q6_k")]})),
    ("Q3_K_M", ("q3_k", "q6_k", {"v": [({0, 1}, "q5_k"), (ALL, "q4_k")],
                                 "down": [(ALL, "q4_k")], "o": [(ALL, "q4_k")]})),  # 8/16 = 0: no Q5_K
    ("Q4_K_S", ("q4_k", "q6_k", {"v": [({0, 1, 2, 3}, "q5_k")], "down": [({0}, "q5_k")]})),
])
def test_mixture_8_layers_no_gqa(ftype, entry):
    _check_plan(_qwen3(8, kv_heads=4), GGUFMixture(ftype), entry)


@pytest.mark.parametrize("ftype, embed", [("Q4_K_M", "q6_k"), ("Q2_K", "q6_k"), ("Q8_0", "q8_0"), ("Q4_0", "q6_k")])
def test_tied_embeddings_take_the_output_rule(ftype, embed):
    model = _qwen3(8, tied=True)
    plan = GGUFMixture(ftype).plan(model)
    assert plan["model.embed_tokens"] == embed
    assert GGUFMixture(ftype).embeddings_type(256, tied=True) == embed
    assert GGUFMixture(ftype).embeddings_type(256, tied=False) == GGUFMixture(ftype).default_type


# hidden 64: q/k/v/o/gate/up, the head and the embeddings have 64-wide rows; down's rows are 512 wide
FALLBACK_64 = {
    # ftype: (64-wide base, attn_v at a use_more_bits layer, attn_v elsewhere, down elsewhere, head, embed)
    "Q4_K_M": ("q5_0", "q8_0", "q5_0", "q4_k", "q8_0", "q5_0"),
    "Q5_K_M": ("q5_1", "q8_0", "q5_1", "q5_k", "q8_0", "q5_1"),
    "Q6_K": ("q8_0", "q8_0", "q8_0", "q6_k", "q8_0", "q8_0"),
    "Q2_K": ("q4_0", "q5_0", "q5_0", "q3_k", "q8_0", "q4_0"),    # attn_v: Q4_K (GQA 4) -> Q5_0
    "Q3_K_S": ("q4_0", "q4_0", "q4_0", "q3_k", "q8_0", "q4_0"),
    "IQ4_XS": ("iq4_nl", "q5_1", "q5_1", "iq4_xs", "q8_0", "iq4_nl"),  # attn_v: Q5_K (GQA 4) -> Q5_1
    "Q8_0": ("q8_0", "q8_0", "q8_0", "q8_0", "q8_0", "q8_0"),
}


@pytest.mark.parametrize("ftype", sorted(FALLBACK_64))
def test_fallback_for_rows_not_a_multiple_of_256(ftype):
    model = _qwen3(8, hidden=64)  # GQA 4, use_more_bits layers {0, 3, 6, 7}
    plan = GGUFMixture(ftype).plan(model)
    base, v_more, v_other, down_other, head, embed = FALLBACK_64[ftype]
    assert plan["model.layers.1.self_attn.q_proj"] == base
    assert plan["model.layers.1.mlp.gate_proj"] == base
    assert plan["model.layers.3.self_attn.v_proj"] == v_more
    assert plan["model.layers.1.self_attn.v_proj"] == v_other
    assert plan["model.layers.1.mlp.down_proj"] == down_other
    assert plan["lm_head"] == head
    assert plan["model.embed_tokens"] == embed


def test_fallback_to_f16_and_refusals():
    m = GGUFMixture("Q4_K_M")
    shape = ModelShape(n_layers=8)
    assert m.tensor_type("q", 1, (128, 48), shape) == "f16"          # Q4_K -> Q5_0 -> 48 % 32 != 0 -> F16
    with pytest.raises(ValueError, match="no fallback"):  # the head's rule gives Q8_0, which has none
        m.tensor_type("head", None, (258, 48), shape)
    with pytest.raises(ValueError, match="no fallback"):
        GGUFMixture("Q4_0").tensor_type("q", 1, (128, 48), shape)


def test_qkv_takes_the_attn_v_branch_and_special_models():
    m = GGUFMixture("Q4_K_M")
    assert m.tensor_type("qkv", 0, (768, 256), ModelShape(32)) == "q6_k"
    assert m.tensor_type("qkv", 4, (768, 256), ModelShape(32)) == "q4_k"
    # Llama-70B shape (80 layers, GQA): Q3_K/Q4_K attn_v become Q5_K; 8 experts: attn_v/attn_k Q8_0
    assert m.tensor_type("v", 11, (1024, 8192), ModelShape(80, n_gqa=8, arch="llama")) == "q5_k"
    assert m.tensor_type("v", 11, (1024, 8192), ModelShape(80, n_gqa=8, arch="qwen3")) == "q4_k"
    assert m.tensor_type("k", 4, (1024, 4096), ModelShape(32, n_expert=8)) == "q8_0"
    assert m.tensor_type("o", 4, (4096, 4096), ModelShape(32, n_expert=8)) == "q5_k"
    # Falcon: ffn_down i < n/16 -> Q6_K, use_more_bits -> Q5_K, else Q4_K; output always Q8_0
    falcon = ModelShape(32, arch="falcon")
    assert [m.tensor_type("down", i, (4096, 16384), falcon) for i in (0, 3, 4, 5)] == ["q6_k", "q5_k", "q4_k", "q4_k"]
    assert m.tensor_type("head", None, (65024, 4096), falcon) == "q8_0"


def test_codecs_and_errors():
    model = _qwen3(8)
    from quantatlas.models.roles import find_roles

    roles = {t.name: t for t in find_roles(model)}
    m = GGUFMixture("q4_k_m")  # case-insensitive
    c = m.codec_for(roles["model.layers.0.self_attn.v_proj"], n_layers=8, n_gqa=4)
    assert c is not None and c.name == "q6_k" and c.group_size == 256
    assert m.codec_for(roles["model.layers.0.input_layernorm"], n_layers=8) is None
    assert m.type_for(roles["model.layers.1.mlp.up_proj"], n_layers=8) == "q4_k"
    assert m.uses_importance(roles["model.layers.1.mlp.up_proj"]) is False
    assert GGUFMixture("Q4_K_M", imatrix=True).uses_importance(roles["model.layers.1.mlp.up_proj"])
    assert not GGUFMixture("Q4_K_M", imatrix=True).uses_importance(roles["lm_head"])
    with pytest.raises(ValueError, match="Q4_K_Z"):
        GGUFMixture("Q4_K_Z")
    with pytest.raises(ValueError, match="Q2_K_S requires imatrix"):
        GGUFMixture("Q2_K_S")
    assert "Q4_K_M" in GGUFMixture.FTYPES and "IQ4_XS" in GGUFMixture.FTYPES


# -- importance matrix --------------------------------------------------------------------------

def test_imatrix_is_the_mean_of_x_squared_per_column():
    from quantatlas.models.calib import input_statistics
    from quantatlas.quant.imatrix import compute_imatrix, imatrix_modules

    model = _qwen3(2, meta=False)
    tokens = torch.randint(0, 258, (3, 20), generator=torch.Generator().manual_seed(1))
    im = compute_imatrix(model, tokens, batch_size=2)
    names = set(imatrix_modules(model))
    assert set(im.sums) == names and "lm_head" not in names and len(names) == 2 * 7

    # independent: every input row the module saw, then mean of x^2 over them in fp64
    seen = {}
    mods = dict(model.named_modules())

    def keep(name):
        return lambda module, args: seen.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))

    hooks = [mods[n].register_forward_pre_hook(keep(n))
             for n in ("model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj")]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    for n, xs in seen.items():
        x = torch.cat(xs).double()
        assert im.counts[n] == x.shape[0] == 60
        torch.testing.assert_close(im.importance(n).double(), (x * x).mean(0), rtol=1e-6, atol=0)
    # and it is what our calibration capture calls sq_mean, bit for bit
    stats = input_statistics(model, {"d": mods["model.layers.1.mlp.down_proj"]}, tokens, hessian=False)
    assert torch.equal(im.importance("model.layers.1.mlp.down_proj"), stats["d"].sq_mean)
    head = compute_imatrix(model, tokens, include_head=True)
    assert "lm_head" in head.sums  # llama-imatrix --process-output


def test_imatrix_gguf_file_round_trip(tmp_path):
    import gguf

    from quantatlas.export import gguf_tensor_names
    from quantatlas.quant.imatrix import compute_imatrix, read_imatrix_gguf, write_imatrix_gguf

    model = _qwen3(2, meta=False)
    im = compute_imatrix(model, torch.randint(0, 258, (2, 16), generator=torch.Generator().manual_seed(2)),
                         datasets=["stdlib"])
    names = gguf_tensor_names(model)
    path = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(path, im, names)

    r = gguf.GGUFReader(str(path))
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.datasets"].contents() == ["stdlib"]
    assert r.fields["imatrix.chunk_size"].contents() == 16
    assert r.fields["imatrix.chunk_count"].contents() == 32 // 16
    t = {x.name: x for x in r.tensors}
    s2 = t["blk.1.ffn_down.weight.in_sum2"]
    assert s2.tensor_type == gguf.GGMLQuantizationType.F32 and list(s2.shape) == [512, 1]  # ne = [width, n_mat]
    assert list(t["blk.1.ffn_down.weight.counts"].shape) == [1, 1]
    assert np.array_equal(np.asarray(s2.data).reshape(-1), im.sums["model.layers.1.mlp.down_proj"].float().numpy())

    back = read_imatrix_gguf(path, names)
    assert set(back.sums) == set(im.sums)
    n = "model.layers.0.self_attn.q_proj"
    assert back.counts[n] == im.counts[n] == 32
    # llama-quantize's row: fp32 sums / count
    sums = np.array(t["blk.0.attn_q.weight.in_sum2"].data, dtype=np.float32).reshape(-1)
    expect = torch.from_numpy(sums).double() / 32
    assert torch.equal(back.importance(n), expect.float())


def test_from_spec_options():
    from quantatlas.quant.config import build

    m = build("codec", {"gguf": {"ftype": "Q4_K_M", "imatrix": True}})
    assert (m.ftype, m.imatrix) == ("Q4_K_M", True)
    assert build("codec", {"gguf": "q6_k"}).default_type == "q6_k"
    with pytest.raises(ValueError, match=r"gguf\.bits: Extra inputs are not permitted"):
        build("codec", {"gguf": {"ftype": "Q4_K_M", "bits": 4}})
    with pytest.raises(ValueError, match=r"gguf\.ftype: Field required"):
        build("codec", {"gguf": {"imatrix": True}})
    with pytest.raises(ValueError, match=r"gguf\.imatrix: Input should be a valid boolean"):
        build("codec", {"gguf": {"ftype": "Q4_K_M", "imatrix": "yes"}})
    with pytest.raises(ValueError, match="Q2_K_S requires imatrix"):
        build("codec", {"gguf": "Q2_K_S"})


def test_frontier_spec_arms_are_valid_mixtures():
    from pathlib import Path

    from quantatlas.spec import load_spec

    spec = load_spec(Path(__file__).parent.parent / "experiments" / "llamacpp_frontier.yaml")
    mixtures = {name: arm.codec.build() for name, arm in spec.arms.items() if arm.codec}
    assert {m.ftype for m in mixtures.values()} == {"Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K"}
    assert mixtures["q4_k_m_imatrix"].imatrix and not mixtures["q4_k_m"].imatrix
    assert spec.arms["fp16"].codec is None
