"""Mixture-of-experts models (issue 27, parts 1-3): the layout reads Qwen3-MoE, Qwen2-MoE and Mixtral with
experts fused in 3-D tensors (transformers 5) or as a ModuleList of MLPs (older versions, built here);
each expert's calibration statistics come only from the tokens its router picks (checked against a
routing computed here from the router's weights); RTN, GPTQ and llama.cpp's Q4_K_M quantize every expert;
overrides pick an expert index; GGUF export writes llama.cpp's 3-D expert tensors (read back with `gguf`);
layer streaming gives the in-memory codes; the run JSON and the results carry the coverage."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers as T
from torch import nn

import quantatlas.quant.quantize as quantize_module
from quantatlas.eval.bits import artifact_of
from quantatlas.models.layout import EXPERT_ROLES, layout
from quantatlas.models.moe import BoundMoE, ExpertStatistics, RoutingTap
from quantatlas.models.roles import find_roles, get_weight, matrix_weights, set_weight
from quantatlas.quant.quantize import quantize_model
from quantatlas.quant.recipe import build_recipe
from quantatlas.spec import Arm

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 300


def qwen3_moe(hidden=32, inter=32, experts=4, layers=2, seed=0, **kw):
    cfg = T.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                           moe_intermediate_size=inter, num_experts=experts, num_experts_per_tok=2,
                           num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=hidden // 2, norm_topk_prob=True, max_position_embeddings=256, **kw)
    torch.manual_seed(seed)
    return _sharpen(T.Qwen3MoeForCausalLM(cfg).eval())


def mixtral(hidden=32, inter=32, experts=4, layers=2, seed=0):
    cfg = T.MixtralConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                          num_experts_per_tok=2, num_hidden_layers=layers, num_attention_heads=2,
                          num_key_value_heads=1, max_position_embeddings=256)
    torch.manual_seed(seed)
    return _sharpen(T.MixtralForCausalLM(cfg).eval())


def qwen2_moe(seed=0):
    cfg = T.Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                           shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           max_position_embeddings=256)
    torch.manual_seed(seed)
    return _sharpen(T.Qwen2MoeForCausalLM(cfg).eval())


@torch.no_grad()
def _sharpen(model):
    """Routers and experts away from the near-zero default init, so routing is decided and experts differ."""
    for name, p in model.named_parameters():
        if name.endswith(("gate.weight", "router.weight")) or "experts" in name:
            p.normal_(0, 0.3)
    return model


# ---- the ModuleList form of older transformers versions, built here ----------------------------

class ListExpert(nn.Module):
    def __init__(self, hidden, inter, names):
        super().__init__()
        self.names = names
        for n, (i, o) in zip(names, ((hidden, inter), (hidden, inter), (inter, hidden))):
            setattr(self, n, nn.Linear(i, o, bias=False))
        self.act_fn = nn.SiLU()

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class ListMoeBlock(nn.Module):
    """transformers 4.x's Qwen3MoeSparseMoeBlock / MixtralSparseMoeBlock: an nn.Linear router, softmax,
    top-k (renormalised), a ModuleList of expert MLPs each run on its routed rows."""

    def __init__(self, fused_block, top_k, names):
        super().__init__()
        e, two_i, h = fused_block.experts.gate_up_proj.shape
        self.top_k = top_k
        self.gate = nn.Linear(h, e, bias=False)
        self.experts = nn.ModuleList(ListExpert(h, two_i // 2, names) for _ in range(e))
        with torch.no_grad():
            self.gate.weight.copy_(fused_block.gate.weight)
            for k, expert in enumerate(self.experts):
                gate, up, down = (getattr(expert, n) for n in names)
                gate.weight.copy_(fused_block.experts.gate_up_proj[k, :two_i // 2])
                up.weight.copy_(fused_block.experts.gate_up_proj[k, two_i // 2:])
                down.weight.copy_(fused_block.experts.down_proj[k])

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        x = hidden_states.view(-1, h)
        weights = torch.softmax(self.gate(x), dim=1, dtype=torch.float)
        weights, chosen = torch.topk(weights, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = nn.functional.one_hot(chosen, num_classes=len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            slot, rows = torch.where(mask[e])
            out.index_add_(0, rows, expert(x[rows]) * weights[rows, slot, None])
        return out.reshape(b, s, h)


def list_form(model, names=("gate_proj", "up_proj", "down_proj")):
    """A copy of a fused-experts model with every MoE block as the ModuleList form (same function)."""
    out = copy.deepcopy(model)
    for layer in out.model.layers:
        layer.mlp = ListMoeBlock(layer.mlp, model.config.num_experts_per_tok, names)
    return out


def calib_tokens(n=4, seq=24, seed=1):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, VOCAB, (n, seq)))


# ---- part 1: the layout --------------------------------------------------------------------------

@pytest.mark.parametrize("build", [qwen3_moe, mixtral, qwen2_moe, lambda: list_form(qwen3_moe()),
                                   lambda: list_form(qwen3_moe(), ("w1", "w3", "w2"))],
                         ids=["qwen3_moe", "mixtral", "qwen2_moe", "list_qwen", "list_mixtral_names"])
def test_every_weight_has_a_role_and_every_expert_its_matrices(build):
    model = build()
    m = layout(model).check()                                  # nothing weight-bearing unrecognised
    assert m.family == "llama_moe" and m.n_experts == 4 and m.experts_used == 2
    assert len(m.moe_blocks) == m.n_layers == 2
    for layer in m.layers:
        moe = layer.moe
        assert moe.n_experts == 4 and moe.top_k == 2 and moe.normalise == (build is not qwen2_moe)
        assert layer.matrices["router"] is moe.router and moe.router.shape == (4, 32)
        for e, roles in enumerate(moe.experts):
            assert set(roles) == set(EXPERT_ROLES) and all(t.expert == e and t.layer == layer.index
                                                          for t in roles.values())
            inter = roles["expert_gate"].shape[0]
            assert roles["expert_gate"].shape == roles["expert_up"].shape == (inter, 32)
            assert roles["expert_down"].shape == (32, inter)
        assert set(moe.shared) == ({"shared_expert_gate", "shared_expert_up", "shared_expert_down", "shared_router"}
                                   if build is qwen2_moe else set())
    # every parameter is stored through a role: the expert matrices replace the fused 3-D tensors
    names = {t.name for t in m.roles}
    for pname in matrix_weights(model):
        assert pname.rsplit(".", 1)[0] in names, pname


def test_fused_expert_weights_are_the_forward_matrices():
    model = qwen3_moe()
    experts = model.model.layers[1].mlp.experts
    m = layout(model)
    roles = m.layers[1].moe.experts[2]
    inter = roles["expert_gate"].shape[0]
    assert torch.equal(get_weight(roles["expert_gate"]), experts.gate_up_proj[2, :inter])
    assert torch.equal(get_weight(roles["expert_up"]), experts.gate_up_proj[2, inter:])
    assert torch.equal(get_weight(roles["expert_down"]), experts.down_proj[2])
    before = experts.gate_up_proj.detach().clone()
    set_weight(roles["expert_up"], torch.full((inter, 32), 0.5))  # writes only expert 2's up rows
    changed = (experts.gate_up_proj != before).nonzero()[:, :2].unique(dim=0).tolist()
    assert sorted({tuple(r) for r in changed}) == [(2, r) for r in range(inter, 2 * inter)]
    # the list form computes what the fused form computes (so the ModuleList tests test the same model)
    x = calib_tokens(1, 12)
    fused = qwen3_moe()
    torch.testing.assert_close(list_form(fused)(x).logits, fused(x).logits, rtol=1e-5, atol=1e-5)


def test_an_unread_moe_family_is_refused_by_name():
    from quantatlas.models.roles import UnmatchedModulesError

    model = T.PhimoeForCausalLM(T.PhimoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               num_local_experts=4))
    with pytest.raises(UnmatchedModulesError, match=r"model\.layers\.0\.mlp\.experts"):
        find_roles(model)
    fused = qwen3_moe()                               # fused experts with biases: a form the layout cannot read
    fused.model.layers[0].mlp.experts.has_bias = True
    with pytest.raises(UnmatchedModulesError, match=r"layers\.0\.mlp\.experts \(Qwen3MoeExperts: fused experts"):
        find_roles(fused)


# ---- part 2: routing-aware statistics --------------------------------------------------------------

def _block_inputs(model, layer, tokens):
    """What reaches layer `layer`'s MoE block, captured with a plain pre-hook (not the code under test)."""
    seen = []
    handle = model.model.layers[layer].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for i in range(0, tokens.shape[0], 8):
            model(tokens[i:i + 8])
    handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])


