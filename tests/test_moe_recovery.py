"""Finetune recovery on mixture-of-experts models whose experts are fused 3-D tensors (issue 27 part 3):
every method trains each expert's packed matrix, the forward assembling the fused parameters from them
(models/moe.py `FusedExpertWeights`). The strongest check is the ModuleList form of the same model, whose
experts are plain Linears recovery always trained: given the same seed and data both forms must end with
the same expert packs. Also: the packs move, the training KL falls, the model holds decode(Packed) exactly,
the bits do not change, the router is left as the recipe left it; transposed and interleaved storage."""
from __future__ import annotations

import copy
import functools
import types

import pytest
import torch

from quantatlas.eval.bits import artifact_of
from quantatlas.models.layout import layout
from quantatlas.models.moe import BoundMoE, FusedExpertWeights
from test_moe import _pipeline, list_form, mixtral, qwen3_moe

pytestmark = pytest.mark.usefixtures("one_thread")

CODEC = {"uniform": {"bits": 3, "group": 16}}
DATA = {"samples": 4, "seq_len": 24, "batch": 2, "steps": 6}
METHODS = {   # lr: relative steps on scales; absolute on latents (attention weights are ~0.02 at init)
    "kd_ste_scales": {"method": "kd_ste", "train": "scales", "lr": 0.01},
    "kd_ste_scales_norms": {"method": "kd_ste", "train": "scales_norms", "lr": 0.01},
    "kd_ste_weights": {"method": "kd_ste", "train": "weights", "lr": 3e-4},
    "qad": {"method": "qad", "lr": 3e-4},
    "pv_lite": {"method": "pv_lite", "lr": 0.01, "discrete_every": 2, "fraction": 0.05},
    "pv_tuning": {"method": "pv_tuning", "lr": 0.01, "discrete_every": 2, "fraction": 0.05},
    "block_ap": {"method": "block_ap", "train": "scales", "lr": 0.01},
    "roste": {"method": "roste", "lr": 3e-4},
}
BUILDS = {"qwen3_moe": qwen3_moe, "mixtral": mixtral}


def _arm(method: str | None) -> dict:
    return {"codec": CODEC} if method is None else {"codec": CODEC, "recovery": {**METHODS[method], **DATA}}


@functools.cache
def _rtn(build: str):
    """The same arm without recovery (the weights step's packs and model)."""
    return _pipeline(BUILDS[build](), _arm(None))


def _experts(packed: dict) -> dict:
    return {n: p for n, p in packed.items() if ".experts." in n}


def _same_pack(a, b) -> bool:
    return set(a.data) == set(b.data) and all(torch.equal(a.data[k], b.data[k]) for k in a.data)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("build", list(BUILDS))
def test_every_method_tunes_fused_experts_as_the_list_form(build, method):
    rtn = _rtn(build)
    fused = _pipeline(BUILDS[build](), _arm(method))
    listed = _pipeline(list_form(BUILDS[build]()), _arm(method))
    rec = fused.records["recovery"]
    assert rec["recovery_train_kl_after"] < rec["recovery_train_kl_before"]
    tuned, before = _experts(fused.packed), _experts(rtn.packed)
    assert set(tuned) == set(before) and len(tuned) == 2 * 4 * 3
    moved = [n for n in tuned if not _same_pack(tuned[n], before[n])]
    assert len(moved) >= 0.75 * len(tuned)          # an expert no training token reaches keeps its pack
    # the same bits: every tensor of every pack keeps its dtype and shape
    for n, p in fused.packed.items():
        q = rtn.packed[n]
        assert p.shape == q.shape and {k: (v.dtype, v.shape) for k, v in p.data.items()} == \
            {k: (v.dtype, v.shape) for k, v in q.data.items()}
    bpw = artifact_of(fused.model, fused.packed).measure(compress=False)["bits_per_weight"]
    assert bpw == artifact_of(rtn.model, rtn.packed).measure(compress=False)["bits_per_weight"]
    # what is evaluated is what is stored: each expert's slice of the fused tensors is decode(Packed)
    experts = FusedExpertWeights(fused.model)
    assert set(experts.roles) == set(tuned)
    for n, p in tuned.items():
        assert torch.equal(experts.matrix(n), p.decode().to(experts.matrix(n).dtype))
    # routers are not trained
    for a, b in zip(layout(fused.model).moe_blocks, layout(rtn.model).moe_blocks):
        assert torch.equal(a.router.module.weight, b.router.module.weight)
    # the ModuleList form trains its expert Linears: the same tuned experts (one fp16 ulp of a scale at most)
    other = _experts(listed.packed)
    assert set(other) == set(tuned)
    for n in tuned:
        torch.testing.assert_close(tuned[n].decode(), other[n].decode(), rtol=0, atol=1e-3)
    assert listed.records["recovery"]["recovery_train_kl_after"] == pytest.approx(rec["recovery_train_kl_after"],
                                                                                rel=1e-3)


