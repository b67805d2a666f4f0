"""Artifacts other tools made, as arms (`artifact:`; quantatlas/quant/external/).

Oracles: our own arms for GGUF (a GGUF we export, re-imported, must give the producing arm's numbers to
the last digit); GPTQ (v1, v2) and AWQ checkpoints packed here by slow loops written after AutoGPTQ's
and AutoAWQ's pack code from known integer codes; a compressed-tensors folder written by the
compressed-tensors package itself from known codes. And the refusals, identity and the push API."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from quantatlas.errors import UserError
from quantatlas.quant.external.config import ArtifactConfig
from quantatlas.quant.external.weights import open_artifact

gguf = pytest.importorskip("gguf")


# ---- tiny models ----------------------------------------------------------------------------------

def fp16_exact(model):
    """Every parameter on the fp16 grid (as the committed reference checkpoint is): GGUF stores the
    unquantized matrices as F16, so the round trip is exact only for such a model."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model.eval()


def qwen3(layers=2, hidden=64, inter=128, seed=0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=258, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 2,
                      max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=256, eos_token_id=257)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)   # a less flat output distribution than the default init
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return fp16_exact(model)


def llama(layers=1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=256, eos_token_id=257)
    return fp16_exact(LlamaForCausalLM(cfg))


def loaded(model, name="tiny"):
    from quantatlas.models.load import LoadedModel

    return LoadedModel(model, name, f"{name}-hash", None)


def exported(tmp_path, model, arm: dict, name="m.gguf", spec_extra=None):
    """Quantize `model` with `arm` as `quantatlas export` does, write the GGUF; (path, QuantizedModel)."""
    from quantatlas.export.gguf import write_gguf
    from quantatlas.measure import quantize_arm
    from quantatlas.spec import parse_spec

    spec = parse_spec({"title": "x", "arms": {"a": arm}, **(spec_extra or {})})
    qm = quantize_arm(loaded(model), spec, "a", 0, device="cpu")
    codec = spec.arms["a"].codec
    write_gguf(tmp_path / name, qm.model, qm.packed, ftype=codec.ftype if codec.name == "gguf" else None)
    return tmp_path / name, qm


def params_equal(a, b) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def imported(model, cfg: ArtifactConfig, arm=None):
    import copy

    m = copy.deepcopy(model)
    ext = open_artifact(cfg, m, "arms.x", arm)
    ext.load_into(m)
    return m, ext


# ---- GGUF: our export, re-imported ------------------------------------------------------------------

def test_an_exported_gguf_reimported_gives_the_producing_arms_kld_to_the_last_digit(tmp_path):
    from quantatlas.atlas.ledger import Ledger
    from quantatlas.runner import run_spec

    model = qwen3()
    arm = {"codec": "q4_0", "overrides": [{"match": "down", "codec": "q8_0"}], "include_head": True}
    path, _ = exported(tmp_path, model, arm)
    db = f"sqlite:///{tmp_path / 'a.db'}"
    spec = {"title": "round trip", "model": "tiny", "data": {"eval": {"tokens": 2048, "ctx": 256}},
            "arms": {"ours": arm, "imported": {"artifact": {"gguf": str(path)}}}}
    doc = run_spec(spec, loaded=loaded(model), db_url=db, log=lambda m: None, device="cpu", compress=False)
    ours, back = (doc["arms"][a]["seeds"]["0"] for a in ("ours", "imported"))
    for k in ("kld_mean", "kld_se", "kld_median", "kld_p99", "kld_max", "same_top", "ppl", "ppl_ratio", "bpb"):
        assert back[k] == ours[k], k
    with Ledger(db) as led:
        runs = {r["arm"]: r["per_token_kld"] for r in led.runs(doc["experiment_id"])}
    assert runs["ours"].tobytes() == runs["imported"].tobytes()
    # bits per weight: the same ggml blocks; bits per parameter: the GGUF keeps norms in F32 (32 bits, where
    # our file stores 16) and the unquantized embedding in F16, as ours
    assert back["bits_per_weight"] == ours["bits_per_weight"]
    n_params = sum(p.numel() for p in model.parameters())
    norms = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1)
    assert back["bits_per_param"] == pytest.approx(ours["bits_per_param"] + 16 * norms / n_params, rel=1e-12)
    assert back["bytes_file"] == path.stat().st_size and "bytes_zstd" not in back   # --no-compress
    stored = doc["spec"]["arms"]["imported"]["artifact"]
    assert stored["provenance"] == {"tool": "GGUF (tool not recorded)", "version": "ggml quantization version 2"}