def _by_hand(model, layer, x, weighted=False):
    """Each expert's (tokens, H of gate/up inputs, H of down inputs) from the router's own weights:
    softmax, top-2, renormalised; H = (2/N) sum_t c_t x_t x_t^T over the routed tokens (c_t = w_t^2 weighted)."""
    block = model.model.layers[layer].mlp
    wr = (block.gate.weight if isinstance(block.gate, nn.Linear) else block.gate.weight).double()
    probs = torch.softmax(x.double() @ wr.T, -1)
    top_w, top_i = probs.topk(2, -1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    out = {}
    m = layout(model).layers[layer].moe
    for e in range(m.n_experts):
        tok, slot = (top_i == e).nonzero(as_tuple=True)
        xe = x[tok].double()
        c = (top_w[tok, slot] ** 2 if weighted else torch.ones(len(tok), dtype=torch.float64))[:, None]
        g, u = get_weight(m.experts[e]["expert_gate"]).double(), get_weight(m.experts[e]["expert_up"]).double()
        h = nn.functional.silu(xe @ g.T) * (xe @ u.T)
        n = max(len(tok), 1)
        out[e] = (len(tok), 2 / n * (xe * c).T @ xe, 2 / n * (h * c).T @ h)
    return out


def _recorded_hessians(monkeypatch):
    seen = {}
    solve = quantize_module._solve

    def record(plan, W, stats):
        if stats is not None and "hessian" in stats:
            seen[plan.name] = stats["hessian"].clone()
        return solve(plan, W, stats)

    solve_batch = quantize_module._solve_batch_in_place

    def record_batch(batch, packed):   # experts of one role solved together (GPTQ's batched path)
        for plan, _, stats in batch:
            seen[plan.name] = stats["hessian"].clone()
        return solve_batch(batch, packed)

    monkeypatch.setattr(quantize_module, "_solve", record)
    monkeypatch.setattr(quantize_module, "_solve_batch_in_place", record_batch)
    return seen


@pytest.mark.parametrize("form,weighting,propagation", [("fused", "tokens", "sequential"),
                                                         ("fused", "routing", "layer"),
                                                         ("list", "tokens", "layer"),
                                                         ("list", "routing", "sequential")])
def test_each_experts_hessian_is_its_routed_tokens(monkeypatch, form, weighting, propagation):
    fp = qwen3_moe()
    model = copy.deepcopy(fp) if form == "fused" else list_form(fp)
    calib = calib_tokens()
    # attention kept fp16, so layer 0's block sees the fp model's input; sequential: down's statistics come
    # after gate/up are quantized, layer: all from one pass before any change
    arm = Arm(solver="gptq", codec={"uniform": {"bits": 4, "group": 16}}, propagation=propagation,
              moe={"min_tokens": 1, "weighting": weighting},
              overrides=[{"match": r, "codec": None} for r in ("q", "k", "v", "o")])
    seen = _recorded_hessians(monkeypatch)
    records = {}
    quantize_model(model, build_recipe(arm), calib, 0, records=records)
    want = _by_hand(model if propagation == "sequential" else fp, 0, _block_inputs(fp, 0, calib),
                    weighted=weighting == "routing")
    experts = layout(model).layers[0].moe.experts
    for e, (n, h_in, h_hidden) in want.items():
        assert n > 0 and records["moe"]["tokens"]["0"][e] == n
        for role in ("expert_gate", "expert_up"):
            torch.testing.assert_close(seen[experts[e][role].name].double(), h_in, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(seen[experts[e]["expert_down"].name].double(), h_hidden, rtol=1e-4, atol=1e-5)
    assert sum(records["moe"]["tokens"]["0"]) == 2 * calib.numel()


def test_all_tokens_statistics_leave_the_logits_unchanged():
    model = qwen3_moe()
    x = calib_tokens(2, 16)
    with torch.no_grad():
        want = model(x).logits.clone()
    blocks = layout(model).moe_blocks
    stats = [ExpertStatistics(BoundMoE(b), {t.name: t for t in b.tensors()}, all_tokens=range(b.n_experts))
             for b in blocks]
    taps = [RoutingTap(s.bound, s.add) for s in stats]
    with torch.no_grad():
        got = model(x).logits
    for tap in taps:
        tap.remove()
    assert torch.equal(got, want)
    x0 = _block_inputs(model, 0, x).double()
    result = stats[0].result()
    for t in blocks[0].tensors():           # every expert's statistics are every token's
        assert result[t.name]["tokens"] == int(stats[0].routed[t.expert])
        if t.role != "expert_down":
            torch.testing.assert_close(result[t.name]["hessian"].double(), 2 / x0.shape[0] * x0.T @ x0,
                                       rtol=1e-4, atol=1e-5)
    assert int(stats[0].routed.sum()) == 2 * x.numel()


@pytest.mark.parametrize("policy", ["rtn", "fp16", "all_tokens"])
def test_starved_expert_policies(monkeypatch, policy):
    model = qwen3_moe()
    fp = copy.deepcopy(model)
    calib = calib_tokens()
    arm = Arm(solver="gptq", codec={"uniform": {"bits": 3, "group": 16}}, propagation="sequential",
              moe={"starved": policy, "min_tokens": 40})
    seen = _recorded_hessians(monkeypatch)
    records = {}
    packed = quantize_model(model, build_recipe(arm), calib, 0, records=records)
    cov = records["moe"]
    starved = {(layer, e) for layer, e, _ in cov["under_threshold"]}
    assert starved and len(starved) < 8 and cov["threshold"] == 40
    assert cov["tokens_min"] == min(n for per in cov["tokens"].values() for n in per)
    m = layout(model)
    fp_roles = {t.name: t for t in layout(fp).roles}
    for layer in m.layers:
        for e, roles in enumerate(layer.moe.experts):
            for t in roles.values():
                name = t.name + ".weight"
                if (layer.index, e) not in starved:
                    assert t.name in seen and name in packed
                elif policy == "fp16":
                    assert name not in packed and torch.equal(get_weight(t), get_weight(fp_roles[t.name]))
                elif policy == "rtn":
                    assert t.name not in seen and name in packed
                else:
                    assert t.name in seen and name in packed
    if policy == "all_tokens":   # a starved expert of layer 0 was calibrated on every token
        layer, e = min(starved)
        if layer == 0:
            x = _block_inputs(model, 0, calib).double()   # after layer 0's quantized attention
            h = seen[m.layers[0].moe.experts[e]["expert_gate"].name].double()
            torch.testing.assert_close(h, 2 / x.shape[0] * x.T @ x, rtol=1e-4, atol=1e-5)


# ---- part 3: every expert quantized, overrides, export, streaming, bits ------------------------------------

@pytest.mark.parametrize("build", [qwen3_moe, mixtral], ids=["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("arm", [
    dict(codec={"uniform": {"bits": 4, "group": 32}}),
    dict(solver="gptq", codec={"uniform": {"bits": 4, "group": 32}}),
    dict(codec={"gguf": {"ftype": "Q4_K_M"}}),
    dict(codec={"gguf": {"ftype": "Q4_K_M", "imatrix": True}}),
], ids=["rtn", "gptq", "q4_k_m", "q4_k_m_imatrix"])
def test_every_expert_is_quantized(build, arm):
    model = build(hidden=256, inter=256)
    fp = copy.deepcopy(model)
    packed = quantize_model(model, build_recipe(Arm(**arm)), calib_tokens(2, 16), 0)
    m = layout(model)
    for layer in m.layers:
        assert layer.moe.router.name + ".weight" not in packed     # the router stays fp16 (gguf: F32)
        for roles in layer.moe.experts:
            for t in roles.values():
                p = packed[t.name + ".weight"]
                w = get_weight(t)
                assert torch.equal(p.decode().float(), w), t.name      # the model holds decode(packed)
                assert not torch.equal(w, get_weight(layout(fp).tensor(t.name)))
    expected = {"q4_k", "q6_k"} if "gguf" in arm["codec"] else {"uniform"}
    assert {packed[t.name + ".weight"].codec for t in m.roles if t.expert is not None} <= expected


def test_overrides_pick_expert_index_role_and_layer():
    model = qwen3_moe()
    arm = Arm(codec={"uniform": {"bits": 4, "group": 16}}, overrides=[
        {"match": "expert_down", "codec": {"uniform": {"bits": 8, "group": 16}}},        # a role
        {"match": r"experts\.1\.", "codec": {"uniform": {"bits": 2, "group": 16}}},       # an expert index
        {"match": r"layers\.1\..*experts\.3\.up_proj", "codec": None},                   # a layer's expert matrix
        {"match": "router", "codec": "q8_0"},                                            # the router, by choice
    ])
    packed = quantize_model(model, build_recipe(arm), None, 0)
    bits = {n: p.config.get("bits") for n, p in packed.items()}
    pre = "model.layers.{}.mlp.experts.{}.{}.weight"
    assert bits[pre.format(0, 0, "gate_proj")] == 4 and bits[pre.format(0, 0, "down_proj")] == 8
    assert all(bits[pre.format(layer, 1, r)] == 2 for layer in (0, 1) for r in ("gate_proj", "up_proj", "down_proj"))
    assert pre.format(1, 3, "up_proj") not in packed and bits[pre.format(0, 3, "up_proj")] == 4
    assert packed["model.layers.0.mlp.gate.weight"].codec == "q8_0"


def test_gguf_export_of_qwen3_moe_reads_back(tmp_path):
    import gguf

    from quantatlas.export.gguf import write_gguf

    model = qwen3_moe(hidden=256, inter=256)
    packed = quantize_model(model, build_recipe(Arm(codec={"gguf": {"ftype": "Q4_K_M"}})), None, 0)
    written = write_gguf(tmp_path / "m.gguf", model, packed, ftype="Q4_K_M")
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in r.tensors}
    assert r.fields["general.architecture"].contents() == "qwen3moe"
    assert r.fields["qwen3moe.expert_count"].contents() == 4
    assert r.fields["qwen3moe.expert_used_count"].contents() == 2
    assert r.fields["qwen3moe.expert_feed_forward_length"].contents() == 256
    m = layout(model)
    for layer in m.layers:
        inp = tensors[f"blk.{layer.index}.ffn_gate_inp.weight"]
        assert inp.tensor_type == gguf.GGMLQuantizationType.F32 and list(inp.shape) == [256, 4]
        np.testing.assert_array_equal(np.asarray(inp.data), get_weight(layer.moe.router).numpy())
        for role, gname in (("expert_gate", "ffn_gate_exps"), ("expert_up", "ffn_up_exps"),
                            ("expert_down", "ffn_down_exps")):
            t = tensors[f"blk.{layer.index}.{gname}.weight"]
            assert list(t.shape) == [256, 256, 4]                    # ggml ne = [in, out, n_expert]
            assert written[t.name] == t.tensor_type.name.lower()
            w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)   # [n_expert, out, in]
            for e, roles in enumerate(layer.moe.experts):
                np.testing.assert_array_equal(w[e], get_weight(roles[role]).numpy())
    assert {n for n in tensors if "exps" in n} == {f"blk.{i}.ffn_{r}_exps.weight" for i in (0, 1)
                                                   for r in ("gate", "up", "down")}


