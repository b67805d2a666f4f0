"""Activation quantization (quant/act.py): every scheme's fake quantization of a Linear's input
against a direct per-token computation written here, FP8 E4M3 against torch's float8_e4m3fn, the
llama.cpp activation types (Q8_0 against the gguf package, Q8_K / Q8_1 against direct
transcriptions of ggml's reference quantizers), and the config's errors."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

TOKENS = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))


def _capture(linear):
    seen = {}
    linear.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach().clone()))
    linear.register_forward_hook(lambda m, a, o: seen.setdefault("y", o.detach().clone()))
    return seen


def _run_with(model, act_cfg, module_path="model.layers.0.mlp.down_proj", recipe=None):
    from quantatlas.quant.act import ActConfig, ActivationQuantizer

    model = copy.deepcopy(model)
    lin = model.get_submodule(module_path)
    seen = _capture(lin)       # registered first: sees the input before the quantizer
    act = ActivationQuantizer(ActConfig.model_validate(act_cfg), seed=3)
    act.attach(model, recipe)
    with torch.no_grad():
        model(TOKENS)
    x = seen["x"].reshape(-1, lin.in_features)
    return lin, x, seen["y"].reshape(-1, lin.out_features), act


def _int_direct(x, bits, symmetric=True, clip=1.0):
    out = torch.empty_like(x)
    for t in range(x.shape[0]):
        row = x[t].double()
        if symmetric:
            hi = 2 ** (bits - 1) - 1
            s = float(np.float16(clip * float(row.abs().max()) / hi)) or 1.0
            out[t] = (torch.clamp(torch.round(row / s), -hi - 1, hi) * s).float()
        else:
            mx, mn = max(float(row.max()), 0.0) * clip, min(float(row.min()), 0.0) * clip
            s = float(np.float16((mx - mn) / (2 ** bits - 1))) or 1.0
            z = min(max(round(-mn / s), 0), 2 ** bits - 1)
            out[t] = ((torch.clamp(torch.round(row / s) + z, 0, 2 ** bits - 1) - z) * s).float()
    return out


@pytest.mark.parametrize("cfg, direct", [
    ("W8A8", lambda x: _int_direct(x, 8)),
    ({"scheme": "W4A4"}, lambda x: _int_direct(x, 4)),
    ({"scheme": "W4A4", "clip_ratio": 0.9}, lambda x: _int_direct(x, 4, clip=0.9)),
    ({"codec": {"uniform": {"bits": 4, "group": None, "symmetric": False}}}, lambda x: _int_direct(x, 4, False)),
    ({"codec": {"uniform": {"bits": 6, "group": None, "symmetric": False}}, "clip_ratio": 0.8},
     lambda x: _int_direct(x, 6, False, 0.8)),
])
def test_int_schemes_equal_a_direct_per_token_computation(tiny_reference, cfg, direct):
    lin, x, y, _ = _run_with(tiny_reference.model, cfg)
    want = direct(x) @ lin.weight.detach().T
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y, x @ lin.weight.detach().T, atol=1e-6)


def test_fp8_rounding_equals_torchs_float8_e4m3fn():
    from quantatlas.quant.codecs.fp8 import e4m3_bits, e4m3_values, round_e4m3

    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = every[~torch.isnan(every)]
    assert torch.equal(e4m3_values(e4m3_bits(finite)), finite)          # every E4M3 value, bits both ways
    assert torch.equal(e4m3_bits(finite), finite.to(torch.float8_e4m3fn).view(torch.uint8))
    gen = torch.Generator().manual_seed(0)
    y = torch.cat([torch.randn(20000, generator=gen) * 10 ** torch.empty(20000).uniform_(-4, 2.6, generator=gen),
                   (finite[:-1] + finite[1:]) / 2])                    # midpoints: ties to even
    y = y.clamp(-448, 448)
    torch.testing.assert_close(round_e4m3(y), y.to(torch.float8_e4m3fn).float(), atol=0, rtol=0)


def test_fp8_dynamic_per_token_equals_torch_round_trip(tiny_reference):
    lin, x, y, act = _run_with(tiny_reference.model, "FP8_DYNAMIC")
    s = x.abs().amax(-1, keepdim=True) / 448
    xq = (x / s).to(torch.float8_e4m3fn).float() * s
    torch.testing.assert_close(y, xq @ lin.weight.detach().T, atol=1e-5, rtol=1e-5)
    assert act.bits()["act_bits"] == pytest.approx(
        sum(w * (8 + 32 / w) for w in [64, 64, 64, 128, 64, 64, 128] * 2) / (576 * 2))


def test_fp8_codec_packs_what_it_quantizes():
    from quantatlas.quant.config import build

    codec = build("codec", {"fp8": {"group": 32}})
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(codec.decode(codec.encode(w)), codec.fake_quantize(w))
    assert codec.bits_per_weight((4, 64)) == 8 + 32 / 32


def test_act_hadamard_rotates_before_the_quantizer_and_back(tiny_reference):
    from quantatlas.quant.hadamard import RandomizedHadamard
    from quantatlas.context import RunContext

    lin, x, y, _ = _run_with(tiny_reference.model, {"scheme": "W4A4", "hadamard": ["down"]})
    q = RandomizedHadamard(lin.in_features, RunContext(3).sub_seed("named", "act", "down", 0))
    want = q.unrotate(_int_direct(q.rotate(x), 4)) @ lin.weight.detach().T
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    # the rotation spreads outliers: per-token int4 error is smaller with it
    plain = _int_direct(x, 4)
    assert ((want - x @ lin.weight.detach().T) ** 2).mean() < ((plain - x) @ lin.weight.detach().T).pow(2).mean()


def test_act_hadamard_refuses_a_linear_already_rotated_online(tiny_reference):
    from quantatlas.quant.act import ActConfig, ActivationQuantizer
    from quantatlas.quant.config import build

    model = copy.deepcopy(tiny_reference.model)
    build("transform", {"hadamard": {"online": ["down"]}}).apply(model, None)
    with pytest.raises(ValueError, match="act.hadamard: .*down_proj already rotates"):
        ActivationQuantizer(ActConfig(scheme="W4A4", hadamard=["down"])).attach(model)


# ---- llama.cpp's activation types -------------------------------------------------------------

def _q8_k_direct(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q8_K_ref transcribed: (d per block, codes)."""
    x = x.astype(np.float32).reshape(-1, 256)
    ds, qs = [], []
    for b in x:
        amax, mx = np.float32(0), np.float32(0)
        for v in b:
            if abs(v) > amax:
                amax, mx = abs(v), v
        if amax == 0:
            ds.append(np.float32(0)), qs.append(np.zeros(256, np.int32))
            continue
        iscale = np.float32(-127.0) / mx
        prod = (iscale * b).astype(np.float32)
        q = np.minimum(np.rint(prod).astype(np.int32), 127)          # nearest_int: half to even
        ds.append(np.float32(1) / iscale), qs.append(q)
    return np.array(ds, np.float32), np.stack(qs)


