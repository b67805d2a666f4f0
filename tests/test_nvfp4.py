"""NVFP4 (the `nvfp4` codec) bit for bit against torchao 0.18's reference quantizer, its stored bytes decoded by
ml_dtypes, Four Over Six against a per-block transcription, and the fused tensor scale of q/k/v and gate/up
through the weights step."""
from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import pytest
import torch

from quantatlas.quant.codecs import make_codec


def _torchao():
    import logging
    import warnings

    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    logging.disable(logging.NOTSET)
    return NVFP4Tensor, per_tensor_amax_to_scale


def _weights(seed=0, rows=32):
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, 256, generator=g) * 0.02
    heavy = torch.from_numpy(np.random.default_rng(seed).standard_t(2, (rows, 256)).astype(np.float32)) * 0.05
    heavy[0, :16] = 0.0            # an all-zero block
    heavy[1, 3] = 9.0              # the tensor's amax: blocks far below it use small E4M3 scales
    return torch.cat([normal, heavy])


def test_nvfp4_equals_torchao_nvfp4_quantize_and_dequantize():
    NVFP4Tensor, per_tensor_amax_to_scale = _torchao()
    codec = make_codec("nvfp4")
    for w in (_weights(0), _weights(1) * 1e3, torch.randn(16, 64)):
        packed = codec.encode(w)
        t = per_tensor_amax_to_scale(w.abs().amax())
        ref = NVFP4Tensor.to_nvfp4(w.contiguous(), 16, t)
        assert torch.equal(packed.data["tensor_scale"], t.reshape(1))
        assert torch.equal(packed.data["scales"], ref.scale.view(torch.uint8))
        assert torch.equal(packed.data["codes"], ref.qdata.view(torch.uint8).reshape(-1))
        assert torch.equal(codec.decode(packed), ref.dequantize(torch.float32))
        assert torch.equal(codec.fake_quantize(w), codec.decode(packed))