def test_gguf_export_refuses_experts_of_one_tensor_in_different_types(tmp_path):
    from quantatlas.export.gguf import write_gguf

    model = qwen3_moe(hidden=256, inter=256, layers=1)
    packed = quantize_model(model, build_recipe(Arm(codec="q4_k", overrides=[{"match": r"experts\.2\.down",
                                                                               "codec": "q8_0"}])), None, 0)
    with pytest.raises(ValueError, match=r"ffn_down_exps.*q4_k, q8_0"):
        write_gguf(tmp_path / "m.gguf", model, packed)


def test_mixture_applies_llama_cpps_eight_expert_rules():
    from quantatlas.quant.gguf_mix import GGUFMixture

    model = qwen3_moe(hidden=256, inter=256, experts=8, layers=8)
    types = GGUFMixture("Q4_K_M").plan(model)
    for i in range(8):
        p = f"model.layers.{i}."
        assert types[p + "self_attn.v_proj"] == types[p + "self_attn.k_proj"] == "q8_0"   # n_expert == 8
        assert types[p + "self_attn.o_proj"] == "q5_k"
        assert types[p + "mlp.gate"] == "f32"
        downs = {types[f"{p}mlp.experts.{e}.down_proj"] for e in range(8)}
        more = i < 1 or i >= 7 or (i - 1) % 3 == 2                                        # use_more_bits(i, 8)
        assert downs == {"q6_k" if more else "q4_k"}
        assert {types[f"{p}mlp.experts.{e}.gate_proj"] for e in range(8)} == {"q4_k"}