def test_a_llama_cpp_mixture_reimports_byte_for_byte_with_its_bits(tmp_path):
    """Q4_K_M (token embeddings and head quantized too), bits counted from ggml's type sizes."""
    from quantatlas.eval.bits import artifact_of

    model = qwen3(layers=1, hidden=256, inter=256)
    path, qm = exported(tmp_path, model, {"codec": {"gguf": "Q4_K_M"}})
    back, ext = imported(model, ArtifactConfig(gguf=str(path)))
    assert params_equal(back, qm.model)
    tensors = gguf.GGUFReader(str(path)).tensors
    quant = [t for t in tensors if t.tensor_type.name not in ("F32", "F16")]
    assert {t.name for t in quant} >= {"token_embd.weight", "output.weight"} and len({t.tensor_type for t in quant}) > 1
    nbytes = sum(int(t.n_elements) // gguf.GGML_QUANT_SIZES[t.tensor_type][0] * gguf.GGML_QUANT_SIZES[t.tensor_type][1]
                 for t in quant)
    weights = sum(int(t.n_elements) for t in quant)
    ours = artifact_of(qm.model, qm.packed).measure(compress=False)
    assert ext.sizes(back).bits_per_weight == 8 * nbytes / weights == ours["bits_per_weight"]
    assert ext.listing.provenance.scheme == "Q4_K_M"


