"""Rotations on mixture-of-experts models (issue 27 part 3): QuaRot's `hadamard` (the residual R1 through the
router, every expert and a shared expert; the online R4 before every expert's down), SpinQuant's learned R1/R2
and RoSTE's per-layer choice. References are computed here: routing from the router's own logits, the experts'
down inputs and their rotation from the raw 3-D tensors and a dense Hadamard matrix, the ModuleList form of the
same model (tests/test_moe.py's `list_form`) with every expert Linear hooked."""
from __future__ import annotations

import copy

import pytest
import torch
from test_moe import VOCAB, _recorded_hessians, calib_tokens, list_form, mixtral, qwen2_moe, qwen3_moe

from quantatlas.context import RunContext
from quantatlas.models.layout import layout
from quantatlas.quant.act import ActConfig, ActivationQuantizer
from quantatlas.quant.cayley import orthogonality_error
from quantatlas.quant.config import parse_config
from quantatlas.quant.hadamard import RandomizedHadamard
from quantatlas.quant.kv import KVCacheConfig
from quantatlas.quant.quantize import quantize_model
from quantatlas.quant.recipe import build_recipe
from quantatlas.quant.transforms import make_transform
from quantatlas.spec import Arm

pytestmark = pytest.mark.usefixtures("one_thread")
X = calib_tokens(3, 20, seed=5)
QUAROT = {"online": ["o", "down"]}


@torch.no_grad()
def _shared_sharpened():
    """Qwen2-MoE with its shared expert (and its sigmoid gate, a router) away from the near-zero init."""
    model = qwen2_moe()
    for name, p in model.named_parameters():
        if "shared_expert" in name:
            p.normal_(0, 0.3)
    return model


BUILDS = {
    "qwen3_moe": qwen3_moe,
    "mixtral": mixtral,
    "list_qwen3_moe": lambda: list_form(qwen3_moe()),
    "list_mixtral": lambda: list_form(mixtral(), ("w1", "w3", "w2")),
    "qwen2_moe_shared": _shared_sharpened,
}


@torch.no_grad()
def _logits_and_routes(model, tokens=X):
    """Logits, and per layer the router logits and the sorted top-k experts of every token, read off the
    router module's output (the fused routers return (logits, weights, experts), a ModuleList's its logits)."""
    seen, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        def hook(mod, args, out, i=i):
            seen.setdefault(i, []).append((out[0] if isinstance(out, tuple) else out).detach())
        handles.append(layer.mlp.gate.register_forward_hook(hook))
    try:
        logits = model(tokens, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    routes = {i: torch.cat(v) for i, v in seen.items()}
    return logits, routes, {i: r.topk(2, dim=-1).indices.sort(-1).values for i, r in routes.items()}


def _down(model, layer, e):
    """Expert e's down matrix [hidden, inter] read off the model's modules (fused tensor or the list's Linear)."""
    experts = model.model.layers[layer].mlp.experts
    if isinstance(experts, torch.nn.ModuleList):
        ex = experts[e]
        return (ex.down_proj if hasattr(ex, "down_proj") else ex.w2).weight
    return experts.down_proj[e]


@pytest.mark.parametrize("name", list(BUILDS))
def test_hadamard_keeps_logits_and_routing(name):
    model = BUILDS[name]()
    before, router_before, top_before = _logits_and_routes(model)
    downs = [_down(model, 0, e).detach().clone() for e in range(4)]
    make_transform("hadamard", QUAROT).apply(model, None, RunContext(3))
    after, router_after, top_after = _logits_and_routes(model)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    for i in router_before:      # the router reads Q h with its rows rotated: the same logits, the same experts
        torch.testing.assert_close(router_after[i], router_before[i], rtol=1e-4, atol=1e-5)
        assert torch.equal(top_after[i], top_before[i])
    # the experts' down matrices were rotated (left by R1, right by the online R4), the norms' gains folded
    assert all(not torch.allclose(d, _down(model, 0, e), atol=1e-3) for e, d in enumerate(downs))
    assert all(torch.equal(layer.post_attention_layernorm.weight, torch.ones_like(layer.post_attention_layernorm.weight))
               for layer in model.model.layers)
    if name == "qwen2_moe_shared":
        assert model.model.layers[0].mlp.shared_expert.down_proj.input_rotation is not None


def test_float64_model_keeps_its_logits():
    model = list_form(qwen3_moe()).double()      # transformers' fused experts (grouped_mm) take no float64
    before, _, _ = _logits_and_routes(model)
    make_transform("hadamard", QUAROT).apply(model, None, RunContext(3))
    after, _, _ = _logits_and_routes(model)
    # the online rotations compute in float32 (quant/online.py), the folds in float64
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6 * before.abs().max().item())