# ---- other storage of the fused tensors ---------------------------------------------------------

def _interleaved_gate(self, out):
    return self.act_fn(out[..., 0::2]) * out[..., 1::2]


@torch.no_grad()
def _restored(model, transposed: bool, interleaved: bool):
    """The same experts stored [E, in, out] (is_transposed) and/or with gate and up rows interleaved
    (is_concatenated: false), run by transformers' batched_mm experts forward, which reads both."""
    model.config._experts_implementation = "batched_mm"
    for layer in model.model.layers:
        ex = layer.mlp.experts
        gate_up, down = ex.gate_up_proj.detach(), ex.down_proj.detach()
        if interleaved:
            i = gate_up.shape[1] // 2
            gate_up = torch.stack([gate_up[:, :i], gate_up[:, i:]], 2).reshape(gate_up.shape)   # g0 u0 g1 u1 ...
            ex.is_concatenated = False
            ex._apply_gate = types.MethodType(_interleaved_gate, ex)
        if transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
            ex.is_transposed = True
        ex.gate_up_proj = torch.nn.Parameter(gate_up.contiguous())
        ex.down_proj = torch.nn.Parameter(down.contiguous())
    return model


STORAGE = [(True, False), (False, True), (True, True)]


@pytest.mark.parametrize("transposed,interleaved", STORAGE, ids=["transposed", "interleaved", "both"])
def test_assembly_inverts_the_layouts_view_and_routes_gradients(transposed, interleaved):
    model = _restored(qwen3_moe(), transposed, interleaved)
    experts = FusedExpertWeights(model)
    moe = layout(model).moe_blocks[0]
    bound, prefix = BoundMoE(moe), moe.name + ".experts"
    # every expert's matrix given: the stored tensors, bit for bit
    given = {n: experts.matrix(n).clone() for n in experts.roles}
    params = experts.parameters(given)
    for param in ("gate_up_proj", "down_proj"):
        assert torch.equal(params[f"{prefix}.{param}"], getattr(moe.experts_module, param))
    # one matrix given (expert 2's up, trainable): the rest from the model, the gradient to it alone
    name = moe.experts[2]["expert_up"].name + ".weight"
    w = torch.randn(bound.weight(2, "expert_up").shape, requires_grad=True)
    params = experts.parameters({name: w})
    assert set(params) == {f"{prefix}.gate_up_proj"}           # down_proj: the model's own is used
    fused = params[f"{prefix}.gate_up_proj"]
    stored = moe.experts_module.gate_up_proj
    rows = torch.arange(moe.experts[2]["expert_up"].shape[0]) * (2 if interleaved else 1) + \
        (1 if interleaved else stored.shape[2 if transposed else 1] // 2)   # up's rows of expert 2, by hand
    as_rows = fused.transpose(1, 2) if transposed else fused
    stored_rows = stored.transpose(1, 2) if transposed else stored
    assert torch.equal(as_rows[2, rows], w.detach())
    keep = torch.ones(as_rows.shape[:2], dtype=torch.bool)
    keep[2, rows] = False
    assert torch.equal(as_rows[keep], stored_rows.detach()[keep])
    r = torch.randn(fused.shape)
    (fused * r).sum().backward()
    assert torch.equal(w.grad, (r.transpose(1, 2) if transposed else r)[2, rows])


@pytest.mark.parametrize("method", ["kd_ste_scales", "qad"])
@pytest.mark.parametrize("transposed,interleaved", STORAGE, ids=["transposed", "interleaved", "both"])
def test_transposed_and_interleaved_storage_tune_as_the_plain_layout(transposed, interleaved, method):
    base = qwen3_moe()
    plain = _pipeline(copy.deepcopy(base), _arm(method))
    other = _pipeline(_restored(copy.deepcopy(base), transposed, interleaved), _arm(method))
    tuned = _experts(other.packed)
    assert set(tuned) == set(_experts(plain.packed))
    for n, p in tuned.items():
        torch.testing.assert_close(p.decode(), plain.packed[n].decode(), rtol=0, atol=1e-3)
    experts = FusedExpertWeights(other.model)
    for n, p in tuned.items():
        assert torch.equal(experts.matrix(n), p.decode())


@pytest.mark.parametrize("extra", [
    {"transforms": [{"hadamard": {}}], "recovery": {"method": "kd_ste", "lr": 0.01}},   # our forward: online R4
    {"act": {"codec": "q8_0"}, "kv": {"k": "q8_0", "v": "q8_0"}, "recovery": {"method": "roste", "lr": 3e-4}},
], ids=["kd_ste_online_down", "roste_act_kv"])
def test_experts_forwards_of_ours_train_on_the_assembled_tensors(extra):
    """The online down rotation's and the activation quantizer's fused forwards read the assembled tensors."""
    arm = {"codec": CODEC, **extra, "recovery": {**extra["recovery"], **DATA}}
    fused, listed = _pipeline(qwen3_moe(hidden=64), arm), _pipeline(list_form(qwen3_moe(hidden=64)), arm)
    rec = fused.records["recovery"]
    assert rec["recovery_train_kl_after"] < rec["recovery_train_kl_before"]
    assert rec["recovery_train_kl_after"] == pytest.approx(listed.records["recovery"]["recovery_train_kl_after"],
                                                           rel=1e-3)
    tuned = _experts(fused.packed)
    assert len(tuned) == 24
    for n, p in tuned.items():
        torch.testing.assert_close(p.decode(), listed.packed[n].decode(), rtol=0, atol=1e-3)


def test_an_unquantized_expert_stays_fp_and_a_packed_router_trains():
    overrides = [{"match": r"layers\.1\..*experts\.3\.up_proj", "codec": None},      # left fp by the recipe
                 {"match": "router", "codec": {"uniform": {"bits": 8, "group": 16}}}]  # packed by choice
    arm = {"codec": CODEC, "overrides": overrides, "recovery": {**METHODS["kd_ste_scales"], **DATA}}
    fp = qwen3_moe()
    fused, listed = _pipeline(copy.deepcopy(fp), arm), _pipeline(list_form(fp), arm)
    rtn = _pipeline(copy.deepcopy(fp), {"codec": CODEC, "overrides": overrides})
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    assert name not in fused.packed
    assert torch.equal(FusedExpertWeights(fused.model).matrix(name), FusedExpertWeights(fp).matrix(name))
    router = "model.layers.0.mlp.gate.weight"
    assert not _same_pack(fused.packed[router], rtn.packed[router])
    assert set(fused.packed) == set(listed.packed)
    for n, p in fused.packed.items():    # the routers too: the list form's is an nn.Linear
        torch.testing.assert_close(p.decode(), listed.packed[n].decode(), rtol=0, atol=1e-3)


# ---- RoSTE's down rotation on MoE layers (quant/roste.py: one Hadamard per layer for all its experts) ----

ROSTE_ARM = {"codec": CODEC, "act": {"codec": "q8_0"}}
ROSTE_WINDOWS = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(3))


