"""The public pipeline (quant/pipeline.py), the run context (context.py) and the layer pass's
collection of Hessians (quant/quantize.py): each checked against a direct computation."""
from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import torch

from quantatlas.context import RunContext
from quantatlas.quant.pipeline import Calibration, quantize
from quantatlas.quant.quantize import quantize_model
from quantatlas.quant.recipe import build_recipe
from quantatlas.spec import Arm

STREAM = np.random.default_rng(0).integers(0, 256, 20000)


def _calibration(samples=4, seq_len=32):
    return Calibration(load=lambda: STREAM, samples=samples, seq_len=seq_len)


# ---- the run context --------------------------------------------------------------------------------
def test_historical_seeds_are_kept():
    """Each tag that existed before the context derives its seed exactly as the code did then."""
    ctx = RunContext(7)
    assert np.array_equal(ctx.rng("calibration").integers(0, 10**9, 5), np.random.default_rng(7).integers(0, 10**9, 5))
    assert np.array_equal(ctx.rng("recovery.windows").permutation(50),
                          np.random.default_rng([7, 0x5EC0]).permutation(50))
    assert np.array_equal(ctx.rng("recovery.batches").permutation(50),
                          np.random.default_rng([7, 0x0DE5]).permutation(50))
    want = int(np.random.SeedSequence([7, 3, 0x1C0]).generate_state(1, np.uint64)[0]) % 2 ** 62
    assert ctx.sub_seed("tensor", 3) == want
    digest = hashlib.sha256("7/act/q/2".encode()).digest()
    assert ctx.sub_seed("named", "act", "q", 2) == int.from_bytes(digest[:8], "little") >> 1
    assert ctx.sub_seed("offset", 2 ** 63 - 1) == (2 ** 63 - 1 + 7) % 2 ** 63


def test_new_tags_differ_by_tag_and_seed_and_repeat():
    a, b = RunContext(1), RunContext(2)
    assert a.sub_seed("x") == RunContext(1).sub_seed("x") != a.sub_seed("y")
    assert a.sub_seed("x") != b.sub_seed("x")
    g1, g2 = a.torch_generator("x"), a.torch_generator("x")
    assert torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))


# ---- the pipeline -----------------------------------------------------------------------------------
def test_quantize_leaves_the_loaded_model_alone_and_reports_its_steps(tiny_reference):
    before = {k: v.clone() for k, v in tiny_reference.model.state_dict().items()}
    arm = Arm.model_validate({"codec": {"uniform": {"bits": 4, "group": 32}}, "kv": {"k": "q8_0", "v": "q8_0"}})
    qm = quantize(tiny_reference, arm, _calibration(), RunContext(0))
    after = tiny_reference.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert qm.streamed is None and qm.forward is qm.model and qm.sizes is None
    assert len(qm.packed) == 2 * 7                  # 7 matrices per decoder layer, 2 layers
    bits = qm.runtime_bits(256)
    assert bits["kv_bits_k"] == bits["kv_bits_v"] == pytest.approx(8.5)
    w = qm.model.get_submodule("model.layers.0.mlp.down_proj").weight
    assert not torch.equal(w, tiny_reference.model.get_submodule("model.layers.0.mlp.down_proj").weight)


def test_the_same_seed_is_the_same_computation_whatever_the_global_random_state(tiny_reference):
    arm = Arm.model_validate({"solver": "gptq", "codec": {"uniform": {"bits": 3, "group": 32}},
                              "transforms": [{"hadamard": {}}]})
    torch.manual_seed(123)
    a = quantize(tiny_reference, arm, _calibration(), RunContext(1))
    torch.manual_seed(456)
    np.random.seed(9)
    b = quantize(tiny_reference, arm, _calibration(), RunContext(1))
    c = quantize(tiny_reference, arm, _calibration(), RunContext(2))
    key = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(a.packed[key].data["codes"], b.packed[key].data["codes"])
    assert not torch.equal(a.packed[key].data["codes"], c.packed[key].data["codes"])


# ---- collecting Hessians ----------------------------------------------------------------------------
def _inputs_of(model, names, tokens):
    seen = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).double())) for n in names]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_shared_inputs_give_each_module_its_own_exact_hessian(tiny_reference, monkeypatch):
    """q/k/v (and gate/up) read one tensor: one accumulation, a copy each, equal to 2/N X^T X."""
    from quantatlas.quant import quantize as qz

    got, handed = {}, []
    real = qz._solve

    def spy(plan, W, stats):
        if stats is not None and "hessian" in stats and plan.layer == 0:
            got[plan.name] = stats["hessian"].clone()   # the solver overwrites what it is handed
            handed.append(stats["hessian"])
        return real(plan, W, stats)

    monkeypatch.setattr(qz, "_solve", spy)
    model = copy.deepcopy(tiny_reference.model)
    tokens = _calibration().tokens(RunContext(0))
    names = [f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "mlp.gate_proj", "mlp.up_proj")]
    x = _inputs_of(tiny_reference.model, names[:3], tokens)  # before any quantization: layer 0's q/k/v input
    quantize_model(model, build_recipe(Arm(solver="gptq", codec={"uniform": {"bits": 4, "group": 32}})), tokens, 0)
    want = 2 * x[names[0]].T @ x[names[0]] / x[names[0]].shape[0]
    for n in names[:3]:
        torch.testing.assert_close(got[n].double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[names[3]], got[names[4]])
    assert len({id(h) for h in handed}) == len(handed) == 7   # each solver got a matrix of its own


@pytest.mark.parametrize("propagation, passes", [("sequential", 5), ("layer", 2)])
def test_layer_propagation_takes_two_passes_per_layer(tiny_reference, propagation, passes):
    model = copy.deepcopy(tiny_reference.model)
    layer = model.get_submodule("model.layers.1")
    calls = []
    layer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    tokens = _calibration(samples=4).tokens(RunContext(0))   # one batch of 4 windows
    arm = Arm(solver="gptq", propagation=propagation, codec={"uniform": {"bits": 4, "group": 32}})
    quantize_model(model, build_recipe(arm), tokens, 0)
    assert len(calls) == passes


def test_layer_propagation_collects_a_layer_before_changing_it(tiny_reference):
    """In layer 0 the quantized stream is the fp model's input, so `layer` and `parallel` agree there
    (both collect every Hessian once, before the layer changes); later layers differ."""
    tokens = _calibration().tokens(RunContext(0))
    out = {}
    for prop in ("layer", "parallel", "sequential"):
        out[prop] = quantize_model(copy.deepcopy(tiny_reference.model),
                                   build_recipe(Arm(solver="gptq", propagation=prop,
                                                    codec={"uniform": {"bits": 3, "group": 32}})), tokens, 0)
    o0, o1 = "model.layers.0.self_attn.o_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(out["layer"][o0].data["codes"], out["parallel"][o0].data["codes"])
    assert not torch.equal(out["layer"][o0].data["codes"], out["sequential"][o0].data["codes"])
    assert not torch.equal(out["layer"][o1].data["codes"], out["parallel"][o1].data["codes"])