@pytest.mark.parametrize("build,names", [(qwen3_moe, ("gate_proj", "up_proj", "down_proj")),
                                         (mixtral, ("w1", "w3", "w2"))], ids=["qwen3_moe", "mixtral"])
def test_fused_and_list_forms_give_the_same_rotated_weights_and_logits(build, names):
    fused = build()
    listed = list_form(fused, names)
    for m in (fused, listed):
        make_transform("hadamard", QUAROT).apply(m, None, RunContext(7))
    for lf, ll in zip(fused.model.layers, listed.model.layers):
        torch.testing.assert_close(ll.mlp.gate.weight, lf.mlp.gate.weight)
        inter = lf.mlp.experts.down_proj.shape[2]
        for e, ex in enumerate(ll.mlp.experts):
            gate, up, down = (getattr(ex, n).weight for n in names)
            torch.testing.assert_close(gate, lf.mlp.experts.gate_up_proj[e, :inter])
            torch.testing.assert_close(up, lf.mlp.experts.gate_up_proj[e, inter:])
            torch.testing.assert_close(down, lf.mlp.experts.down_proj[e])
    torch.testing.assert_close(_logits_and_routes(fused)[0], _logits_and_routes(listed)[0], rtol=1e-5, atol=1e-5)


def test_the_online_rotation_is_the_seeded_hadamard_on_every_experts_down():
    """Expert e's down after the transform is R1 W_e Q4ᵀ with R1 and Q4 the seeded Hadamards, written out."""
    fp = qwen3_moe()
    model = copy.deepcopy(fp)
    ctx = RunContext(2)
    make_transform("hadamard", QUAROT).apply(model, None, ctx)
    r1 = RandomizedHadamard(32, ctx.sub_seed("named", "residual")).matrix()
    for i in range(2):
        q4 = RandomizedHadamard(32, ctx.sub_seed("named", "online", "down", i)).matrix()
        for e in range(4):
            want = r1 @ fp.model.layers[i].mlp.experts.down_proj[e].double() @ q4.T
            torch.testing.assert_close(model.model.layers[i].mlp.experts.down_proj[e].double(), want,
                                       rtol=1e-5, atol=1e-6)


# ---- the weight step after the transform -----------------------------------------------------------

@torch.no_grad()
def _block_input(model, layer, tokens):
    seen = []
    handle = model.model.layers[layer].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    for i in range(0, tokens.shape[0], 8):
        model(tokens[i:i + 8])
    handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])