def _roste_moe(fp, rotation: str):
    """RoSTE.run on a copy of `fp` quantized by ROSTE_ARM (RTN), `fp` the teacher."""
    from quantatlas.quant.quantize import quantize_model
    from quantatlas.quant.recipe import build_recipe
    from quantatlas.quant.roste import RoSTE
    from quantatlas.spec import Arm

    arm = Arm.model_validate({**ROSTE_ARM, "recovery": {"method": "roste", "lr": 3e-4, "rotation": rotation,
                                                         **DATA, "steps": 2}})
    model = copy.deepcopy(fp)
    packed = quantize_model(model, build_recipe(arm), None, 0)
    rec = RoSTE(arm.recovery, 0, arm.act, arm.kv)
    new, info, report = rec.run(model, fp, packed, ROSTE_WINDOWS)
    return arm, model, new, info, report, rec


@pytest.mark.parametrize("form", ["fused", "list"])
def test_roste_hadamard_rotates_every_experts_down_and_preserves_the_fp_function(form):
    from quantatlas.quant.online import rotates_expert_down
    from quantatlas.quant.roste import rotate_model

    fp = qwen3_moe(hidden=64) if form == "fused" else list_form(qwen3_moe(hidden=64))
    _, model, _, info, report, rec = _roste_moe(fp, "hadamard")
    assert info["recovery_rotated_down"] == 1.0
    for li in ("0", "1"):
        got = report["layers"][li]["down"]
        assert got["rotation"] == "hadamard" and got["identity"] > 0 and got["hadamard"] > 0
    for layer in model.model.layers:     # the trained model reads rotated down inputs online
        ex = layer.mlp.experts
        if form == "fused":
            assert rotates_expert_down(ex)
        else:
            assert all(hasattr(e.down_proj, "input_rotation") for e in ex)
    # the same rotations on the fp model: its weights change, its logits do not
    rotated = copy.deepcopy(fp)
    rotate_model(rotated, rec.chosen, seed=0)
    a_w = BoundMoE(layout(fp).moe_blocks[1]).weight(2, "expert_down")
    b_w = BoundMoE(layout(rotated).moe_blocks[1]).weight(2, "expert_down")
    assert not torch.allclose(a_w, b_w, atol=1e-3)
    with torch.no_grad():
        a, b = fp(ROSTE_WINDOWS, use_cache=False).logits, rotated(ROSTE_WINDOWS, use_cache=False).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4 * float(a.abs().max()))


