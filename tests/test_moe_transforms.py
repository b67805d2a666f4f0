"""SmoothQuant on mixture-of-experts models: one scale s on post_attention_layernorm's output goes into the
columns of every reader of it (the router, each expert's gate and up, a shared expert's gate, up and router),
so the logits and the routing are unchanged; s is checked against the formula computed here from the norm's
output and the readers' weights; the fused 3-D experts and the ModuleList form give the same weights. (Each
expert's down, equalize and AWQ on experts: tests/test_moe_scales.py; rotations: tests/test_moe_rotations.py.)"""
from __future__ import annotations

import pytest
import torch
from test_moe import calib_tokens, list_form, mixtral, qwen2_moe, qwen3_moe

from quantatlas.models.layout import layout
from quantatlas.models.moe import BoundMoE, RoutingTap
from quantatlas.quant.transforms import make_transform

pytestmark = pytest.mark.usefixtures("one_thread")
ALPHA = 0.5

BUILDS = {
    "qwen3_moe": qwen3_moe,
    "mixtral": mixtral,
    "list_qwen3_moe": lambda: list_form(qwen3_moe()),
    "list_mixtral": lambda: list_form(mixtral(), ("w1", "w3", "w2")),
    "qwen2_moe_shared": lambda: _sharpen_shared(qwen2_moe()),
}


@torch.no_grad()
def _sharpen_shared(model):
    """The shared expert away from its near-zero init too, so that its gate (a router) matters to the logits."""
    for name, p in model.named_parameters():
        if "shared_expert" in name:
            p.normal_(0, 0.3)
    return model


@torch.no_grad()
def _logits_and_routing(model, tokens):
    """Logits, and per MoE layer the sorted top-k experts of every token."""
    routes: dict[int, list[torch.Tensor]] = {}
    taps = [RoutingTap(BoundMoE(layer.moe), lambda r, i=layer.index: routes.setdefault(i, []).append(
        r.index.sort(dim=-1).values)) for layer in layout(model).layers]
    try:
        logits = model(tokens, use_cache=False).logits
    finally:
        for t in taps:
            t.remove()
    return logits, {i: torch.cat(v) for i, v in routes.items()}


@torch.no_grad()
def _norm_absmax(model, tokens):
    """max |x_j| of each layer's post_attention_layernorm output over every calibration token (hooked here)."""
    out, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        def hook(mod, args, y, i=i):
            m = y.reshape(-1, y.shape[-1]).abs().amax(0)
            out[i] = m if i not in out else torch.maximum(out[i], m)
        handles.append(layer.post_attention_layernorm.register_forward_hook(hook))
    for b in range(0, tokens.shape[0], 8):
        model(tokens[b:b + 8], use_cache=False)
    for h in handles:
        h.remove()
    return out


def _readers_by_hand(mlp, routers: bool = True) -> list[torch.Tensor]:
    """Every matrix reading the norm's output, read off the modules directly (no layout); `routers=False`: the
    quantized ones (the router and a shared router stay fp16)."""
    ws = [mlp.gate.weight] if routers else []
    if isinstance(mlp.experts, torch.nn.ModuleList):
        for ex in mlp.experts:
            names = ("gate_proj", "up_proj") if hasattr(ex, "gate_proj") else ("w1", "w3")
            ws += [getattr(ex, n).weight for n in names]
    else:
        ws.append(mlp.experts.gate_up_proj.reshape(-1, mlp.experts.gate_up_proj.shape[-1]))   # every gate and up row
    if hasattr(mlp, "shared_expert"):
        ws += [mlp.shared_expert.gate_proj.weight, mlp.shared_expert.up_proj.weight]
        ws += [mlp.shared_expert_gate.weight] if routers else []
    return [w.detach().clone().double() for w in ws]


def _smooth(model, tokens):
    make_transform("smoothquant", {"alpha": ALPHA}).apply(model, tokens)


