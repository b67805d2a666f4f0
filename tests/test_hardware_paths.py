"""The hardware codecs (mx, nvfp4, fp8 granularities, ggml mxfp4) inside every path of an arm: RTN, GPTQ/LDLQ
(per-column rounding with the group's fitted scale, fast and generic paths alike), GPTAQ, incoherence, the
block-diagonal Hadamard transform with the microscaling block, the KV cache, activations (static and dynamic
scales) and allocation candidates; on the tiny Qwen3 of conftest."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from quantatlas.context import RunContext
from quantatlas.quant.codecs import make_codec
from quantatlas.quant.codecs.base import Codec
from quantatlas.quant.codecs.mx import MX
from quantatlas.quant.codecs.nvfp4 import NVFP4
from quantatlas.spec import Arm

TOKENS = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))


def _calibration():
    from quantatlas.quant.pipeline import Calibration

    stream = np.random.default_rng(0).integers(0, 256, 4096)
    return Calibration(lambda: stream, 2, 32)


def _run(tiny, arm: dict):
    from quantatlas.quant.pipeline import quantize

    return quantize(tiny, Arm.model_validate(arm), _calibration(), RunContext(0))


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits.float()


def _layer(seed=0, rows=64, cols=128):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    mix = torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols ** 0.5              # correlated inputs
    x = (torch.randn(1024, cols, generator=g) @ mix) * torch.exp(torch.randn(cols, generator=g))   # uneven columns
    return w, 2 * x.T @ x / x.shape[0]


def _proxy(w_hat, w, H):
    d = (w_hat - w).double()
    return float(((d @ H.double()) * d).sum())


CODECS = {"mxfp4": {"mx": {}}, "mxfp6_rceil": {"mx": {"element": "fp6_e3m2", "scale_rounding": "rceil"}},
          "nvfp4": {"nvfp4": {}}, "nvfp4_4o6": {"nvfp4": {"scale_selection": "four_over_six"}},
          "fp8_e5m2": {"fp8": {"format": "e5m2"}}, "ggml_mxfp4": {"mxfp4": {}}}


@pytest.mark.parametrize("name", list(CODECS))
def test_gptq_rounds_per_column_with_the_groups_scale_and_beats_rtn(name):
    from quantatlas.quant.solvers.gptq import gptq

    codec = make_codec(*next(iter(CODECS[name].items())))
    w, H = _layer()
    for static in (False, True):
        w_hat, packed, _ = gptq(w, H, codec, act_order=static, static_groups=static)
        assert torch.equal(codec.decode(packed), w_hat)
        assert _proxy(w_hat, w, H) < 0.9 * _proxy(codec.fake_quantize(w), w, H)


@pytest.mark.parametrize("cls,options", [(MX, {"element": "fp4_e2m1"}), (NVFP4, {"scale_selection": "four_over_six"})])
def test_the_fast_column_path_equals_the_generic_one(cls, options):
    from quantatlas.quant.config import parse_config
    from quantatlas.quant.solvers.gptq import gptq

    generic = type("Generic" + cls.__name__, (cls,), {"column_quantizer": Codec.column_quantizer})
    cfg = parse_config("codec", {cls.name: options})
    w, H = _layer(1)
    fast = gptq(w, H, cls(cfg))
    slow = gptq(w, H, generic(cfg))
    assert torch.equal(fast[0], slow[0]) and all(torch.equal(fast[1].data[k], slow[1].data[k]) for k in fast[1].data)


@pytest.mark.parametrize("arm", [{"codec": {"nvfp4": {}}, "solver": "gptaq"},
                                 {"codec": {"mx": {}}, "solver": "gptq", "solver_options": {"incoherence": True}},
                                 {"codec": {"nvfp4": {"tensor_scale": "fused"}}, "solver_options": {"incoherence": True}}])
def test_gptaq_and_incoherence_run_with_the_hardware_codecs(tiny_reference, arm):
    qm = _run(tiny_reference, arm)
    params = dict(qm.model.named_parameters())
    for n, p in qm.packed.items():
        assert torch.allclose(p.decode(), params[n].detach().float(), atol=1e-6), n
    assert not torch.equal(_logits(qm.model), _logits(tiny_reference.model))


@pytest.mark.parametrize("block", [16, 32])
def test_block_hadamard_with_the_microscaling_block(tiny_reference, block):
    """The hadamard transform's `block` is the block-diagonal rotation FP4 GPTQ work uses (MR-GPTQ): every
    Linear's input rotated within blocks of the microscaling block (residual stream folded, o/down online,
    no head rotation), so each block of input columns keeps its norm; the function is unchanged."""
    from quantatlas.quant.config import parse_config

    rotation = {"hadamard": {"block": block, "heads": False, "online": ["o", "down"]}}
    model = copy.deepcopy(tiny_reference.model)
    parse_config("transform", rotation).build().apply(model, None, RunContext(0))
    torch.testing.assert_close(_logits(model), _logits(tiny_reference.model), atol=2e-4, rtol=1e-4)
    for name, gain in (("model.layers.0.self_attn.k_proj", "model.layers.0.input_layernorm"),
                       ("model.layers.1.mlp.down_proj", None)):
        before = tiny_reference.model.get_submodule(name).weight.detach().double()
        if gain is not None:
            before = before * tiny_reference.model.get_submodule(gain).weight.detach().double()
        after = model.get_submodule(name).weight.detach().double()
        # the rows may be rotated too (down writes the residual stream); each block of columns keeps its norm
        norms = [x.reshape(x.shape[0], -1, block).square().sum((0, 2)) for x in (before, after)]
        torch.testing.assert_close(norms[0], norms[1])
        assert not torch.allclose(before, after)
    codec = {"nvfp4": {}} if block == 16 else {"mx": {}}
    qm = _run(tiny_reference, {"codec": codec, "transforms": [rotation]})
    assert (_logits(qm.model) - _logits(tiny_reference.model)).abs().max() > 0


@pytest.mark.parametrize("kv", [{"k": "fp8", "v": "fp8"}, {"k": {"nvfp4": {"tensor_scale": "per_row"}}, "v": {"mx": {}}},
                                {"k": {"fp8": {"granularity": "tensor", "format": "e5m2"}}, "v": {"nvfp4": {}}}])
def test_kv_cache_codecs(tiny_reference, kv):
    qm = _run(tiny_reference, {"codec": None, "kv": kv})
    bits = qm.runtime_bits(128)
    assert not torch.equal(_logits(qm.model), _logits(tiny_reference.model))
    want = {"fp8": 8 + 32 / 32, "per_row": 4.5 + 32 / 32, "mx": 4.25}    # head_dim 32
    assert bits["kv_bits_k"] == pytest.approx(want["fp8"] if kv["k"] == "fp8" else
                                              want["per_row"] if "nvfp4" in kv["k"] else 8.0, abs=1e-3)


def test_w4a4_activations_quantize_each_token_block_dynamically(tiny_reference):
    from quantatlas.quant.act import ActConfig, ActivationQuantizer

    for codec in ({"mx": {}}, {"nvfp4": {"tensor_scale": "per_row"}}):
        model = copy.deepcopy(tiny_reference.model)
        lin = model.get_submodule("model.layers.0.mlp.down_proj")
        seen = {}
        lin.register_forward_pre_hook(lambda m, a: seen.update(raw=a[0].detach().reshape(-1, m.in_features)))
        lin.register_forward_hook(lambda m, a, y: seen.update(used=a[0].detach().reshape(-1, m.in_features)))
        ActivationQuantizer(ActConfig.model_validate({"codec": codec}), 0).attach(model)   # hooks after ours
        _logits(model)
        direct = make_codec(*next(iter(codec.items())))   # what the Linear multiplied: each token on its own
        assert torch.equal(seen["used"], torch.cat([direct.fake_quantize(row[None]) for row in seen["raw"]]))
        assert not torch.equal(seen["used"], seen["raw"])


def test_static_activation_scale_is_the_calibration_amax(tiny_reference):
    from quantatlas.quant.act import ActConfig, ActivationQuantizer

    model = copy.deepcopy(tiny_reference.model)
    lin = model.get_submodule("model.layers.1.self_attn.o_proj")
    amax = {"v": 0.0}
    h = lin.register_forward_pre_hook(lambda m, a: amax.update(v=max(amax["v"], float(a[0].abs().max()))))
    act = ActivationQuantizer(ActConfig.model_validate({"codec": {"nvfp4": {}}, "static": True}), 0)
    act.attach(model)
    act.calibrate(model, TOKENS, batch=1)
    h.remove()
    bound = [float(s["codec"].tensor_amax) for s in act.slots]      # one per hooked Linear, in model order
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    assert bound[names.index("model.layers.1.self_attn.o_proj")] == amax["v"] and len(set(bound)) > 1
    with pytest.raises(Exception, match="static"):
        ActConfig.model_validate({"codec": {"nvfp4": {"tensor_scale": "per_row"}}, "static": True})
    with pytest.raises(Exception, match="static"):
        ActConfig.model_validate({"codec": {"mx": {}}, "static": True})


WIDTHS = [64] * 5 + [128] * 2                  # q k v gate up read the hidden 64; o and down read 128


@pytest.mark.parametrize("act,bits", [({"codec": {"nvfp4": {}}, "static": True}, 4.5),
                                      ("FP8_DYNAMIC", sum(w * (8 + 32 / w) for w in WIDTHS) / sum(WIDTHS)),
                                      ({"codec": {"mx": {}}}, 4.25)])
def test_w4a4_arm_with_static_nvfp4_and_fp8_per_token(tiny_reference, act, bits):
    qm = _run(tiny_reference, {"codec": {"nvfp4": {}}, "act": act})
    assert qm.runtime_bits(128)["act_bits"] == pytest.approx(bits, abs=1e-3)


def test_allocation_candidates_price_hardware_codecs_by_their_stored_bits(tiny_reference):
    from quantatlas.quant.config import parse_config
    from quantatlas.quant.sensitivity import measure_sensitivity

    arm = Arm.model_validate({"codec": {"mx": {}}})
    cands = [parse_config("codec", {"nvfp4": {}}), parse_config("codec", {"fp8": {}})]
    s = measure_sensitivity(tiny_reference, arm, cands, TOKENS, only=[r"^down\.1$"])
    (group,) = s.groups
    w = dict(tiny_reference.model.named_parameters())[group.tensors[0]].detach().float()
    for cfg, label in zip(cands, s.candidates):
        assert group.bits[label] == 8 * cfg.build().encode(w).nbytes
    assert group.bits[s.candidates[0]] == w.numel() * 4.5 + 32 and group.bits[s.candidates[1]] == w.numel() * 8 + 32 * w.shape[0]