@pytest.mark.parametrize("solver", ["rtn", "gptq"])
def test_weight_step_on_rotated_fused_experts_sees_the_rotated_down_input(monkeypatch, solver):
    model = qwen3_moe()
    ctx = RunContext(0)
    make_transform("hadamard", QUAROT).apply(model, None, ctx)
    calib = calib_tokens()
    x = _block_input(model, 0, calib).double()
    experts = model.model.layers[0].mlp.experts
    w_gate_up, router = experts.gate_up_proj.detach().double().clone(), model.model.layers[0].mlp.gate.weight.double()
    arm = Arm(solver=solver, codec={"uniform": {"bits": 4, "group": 16}}, propagation="layer", moe={"min_tokens": 1},
              overrides=[{"match": r, "codec": None} for r in ("q", "k", "v", "o")])
    seen = _recorded_hessians(monkeypatch)
    packed = quantize_model(model, build_recipe(arm), calib, 0)
    names = {e: t["expert_down"].name for e, t in enumerate(layout(model).layers[0].moe.experts)}
    assert {n + ".weight" for n in names.values()} <= set(packed)
    with torch.no_grad():
        assert torch.isfinite(model(X).logits).all()
    if solver == "rtn":
        return
    # by hand: softmax, top-2 renormalised from the router's weights; h = silu(x Wgᵀ) ⊙ (x Wuᵀ) of the rotated
    # fp expert, rotated by the seeded Q4 of layer 0; H = 2/N Σ (Q h)(Q h)ᵀ over the expert's routed rows
    q4 = RandomizedHadamard(32, ctx.sub_seed("named", "online", "down", 0)).matrix()
    top = torch.softmax(x @ router.T, -1).topk(2, -1).indices
    for e in range(4):
        rows = x[(top == e).any(-1)]
        assert rows.shape[0] > 0
        h = torch.nn.functional.silu(rows @ w_gate_up[e, :32].T) * (rows @ w_gate_up[e, 32:].T)
        qh = h @ q4.T
        want = 2 / rows.shape[0] * qh.T @ qh
        torch.testing.assert_close(seen[names[e]].double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_a_deep_copy_of_a_rotated_layer_computes_with_its_own_weights():
    model = qwen3_moe()
    make_transform("hadamard", QUAROT).apply(model, None, RunContext(0))
    layer = model.model.layers[0]
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = layer.mlp(x)
        copied = copy.deepcopy(layer)
        assert copied.mlp.experts.down_rotation is not layer.mlp.experts.down_rotation
        layer.mlp.experts.down_proj.zero_()           # the original changes: the copy must not follow it
        layer.mlp.experts.down_rotation.rotation = RandomizedHadamard(32, 99)
        torch.testing.assert_close(copied.mlp(x), want, rtol=0, atol=0)
        assert not torch.allclose(layer.mlp(x), want)


def test_gptaq_runs_on_rotated_moe():
    """GPTAQ keeps an fp copy of each layer (a deep copy): its experts rotate their down input too."""
    model = qwen3_moe()
    make_transform("hadamard", QUAROT).apply(model, None, RunContext(0))
    packed = quantize_model(model, build_recipe(Arm(solver="gptaq", codec={"uniform": {"bits": 4, "group": 16}},
                                                     moe={"min_tokens": 1})), calib_tokens(), 0)
    assert all(torch.isfinite(p.decode()).all() for p in packed.values())
    with torch.no_grad():
        assert torch.isfinite(model(X).logits).all()


# ---- the activation step -----------------------------------------------------------------------------

@pytest.mark.parametrize("build,names", [(qwen3_moe, ("gate_proj", "up_proj", "down_proj")),
                                         (mixtral, ("w1", "w3", "w2"))], ids=["qwen3_moe", "mixtral"])
def test_w4a4_after_quarot_fused_experts_equal_the_hooked_list_form(build, names):
    """W4A4 with the online down of the transform: the fused forward quantizes Q·h as the list form's
    hooked Linears (their hook rotates first, then the act quantizer) do."""
    fused = build()
    listed = list_form(fused, names)
    outs = []
    for m in (fused, listed):
        make_transform("hadamard", QUAROT).apply(m, None, RunContext(1))
        act = ActivationQuantizer(ActConfig.model_validate({"scheme": "W4A4"}), seed=4)
        act.attach(m)
        with torch.no_grad():
            outs.append(m(X).logits)
        act.detach()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(outs[0], fused(X).logits, atol=1e-4)     # something was quantized
    # by hand on the fused model: expert 0 of layer 0 reads q(Q h) with q the per-token int4 quantizer
    block = fused.model.layers[0].mlp
    q4 = block.experts.down_rotation.rotation
    seen = []
    act = ActivationQuantizer(ActConfig.model_validate({"scheme": "W4A4", "roles": ["expert_down"], "layers": [0]}),
                              seed=4)
    act.attach(fused)
    codec = act.slots[0]["codec"]
    original = codec.fake_quantize
    codec.fake_quantize = lambda g: seen.append(g.clone()) or original(g)
    try:
        with torch.no_grad():
            fused(X)
    finally:
        act.detach()
    h = _down_inputs(fused, 0, 0)
    torch.testing.assert_close(seen[0], q4.rotate(h.float()), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def _down_inputs(model, layer, expert):
    """act(gate x) ⊙ up x of `expert`'s routed rows, from the raw tensors and the router's logits."""
    x = _block_input(model, layer, X).float()
    block = model.model.layers[layer].mlp
    rows = x[(x @ block.gate.weight.T).topk(2, -1).indices.eq(expert).any(-1)]
    gu = block.experts.gate_up_proj[expert]
    inter = gu.shape[0] // 2
    return torch.nn.functional.silu(rows @ gu[:inter].T) * (rows @ gu[inter:].T)


@pytest.mark.parametrize("form", ["fused", "list"])
def test_act_hadamard_down_with_the_transforms_online_down_is_refused(form):
    model = qwen3_moe() if form == "fused" else list_form(qwen3_moe())
    make_transform("hadamard", {"online": ["down"]}).apply(model, None, RunContext(0))
    with pytest.raises(ValueError, match="already rotates its input online"):
        ActivationQuantizer(ActConfig.model_validate({"scheme": "W4A4", "hadamard": ["down"]})).attach(model)
    with pytest.raises(ValueError, match="already rotated online"):
        make_transform("hadamard", {"residual": False, "heads": False, "online": ["down"]}).apply(model, None)


def test_exports_refuse_an_moe_model_with_online_rotations(tmp_path):
    from quantatlas.export.gguf import write_gguf
    from quantatlas.export.schemes import NoScheme, check_arm

    model = qwen3_moe()
    make_transform("hadamard", {"online": ["down"]}).apply(model, None, RunContext(0))
    with pytest.raises(ValueError, match=r"gguf export: model\.layers\.0\.mlp\.experts .*rotate their input online"):
        write_gguf(tmp_path / "m.gguf", model, {})
    assert not (tmp_path / "m.gguf").exists()
    arm = Arm(codec={"uniform": {"bits": 4, "group": 16}}, transforms=[{"hadamard": {"online": ["down"]}}])
    with pytest.raises(NoScheme, match="hadamard.online"):
        check_arm(arm)


def test_hadamard_runs_in_the_pipeline_on_moe():
    from quantatlas.models.load import LoadedModel
    from quantatlas.quant.pipeline import Calibration, quantize
    import numpy as np

    model = qwen3_moe()
    lm = LoadedModel(model, "tiny-moe", "tiny-qwen3-moe", None)
    cal = Calibration(load=lambda: np.random.default_rng(7).integers(0, VOCAB, 4000), samples=4, seq_len=24,
                      held_out=lambda: np.random.default_rng(8).integers(0, VOCAB, 4000), held_out_tokens=256)
    arm = Arm.model_validate({"codec": {"uniform": {"bits": 4, "group": 16}}, "act": {"scheme": "W4A4"},
                              "transforms": [{"hadamard": QUAROT}], "moe": {"min_tokens": 1}})
    qm = quantize(lm, arm, cal, RunContext(0))
    with torch.no_grad():
        assert torch.isfinite(qm.model(X).logits).all()


# ---- SpinQuant ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen3_moe", "list_qwen3_moe", "qwen2_moe_shared"])
def test_spinquant_steps_zero_is_hadamard(name):
    a, b = BUILDS[name](), BUILDS[name]()
    make_transform("spinquant", {"steps": 0, **QUAROT}).apply(a, None, RunContext(2))
    make_transform("hadamard", QUAROT).apply(b, None, RunContext(2))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits_and_routes(a)[0], _logits_and_routes(b)[0], rtol=0, atol=1e-5)


def _bound_spinquant(steps=4):
    t = make_transform("spinquant", {"steps": steps, "lr": 5.0, "samples": 4, "seq_len": 24, "batch": 4, **QUAROT})
    kv4 = {"uniform": {"bits": 4, "group": 16, "symmetric": False}}
    t.bind(parse_config("codec", {"uniform": {"bits": 3, "group": 16}}).build(),
           ActConfig.model_validate({"scheme": "W4A4"}), KVCacheConfig.model_validate({"k": kv4, "v": kv4}))
    return t


@pytest.mark.parametrize("name", ["qwen3_moe", "list_qwen3_moe", "qwen2_moe_shared"])
def test_spinquant_learns_orthogonal_rotations_that_keep_the_fp_function(name):
    model = BUILDS[name]()
    before, _, top_before = _logits_and_routes(model)
    t = _bound_spinquant()
    t.apply(model, calib_tokens(4, 24), RunContext(1))
    after, _, top_after = _logits_and_routes(model)
    assert len(t.history) == 4 and all(h > 0 for h in t.history)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-4 * before.abs().max().item())
    assert all(torch.equal(top_after[i], top_before[i]) for i in top_before)
    r1, r2 = t.rotations["r1"], t.rotations["r2"]
    assert orthogonality_error(r1) < 1e-5 and max(orthogonality_error(r) for r in r2) < 1e-5
    start = make_transform("spinquant", {"steps": 0})
    start.apply(BUILDS[name](), None, RunContext(1))
    assert (r1 - start.rotations["r1"]).abs().max() > 1e-4     # R1 moved: gradients reached it