def test_stored_bytes_decode_with_ml_dtypes():
    codec = make_codec("nvfp4")
    w = _weights(2)
    packed = codec.encode(w)
    nib = packed.data["codes"].numpy()
    codes = np.stack([nib & 0xF, nib >> 4], 1).reshape(w.shape)
    p = codes.astype(np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    s = packed.data["scales"].numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    t = np.float32(packed.data["tensor_scale"].numpy()[0])
    want = p * np.repeat(t * s, 16, axis=1)                 # element · (t · s), fp32
    assert np.array_equal(codec.decode(packed).numpy().view(np.uint32), want.view(np.uint32))
    assert t == np.float32(np.float32(np.abs(w.numpy()).max()) / np.float32(2688.0))


def test_bits_per_weight_count_the_block_and_tensor_scales():
    w = torch.randn(48, 128)
    assert make_codec("nvfp4").encode(w).bits_per_weight == 4.5 + 32 / (48 * 128)
    assert make_codec("nvfp4", {"tensor_scale": "per_row"}).encode(w).bits_per_weight == 4.5 + 32 / 128
    assert make_codec("nvfp4").bits_per_weight((48, 128)) == 4.5 + 32 / (48 * 128)


def test_four_over_six_equals_a_per_block_transcription():
    """Each block scaled to 6 and to 4 (tensor scale amax / (6 · 256)), the one with the smaller squared error
    kept (6 on a tie); ml_dtypes does every cast, one block at a time."""
    codec = make_codec("nvfp4", {"scale_selection": "four_over_six"})
    w = _weights(3, rows=8)
    got = codec.decode(codec.encode(w)).numpy()
    x = w.numpy()
    f32 = np.float32
    t = f32(f32(np.abs(x).max()) / f32(1536.0))
    want = np.empty_like(x)
    picks = 0
    for r in range(x.shape[0]):
        for c in range(0, x.shape[1], 16):
            v = x[r, c:c + 16]
            m = f32(np.abs(v).max())
            best = None
            for target in (6.0, 4.0):
                s = f32(np.clip(f32(f32(m / f32(target)) / t), 2.0 ** -6, 448.0)).astype(ml_dtypes.float8_e4m3fn)
                s = f32(s)
                q = np.clip(v * f32(f32(f32(1.0) / t) / s), -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(f32)
                val = q * f32(t * s)
                err = f32(((val - v) ** 2).sum(dtype=f32))
                if best is None or err < best[0]:
                    best = (err, val, target)
            want[r, c:c + 16] = best[1]
            picks += best[2] == 4.0
    assert np.array_equal(got, want)
    assert 0 < picks < x.size // 16                       # both choices occur
    plain = make_codec("nvfp4")
    assert ((codec.fake_quantize(w) - w) ** 2).sum() < ((plain.fake_quantize(w) - w) ** 2).sum()


def test_solver_path_agrees_with_encode_and_needs_the_tensor_scale():
    codec = make_codec("nvfp4", {"scale_selection": "four_over_six"})
    w = _weights(4, rows=10)
    with pytest.raises(ValueError, match="whole matrix"):
        codec.fit(w[:, :16])
    bound = codec.for_matrix(w)
    params = [bound.fit(w[:, c:c + 16]) for c in range(0, 256, 16)]
    parts = [bound.quantize(w[:, c:c + 16], p) for c, p in zip(range(0, 256, 16), params)]
    packed = bound.pack(torch.cat([q.codes for q in parts], 1), params)
    ref = codec.encode(w)
    assert all(torch.equal(packed.data[k], ref.data[k]) for k in ref.data)
    rnd = bound.column_quantizer(params[3])
    values, codes = torch.empty(20), torch.empty(20)
    moved = (w[:, 50] * 3).contiguous()
    rnd(moved, 2, values, codes)
    want = bound.quantize(moved[:, None], params[3], 2)
    assert torch.equal(values, want.values[:, 0]) and torch.equal(codes, want.codes[:, 0].float())


def test_per_row_tensor_scale_is_each_rows_own():
    codec = make_codec("nvfp4", {"tensor_scale": "per_row"})
    w = _weights(5, rows=6)
    got = codec.fake_quantize(w)
    for r in range(w.shape[0]):
        assert torch.equal(got[r], make_codec("nvfp4").fake_quantize(w[r:r + 1])[0])


def _plans(model, codec_cfg, solver="rtn"):
    from quantatlas.quant.quantize import quantize_model
    from quantatlas.quant.recipe import build_recipe
    from quantatlas.spec import Arm

    arm = Arm.model_validate({"codec": codec_cfg, "solver": solver})
    return quantize_model(model, build_recipe(arm), None, 0)


@pytest.mark.parametrize("fused", [True, False])
def test_fused_tensor_scale_is_shared_by_qkv_and_by_gate_up(tiny_reference, fused):
    model = copy.deepcopy(tiny_reference.model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    packed = _plans(model, {"nvfp4": {"tensor_scale": "fused" if fused else "per_tensor"}})
    layer = "model.layers.1."
    ts = {n.removeprefix(layer).split(".")[1]: float(p.data["tensor_scale"][0]) for n, p in packed.items()
          if n.startswith(layer)}
    for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        amaxes = [float(weights[f"{layer}{'self_attn' if m[0] in 'qkv' else 'mlp'}.{m}.weight"].abs().max())
                  for m in group]
        scales = [ts[m] for m in group]
        if fused:
            assert len(set(scales)) == 1 and scales[0] == float(np.float32(max(amaxes)) / np.float32(2688.0))
        else:
            assert len(set(scales)) == len(group)
    assert ts["o_proj"] != ts["q_proj"] and ts["down_proj"] != ts["up_proj"]   # not fused with anything


def test_fused_scale_holds_under_gptq(tiny_reference):
    from quantatlas.quant.pipeline import Calibration, quantize
    from quantatlas.context import RunContext
    from quantatlas.spec import Arm

    stream = np.random.default_rng(0).integers(0, 256, 4096)
    arm = Arm.model_validate({"codec": {"nvfp4": {"tensor_scale": "fused"}}, "solver": "gptq"})
    qm = quantize(tiny_reference, arm, Calibration(lambda: stream, 4, 64), RunContext(0))
    ts = {n: float(p.data["tensor_scale"][0]) for n, p in qm.packed.items()}
    att = "model.layers.0.self_attn."
    assert ts[att + "q_proj.weight"] == ts[att + "k_proj.weight"] == ts[att + "v_proj.weight"]
    for n, p in qm.packed.items():   # what the model holds is what the packs decode to
        assert torch.equal(p.decode(), qm.model.get_parameter(n).detach().float())


def test_layer_streamed_run_shares_the_same_fused_scales(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from quantatlas.models.load import load_model
    from quantatlas.models.stream import StreamedModel, load_packed
    from quantatlas.quant.quantize import quantize_model
    from quantatlas.quant.recipe import build_recipe
    from quantatlas.quant.streamed import quantize_streamed
    from quantatlas.spec import Arm

    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 tie_word_embeddings=False)).save_pretrained(tmp_path / "m", max_shard_size="40KB")
    arm = Arm(codec={"nvfp4": {"tensor_scale": "fused"}})
    model = copy.deepcopy(load_model(str(tmp_path / "m"), stream=False).model)
    packed = quantize_model(model, build_recipe(arm), None, 0)
    quantize_streamed(StreamedModel(tmp_path / "m"), build_recipe(arm), None, 0, tmp_path / "out")
    got = load_packed(tmp_path / "out")
    assert set(got) == set(packed)
    for name, p in packed.items():
        assert all(torch.equal(got[name].data[k], t) for k, t in p.data.items()), name
    att = "model.layers.1.self_attn."
    assert torch.equal(got[att + "q_proj.weight"].data["tensor_scale"], got[att + "v_proj.weight"].data["tensor_scale"])