def test_roste_adaptive_moe_down_error_is_eq12_summed_over_routed_experts():
    """E_down(I), E_down(H) recomputed here: the MoE block's input hooked, routed by hand (softmax, top 2,
    renormalised), each expert's hidden silu(gate x) ⊙ up x from the fused tensors, a dense Hadamard, the
    codecs' fake_quantize (weights: uniform 3-bit g16; act: q8_0 per row of 32)."""
    from quantatlas.quant.config import build
    from test_roste_qad import _dense_hadamard

    fp = qwen3_moe(hidden=64)
    arm, _, _, _, report, _ = _roste_moe(fp, "adaptive")
    wq, aq = build("codec", arm.codec.to_spec()), build("codec", "q8_0")

    def err(codec, m):
        return float(((codec.fake_quantize(m) - m) ** 2).sum())

    inputs = {}
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda m, a, li=li: inputs.setdefault(li, []).append(a[0].reshape(-1, a[0].shape[-1]).float()))
        for li, layer in enumerate(fp.model.layers)]
    with torch.no_grad():
        for i in range(ROSTE_WINDOWS.shape[0]):
            fp(ROSTE_WINDOWS[i:i + 1], use_cache=False)
    for h in hooks:
        h.remove()
    n = ROSTE_WINDOWS.shape[0]
    for li, layer in enumerate(fp.model.layers):
        mlp = layer.mlp
        gate_up, down = mlp.experts.gate_up_proj.detach().float(), mlp.experts.down_proj.detach().float()
        inter = down.shape[2]
        R = {"identity": torch.eye(inter), "hadamard": _dense_hadamard(0, "down", li, inter)}
        want = {}
        for rot, r in R.items():
            total = 0.0
            for e in range(4):
                total += err(wq, down[e] @ r.T)
                for x in inputs[li]:
                    probs = torch.softmax(x @ mlp.gate.weight.detach().float().T, -1)
                    w, idx = torch.topk(probs, 2, -1)
                    rows = (idx == e).any(-1)
                    if rows.any():
                        xe = x[rows]
                        h = torch.nn.functional.silu(xe @ gate_up[e, :inter].T) * (xe @ gate_up[e, inter:].T)
                        total += err(aq, h @ r.T) / n
            want[rot] = total
        got = report["layers"][str(li)]["down"]
        assert got["identity"] is not None and got["hadamard"] is not None
        assert got["identity"] == pytest.approx(want["identity"], rel=1e-4)
        assert got["hadamard"] == pytest.approx(want["hadamard"], rel=1e-4)
        assert got["rotation"] == ("hadamard" if want["hadamard"] < want["identity"] else "identity")