def test_imatrix_counts_each_experts_routed_tokens(tmp_path):
    from quantatlas.export.gguf import gguf_tensor_names
    from quantatlas.quant.imatrix import compute_imatrix, read_imatrix_gguf, write_imatrix_gguf

    model = qwen3_moe()
    calib = calib_tokens()
    im = compute_imatrix(model, calib, datasets=["calib"])
    x = _block_inputs(model, 0, calib).double()
    want = _by_hand(model, 0, x)
    experts = layout(model).layers[0].moe.experts
    for e, (n, h_in, h_hidden) in want.items():
        t = experts[e]["expert_gate"]
        assert im.counts[t.name] == n == im.routed[0][e]
        # llama-imatrix's values: sum x^2 over the routed tokens = (N/2) diag(H)
        torch.testing.assert_close(im.sums[t.name], n / 2 * torch.diagonal(h_in), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(im.sums[experts[e]["expert_down"].name], n / 2 * torch.diagonal(h_hidden),
                                   rtol=1e-4, atol=1e-5)
    names = gguf_tensor_names(model)
    write_imatrix_gguf(tmp_path / "im.gguf", im, names)
    back = read_imatrix_gguf(tmp_path / "im.gguf", names, im.experts)
    assert set(back.sums) == set(im.sums) and back.counts == im.counts
    for k in im.sums:
        torch.testing.assert_close(back.sums[k], im.sums[k].float().double())


def test_streamed_gptq_on_moe_equals_in_memory(tmp_path):
    from quantatlas.eval.windows import make_eval_set, scored_logits
    from quantatlas.models.stream import ShardReader, StreamedModel, load_packed
    from quantatlas.quant.streamed import quantize_streamed

    saved = qwen3_moe()
    saved.save_pretrained(tmp_path / "src", max_shard_size="60KB")       # per-expert checkpoint keys
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in ShardReader([tmp_path / "src"]).entries
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    calib = calib_tokens(6, 24)
    arm = Arm(solver="gptq", codec={"uniform": {"bits": 3, "group": 16}}, moe={"min_tokens": 10})
    records = {}
    packed = quantize_model(model, build_recipe(arm), calib, 0, records=records)
    sm = StreamedModel(tmp_path / "src")
    streamed_records = {}
    summary = quantize_streamed(sm, build_recipe(arm), calib, 0, tmp_path / "out", records=streamed_records)
    got = load_packed(tmp_path / "out")
    assert set(got) == set(packed) and streamed_records == records
    for name, p in packed.items():
        for key, t in p.data.items():
            assert torch.equal(got[name].data[key], t), (name, key)
    toks = np.random.default_rng(3).integers(0, VOCAB, 3 * 32)
    es = make_eval_set(toks, 3 * 32, 32)
    want = torch.cat([x for _, x in scored_logits(model, es, 2, "cpu")])
    torch.testing.assert_close(torch.cat([x for _, x in sm.over(tmp_path / "out").scored_logits(es, 2)]), want,
                               rtol=1e-5, atol=1e-5)
    assert summary["quantized_params"] == sum(p.shape[0] * p.shape[1] for p in packed.values())


def test_bits_count_every_expert_and_active_bits_count_top_k():
    model = qwen3_moe()
    packed = quantize_model(model, build_recipe(Arm(codec={"uniform": {"bits": 4, "group": 16}})), None, 0)
    sizes = artifact_of(model, packed).measure(compress=False)
    n_params = sum(p.numel() for p in model.parameters())
    expert_names = {t.name + ".weight" for t in layout(model).roles if t.expert is not None}
    assert expert_names <= set(packed)
    stored = {n: 8 * p.nbytes for n, p in packed.items()}
    stored.update({n: 16 * p.numel() for n, p in model.named_parameters() if "experts" not in n and n not in packed})
    assert sizes["bits_per_param"] == pytest.approx(sum(stored.values()) / n_params)
    # a token uses 2 of each block's 4 experts: half of every expert tensor's bits and weights
    frac = {n: (0.5 if n in expert_names else 1.0) for n in stored}
    expert_weights = sum(packed[n].shape[0] * packed[n].shape[1] for n in expert_names)
    active_params = n_params - expert_weights / 2
    assert sizes["active_params"] == pytest.approx(active_params)
    assert sizes["active_bits_per_param"] == pytest.approx(sum(b * frac[n] for n, b in stored.items()) / active_params)


def test_run_json_and_results_carry_the_coverage(tmp_path):
    from quantatlas.models.load import LoadedModel
    from quantatlas.runner import run_spec

    lm = LoadedModel(qwen3_moe(), "tiny-moe", "tiny-qwen3-moe-seed0", None)
    spec = {"title": "moe coverage", "seeds": [0], "data": {"eval": {"tokens": 512, "ctx": 64},
                                                             "calib": {"samples": 2, "seq_len": 32}},
            "arms": {"gptq": {"solver": "gptq", "codec": {"uniform": {"bits": 4, "group": 16}},
                              "moe": {"min_tokens": 20, "starved": "fp16"}}}}
    doc = run_spec(spec, tmp_path / "r.json", loaded=lm, ledger=False, compress=False, log=lambda m: None)
    import json

    stored = json.loads((tmp_path / "r.json").read_text())["arms"]["gptq"]
    cov = stored["coverage"]["0"]
    counts = [n for per in cov["tokens"].values() for n in per]
    assert len(counts) == 8 and sum(counts) == 2 * 2 * 2 * 32        # 2 layers x top-2 x 64 tokens
    res = doc["arms"]["gptq"]["seeds"]["0"]
    assert res["moe_tokens_min"] == cov["tokens_min"] == min(counts)
    assert res["moe_experts_under_threshold"] == len(cov["under_threshold"]) == sum(n < 20 for n in counts)
    assert res["bits_per_param"] > 0 and 0 < res["active_bits_per_param"]


def test_moe_option_is_validated_and_refused_on_a_dense_model(tiny_reference):
    from quantatlas.context import RunContext
    from quantatlas.errors import UserError
    from quantatlas.quant.pipeline import Calibration, quantize
    from quantatlas.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match=r"arms\.a\.moe\.starved"):
        parse_spec({"title": "t", "arms": {"a": {"codec": "q8_0", "moe": {"starved": "drop"}}}})
    plain = parse_spec({"title": "t", "arms": {"a": {"codec": "q8_0"}}})
    assert "moe" not in plain.identity()["arms"]["a"]             # unset: no existing id changes
    arm = parse_spec({"title": "t", "arms": {"a": {"codec": "q8_0", "moe": {"starved": "all_tokens"}}}}).arms["a"]
    from quantatlas.quant.steps import arm_techniques

    assert "moe.starved=all_tokens" in arm_techniques(arm)
    cal = Calibration(load=lambda: np.arange(1000) % 250, samples=2, seq_len=16)
    with pytest.raises(UserError, match="arm.moe: .* has no mixture-of-experts blocks"):
        quantize(tiny_reference, arm, cal, RunContext(0))