def test_spinquant_trains_the_same_on_fused_and_list_experts():
    """The in-loop weight quantizer goes over each expert matrix, the act quantizer over each expert input,
    with straight-through gradients, whichever way the experts are stored."""
    fused = qwen3_moe()
    listed = list_form(fused)
    ta, tb = _bound_spinquant(3), _bound_spinquant(3)
    ta.apply(fused, calib_tokens(4, 24), RunContext(1))
    tb.apply(listed, calib_tokens(4, 24), RunContext(1))
    torch.testing.assert_close(torch.tensor(ta.history), torch.tensor(tb.history), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ta.rotations["r1"], tb.rotations["r1"], rtol=0, atol=1e-5)


# ---- RoSTE ----------------------------------------------------------------------------------------------

def test_roste_hadamard_rotates_vo_and_the_experts_down_on_moe_layers():
    from quantatlas.quant.roste import RoSTE

    arm = Arm.model_validate({"codec": {"uniform": {"bits": 4, "group": 16}}, "act": {"scheme": "W4A4"},
                              "moe": {"min_tokens": 1},
                              "recovery": {"method": "roste", "lr": 1e-4, "rotation": "hadamard", "samples": 4,
                                           "seq_len": 24, "batch": 2, "steps": 2}})
    fp = list_form(qwen3_moe())
    model = copy.deepcopy(fp)
    packed = quantize_model(model, build_recipe(arm), calib_tokens(), 0)
    rec = RoSTE(arm.recovery, 0, arm.act, arm.kv)
    _, info, report = rec.run(model, fp, packed, calib_tokens(4, 24))
    assert rec.chosen == {0: {"vo": True, "down": True}, 1: {"vo": True, "down": True}}
    down = report["layers"]["0"]["down"]     # eq. (12) summed over the experts (tests/test_moe_recovery.py)
    assert down["rotation"] == "hadamard" and down["identity"] > 0 and down["hadamard"] > 0
    assert info["recovery_rotated_vo"] == 1.0 and info["recovery_rotated_down"] == 1.0
    with torch.no_grad():
        assert torch.isfinite(model(X).logits).all()


