"""Activation quantization of mixture-of-experts models (issue 27 part 3, quant/act.py): experts fused
in 3-D tensors (transformers 5) quantize each expert's inputs on its routed rows as hooks on the
expert's own Linears do. The reference is the ModuleList form of the same model (tests/test_moe.py's
`list_form`), whose expert Linears the step hooks one by one: same logits, same calibrated amaxes, same
bits. With an identity codec the fused forward of ours reproduces the model's own logits."""
from __future__ import annotations

import copy

import pytest
import torch
from test_moe import calib_tokens, list_form, mixtral, qwen2_moe, qwen3_moe

from quantatlas.quant.act import ActConfig, ActivationQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")
X = calib_tokens(2, 20, seed=5)


class Identity:
    """A codec that changes nothing (what the step's plumbing does, without quantization)."""
    name = "identity"

    def fake_quantize(self, g):
        return g

    def group_of(self, width):
        return width


def _canon(name):
    """An expert Linear's name with Mixtral's w1/w3/w2 spelled gate_proj/up_proj/down_proj, as fused ones are."""
    head, _, last = name.rpartition(".")
    return f"{head}.{ {'w1': 'gate_proj', 'w3': 'up_proj', 'w2': 'down_proj'}.get(last, last)}"


def _logits(model, cfg, seed=0, calib=None, codec=None):
    """(logits with the act step attached, the quantizer, logits after detach)."""
    act = ActivationQuantizer(ActConfig.model_validate(cfg), seed=seed)
    if codec is not None:
        act.codec = codec
    act.attach(model)
    if calib is not None:
        act.calibrate(model, calib)
    with torch.no_grad():
        got = model(X).logits
    act.detach()
    with torch.no_grad():
        after = model(X).logits
    return got, act, after


@pytest.mark.parametrize("build", [qwen3_moe, mixtral, qwen2_moe], ids=["qwen3_moe", "mixtral", "qwen2_moe"])
def test_identity_codec_leaves_the_logits_and_detach_restores_the_forward(build):
    model = build()
    with torch.no_grad():
        want = model(X).logits
    experts = [layer.mlp.experts for layer in model.model.layers]
    got, act, after = _logits(model, "W8A8", codec=Identity())
    assert sum(".experts." in s["name"] for s in act.slots) == 2 * 4 * 3
    assert sum(".shared_expert." in s["name"] for s in act.slots) == (2 * 3 if build is qwen2_moe else 0)
    assert not any(s["name"].endswith(("mlp.gate", "shared_expert_gate")) for s in act.slots)   # routers
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)          # our fused forward = the model's
    assert all("forward" not in e.__dict__ for e in experts)            # the class's own forward is back
    assert torch.equal(after, want)
    q, _, _ = _logits(model, "W8A8")                                    # a real codec changes them
    assert not torch.allclose(q, want, atol=1e-4)


CASES = {
    "w8a8": "W8A8",
    "w4a4_clip": {"scheme": "W4A4", "clip_ratio": 0.9},
    "asym_int6": {"codec": {"uniform": {"bits": 6, "group": 16, "symmetric": False}}},
    "hadamard_down": {"scheme": "W4A4", "hadamard": ["o", "down"]},
    "fp8": "FP8_DYNAMIC",
    "nvfp4_dynamic_tensor": {"codec": {"nvfp4": {}}},            # its tensor scale spans each expert's rows
    "roles_layers": {"scheme": "W4A4", "roles": ["expert_down", "expert_up", "q"], "layers": [1]},
    "router_too": {"scheme": "W4A4", "roles": ["router", "expert_gate"]},
}