@pytest.mark.parametrize("name", list(BUILDS))
def test_smoothquant_keeps_logits_and_routing(name):
    model = BUILDS[name]()
    tokens, probe = calib_tokens(8, 24), calib_tokens(3, 20, seed=5)
    before, route_before = _logits_and_routing(model, probe)
    norms = [layer.post_attention_layernorm.weight.detach().clone() for layer in model.model.layers]
    _smooth(model, tokens)
    after, route_after = _logits_and_routing(model, probe)
    # the fold did something: every post-attention norm moved
    assert all(not torch.allclose(n, layer.post_attention_layernorm.weight)
               for n, layer in zip(norms, model.model.layers))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert set(route_after) == set(route_before) == {0, 1}
    for i in route_before:
        assert torch.equal(route_after[i], route_before[i])     # the same top-k experts for every token


@pytest.mark.parametrize("name", list(BUILDS))
def test_smoothing_scales_are_the_formula(name):
    model = BUILDS[name]()
    tokens = calib_tokens(8, 24)
    with torch.no_grad():
        act = _norm_absmax(model, tokens)
    before = [(_readers_by_hand(layer.mlp), layer.post_attention_layernorm.weight.detach().clone().double(),
               layer.mlp, _readers_by_hand(layer.mlp, routers=False)) for layer in model.model.layers]
    _smooth(model, tokens)
    for i, (readers, gamma, mlp, quantized) in enumerate(before):
        # per input channel, over every reader that gets quantized (the routers' columns are scaled, not measured)
        w_max = torch.stack([w.abs().amax(0) for w in quantized]).amax(0)
        s = act[i].double() ** ALPHA / w_max ** (1 - ALPHA)
        assert s.std() > 0.05 * s.mean()                                     # not a trivial, uniform scale
        torch.testing.assert_close(model.model.layers[i].post_attention_layernorm.weight.double(), gamma / s,
                                   rtol=1e-5, atol=1e-7)
        for w0, w1 in zip(readers, _readers_by_hand(mlp)):
            torch.testing.assert_close(w1, w0 * s[None, :], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("build,names", [(qwen3_moe, ("gate_proj", "up_proj", "down_proj")),
                                         (mixtral, ("w1", "w3", "w2"))], ids=["qwen3_moe", "mixtral"])
def test_fused_and_list_forms_give_the_same_weights(build, names):
    fused = build()
    listed = list_form(fused, names)
    tokens = calib_tokens(8, 24)
    _smooth(fused, tokens)
    _smooth(listed, tokens)
    for lf, ll in zip(fused.model.layers, listed.model.layers):
        gate_up, down = lf.mlp.experts.gate_up_proj, lf.mlp.experts.down_proj
        inner = gate_up.shape[1] // 2
        for key in ("input_layernorm", "post_attention_layernorm"):
            torch.testing.assert_close(getattr(ll, key).weight, getattr(lf, key).weight, rtol=1e-5, atol=1e-7)
        for key in ("q_proj", "k_proj", "v_proj", "o_proj"):
            torch.testing.assert_close(getattr(ll.self_attn, key).weight, getattr(lf.self_attn, key).weight,
                                       rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ll.mlp.gate.weight, lf.mlp.gate.weight, rtol=1e-5, atol=1e-7)
        for e, ex in enumerate(ll.mlp.experts):
            g, u, d = (getattr(ex, n).weight for n in names)
            torch.testing.assert_close(g, gate_up[e, :inner], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(u, gate_up[e, inner:], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(d, down[e], rtol=0, atol=0)          # down is not a reader of the norm


def test_w8a8_smoothquant_arm_runs_on_moe():
    from test_moe import _pipeline

    model = qwen3_moe(hidden=64)
    arm = {"codec": {"uniform": {"bits": 8, "group": None}}, "transforms": [{"smoothquant": {"alpha": 0.5}}],
           "act": "W8A8"}
    qm = _pipeline(model, arm)
    with torch.no_grad():
        assert torch.isfinite(qm.model(calib_tokens(1, 16)).logits).all()
