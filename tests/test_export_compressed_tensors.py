"""`quantatlas export --format compressed-tensors`: the folder loads in transformers (the
compressed-tensors package decompresses it, our oracle) into exactly our quantized weights and
our logits; its stored tensors are what compressed-tensors' own compressors write for those
values; arms with no scheme are refused in one line before any compute."""
import json
import warnings

import pytest
import torch
from typer.testing import CliRunner

from quantatlas.cli import app
from quantatlas.export.compressed_tensors import pack_int32, write_compressed_tensors
from quantatlas.measure import quantize_arm
from quantatlas.models import load_model
from quantatlas.spec import parse_spec

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.usefixtures("one_thread")
LOGIT_TOL = 1e-3


def _save_llama(tmp_path_factory, name: str, hidden: int, layers: int):
    """A seeded random Llama (4 heads, 2 KV heads, intermediate 2 × hidden) saved under a fresh folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=258, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=256, eos_token_id=257, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp(name) / "llama"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return _save_llama(tmp_path_factory, "tiny", hidden=64, layers=2)


def _spec(model, arms: dict):
    return parse_spec({"title": "t", "model": str(model), "data": {"calib": {"samples": 2, "seq_len": 32}},
                       "arms": arms}, "spec")


def _load(folder, dequantize: bool):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = CompressedTensorsConfig(run_compressed=False) if dequantize else None
        kw = {"quantization_config": cfg} if cfg is not None else {}
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()


@torch.no_grad()
def _compare(folder, ours, dequantize=True, x=None):
    """(names of parameters that differ from ours, max |logit difference|) of the loaded folder."""
    theirs = _load(folder, dequantize)
    x = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1)) if x is None else x
    their_logits = theirs(x).logits.float()      # (the default path decompresses on this first forward)
    mine = dict(ours.named_parameters())
    got = dict(theirs.named_parameters())
    differ = [n for n, p in mine.items() if n not in got or not torch.equal(got[n].float(), p.float())]
    return differ, (their_logits - ours(x).logits.float()).abs().max().item()


def test_pack_int32_is_compressed_tensors_packing():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(0)
    for bits, cols in ((4, 96), (3, 70), (8, 40), (2, 33)):
        codes = torch.randint(0, 1 << bits, (5, cols), generator=g)
        signed = (codes - (1 << (bits - 1))).to(torch.int8)
        ours = pack_int32(codes, bits)
        assert torch.equal(ours, pack_to_int32(signed, bits)), (bits, cols)
        assert torch.equal(unpack_from_int32(ours, bits, torch.Size([5, cols])), signed)
        # packed down the rows (zero points)
        assert torch.equal(pack_int32(codes.t(), bits).t(), pack_to_int32(signed, bits, packed_dim=0))


TINY_ARMS = {
    "w4g32": {"codec": {"uniform": {"bits": 4, "group": 32}}},
    "w4asym": {"codec": {"uniform": {"bits": 4, "group": 32, "symmetric": False}}},
    "w3g32": {"codec": {"uniform": {"bits": 3, "group": 32, "scale": "half_step"}}},
    "w8ch": {"codec": {"uniform": {"bits": 8, "group": None}}},
    "gptq_ao": {"solver": "gptq", "codec": {"uniform": {"bits": 4, "group": 32}}},
    "fp8w": {"codec": {"fp8": {"group": None}}},
    "fp8g": {"codec": {"fp8": {"group": 32}}},
}


def test_tiny_llama_weights_and_logits(tiny_llama, tmp_path):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from safetensors.torch import load_file

    s = _spec(tiny_llama, TINY_ARMS)
    lm = load_model(s.model, device="cpu")
    for arm in TINY_ARMS:
        qm = quantize_arm(lm, s, arm, 0)
        out = tmp_path / arm
        info = write_compressed_tensors(out, qm.model, qm.packed, s.arms[arm])
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        QuantizationConfig.model_validate(qc)      # the package reads it as written
        assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
        assert qc["ignore"] == ["lm_head"] and qc["config_groups"]["group_0"]["targets"] == ["Linear"]
        weights = qc["config_groups"]["group_0"]["weights"]
        assert weights.get("actorder") == ("weight" if arm == "gptq_ao" else None)
        differ, diff = _compare(out, qm.model)
        assert differ == [], (arm, differ[:3])
        assert diff <= LOGIT_TOL, (arm, diff)
        # the stored tensors are what compressed-tensors' own compressor writes for our values
        scheme = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
        stored = load_file(out / "model.safetensors")
        module = "model.layers.1.mlp.down_proj"
        mine = {k.removeprefix(module + "."): v for k, v in stored.items() if k.startswith(module + ".")}
        state = {"weight": dict(qm.model.named_parameters())[f"{module}.weight"].detach().float(),
                 "weight_scale": mine["weight_scale"].float()}
        if "weight_zero_point" in mine:   # compressed-tensors' signed zero points, unpacked
            state["weight_zero_point"] = (qm.packed[f"{module}.weight"].data["zero"].float().round() - 8).to(torch.int8)
        theirs = BaseCompressor.get_value_from_registry(info["format"]).compress(state, scheme)
        for k, v in theirs.items():
            assert torch.equal(mine[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else mine[k],
                               v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v), (arm, k)


def test_reference_model_roundtrip(tmp_path):
    """The reference model: GPTQ int4 g128 (act order) W4A16 and FP8 per channel with FP8 per-token
    activations (FP8_DYNAMIC): weights equal, logits within 1e-3 (the activations applied by
    compressed-tensors' own quantizer on load without dequantize)."""
    s = parse_spec({"title": "t", "model": "reference", "data": {"calib": {"samples": 2, "seq_len": 64}},
                    "arms": {"gptq4": {"solver": "gptq", "codec": {"uniform": {"bits": 4, "group": 128}}},
                             "fp8dyn": {"codec": {"fp8": {"group": None}}, "act": "FP8_DYNAMIC"}}}, "spec")
    lm = load_model("reference", device="cpu")
    figures = {}
    for arm, dequantize in (("gptq4", True), ("fp8dyn", False)):
        qm = quantize_arm(lm, s, arm, 0)
        write_compressed_tensors(tmp_path / arm, qm.model, qm.packed, s.arms[arm])
        differ, diff = _compare(tmp_path / arm, qm.model, dequantize)
        figures[arm] = diff
        assert differ == [] and diff <= LOGIT_TOL, (arm, differ[:3], diff)
    qc = json.loads((tmp_path / "fp8dyn" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "float-quantized"
    assert qc["config_groups"]["group_0"]["input_activations"]["strategy"] == "token"


def test_w8a8_int_activations(tiny_llama, tmp_path):
    """W8A8: int8 weights per channel (int-quantized) with int8 per-token dynamic activations. The
    weights decompress exactly; the activation rule is the runtime's, so the logits are compared with
    the activations off on both sides (the weight-only twin arm has the same weights)."""
    s = _spec(tiny_llama, {"w8a8": {"codec": {"uniform": {"bits": 8, "group": None}}, "act": "W8A8"},
                           "w8": {"codec": {"uniform": {"bits": 8, "group": None}}}})
    lm = load_model(s.model, device="cpu")
    qm = quantize_arm(lm, s, "w8a8", 0)
    info = write_compressed_tensors(tmp_path / "w8a8", qm.model, qm.packed, s.arms["w8a8"])
    assert info["format"] == "int-quantized"
    g = info["config_groups"]["group_0"]
    assert g["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                                      "strategy": "token", "dynamic": True}
    differ, diff = _compare(tmp_path / "w8a8", quantize_arm(lm, s, "w8", 0).model)
    assert differ == [] and diff <= LOGIT_TOL


def test_kv_cache_scheme_is_compressed_tensors_fake_quant():
    """kv: fp8 per token (and per group of head_dim): our cache codec on K [batch, heads, tokens,
    head_dim] equals compressed-tensors' dynamic fake quantization with the exported kv_cache_scheme."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    from quantatlas.export.schemes import kv_args_for, kv_cache_args
    from quantatlas.quant.kv import KVCacheConfig

    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 24, 64, generator=g) * torch.linspace(0.1, 4, 64)
    for group in (None, 32):
        codec = {"fp8": {"group": group}}
        kv = KVCacheConfig.model_validate({"k": codec, "v": codec})
        args = QuantizationArgs.model_validate(kv_args_for(kv_cache_args(kv), 64))
        scale, zp = compute_dynamic_scales_and_zp(k, args, module=None)
        theirs = fake_quantize(k, scale, zp, args)
        c = kv.k.build()
        mine = c.fake_quantize(k.reshape(-1, group or 64)).reshape(k.shape)
        assert torch.equal(mine, theirs), group


def test_shards_and_tokenizer(tiny_llama, tmp_path):
    """Past max_shard_bytes the safetensors are sharded with an index, and load the same; the model's
    tokenizer is written beside them."""
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2},
                                                                              unk_token="<unk>")),
                                  unk_token="<unk>")
    s = _spec(tiny_llama, {"w4": {"codec": {"uniform": {"bits": 4, "group": 32}}}})
    qm = quantize_arm(load_model(s.model, device="cpu"), s, "w4", 0)
    info = write_compressed_tensors(tmp_path / "w4", qm.model, qm.packed, s.arms["w4"], tokenizer=tok,
                                    max_shard_bytes=20_000)
    assert len(info["files"]) > 1 and (tmp_path / "w4" / "model.safetensors.index.json").exists()
    differ, diff = _compare(tmp_path / "w4", qm.model)
    assert differ == [] and diff <= LOGIT_TOL
    assert AutoTokenizer.from_pretrained(tmp_path / "w4").get_vocab() == tok.get_vocab()


def _cli(spec, arm, out, *extra):
    return CliRunner().invoke(app, ["export", str(spec), "--arm", arm, "--format", "compressed-tensors",
                                    "--out", str(out), *extra])


def test_cli_export_and_refusals(tiny_llama, tmp_path, monkeypatch):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"title: t\nmodel: {tiny_llama}\narms:\n"
                    "  int4: {codec: {uniform: {bits: 4, group: 32}}}\n"
                    "  tr: {codec: {trellis: {bits: 2}}}\n"
                    "  q4k: {codec: q4_k}\n"
                    "  rot: {codec: {uniform: {bits: 4, group: 32}}, transforms: [hadamard]}\n"
                    "  spin: {codec: {uniform: {bits: 4, group: 32}}, transforms: [{spinquant: {steps: 0}}]}\n"
                    "  cpu: {codec: q8_0, act: llamacpp_cpu}\n"
                    "  e5: {codec: {uniform: {bits: 4, group: 32}}, act: {codec: {uniform: {bits: 8, group: null}}, "
                    "clip_ratio: 0.9}}\n")
    r = _cli(spec, "int4", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "pack-quantized" in r.output and (tmp_path / "out" / "config.json").exists()
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["weights"]["group_size"] == 32

    import quantatlas.models as models

    def no_compute(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(models, "load_model", no_compute)
    for arm, words in (("tr", ("codec trellis", "QTIP")), ("q4k", ("codec q4_k", "GGUF")),
                       ("rot", ("hadamard.online", "online: []")), ("spin", ("spinquant.online", "online: []")),
                       ("cpu", ("q8_0", "GGUF")),
                       ("e5", ("clip_ratio",))):
        bad = _cli(spec, arm, tmp_path / arm)
        assert bad.exit_code == 2, (arm, bad.output)
        line = bad.stderr.strip()
        assert "\n" not in line and "Traceback" not in bad.output, (arm, bad.output)
        assert all(w in line for w in words), (arm, line)
        assert not (tmp_path / arm).exists()


# ---- FP8 tensor / block, static activations, NVFP4, MXFP4, MXFP8 ------------------------------------

@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """Widths that hold whole 128 × 128 FP8 blocks."""
    return _save_llama(tmp_path_factory, "wide", hidden=128, layers=1)


def test_fp8_tensor_block_and_static_activations(wide_llama, tmp_path):
    """FP8 per tensor with static (calibrated) and dynamic per-tensor activations, and 128 × 128 blocks
    with per-group-of-128 activations: compressed-tensors' own forward (activations included) gives our
    logits."""
    tensor = {"fp8": {"granularity": "tensor"}}
    arms = {"static": {"codec": tensor, "act": {"codec": tensor, "static": True}},
            "dynamic": {"codec": tensor, "act": {"codec": tensor}},
            "block": {"codec": {"fp8": {"granularity": "block"}}, "act": {"codec": {"fp8": {"group": 128}}}}}
    s = _spec(wide_llama, arms)
    lm = load_model(s.model, device="cpu")
    amax = {}
    for arm in arms:
        qm = quantize_arm(lm, s, arm, 0)
        amax[arm] = qm.records.get("act_static_amax")
        info = write_compressed_tensors(tmp_path / arm, qm.model, qm.packed, s.arms[arm], input_amax=amax[arm])
        g = info["config_groups"]["group_0"]
        assert info["format"] == "float-quantized"
        differ, diff = _compare(tmp_path / arm, qm.model, dequantize=False)
        assert differ == [] and diff <= LOGIT_TOL, (arm, differ[:3], diff)
    assert g["weights"]["block_structure"] == [128, 128] and g["input_activations"]["group_size"] == 128
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "static" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    assert amax["dynamic"] is None and stored[f"{name}.input_scale"].item() == pytest.approx(amax["static"][name] / 448,
                                                                                            rel=1e-7)


def _bf16_weights(model, packed):
    """A copy of `model` with its quantized weights rounded to bfloat16 (compressed-tensors decompresses
    FP4 through bfloat16)."""
    import copy

    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for name in packed:
            params[name].copy_(params[name].to(torch.bfloat16).float())
    return m


def test_fp4_and_mxfp8_weights(tiny_llama, tmp_path):
    """NVFP4 (max and four_over_six block scales), MXFP4 and MXFP8 weights: MX decompresses to exactly our
    weights; NVFP4 to our weights rounded to bfloat16 (compressed-tensors decompresses FP4 through bf16)."""
    arms = {"nvfp4": {"codec": {"nvfp4": {}}}, "nvfp4_46": {"codec": {"nvfp4": {"scale_selection": "four_over_six"}}},
            "mxfp4": {"codec": {"mx": {}}}, "mxfp8": {"codec": {"mx": {"element": "fp8_e4m3"}}}}
    s = _spec(tiny_llama, arms)
    lm = load_model(s.model, device="cpu")
    formats = {}
    for arm in arms:
        qm = quantize_arm(lm, s, arm, 0)
        formats[arm] = write_compressed_tensors(tmp_path / arm, qm.model, qm.packed, s.arms[arm])["format"]
        ours = _bf16_weights(qm.model, qm.packed) if arm.startswith("nvfp4") else qm.model
        differ, diff = _compare(tmp_path / arm, ours)
        assert differ == [] and diff <= LOGIT_TOL, (arm, differ[:3], diff)
    assert formats == {"nvfp4": "nvfp4-pack-quantized", "nvfp4_46": "nvfp4-pack-quantized",
                       "mxfp4": "mxfp4-pack-quantized", "mxfp8": "mxfp8-quantized"}


def test_static_nvfp4_activations_store_the_global_input_scale(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    from quantatlas.quant.codecs.nvfp4 import tensor_scale_of

    s = _spec(tiny_llama, {"w4a4": {"codec": {"nvfp4": {}}, "act": {"codec": {"nvfp4": {}}, "static": True}}})
    qm = quantize_arm(load_model(s.model, device="cpu"), s, "w4a4", 0)
    info = write_compressed_tensors(tmp_path / "a", qm.model, qm.packed, s.arms["w4a4"],
                                    input_amax=qm.records["act_static_amax"])
    a = info["config_groups"]["group_0"]["input_activations"]
    assert (a["strategy"], a["dynamic"], a["group_size"]) == ("tensor_group", "local", 16)
    stored = load_file(tmp_path / "a" / "model.safetensors")
    for module, amax in qm.records["act_static_amax"].items():
        t = tensor_scale_of(torch.tensor([amax]), "max")
        assert torch.equal(stored[f"{module}.input_global_scale"], 1.0 / t)


def test_mxfp4_activations_are_compressed_tensors_mxfp4():
    """`act: {codec: {mx: {scale_rounding: even}}}` is compressed-tensors' MXFP4 activation quantizer bit for
    bit (its power-of-two scale rounds the group max to FP4's mantissa first: our `even`)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    from quantatlas.quant.act import ActConfig
    from quantatlas.export.schemes import activation_args

    act = ActConfig.model_validate({"codec": {"mx": {"scale_rounding": "even"}}})
    args = QuantizationArgs.model_validate(activation_args(act))
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 256)
    scale, zp = compute_dynamic_scales_and_zp(x, args, module=None)
    ours = act.codec_config().build().fake_quantize(x.reshape(-1, 32)).reshape(x.shape)
    assert torch.equal(ours, fake_quantize(x, scale, zp, args))


@pytest.mark.parametrize("arm, words", [
    ({"codec": {"fp8": {"format": "e5m2"}}}, "E4M3 only"),
    ({"codec": {"nvfp4": {"tensor_scale": "per_row"}}}, "per_row"),
    ({"codec": {"mx": {"element": "fp6_e2m3"}}}, "MXFP8"),
    ({"codec": {"nvfp4": {}}, "act": {"codec": {"nvfp4": {}}}}, "static: true"),
    ({"codec": {"uniform": {"bits": 4}}, "kv": {"k": "q8_0", "v": "q8_0"}}, "kv.k"),
])
def test_refusals_name_the_field(arm, words):
    from quantatlas.export.schemes import NoScheme, check_arm

    with pytest.raises(NoScheme, match=words) as e:
        check_arm(_spec("reference", {"a": arm}).arms["a"], "arms.a")
    assert "\n" not in str(e.value) and e.value.field.startswith("arms.a")


def test_a_freeze_dried_arm_is_refused_before_compute():
    from quantatlas.export.schemes import NoScheme, check_arm
    from quantatlas.spec import parse_spec

    spec = parse_spec({"title": "t", "arms": {"a": {"codec": {"uniform": {"bits": 4}}, "freeze_dry": {"tol": 0.05}}}})
    with pytest.raises(NoScheme, match=r"arms\.a\.freeze_dry"):
        check_arm(spec.arms["a"], "arms.a")


def test_a_model_rotating_inputs_online_is_refused_whatever_the_arm_says(tiny_llama):
    """An online rotation the arm does not name (RoSTE's chosen down rotations) is found on the model itself:
    the scheme plan refuses it rather than write weights a runtime would read with unrotated inputs."""
    from quantatlas.export.compressed_tensors import plan_schemes
    from quantatlas.export.schemes import NoScheme
    from quantatlas.quant.hadamard import RandomizedHadamard
    from quantatlas.quant.online import OnlineRotation, attach_online_rotation
    from quantatlas.spec import Arm

    model = load_model(str(tiny_llama)).model
    arm = Arm.model_validate({"codec": {"uniform": {"bits": 4, "group": 32}}})
    down = model.model.layers[0].mlp.down_proj
    attach_online_rotation(down, OnlineRotation(RandomizedHadamard(down.in_features, 0)))
    with pytest.raises(NoScheme, match=r"model\.layers\.0\.mlp\.down_proj .*rotate their input online"):
        plan_schemes(model, {}, arm)
