"""SmoothQuant (transforms/smoothquant.py): function-preserving before quantization, scales by the
paper's formula, and with α = 1 every smoothed input channel's max |x| becomes 1."""
from __future__ import annotations

import copy

import pytest
import torch

CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(7))
TOKENS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(8))


def _smooth(model, **opts):
    from quantatlas.quant.config import build

    m = copy.deepcopy(model)
    build("transform", {"smoothquant": opts}).apply(m, CALIB)
    return m


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


def _spread_gains(model):
    """Random norm gains, so the test does not rest on γ = 1."""
    m = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.mul_(torch.exp(torch.randn(p.shape, generator=gen)))
    return m


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85])
def test_smoothquant_keeps_the_function(tiny_reference, alpha):
    model = _spread_gains(tiny_reference.model)
    smoothed = _smooth(model, alpha=alpha, roles=["qkv", "gate_up", "o", "down"])
    torch.testing.assert_close(_logits(smoothed), _logits(model), atol=2e-4, rtol=1e-4)
    layer = smoothed.model.layers[0]
    assert not torch.allclose(layer.input_layernorm.weight, model.model.layers[0].input_layernorm.weight)


def test_scales_follow_the_formula(tiny_reference):
    from quantatlas.quant.transforms.smoothquant import input_absmax

    model = _spread_gains(tiny_reference.model)
    layer = model.model.layers[1]
    x_max = input_absmax(model, {"qkv": layer.self_attn.q_proj, "gate_up": layer.mlp.gate_proj}, CALIB)
    w_qkv = torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                       layer.self_attn.v_proj.weight]).abs().amax(0)
    s = x_max["qkv"].double() ** 0.6 / w_qkv.double() ** 0.4
    w_gu = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]).abs().amax(0)
    s2 = x_max["gate_up"].double() ** 0.6 / w_gu.double() ** 0.4
    smoothed = _smooth(model, alpha=0.6).model.layers[1]
    torch.testing.assert_close(smoothed.input_layernorm.weight.double(),
                               layer.input_layernorm.weight.double() / s, rtol=1e-5, atol=0)
    torch.testing.assert_close(smoothed.post_attention_layernorm.weight.double(),
                               layer.post_attention_layernorm.weight.double() / s2, rtol=1e-5, atol=0)
    torch.testing.assert_close(smoothed.self_attn.k_proj.weight.double(),
                               layer.self_attn.k_proj.weight.double() * s, rtol=1e-5, atol=1e-7)


def test_alpha_one_flattens_every_input_channel_to_max_one(tiny_reference):
    from quantatlas.quant.transforms.smoothquant import input_absmax

    model = _spread_gains(tiny_reference.model)
    smoothed = _smooth(model, alpha=1.0)
    mods = {(i, r): getattr(getattr(layer, blk), proj) for i, layer in enumerate(smoothed.model.layers)
            for r, blk, proj in (("qkv", "self_attn", "q_proj"), ("gate_up", "mlp", "up_proj"))}
    for key, m in input_absmax(smoothed, mods, CALIB).items():
        torch.testing.assert_close(m, torch.ones_like(m), rtol=1e-4, atol=0, msg=str(key))
    before = input_absmax(model, {"q": model.model.layers[0].self_attn.q_proj}, CALIB)["q"]
    assert before.max() / before.min() > 3     # there was something to flatten


def test_smoothquant_lowers_w8a8_error_on_outlier_channels(tiny_reference):
    """With a few channels made 30x larger, per-token int8 activations lose those channels' neighbours
    to the big scale; smoothing (α = 0.5) moves the outliers into the weights and lowers the error."""
    from quantatlas.quant.act import ActConfig, ActivationQuantizer

    model = copy.deepcopy(tiny_reference.model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] *= 30
    ref = _logits(model)

    def err(m):
        m = copy.deepcopy(m)
        ActivationQuantizer(ActConfig(scheme="W4A8")).attach(m)
        return ((_logits(m) - ref) ** 2).mean()

    assert err(_smooth(model, alpha=0.5)) < 0.7 * err(model)


def test_smoothquant_refuses_an_online_rotated_consumer_and_bad_alpha(tiny_reference):
    from quantatlas.quant.config import ConfigError, build, parse_config

    m = copy.deepcopy(tiny_reference.model)
    build("transform", {"hadamard": {"online": ["down"]}}).apply(m, None)
    with pytest.raises(ValueError, match="apply smoothquant before hadamard"):
        build("transform", {"smoothquant": {"roles": ["down"]}}).apply(m, CALIB)
    with pytest.raises(ConfigError, match="smoothquant.alpha"):
        parse_config("transform", {"smoothquant": {"alpha": 1.5}})