def _legacy_q8_direct(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q8_0_ref / q8_1_ref transcribed: fp16 d, codes (roundf), fp16 s = d·Σq."""
    x = x.astype(np.float32).reshape(-1, 32)
    d = np.abs(x).max(1) / np.float32(127)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, 1, d)).astype(np.float32)
    v = (x * inv[:, None]).astype(np.float32)
    q = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int32)   # exact for |v| <= 127.5
    s = (q.sum(1).astype(np.float32) * d).astype(np.float16)
    return d.astype(np.float16), q, s


def _activations(n=6, width=512, seed=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=gen) * torch.exp(torch.randn(width, generator=gen))
    x[0, :256] = 0                      # an all-zero block
    x[1, 7] = -50.0                     # a negative max: d > 0 for Q8_K (d = -max/127)
    return x


def test_q8_k_equals_ggmls_reference_quantizer():
    from quantatlas.quant.act import fake_quantize_rows
    from quantatlas.quant.config import build

    codec = build("codec", "q8_k")
    x = _activations()
    d, q = _q8_k_direct(x.numpy())
    want = (q * d[:, None]).reshape(x.shape)
    got = fake_quantize_rows(x, codec, 256)
    assert np.array_equal(got.numpy(), want.astype(np.float32))
    assert d[2] > 0 and (d < 0).any() and d[0] == 0       # d = -max/127: its sign is the max's, negated
    blocks = codec.encode(x).data["blocks"].reshape(-1, 292).numpy()
    assert np.array_equal(blocks[:, :4].copy().view(np.float32)[:, 0], d)
    assert np.array_equal(blocks[:, 4:260].copy().view(np.int8), q)
    assert np.array_equal(blocks[:, 260:].copy().view(np.int16), q.reshape(-1, 16, 16).sum(-1))
    assert codec.bits_per_weight((2, 512)) == 292 * 8 / 256


def test_q8_0_activations_equal_gguf_and_q8_1_its_direct_transcription():
    import gguf.quants

    from quantatlas.quant.act import fake_quantize_rows
    from quantatlas.quant.config import build

    x = _activations(width=256)
    want = gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                  gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(fake_quantize_rows(x, build("codec", "q8_0"), 32).numpy(), want)
    q81 = build("codec", "q8_1")
    assert np.array_equal(fake_quantize_rows(x, q81, 32).numpy(), want)     # Q8_1's values are Q8_0's
    d, q, s = _legacy_q8_direct(x.numpy())
    blocks = q81.encode(x).data["blocks"].reshape(-1, 36).numpy()
    assert np.array_equal(blocks[:, :2].copy().view(np.float16)[:, 0], d)
    assert np.array_equal(blocks[:, 2:4].copy().view(np.float16)[:, 0], s)
    assert np.array_equal(blocks[:, 4:].copy().view(np.int8), q)
    assert q81.bits_per_weight((2, 64)) == 9.0


def test_llamacpp_cpu_picks_the_activation_type_of_each_weight_type(tiny_reference):
    from quantatlas.quant.act import ActConfig, ActivationQuantizer, VEC_DOT_TYPE
    from quantatlas.quant.quantize import quantize_model
    from quantatlas.quant.recipe import build_recipe
    from quantatlas.spec import Arm

    arm = Arm.model_validate({"codec": "q4_0", "overrides": [{"match": "down", "codec": "q5_1"},
                                                             {"match": "layers\\.1\\.self_attn\\.o", "codec": None}],
                              "act": "llamacpp_cpu"})
    recipe = build_recipe(arm)
    model = copy.deepcopy(tiny_reference.model)
    quantize_model(model, recipe, None, 0)
    down, o1, q0, head = (model.get_submodule(p) for p in ("model.layers.0.mlp.down_proj",
                                                            "model.layers.1.self_attn.o_proj",
                                                            "model.layers.0.self_attn.q_proj", "lm_head"))
    seen = {k: _capture(m) for k, m in {"down": down, "o1": o1, "q0": q0, "head": head}.items()}
    act = ActivationQuantizer(arm.act)
    act.attach(model, recipe)
    with torch.no_grad():
        model(TOKENS)
    for key, lin, fmt in (("down", down, "q8_1"), ("q0", q0, "q8_0")):
        x = seen[key]["x"].reshape(-1, lin.in_features).numpy()
        d, q, _ = _legacy_q8_direct(x)
        xq = torch.from_numpy((q * d.astype(np.float32)[:, None]).reshape(x.shape).astype(np.float32))
        torch.testing.assert_close(seen[key]["y"].reshape(-1, lin.out_features), xq @ lin.weight.detach().T,
                                   atol=1e-5, rtol=1e-5, msg=fmt)
    for key, lin in (("o1", o1), ("head", head)):   # f16 weights (the head included): fp16-rounded inputs
        x = seen[key]["x"].reshape(-1, lin.in_features)
        torch.testing.assert_close(seen[key]["y"].reshape(-1, lin.out_features),
                                   x.half().float() @ lin.weight.detach().T, atol=1e-5, rtol=1e-5)
    names = sorted({getattr(c, "name", "") for _, c in act.widths})
    assert names == ["f16", "q8_0", "q8_1"]
    assert VEC_DOT_TYPE["q4_k"] == VEC_DOT_TYPE["q6_k"] == VEC_DOT_TYPE["iq4_xs"] == "q8_k"
    assert ActivationQuantizer._llamacpp_codec("q4_k").name == "q8_k"


def test_llamacpp_cpu_refuses_non_ggml_weights(tiny_reference):
    from quantatlas.quant.act import ActivationQuantizer
    from quantatlas.quant.recipe import build_recipe
    from quantatlas.spec import Arm

    arm = Arm.model_validate({"codec": {"uniform": {"bits": 4}}, "act": "llamacpp_cpu"})
    recipe = build_recipe(arm)
    with pytest.raises(ValueError, match="llamacpp_cpu needs llama.cpp weight types.*'uniform'"):
        ActivationQuantizer(arm.act).attach(copy.deepcopy(tiny_reference.model), recipe)


# ---- the config ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ({"scheme": "W8A8", "codec": "q8_0"}, "exactly one of scheme"),
    ({}, "exactly one of scheme"),
    ("W4A4KV4", "W4A4KV4 is weights \\+ activations \\+ KV cache"),
    ({"scheme": "W9A9"}, "scheme"),
    ({"scheme": "W4A4", "clip_ratio": 0}, "clip_ratio"),
    ({"scheme": "llamacpp_cpu", "clip_ratio": 0.9}, "llamacpp_cpu reproduces"),
    ({"scheme": "W4A4", "hadamard": ["q"]}, "hadamard"),
    ({"scheme": "W8A8", "roles": ["head"]}, "roles"),
    ({"scheme": "W8A8", "roles": []}, "roles"),
    ({"scheme": "W8A8", "layers": [-1]}, "layers"),
])
def test_bad_act_configs_name_the_field(value, message):
    from quantatlas.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match=message):
        parse_spec({"title": "t", "arms": {"a": {"act": value}}})


def test_presets_and_defaults():
    from quantatlas.quant.act import ActConfig

    assert ActConfig.model_validate("W8A8").codec_config().to_spec() == \
        {"uniform": {"bits": 8, "group": None, "symmetric": True, "clip": "minmax", "scale": "absmax"}}
    assert ActConfig.model_validate("W4A8").codec_config() == ActConfig.model_validate("W8A8").codec_config()
    assert ActConfig.model_validate("llamacpp_cpu").head and not ActConfig.model_validate("W8A8").head
    assert ActConfig.model_validate({"scheme": "W4A4", "hadamard": ["o"]}).seeded
    assert not ActConfig.model_validate("W4A4").seeded


def test_a_w8a8_spec_and_a_llamacpp_cpu_spec_run(tiny_reference):
    from quantatlas.runner import run_spec
    from quantatlas.spec import parse_spec

    spec = parse_spec({"title": "act", "data": {"eval": {"tokens": 1024, "ctx": 128}}, "control": "q8",
                       "arms": {"q8": {"codec": "q8_0"},
                                "q8_cpu": {"codec": "q8_0", "act": "llamacpp_cpu"},
                                "w8a8": {"codec": {"uniform": {"bits": 8, "group": None}}, "act": "W8A8"}}})
    doc = run_spec(spec, ledger=False, loaded=tiny_reference, compress=False, log=lambda m: None)
    r = {name: arm["seeds"]["0"] for name, arm in doc["arms"].items()}
    assert r["q8_cpu"]["kld_mean"] > r["q8"]["kld_mean"] > 0
    # q/k/v/o/gate/up/down take Q8_0 (8.5 bits), the head (fp16 weights) fp16 inputs
    widths = [64, 64, 64, 128, 64, 64, 128] * 2
    want = (sum(widths) * 8.5 + 64 * 16) / (sum(widths) + 64)
    assert r["q8_cpu"]["act_bits"] == pytest.approx(want)
    assert r["w8a8"]["act_bits"] > 8


def test_roles_and_layers_restrict_which_linear_inputs_are_quantized(tiny_reference):
    """act.roles / act.layers hook exactly the Linears named (both: the intersection); a role or
    layer the model lacks is refused; the bits average over the hooked Linears only."""
    from quantatlas.quant.act import ActConfig, ActivationQuantizer

    model = tiny_reference.model
    with torch.no_grad():
        plain = model(TOKENS).logits
    for cfg, want in [({"roles": ["down"], "layers": [1]}, {"model.layers.1.mlp.down_proj"}),
                      ({"roles": ["q", "k", "v"]}, {f"model.layers.{i}.self_attn.{r}_proj" for i in (0, 1)
                                                    for r in "qkv"}),
                      ({"layers": [0]}, {n for n, m in model.named_modules()
                                         if n.startswith("model.layers.0.") and isinstance(m, torch.nn.Linear)})]:
        m = copy.deepcopy(model)
        act = ActivationQuantizer(ActConfig.model_validate({"scheme": "W4A4", **cfg}))
        act.attach(m)
        hooked = {n for n, mod in m.named_modules() if mod._forward_pre_hooks}
        assert hooked == want
        with torch.no_grad():
            got = m(TOKENS).logits
        assert (got - plain).abs().max() > 1e-4          # the hooked inputs are quantized
        assert len(act.widths) == len(want)
    # layer 0 alone: q/k/v/gate/up read 64 values per token, o/down 128 (one fp16 scale per row)
    assert act.bits()["act_bits"] == pytest.approx((5 * 64 * (4 + 16 / 64) + 2 * 128 * (4 + 16 / 128)) / (5 * 64 + 256))
    # the down input alone through a direct per-token int4 equals the restricted step
    lin, x, y, _ = _run_with(model, {"scheme": "W4A4", "roles": ["down"], "layers": [0]})
    torch.testing.assert_close(y, _int_direct(x, 4) @ lin.weight.detach().T, atol=1e-5, rtol=1e-5)
    lin, x, y, _ = _run_with(model, {"scheme": "W4A4", "roles": ["down"], "layers": [1]})
    torch.testing.assert_close(y, x @ lin.weight.detach().T, atol=1e-6, rtol=0)   # layer 0 untouched
    for cfg, message in [({"roles": ["qkv"]}, "act.roles: \\['qkv'\\] not in"),
                         ({"layers": [7]}, "act.layers: \\[7\\] not in")]:
        with pytest.raises(ValueError, match=message):
            ActivationQuantizer(ActConfig.model_validate({"scheme": "W8A8", **cfg})).attach(copy.deepcopy(model))