def test_gptaq_and_layer_propagation_run_on_moe():
    for arm in (dict(solver="gptaq", codec={"uniform": {"bits": 4, "group": 16}}, moe={"min_tokens": 1}),
                dict(solver="gptq", codec={"uniform": {"bits": 4, "group": 16}}, propagation="layer",
                     moe={"min_tokens": 1, "starved": "all_tokens"})):
        model = qwen3_moe()
        packed = quantize_model(model, build_recipe(Arm(**arm)), calib_tokens(), 0)
        assert {t.name + ".weight" for t in layout(model).roles if t.expert is not None} <= set(packed)
        assert all(torch.isfinite(p.decode()).all() for p in packed.values())


def _pipeline(model, arm: dict, seed: int = 0):
    from quantatlas.context import RunContext
    from quantatlas.models.load import LoadedModel
    from quantatlas.quant.pipeline import Calibration, quantize

    lm = LoadedModel(model, "tiny-moe", "tiny-qwen3-moe", None)
    cal = Calibration(load=lambda: np.random.default_rng(7).integers(0, VOCAB, 4000), samples=4, seq_len=24,
                      held_out=lambda: np.random.default_rng(8).integers(0, VOCAB, 4000), held_out_tokens=256)
    return quantize(lm, Arm.model_validate(arm), cal, RunContext(seed))