def test_roste_adaptive_fused_and_list_forms_choose_alike_and_tune_alike():
    fp = qwen3_moe(hidden=64)
    _, fused_model, fused, _, fused_report, _ = _roste_moe(fp, "adaptive")
    _, list_model, listed, _, list_report, _ = _roste_moe(list_form(fp), "adaptive")
    for li in ("0", "1"):
        a, b = fused_report["layers"][li]["down"], list_report["layers"][li]["down"]
        assert a["rotation"] == b["rotation"]
        assert a["identity"] == pytest.approx(b["identity"], rel=1e-5)
        assert a["hadamard"] == pytest.approx(b["hadamard"], rel=1e-5)
    tuned = _experts(fused)
    assert set(tuned) == set(_experts(listed)) and len(tuned) == 24
    for n, p in tuned.items():
        torch.testing.assert_close(p.decode(), listed[n].decode(), rtol=0, atol=1e-3)
    with torch.no_grad():
        a, b = fused_model(ROSTE_WINDOWS, use_cache=False).logits, list_model(ROSTE_WINDOWS, use_cache=False).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-3 * float(a.abs().max()))


def test_roste_down_rotation_reaches_a_shared_expert_and_preserves_the_fp_function():
    """Qwen2-MoE: the shared expert's down (48 wide, its own Hadamard of the layer's down seed) is rotated
    online with the routed experts' (32 wide); the logits stay."""
    from quantatlas.quant.online import rotates_expert_down
    from quantatlas.quant.roste import rotate_model
    from test_moe import qwen2_moe

    fp = qwen2_moe()
    rotated = copy.deepcopy(fp)
    rotate_model(rotated, {0: {"vo": False, "down": True}, 1: {"vo": False, "down": False}}, seed=0)
    a_mlp, b_mlp = fp.model.layers[0].mlp, rotated.model.layers[0].mlp
    assert rotates_expert_down(b_mlp.experts) and hasattr(b_mlp.shared_expert.down_proj, "input_rotation")
    assert not torch.allclose(a_mlp.shared_expert.down_proj.weight, b_mlp.shared_expert.down_proj.weight, atol=1e-3)
    assert not rotates_expert_down(rotated.model.layers[1].mlp.experts)
    with torch.no_grad():
        a, b = fp(ROSTE_WINDOWS, use_cache=False).logits, rotated(ROSTE_WINDOWS, use_cache=False).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4 * float(a.abs().max()))