def test_check_model_accepts_moe_and_refuses_a_width_without_hadamard():
    model = qwen3_moe(inter=24)          # experts' down reads 24 values: 24 = 12·2, a Paley order
    make_transform("hadamard", {}).check_model(model)
    make_transform("spinquant", {}).check_model(model)
    with pytest.raises(ValueError, match="hadamard: width 24"):
        make_transform("hadamard", {"block": 16}).check_model(qwen3_moe(inter=24))


@torch.no_grad()
def _stored_transposed(model):
    """The same experts stored [E, in, out] (transformers' is_transposed layout); the model's own eager forward
    does not read that layout, so only a rotated model (whose forward is ours) is run with it."""
    for layer in model.model.layers:
        ex = layer.mlp.experts
        ex.gate_up_proj = torch.nn.Parameter(ex.gate_up_proj.detach().transpose(1, 2).contiguous())
        ex.down_proj = torch.nn.Parameter(ex.down_proj.detach().transpose(1, 2).contiguous())
        ex.is_transposed = True
    return model


def test_experts_stored_transposed_rotate_and_train_as_the_plain_layout():
    fp = qwen3_moe()
    before, _, _ = _logits_and_routes(fp)
    plain, flipped = copy.deepcopy(fp), _stored_transposed(copy.deepcopy(fp))
    for m in (plain, flipped):
        make_transform("hadamard", QUAROT).apply(m, None, RunContext(1))
    torch.testing.assert_close(_logits_and_routes(flipped)[0], before, rtol=0, atol=1e-4 * before.abs().max().item())
    for lp, lf in zip(plain.model.layers, flipped.model.layers):
        torch.testing.assert_close(lf.mlp.experts.down_proj.transpose(1, 2), lp.mlp.experts.down_proj)
        torch.testing.assert_close(lf.mlp.experts.gate_up_proj.transpose(1, 2), lp.mlp.experts.gate_up_proj)
    ta, tb = _bound_spinquant(2), _bound_spinquant(2)
    ta.apply(copy.deepcopy(fp), calib_tokens(4, 24), RunContext(1))
    tb.apply(_stored_transposed(copy.deepcopy(fp)), calib_tokens(4, 24), RunContext(1))
    torch.testing.assert_close(torch.tensor(ta.history), torch.tensor(tb.history), rtol=1e-4, atol=1e-7)