def test_kv_activation_steps_and_transforms_on_moe():
    model = qwen3_moe(hidden=64)      # head_dim 32: one q8_0 block per cached head row
    x = calib_tokens(1, 16)
    qm = _pipeline(model, {"codec": {"uniform": {"bits": 4, "group": 16}}, "kv": {"k": "q8_0", "v": "q8_0"}})
    with torch.no_grad():
        assert torch.isfinite(qm.model(x).logits).all()
    assert qm.runtime_bits(64)                                    # the KV cache is counted
    # activations: the fused experts' inputs too (tests/test_moe_act.py: equal to hooking each expert's Linears)
    for act in ({"codec": "q8_0"}, {"codec": "q8_0", "roles": ["q", "k", "v", "o"]}):
        qm = _pipeline(model, {"codec": {"uniform": {"bits": 4, "group": 16}}, "act": act})
        with torch.no_grad():
            assert torch.isfinite(qm.model(x).logits).all()
    # rotations fold into the router and every expert (tests/test_moe_rotations.py)
    qm = _pipeline(model, {"codec": {"uniform": {"bits": 4, "group": 16}}, "transforms": [{"hadamard": {}}]})
    with torch.no_grad():
        assert torch.isfinite(qm.model(x).logits).all()


def test_recovery_and_allocation_with_experts_as_groups():
    from quantatlas.quant.sensitivity import measure_sensitivity

    model = qwen3_moe()
    qm = _pipeline(model, {"codec": {"uniform": {"bits": 2, "group": 16}},
                           "recovery": {"method": "kd_ste", "samples": 4, "seq_len": 24, "batch": 2, "steps": 3}})
    assert {t.name + ".weight" for t in layout(model).roles if t.expert is not None} <= set(qm.packed)
    assert qm.records["recovery"]["recovery_train_kl_after"] >= 0
    from quantatlas.models.load import LoadedModel
    from quantatlas.quant.config import parse_config

    lm = LoadedModel(model, "tiny-moe", "tiny-qwen3-moe", None)
    sens = measure_sensitivity(lm, Arm(codec={"uniform": {"bits": 2, "group": 16}}),
                               [parse_config("codec", {"uniform": {"bits": 8, "group": 16}})], calib_tokens(2, 16),
                               grouping="role")
    groups = {g.group: g for g in sens.groups}
    assert {"expert_gate", "expert_up", "expert_down", "q", "o"} <= set(groups)
    assert "router" not in groups                                # kept fp16, not a group of the base codec
    down = groups["expert_down"]
    assert len(down.tensors) == 2 * 4 and down.weights == 2 * 4 * 32 * 32
    assert down.bits[sens.candidates[0]] > down.bits[sens.base]