def test_llama_rows_permuted_by_the_writer_are_permuted_back(tmp_path):
    model = llama()
    path, qm = exported(tmp_path, model, {"codec": "q8_0"})
    q = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.attn_q.weight")
    stored = gguf.quants.dequantize(np.asarray(q.data), q.tensor_type)
    mine = dict(qm.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"].detach().numpy()
    assert not np.array_equal(stored, mine)          # the file holds the permuted rows ...
    back, _ = imported(model, ArtifactConfig(gguf=str(path)))
    assert params_equal(back, qm.model)              # ... and the arm the model's


# ---- GPTQ and AWQ checkpoints from known integer codes ------------------------------------------------

def pack_gptq(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's QuantLinear.pack loop over rows of [in, out] (3 bits: its three-word pattern)."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << np.uint32(bits * (j - i))
            i += 32 // bits
            row += 1
        else:
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << np.uint32(3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << np.uint32(30)
            row += 1
            qweight[row] |= (intweight[i] >> np.uint32(2)) & np.uint32(1)
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << np.uint32(3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << np.uint32(31)
            row += 1
            qweight[row] |= (intweight[i] >> np.uint32(1)) & np.uint32(3)
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << np.uint32(3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.view(np.int32)


def pack_awq(intweight: np.ndarray) -> np.ndarray:
    """AutoAWQ's WQLinear_GEMM pack: [rows, cols] 4-bit -> [rows, cols/8] int32, nibble i = column 8c + order[i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    out = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    for col in range(out.shape[1]):
        for i in range(8):
            out[:, col] |= intweight[:, col * 8 + order[i]].astype(np.uint32) << np.uint32(i * 4)
    return out.view(np.int32)


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def write_folder(folder, model, tensors: dict, quant: dict, with_config=True):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    quantized = {n.rpartition(".")[0] for n in tensors}
    rest = {n: p.detach().half().contiguous() for n, p in params.items() if n.rpartition(".")[0] not in quantized
            or not n.endswith(".weight")}
    save_file({**rest, **{k: v.contiguous() for k, v in tensors.items()}}, str(folder / "model.safetensors"))
    if with_config:
        (folder / "config.json").write_text(json.dumps({**model.config.to_dict(), "quantization_config": quant}))


def gptq_checkpoint(folder, model, bits: int, fmt: str, group: int = 32, act_order: bool = False, seed: int = 0):
    """Known codes q, zero points z and fp16 scales for every decoder Linear, packed as a GPTQ checkpoint
    of checkpoint_format `fmt`; returns the weights it must decode to, W = s[g] (q − z[g])."""
    g = torch.Generator().manual_seed(seed)
    expected, tensors = {}, {}
    for name, m in linears(model).items():
        out_f, in_f = m.weight.shape
        n_groups = in_f // group
        q = torch.randint(0, 2 ** bits, (in_f, out_f), generator=g)
        lo = 1 if fmt == "gptq" else 0   # v1 stores z − 1, so z = 0 cannot be written
        z = torch.randint(lo, 2 ** bits, (n_groups, out_f), generator=g)
        if fmt == "gptq":
            z[0, 0] = 2 ** bits          # stored 2^b − 1: read as 2^b (AutoGPTQ's kernels add 1 after unpacking)
        s = (torch.rand(n_groups, out_f, generator=g) * 0.01 + 1e-3).half()
        gidx = torch.arange(in_f) // group
        if act_order:
            gidx = gidx[torch.randperm(in_f, generator=g)]
        w = torch.empty(out_f, in_f, dtype=torch.float64)
        for i in range(in_f):     # the definition, one input column at a time
            w[:, i] = s[gidx[i]].double() * (q[i] - z[gidx[i]]).double()
        expected[f"{name}.weight"] = w.float()
        stored_z = (z - 1) if fmt == "gptq" else z
        tensors[f"{name}.qweight"] = torch.from_numpy(pack_gptq(q.numpy(), bits))
        tensors[f"{name}.qzeros"] = torch.from_numpy(
            np.ascontiguousarray(pack_gptq((stored_z.numpy() & (2 ** bits - 1)).T.copy(), bits).T))
        tensors[f"{name}.scales"] = s
        tensors[f"{name}.g_idx"] = gidx.to(torch.int32)
    write_folder(folder, model, tensors, {"quant_method": "gptq", "bits": bits, "group_size": group,
                                          "desc_act": act_order, "sym": False, "checkpoint_format": fmt})
    return expected


@pytest.mark.parametrize("bits,fmt,act_order", [(4, "gptq", True), (4, "gptq_v2", False), (3, "gptq", False),
                                                (3, "gptq_v2", True), (2, "gptq_v2", False), (8, "gptq", False)])
def test_gptq_checkpoints_decode_to_the_weights_their_codes_define(tmp_path, bits, fmt, act_order):
    model = qwen3()
    expected = gptq_checkpoint(tmp_path / "gptq", model, bits, fmt, act_order=act_order)
    back, ext = imported(model, ArtifactConfig(gptq=str(tmp_path / "gptq")))
    params = dict(back.named_parameters())
    for name, w in expected.items():
        assert torch.equal(params[name], w), name
    assert torch.equal(params["model.norm.weight"], dict(model.named_parameters())["model.norm.weight"])
    # bits per weight: codes + int32 zeros (b bits each) + fp16 scales per group of 32 + a 32-bit g_idx per input
    weights = sum(m.weight.numel() for m in linears(model).values())
    per_matrix = [(m.weight.shape[0], m.weight.shape[1]) for m in linears(model).values()]
    stored = sum(o * i * bits / 8 + (i // 32) * o * bits / 8 + (i // 32) * o * 2 + 4 * i for o, i in per_matrix)
    assert ext.sizes(back).bits_per_weight == pytest.approx(8 * stored / weights, rel=1e-12)
    assert ext.listing.decode == {"bits": bits, "group_size": 32, "checkpoint_format": fmt}


def test_the_v1_zero_point_is_one_more_than_stored():
    """The same stored tensors read as v1 and as v2 differ by exactly one zero point step."""
    import tempfile
    from pathlib import Path

    model = qwen3(layers=1)
    with tempfile.TemporaryDirectory() as d:
        expected = gptq_checkpoint(Path(d) / "g", model, 4, "gptq")
        v1, _ = imported(model, ArtifactConfig(gptq=str(Path(d) / "g")))
        cfg = json.loads((Path(d) / "g" / "config.json").read_text())
        cfg["quantization_config"]["checkpoint_format"] = "gptq_v2"
        (Path(d) / "g" / "config.json").write_text(json.dumps(cfg))
        v2, _ = imported(model, ArtifactConfig(gptq=str(Path(d) / "g")))
    p1, p2 = dict(v1.named_parameters()), dict(v2.named_parameters())
    name = "model.layers.0.self_attn.q_proj"
    diff = p2[f"{name}.weight"] - p1[f"{name}.weight"]          # s · ((q − z) − (q − z − 1)) = s
    assert torch.equal(p1[f"{name}.weight"], expected[f"{name}.weight"])
    assert (diff > 0).all() and torch.equal(diff[:, :32].amax(1), diff[:, :32].amin(1))   # one scale per group


def test_awq_gemm_checkpoints_decode_to_the_weights_their_codes_define(tmp_path):
    model = qwen3()
    g = torch.Generator().manual_seed(3)
    expected, tensors, group = {}, {}, 32
    for name, m in linears(model).items():
        out_f, in_f = m.weight.shape
        q = torch.randint(0, 16, (in_f, out_f), generator=g)
        z = torch.randint(0, 16, (in_f // group, out_f), generator=g)
        s = (torch.rand(in_f // group, out_f, generator=g) * 0.01 + 1e-3).half()
        w = torch.empty(out_f, in_f, dtype=torch.float64)
        for i in range(in_f):
            w[:, i] = (q[i] - z[i // group]).double() * s[i // group].double()
        expected[f"{name}.weight"] = w.float()
        tensors[f"{name}.qweight"] = torch.from_numpy(pack_awq(q.numpy()))
        tensors[f"{name}.qzeros"] = torch.from_numpy(pack_awq(z.numpy()))
        tensors[f"{name}.scales"] = s
    write_folder(tmp_path / "awq", model, tensors, {"quant_method": "awq", "bits": 4, "group_size": group,
                                                    "zero_point": True, "version": "gemm"})
    back, ext = imported(model, ArtifactConfig(awq=str(tmp_path / "awq")))
    params = dict(back.named_parameters())
    assert all(torch.equal(params[n], w) for n, w in expected.items())
    weights = sum(m.weight.numel() for m in linears(model).values())
    stored = sum(o * i / 2 + (i // group) * o / 2 + (i // group) * o * 2
                 for o, i in (m.weight.shape for m in linears(model).values()))
    assert ext.sizes(back).bits_per_weight == pytest.approx(8 * stored / weights, rel=1e-12)


# ---- compressed-tensors, written by the package -------------------------------------------------------

def ct_folder(folder, symmetric=False, act=False):
    """A tiny Qwen3 quantized by compressed-tensors' own lifecycle from known codes (int4, groups of 32),
    compressed by its ModelCompressor (pack-quantized) and saved; returns (model, expected weights)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)

    model = qwen3()
    base = qwen3()   # the same weights, without compressed-tensors' modules: what the arm loads into
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=32),
        input_activations=QuantizationArgs(num_bits=8, type="int", strategy="token", dynamic=True) if act else None)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    g = torch.Generator().manual_seed(5)
    expected = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if not hasattr(m, "weight_scale"):
                continue
            out_f, in_f = m.weight.shape
            q = torch.randint(-8, 8, (out_f, in_f), generator=g)
            zp = torch.zeros(out_f, in_f // 32, dtype=torch.long) if symmetric else \
                torch.randint(-8, 8, (out_f, in_f // 32), generator=g)
            s = (torch.rand(out_f, in_f // 32, generator=g) * 0.02 + 1e-3).half().float()
            w = (q - zp.repeat_interleave(32, 1)).float() * s.repeat_interleave(32, 1)
            m.weight.copy_(w)
            m.weight_scale.copy_(s)
            if not symmetric:
                m.weight_zero_point.copy_(zp.to(m.weight_zero_point.dtype))
            expected[f"{name}.weight"] = w.clone()
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(str(folder))
    compressor.update_config(str(folder))
    return base, expected


def test_a_compressed_tensors_folder_decodes_through_the_package_to_its_codes(tmp_path):
    model, expected = ct_folder(tmp_path / "ct")
    back, ext = imported(model, ArtifactConfig(compressed_tensors=str(tmp_path / "ct")))
    params = dict(back.named_parameters())
    assert all(torch.equal(params[n], w) for n, w in expected.items())
    assert torch.equal(params["lm_head.weight"], dict(model.named_parameters())["lm_head.weight"])
    # bits per weight: 4-bit codes; an fp32 scale and a 4-bit zero point per group of 32 (the zero points
    # packed 8 to an int32 down each column); the int64 [out, in] shape of each matrix
    stored = sum(o * i / 2 + (i // 32) * o * 4 + (i // 32) * (-(-o // 8)) * 4 + 16
                 for o, i in (m.weight.shape for m in linears(model).values()))
    weights = sum(m.weight.numel() for m in linears(model).values())
    assert ext.sizes(back).bits_per_weight == pytest.approx(8 * stored / weights, rel=1e-12)
    prov = ext.listing.provenance
    assert prov.tool == "compressed-tensors" and prov.version and "int4 group 32 asym" in prov.scheme


def test_a_compressed_tensors_folder_we_export_reimports_with_the_producing_arms_kld(tmp_path):
    """Our compressed-tensors writer (export/compressed_tensors.py), read back as an artifact arm: the same
    KLD to the last digit. Its bits are the folder's: it keeps an fp32 model's scales in fp32 (ours: fp16)
    and adds each matrix's int64 [out, in] shape."""
    pytest.importorskip("compressed_tensors")
    from quantatlas.export.compressed_tensors import write_compressed_tensors
    from quantatlas.measure import quantize_arm
    from quantatlas.runner import run_spec
    from quantatlas.spec import parse_spec

    model = qwen3()
    arm = {"codec": {"uniform": {"bits": 4, "group": 32}}}
    spec = parse_spec({"title": "x", "arms": {"a": arm}})
    qm = quantize_arm(loaded(model), spec, "a", 0, device="cpu")
    write_compressed_tensors(tmp_path / "ct", qm.model, qm.packed, spec.arms["a"])
    doc = run_spec({"title": "rt", "model": "tiny", "data": {"eval": {"tokens": 1024, "ctx": 256}},
                    "arms": {"ours": arm, "imported": {"artifact": {"compressed_tensors": str(tmp_path / "ct")}}}},
                   loaded=loaded(model), ledger=False, log=lambda m: None, device="cpu", compress=False)
    ours, back = (doc["arms"][a]["seeds"]["0"] for a in ("ours", "imported"))
    for k in ("kld_mean", "kld_max", "kld_p99", "same_top", "ppl"):
        assert back[k] == ours[k], k
    weights = sum(m.weight.numel() for m in linears(model).values())
    assert ours["bits_per_weight"] == 4 + 16 / 32
    assert back["bits_per_weight"] == pytest.approx(4 + 32 / 32 + 128 * len(linears(model)) / weights, rel=1e-12)


def test_an_activation_scheme_needs_the_arm_to_apply_activations(tmp_path):
    model, _ = ct_folder(tmp_path / "ct", symmetric=True, act=True)
    with pytest.raises(UserError, match=r"arms\.x\.artifact: .*group_0 also quantizes activations.*`act:`"):
        open_artifact(ArtifactConfig(compressed_tensors=str(tmp_path / "ct")), model, "arms.x")


def test_without_the_compressed_tensors_package_the_arm_is_refused_in_one_line(tmp_path, monkeypatch):
    import sys

    model = qwen3(layers=1)
    write_folder(tmp_path / "ct", model, {}, {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                              "config_groups": {"g": {"targets": ["Linear"]}}})
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    with pytest.raises(UserError, match=r"^arms\.x\.artifact: .*not installed: pip install compressed-tensors"):
        open_artifact(ArtifactConfig(compressed_tensors=str(tmp_path / "ct")), model, "arms.x")


# ---- refusals before anything is evaluated ------------------------------------------------------------

@pytest.fixture
def no_eval(monkeypatch):
    import quantatlas.runner

    def evaluated(*a, **k):
        raise AssertionError("the reference logits were computed: the artifact should have been refused before")
    monkeypatch.setattr(quantatlas.runner, "reference_logprobs", evaluated)


def refusal(model, path, fmt="gguf") -> str:
    from quantatlas.runner import run_spec

    spec = {"title": "t", "model": "tiny", "data": {"eval": {"tokens": 1024, "ctx": 256}},
            "arms": {"fp": {}, "imp": {"artifact": {fmt: str(path)}}}}
    with pytest.raises(UserError) as e:
        run_spec(spec, loaded=loaded(model), ledger=False, log=lambda m: None, device="cpu")
    assert e.value.field.startswith("arms.imp.artifact") and "\n" not in str(e.value)
    return str(e.value)


def test_mismatched_artifacts_are_refused_naming_the_tensor(tmp_path, no_eval):
    two, _ = exported(tmp_path, qwen3(layers=2), {"codec": "q8_0"}, "two.gguf")
    msg = refusal(qwen3(layers=1), two)                                   # more layers than the model
    assert "tensor blk.1.attn_k.weight is no parameter of the model (and 10 more)" in msg
    one, _ = exported(tmp_path, qwen3(layers=1), {"codec": "q8_0"}, "one.gguf")
    assert "the model's model.layers.1.self_attn.q_proj.weight is not in the artifact" in refusal(qwen3(), one)
    wide, _ = exported(tmp_path, qwen3(inter=256), {"codec": "q8_0"}, "wide.gguf")
    assert "tensor blk.0.ffn_gate.weight decodes to shape [256, 64], the model's " \
           "model.layers.0.mlp.gate_proj.weight is [128, 64]" in refusal(qwen3(), wide)
    other, _ = exported(tmp_path, llama(layers=2), {"codec": "q8_0"}, "llama.gguf")
    assert "the artifact is a 'llama' model (general.architecture), the spec's model is 'qwen3'" in \
        refusal(qwen3(), other)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    assert "not a readable GGUF file" in refusal(qwen3(), tmp_path / "junk.gguf")
    model = qwen3()
    gptq_checkpoint(tmp_path / "g", model, 4, "gptq")
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    (tmp_path / "g" / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    assert "the artifact is a llama model (config.json model_type), the spec's model is qwen3" in \
        refusal(model, tmp_path / "g", "gptq")


def test_the_command_line_refuses_a_missing_artifact_in_one_line_at_its_spec_line(tmp_path):
    from typer.testing import CliRunner

    from quantatlas.cli import app

    qwen3(layers=1).save_pretrained(tmp_path / "model")
    (tmp_path / "eval.txt").write_text("abc " * 600)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"title: t\nmodel: {tmp_path / 'model'}\ndata:\n  eval: {{tokens: 1024, ctx: 256, source: "
                    f"{tmp_path / 'eval.txt'}}}\narms:\n  fp: {{}}\n  llama_q4km:\n"
                    "    artifact: {gguf: nowhere.gguf}\n")
    result = CliRunner().invoke(app, ["run", str(spec), "--quiet", "--db", f"sqlite:///{tmp_path / 'a.db'}"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {spec}:8: arms.llama_q4km.artifact.gguf: no such file: {tmp_path / 'nowhere.gguf'}"]
    assert not (tmp_path / "a.db").exists()   # refused before the model was loaded or the ledger opened


def test_artifact_arms_take_no_weights_of_their_own_but_may_quantize_the_cache():
    from quantatlas.spec import SpecError, parse_spec

    for extra in ({"codec": "q8_0"}, {"solver": "gptq"}, {"transforms": [{"hadamard": {}}]}, {"include_head": True},
                  {"solver_options": {"incoherence": True}}, {"recovery": {"method": "kd_ste"}}):
        with pytest.raises(SpecError, match=r"field arms\.a\.artifact: an artifact arm's weights are the artifact's"):
            parse_spec({"title": "t", "arms": {"a": {"artifact": {"gguf": "x.gguf"}, **extra}}})
    for bad, field in (({"gguf": "x", "awq": "y"}, "exactly one of"), ({"gguf": "x", "sha256": "ABC"}, "sha256"),
                       ({}, "exactly one of"), ({"gguf": "x", "tool": "me"}, "tool")):
        with pytest.raises(SpecError, match=field):
            parse_spec({"title": "t", "arms": {"a": {"artifact": bad}}})
    spec = parse_spec({"title": "t", "arms": {"a": {"artifact": {"gguf": "x.gguf"}, "kv": {"k": "q8_0"}}}})
    arm = spec.arms["a"]
    from quantatlas.quant.steps import arm_reads_calibration, arm_techniques, is_reference

    assert not arm.seeded and not arm_reads_calibration(arm)
    assert not is_reference(arm) and arm_techniques(arm) == {"artifact:gguf", "kv", "kv.k=q8_0"}


# ---- identity: the tensors, not the path --------------------------------------------------------------

def test_the_same_tensors_at_two_paths_are_one_arm_and_a_changed_tensor_is_another(tmp_path, monkeypatch):
    from quantatlas.runner import arm_key
    from quantatlas.spec import SpecError, load_spec

    path, _ = exported(tmp_path, qwen3(layers=1), {"codec": "q4_0"})
    (tmp_path / "alice").mkdir()
    (tmp_path / "bob" / "files").mkdir(parents=True)
    shutil.copy(path, tmp_path / "alice" / "model.gguf")
    shutil.copy(path, tmp_path / "bob" / "files" / "renamed.gguf")
    (tmp_path / "alice" / "spec.yaml").write_text("title: t\narms:\n  q: {artifact: {gguf: model.gguf}}\n")
    (tmp_path / "bob" / "spec.yaml").write_text("title: t\narms:\n  q: {artifact: {gguf: files/renamed.gguf}}\n")
    monkeypatch.chdir(tmp_path)    # relative paths are read from the spec's folder, not the working directory
    a, b = load_spec(tmp_path / "alice" / "spec.yaml"), load_spec(tmp_path / "bob" / "spec.yaml")
    assert a.arms["q"].artifact.gguf == str(tmp_path / "alice" / "model.gguf")
    assert a.arms["q"].artifact.sha256 == b.arms["q"].artifact.sha256 is not None
    assert a.spec_hash() == b.spec_hash()
    key = lambda s: arm_key(s.arms["q"].model_dump(mode="json"), "m", "e")  # noqa: E731
    assert key(a) == key(b)
    # a changed tensor byte: another arm
    blob = bytearray((tmp_path / "bob" / "files" / "renamed.gguf").read_bytes())
    blob[-1] ^= 1
    (tmp_path / "bob" / "files" / "renamed.gguf").write_bytes(bytes(blob))
    c = load_spec(tmp_path / "bob" / "spec.yaml")
    assert c.spec_hash() != a.spec_hash() and key(c) != key(a)
    # a sha256 written in the spec must be the file's
    (tmp_path / "bob" / "spec.yaml").write_text("title: t\narms:\n  q:\n    artifact:\n      gguf: files/renamed.gguf\n"
                                                 f"      sha256: {a.arms['q'].artifact.sha256}\n")
    with pytest.raises(SpecError, match=r"spec\.yaml:6: field arms\.q\.artifact\.sha256: .* is not the artifact's"):
        load_spec(tmp_path / "bob" / "spec.yaml")
    # an unread artifact (the file is elsewhere) has no id in the ledger
    from quantatlas.atlas.ids import normalise_spec

    with pytest.raises(ValueError, match=r"arms\.q\.artifact\.sha256: missing"):
        normalise_spec({"title": "t", "arms": {"q": {"artifact": {"gguf": "elsewhere.gguf"}}}})


# ---- the ledger, the push API and the page ------------------------------------------------------------

def test_the_push_api_takes_the_artifact_arm_checks_its_hash_and_the_page_shows_who_made_it(tmp_path):
    import copy

    from fastapi.testclient import TestClient

    from quantatlas.atlas.io import experiment_record, run_records
    from quantatlas.atlas.ledger import Ledger
    from quantatlas.atlas.tokens import create_token
    from quantatlas.web import create_app

    sha = "ab" * 32
    spec = {"title": "external", "model": "reference", "seeds": [0],
            "arms": {"llmc": {"artifact": {"compressed_tensors": "/data/llmc-w4a16", "sha256": sha,
                                           "provenance": {"tool": "compressed-tensors", "version": "0.19.0",
                                                          "scheme": "weights int4 group 128 sym"}}}}}
    local = Ledger(f"sqlite:///{tmp_path / 'local.db'}", contributor="alice")
    exp = local.register_experiment(spec)
    t = np.full(64, 0.01, np.float32)
    local.record_run(exp, "llmc", 0, {"kld_mean": 0.01, "bits_per_weight": 4.25}, t,
                     {"device": "cpu", "packages": {}, "git_commit": "x", "hostname": "h"}, "mh", "ef")
    with local.read() as q:
        payload = {"schema_version": 1, "experiments": [experiment_record(q, q.experiment(exp))],
                   "runs": run_records(local, [r["id"] for r in local.runs(exp)])}
    app = create_app(f"sqlite:///{tmp_path / 'server.db'}")
    token = create_token(app.state.ledger, "alice")
    with TestClient(app) as client:
        for bad, why in ((sha[:-2], "sha256"), (sha.upper(), "sha256"), (7, "sha256"), (None, "sha256: missing")):
            p = copy.deepcopy(payload)
            art = p["experiments"][0]["spec"]["arms"]["llmc"]["artifact"]
            art.pop("sha256") if bad is None else art.update(sha256=bad)
            r = client.post("/api/runs", json=p, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 422 and why in r.text and "arms.llmc.artifact" in r.text, r.text
        r = client.post("/api/runs", json=payload, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        page = client.get(f"/experiments/{exp}").text
        assert "made by: compressed-tensors · compressed-tensors 0.19.0 · weights int4 group 128 sym · sha256 " \
               "abababababab" in page
    # the same artifact elsewhere (another path, another provenance text) is the same experiment
    moved = copy.deepcopy(spec)
    moved["arms"]["llmc"]["artifact"].update(compressed_tensors="/home/bob/llmc", provenance={"tool": "llmc"})
    from quantatlas.atlas.ids import normalise_spec

    assert normalise_spec(moved)[1] == normalise_spec(spec)[1]
    local.close()