@pytest.mark.parametrize("build", [qwen3_moe, mixtral], ids=["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_experts_equal_their_list_form_with_hooked_linears(build, case):
    fused = build()
    names = ("w1", "w3", "w2") if build is mixtral else ("gate_proj", "up_proj", "down_proj")
    listed = list_form(fused, names)
    cfg = CASES[case]
    got, act_f, _ = _logits(fused, cfg, seed=4)
    want, act_l, _ = _logits(listed, cfg, seed=4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(got, fused(X).logits, atol=1e-4)      # something was quantized
    # one slot per expert Linear, the same inputs: the ModuleList names its w1/w3/w2, fused ones gate/up/down
    assert sorted(s["name"] for s in act_f.slots) == sorted(_canon(s["name"]) for s in act_l.slots)
    assert act_f.bits() == act_l.bits()


def test_roles_layers_router_and_bits_count_each_expert_input():
    model = qwen3_moe(hidden=32, inter=48)
    act = ActivationQuantizer(ActConfig.model_validate({"scheme": "W4A4", "roles": ["expert_down"],
                                                        "layers": [1]}))
    act.attach(model)
    assert [s["name"] for s in act.slots] == [f"model.layers.1.mlp.experts.{e}.down_proj" for e in range(4)]
    assert act.widths == [(48, act.codec)] * 4
    act.detach()
    every = ActivationQuantizer(ActConfig.model_validate("W4A4"))
    every.attach(model)
    names = [s["name"] for s in every.slots]
    assert not any(n.endswith("mlp.gate") for n in names)                # routers: only when named
    assert sum(w for w, _ in every.widths) == 2 * (4 * 32 + 4 * (32 + 32 + 48))   # q k v o + each expert's three
    # int4 symmetric per token: 4 bits a value plus one fp16 scale a row
    attn, experts = 4 * 32, 4 * (32 + 32 + 48)
    want = (attn * (4 + 16 / 32) + 4 * 2 * 32 * (4 + 16 / 32) + 4 * 48 * (4 + 16 / 48)) / (attn + experts)
    assert every.bits()["act_bits"] == pytest.approx(want)
    every.detach()
    named = ActivationQuantizer(ActConfig.model_validate({"scheme": "W4A4", "roles": ["router"]}))
    named.attach(model)
    assert [s["name"] for s in named.slots] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    named.detach()
    with pytest.raises(ValueError, match=r"act\.roles: \['gate'\] not in Qwen3MoeForCausalLM"):
        ActivationQuantizer(ActConfig.model_validate({"scheme": "W4A4", "roles": ["gate"]})).attach(model)


@pytest.mark.parametrize("build", [qwen3_moe, mixtral], ids=["qwen3_moe", "mixtral"])
def test_static_scales_are_one_amax_per_expert_input(build):
    cfg = {"codec": {"nvfp4": {}}, "static": True}
    fused = build()
    listed = list_form(fused) if build is qwen3_moe else list_form(fused, ("w1", "w3", "w2"))
    calib = calib_tokens(3, 16, seed=9)
    got, act_f, _ = _logits(fused, cfg, calib=calib)
    want, act_l, _ = _logits(listed, cfg, calib=calib)
    amax_f = {s["name"]: float(s["codec"].tensor_amax) for s in act_f.slots}
    amax_l = {_canon(s["name"]): float(s["codec"].tensor_amax) for s in act_l.slots}
    assert amax_f.keys() == amax_l.keys()
    for n, a in amax_f.items():
        assert a == pytest.approx(amax_l[n], rel=1e-6), n
    # by hand: expert 1 of layer 0 reads the rows its router picks; its gate and up amax is theirs
    block = fused.model.layers[0].mlp
    seen = []
    h = block.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        fused(calib)
    h.remove()
    x = torch.cat(seen)
    _, _, experts = block.gate(x)
    rows = x[(experts == 1).any(-1)]
    assert amax_f["model.layers.0.mlp.experts.1.gate_proj"] == pytest.approx(float(rows.abs().max()), rel=1e-6)
    assert amax_f["model.layers.0.mlp.experts.1.up_proj"] == amax_f["model.layers.0.mlp.experts.1.gate_proj"]
    assert len({round(a, 6) for n, a in amax_f.items() if "experts" in n and "gate" in n}) > 1   # per expert
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_act_step_runs_on_fused_moe_in_the_pipeline():
    from test_moe import _pipeline

    model = qwen3_moe(hidden=64)
    fp = copy.deepcopy(model)
    qm = _pipeline(model, {"codec": {"uniform": {"bits": 8, "group": None}}, "act": "W8A8"})
    with torch.no_grad():
        q, ref = qm.model(X).logits, fp(X).logits
    assert torch.isfinite(q).all() and not torch.equal(q, ref)
    # int8 per token: 8 bits a value and an fp16 scale a row, averaged over inputs weighted by width
    widths = [64] * 4 + [64, 64, 32] * 4                                 # q k v o, each expert's gate up down
    assert qm.runtime_bits(64)["act_bits"] == pytest.approx(8 + 16 * len(widths) / sum(widths))


def test_an_act_group_that_does_not_divide_a_width_is_refused_before_any_compute():
    """q8_0's 32-value groups do not divide the 48-wide shared expert's down input of this Qwen2-MoE: refused while
    the arm is checked, naming the field, before calibration or any weight is quantized (RoSTE included)."""
    from test_moe import _pipeline, qwen2_moe

    from quantatlas.errors import UserError

    for extra in ({}, {"recovery": {"method": "roste", "samples": 4, "seq_len": 24, "batch": 2, "steps": 2}}):
        model = qwen2_moe()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(UserError, match=r"^arm\.act: q8_0: 48 columns are not a multiple of group size 32") as e:
            _pipeline(model, {"codec": {"uniform": {"bits": 4, "group": 16}}, "act": {"codec": "q8_0"}, **extra})
        assert e.value.field == "arm.act" and "\n" not in str(e.value)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # nothing was done
