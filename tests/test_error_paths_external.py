"""User mistakes refused in one line, naming the file, field and value, before any compute: malformed
external artifacts (safetensors headers, configs that are not JSON objects, an unknown compressed-tensors
format, packed tensors that do not fit their scheme; over-long metadata is cut, not a traceback), `quantatlas reference train`'s options (device, sizes, a seq_len past the model's context),
bench/gaussian_mse.py's --codecs and --trellis-L, and an arm override whose match hits no tensor of the
model (`match: down` on a mixture of experts, whose MLP roles are expert_down, ...)."""
from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantatlas.cli import app
from quantatlas.errors import UserError
from quantatlas.quant.external.config import ArtifactConfig
from quantatlas.quant.external.stored import resolve

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ---- tiny models ----------------------------------------------------------------------------------

def tiny_qwen3(layers=1):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=258, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=32, max_position_embeddings=256,
                                        tie_word_embeddings=False)).eval()


def tiny_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=258, hidden_size=32, intermediate_size=64,
                                              moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                              head_dim=16, max_position_embeddings=256)).eval()


def loaded(model, name):
    from quantatlas.models.load import LoadedModel

    return LoadedModel(model, name, f"{name}-hash", None)


# ---- external artifacts: malformed safetensors headers ---------------------------------------------

HEADER = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()


def safetensors_bytes(header: bytes, length: int | None = None, data: bytes = b"\0" * 8) -> bytes:
    """A safetensors file: 8-byte little-endian header length (`length`, default the header's), header, data."""
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def gptq_folder(folder: Path, blob: bytes) -> Path:
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(blob)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3", "quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 32}}))
    return folder


def refused_artifact(folder: Path, fmt: str = "gptq") -> str:
    """The one-line UserError resolving an arm's artifact gives (what `quantatlas run` does first)."""
    with pytest.raises(UserError) as e:
        resolve(ArtifactConfig(**{fmt: str(folder)}), None, "arms.imp.artifact", require=True)
    assert e.value.field == f"arms.imp.artifact.{fmt}"
    msg = one_line(e)
    assert msg.startswith(f"arms.imp.artifact.{fmt}: ")
    return msg


@pytest.mark.parametrize("blob,reason", [
    (b"\x01\x02\x03", "not a readable safetensors file (unpack requires a buffer of 8 bytes)"),    # cut in the length
    (b"", "not a readable safetensors file (unpack requires a buffer of 8 bytes)"),               # empty
    (safetensors_bytes(HEADER[:10], data=b""), "not a readable safetensors file (Unterminated string"),
    (safetensors_bytes(HEADER, 1 << 40), f"not a readable safetensors file (its first 8 bytes declare a header of "
                                         f"{1 << 40} bytes, the file holds {8 + len(HEADER) + 8} bytes)"),
    (safetensors_bytes(b"[" * 100_000 + b"]" * 100_000), "not a readable safetensors file (maximum recursion"),
    (safetensors_bytes(b"notjson!"), "not a readable safetensors file (Expecting value"),
    (safetensors_bytes(b"[1, 2]"), "not a readable safetensors file (its header is not a JSON object)"),
    (safetensors_bytes(b'"w"'), "not a readable safetensors file (its header is not a JSON object)"),
    (safetensors_bytes(b'{"w": {"dtype": "F32"}}'), "tensor w: not a safetensors header entry (dtype, shape, "
                                                    "data_offsets): KeyError"),
    (safetensors_bytes(b'{"w": {"dtype": "F32", "shape": "ab", "data_offsets": [0, 8]}}'),
     "tensor w: not a safetensors header entry"),
    (safetensors_bytes(b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}'),
     "tensor w: not a safetensors header entry (dtype, shape, data_offsets): ValueError data_offsets [8, 0] is no "
     "byte range"),
    (safetensors_bytes(HEADER, data=b"\0" * 3), "tensor w is cut short (5 of its 8 bytes missing)"),  # data cut
])
def test_a_malformed_safetensors_file_is_refused_naming_the_file(tmp_path, blob, reason):
    folder = gptq_folder(tmp_path / "g", blob)
    msg = refused_artifact(folder)
    assert f"{folder / 'model.safetensors'}: {reason}" in msg


def test_a_header_length_past_the_end_of_the_file_is_refused(tmp_path):
    # the length says 1000 more bytes than the file holds: whether what is there parses as JSON (whose
    # tensors would then look cut short) or not, the length is named, with the file's size
    for i, (blob, size) in enumerate([(safetensors_bytes(HEADER[:-1], len(HEADER) + 1000, b""), 8 + len(HEADER) - 1),
                                      (safetensors_bytes(HEADER, len(HEADER) + 1000, b""), 8 + len(HEADER)),
                                      (safetensors_bytes(HEADER, len(HEADER) + 1, b""), 8 + len(HEADER))]):
        folder = gptq_folder(tmp_path / f"g{i}", blob)
        assert len(blob) == size
        assert refused_artifact(folder).endswith(
            f"{folder / 'model.safetensors'}: not a readable safetensors file (its first 8 bytes declare a header of "
            f"{len(HEADER) + (1000 if i < 2 else 1)} bytes, the file holds {size} bytes)")
    # the length that fits exactly is read (the same header, its data cut: refused for the data, not the length)
    folder = gptq_folder(tmp_path / "exact", safetensors_bytes(HEADER, data=b""))
    assert "tensor w is cut short (8 of its 8 bytes missing)" in refused_artifact(folder)


def test_a_header_that_fits_the_file_but_is_past_the_size_cap_is_refused(tmp_path):
    # a sparse file of 100 MB and a bit: its header length fits, and is more than a header is read for
    n = 100_000_001
    folder = gptq_folder(tmp_path / "g", safetensors_bytes(b"{", n, b""))
    with open(folder / "model.safetensors", "r+b") as fh:
        fh.truncate(8 + n)
    assert f"{folder / 'model.safetensors'}: not a readable safetensors file (header of {n} bytes)" in \
        refused_artifact(folder)


def test_the_command_line_refuses_a_malformed_artifact_at_its_spec_line(tmp_path):
    folder = gptq_folder(tmp_path / "g", safetensors_bytes(b"[]"))
    spec = tmp_path / "spec.yaml"
    spec.write_text("title: t\nmodel: reference\narms:\n  fp: {}\n  imp:\n    artifact: {gptq: g}\n")
    r = CliRunner().invoke(app, ["run", str(spec), "--quiet", "--db", f"sqlite:///{tmp_path / 'a.db'}"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert r.stderr.strip().splitlines() == [
        f"error: {spec}:6: field arms.imp.artifact.gptq: {folder / 'model.safetensors'}: not a readable "
        "safetensors file (its header is not a JSON object)"]
    assert not (tmp_path / "a.db").exists()   # refused before the ledger was opened (or the model loaded)


# ---- external artifacts: configs that are not JSON objects -----------------------------------------

def folder_with_config(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(safetensors_bytes(HEADER))
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("fmt,files,name,reason", [
    ("gptq", {"config.json": "[1, 2]"}, "config.json", "a JSON object expected, found list"),
    ("awq", {"config.json": '"awq"'}, "config.json", "a JSON object expected, found str"),
    ("compressed_tensors", {"config.json": "{not json"}, "config.json", "not readable JSON (Expecting property"),
    ("gptq", {"config.json": '{"model_type": "qwen3"}', "quantize_config.json": "[4, 128]"},
     "quantize_config.json", "a JSON object expected, found list"),      # AutoGPTQ's own file
    ("awq", {"config.json": '{"model_type": "qwen3"}', "quant_config.json": "null"},
     "quant_config.json", "a JSON object expected, found NoneType"),      # AutoAWQ's own file
])
def test_a_config_that_is_not_a_json_object_is_refused_naming_the_file(tmp_path, fmt, files, name, reason):
    folder = folder_with_config(tmp_path / "a", files)
    assert f"{folder / name}: {reason}" in refused_artifact(folder, fmt)


@pytest.mark.parametrize("fmt,value,found", [
    ("gptq", "gptq", "str ('gptq')"),
    ("awq", [{"quant_method": "awq"}], "list ([{'quant_method': 'awq'}])"),
    ("compressed_tensors", 4, "int (4)"),
    ("gptq", "x" * 500, f"str ({('x' * 500)!r:.57}...)"),   # a long value is cut
])
def test_a_quantization_config_that_is_not_an_object_is_refused(tmp_path, fmt, value, found):
    # refused where it is read, not dropped (and then refused for the quant_method it lacks)
    folder = folder_with_config(tmp_path / "a", {"config.json": json.dumps({"model_type": "qwen3",
                                                                            "quantization_config": value})})
    assert refused_artifact(folder, fmt).endswith(
        f"{folder / 'config.json'}: quantization_config: a JSON object expected, found {found}")


def test_a_null_quantization_config_reads_as_absent(tmp_path):
    # null is no config at all: the tool's own file beside it is read, as where the key is missing
    folder = folder_with_config(tmp_path / "a", {"config.json": json.dumps({"model_type": "qwen3",
                                                                            "quantization_config": None}),
                                                 "quantize_config.json": '{"quant_method": "awq"}'})
    assert refused_artifact(folder, "gptq").endswith(
        f"{folder}: a GPTQ (HF checkpoint) artifact needs quantization_config.quant_method 'gptq' in config.json, "
        "found 'awq'")


def test_a_config_group_that_is_not_a_scheme_is_refused(tmp_path):
    ct = folder_with_config(tmp_path / "ct", {"config.json": json.dumps({"quantization_config": {
        "quant_method": "compressed-tensors", "config_groups": {"group_0": ["Linear"]}}})})
    assert f"{ct}: quantization_config.config_groups.group_0 is not a scheme (an object with weights)" in \
        refused_artifact(ct, "compressed_tensors")


# ---- external artifacts: an unknown compressed-tensors format ----------------------------------------

def ct_unknown_format(folder: Path, model, fmt: str) -> Path:
    """A compressed-tensors folder whose q_proj is stored as pack-quantized tensors (int4, groups of 32) and
    whose quantization_config.format is `fmt`; every other tensor as the model's fp16 values."""
    from safetensors.torch import save_file

    folder.mkdir()
    q = "model.layers.0.self_attn.q_proj"
    out_f, in_f = model.get_submodule(q).weight.shape
    tensors = {n: p.detach().half().contiguous() for n, p in model.named_parameters() if n != f"{q}.weight"}
    tensors[f"{q}.weight_packed"] = torch.zeros(out_f, in_f // 8, dtype=torch.int32)
    tensors[f"{q}.weight_scale"] = torch.ones(out_f, in_f // 32, dtype=torch.float16)
    tensors[f"{q}.weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int32)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**model.config.to_dict(), "quantization_config": {
        "quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True}}}}}))
    return folder


def test_an_unknown_compressed_tensors_format_is_refused_before_anything_is_evaluated(tmp_path, monkeypatch):
    pytest.importorskip("compressed_tensors")
    import quantatlas.runner
    from quantatlas.quant.external.weights import open_artifact
    from quantatlas.runner import run_spec

    model = tiny_qwen3()
    ct = ct_unknown_format(tmp_path / "ct", model, "no-such-format")
    with pytest.raises(UserError) as e:
        open_artifact(ArtifactConfig(compressed_tensors=str(ct)), model, "arms.x")
    assert e.value.field == "arms.x.artifact"
    assert one_line(e) == ("arms.x.artifact: compressed-tensors ct: config group group_0: format 'no-such-format' "
                           "(quantization_config.format) is no compressor compressed-tensors has")

    def evaluated(*a, **k):
        raise AssertionError("the reference logits were computed: the artifact should have been refused before")
    monkeypatch.setattr(quantatlas.runner, "reference_logprobs", evaluated)
    spec = {"title": "t", "model": "tiny", "data": {"eval": {"tokens": 1024, "ctx": 256}},
            "arms": {"fp": {}, "imp": {"artifact": {"compressed_tensors": str(ct)}}}}
    with pytest.raises(UserError) as e:
        run_spec(spec, loaded=loaded(model, "tiny"), ledger=False, log=lambda m: None, device="cpu")
    assert e.value.field == "arms.imp.artifact" and "format 'no-such-format'" in one_line(e)


W4G32 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True}


def ct_group(folder: Path, model, group: dict, top_format: str = "pack-quantized") -> Path:
    """`ct_unknown_format`'s folder (q_proj stored pack-quantized, int4 in groups of 32) with config group
    group_0 replaced by `group`."""
    ct_unknown_format(folder, model, top_format)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["config_groups"] = {"group_0": group}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def ct_refusal(folder: Path, model) -> str:
    """What opening the compressed-tensors folder as an arm's artifact (before anything is evaluated) says,
    after its `arms.x.artifact: compressed-tensors <folder>: ` prefix."""
    from quantatlas.quant.external.weights import open_artifact

    with pytest.raises(UserError) as e:
        open_artifact(ArtifactConfig(compressed_tensors=str(folder)), model, "arms.x")
    assert e.value.field == "arms.x.artifact"
    msg = one_line(e)
    assert msg.startswith(f"arms.x.artifact: compressed-tensors {folder.name}: ")
    return msg.removeprefix(f"arms.x.artifact: compressed-tensors {folder.name}: ")


def test_the_ct_group_helper_writes_a_readable_folder(tmp_path):
    # the refusals below are each about the one thing their folder changes
    pytest.importorskip("compressed_tensors")
    from quantatlas.quant.external.weights import open_artifact

    model = tiny_qwen3()
    ct = ct_group(tmp_path / "ct", model, {"targets": ["Linear"], "weights": W4G32, "format": "pack-quantized"})
    open_artifact(ArtifactConfig(compressed_tensors=str(ct)), model, "arms.x").load_into(model)
    # pack-quantized int4 stores q + 8: a zero word is q = -8, times the scale 1
    assert torch.equal(model.get_submodule(Q_PROJ).weight, torch.full((128, 64), -8.0))


def test_an_unknown_format_in_a_config_group_is_refused_naming_the_group_and_value(tmp_path):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.config import CompressionFormat

    model = tiny_qwen3()
    ct = ct_group(tmp_path / "ct", model, {"targets": ["Linear"], "weights": W4G32, "format": "pack-quantised"})
    known = [f.value for f in CompressionFormat]
    assert "pack-quantized" in known and "pack-quantised" not in known
    assert ct_refusal(ct, model) == (
        f"{ct / 'config.json'}: quantization_config.config_groups.group_0.format: 'pack-quantised' is not a "
        f"compressed-tensors format (one of {', '.join(known)})")
    # a format the package names but has no compressor for: the group's own field is named as its source
    marlin = ct_group(tmp_path / "m", model, {"targets": ["Linear"], "weights": W4G32, "format": "marlin-24"})
    assert ct_refusal(marlin, model) == ("config group group_0: format 'marlin-24' (quantization_config."
                                         "config_groups.group_0.format) is no compressor compressed-tensors has")


@pytest.mark.parametrize("group,message", [
    ({"targets": ["Linear"], "weights": {**W4G32, "num_bits": "four"}},
     "quantization_config.config_groups.group_0.weights.num_bits: 'four' is not compressed-tensors' (Input should "
     "be a valid integer, unable to parse string as an integer)"),
    ({"targets": "Linear", "weights": W4G32},
     "quantization_config.config_groups.group_0.targets: 'Linear' is not compressed-tensors' (Input should be a "
     "valid list)"),
    ({"targets": ["Linear"], "weights": {**W4G32, "strategy": "rows"}},
     "quantization_config.config_groups.group_0.weights.strategy: 'rows' is not compressed-tensors' (Value error, "
     "'rows' is not a valid QuantizationStrategy)"),
])
def test_the_packages_own_refusals_name_the_field_and_value(tmp_path, group, message):
    pytest.importorskip("compressed_tensors")
    model = tiny_qwen3()
    ct = ct_group(tmp_path / "ct", model, group)
    assert ct_refusal(ct, model) == f"{ct / 'config.json'}: {message}"


@pytest.mark.parametrize("group,message", [
    # a "re:" target that is no regular expression (re.error out of the package's matcher)
    ({"targets": ["re:.*proj["], "weights": W4G32},
     "config group group_0: targets ['re:.*proj['] / ignore ['lm_head']: a pattern is no regular expression "
     "(unterminated character set at position 6)"),
    # packed weights stored for a group that quantizes none (AttributeError in the package's decompressor)
    ({"targets": ["Linear"]},
     "tensor model.layers.0.self_attn.q_proj.weight_packed is stored, but config group group_0 quantizes no weights "
     "(quantization_config.config_groups.group_0.weights)"),
    # group sizes the stored scales do not have (RuntimeError / ValueError out of decompress, once at load time)
    ({"targets": ["Linear"], "weights": {**W4G32, "group_size": 16}},
     "tensors model.layers.0.self_attn.q_proj.weight_packed, model.layers.0.self_attn.q_proj.weight_scale, "
     "model.layers.0.self_attn.q_proj.weight_shape do not decode as pack-quantized with their config group's scheme "
     "(RuntimeError: The size of tensor a (4) must match the size of tensor b (2) at non-singleton dimension 1)"),
    ({"targets": ["Linear"], "weights": {**W4G32, "group_size": 7}},
     "tensors model.layers.0.self_attn.q_proj.weight_packed, model.layers.0.self_attn.q_proj.weight_scale, "
     "model.layers.0.self_attn.q_proj.weight_shape do not decode as pack-quantized with their config group's scheme "
     "(ValueError: tensor column shape must be divisble by the given group_size 7 but got 64)"),
])
def test_a_compressed_tensors_folder_the_package_cannot_decode_is_refused_when_opened(tmp_path, group, message):
    pytest.importorskip("compressed_tensors")
    model = tiny_qwen3()
    assert ct_refusal(ct_group(tmp_path / "ct", model, group), model) == message


def test_a_stored_weight_shape_other_than_the_models_is_refused(tmp_path):
    pytest.importorskip("compressed_tensors")
    from safetensors.torch import load_file, save_file

    model = tiny_qwen3()
    ct = ct_group(tmp_path / "ct", model, {"targets": ["Linear"], "weights": W4G32})
    tensors = load_file(str(ct / "model.safetensors"))
    tensors[f"{Q_PROJ}.weight_shape"] = torch.tensor([64, 128], dtype=torch.int32)
    save_file(tensors, str(ct / "model.safetensors"))
    assert ct_refusal(ct, model) == (f"tensor {Q_PROJ}.weight_shape is [64, 128], the model's {Q_PROJ}.weight "
                                     "is [128, 64]")


def test_activations_that_are_not_an_object_are_refused_naming_the_field(tmp_path):
    folder = folder_with_config(tmp_path / "ct", {"config.json": json.dumps({"quantization_config": {
        "quant_method": "compressed-tensors",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": W4G32, "input_activations": "int8"}}}})})
    assert refused_artifact(folder, "compressed_tensors").endswith(
        f"{folder / 'config.json'}: quantization_config.config_groups.group_0.input_activations: a JSON object "
        "expected, found str ('int8')")


# ---- external artifacts: GPTQ / AWQ tensors, entries the safetensors package refuses, long metadata ---------

Q_PROJ = "model.layers.0.self_attn.q_proj"


def packed_folder(folder: Path, model, fmt: str, quant: dict | None = None, **change) -> Path:
    """A GPTQ (v1, int4, groups of 32) or AWQ folder for `model`: q_proj stored as zero words (codes and zero
    points 0), scales 1, every other tensor as the model's fp16 values; `change` replaces q_proj's parts."""
    from safetensors.torch import save_file

    folder.mkdir()
    out_f, in_f = model.get_submodule(Q_PROJ).weight.shape
    tensors = {n: p.detach().half().contiguous() for n, p in model.named_parameters() if n != f"{Q_PROJ}.weight"}
    parts = {"qweight": torch.zeros(in_f // 8, out_f, dtype=torch.int32) if fmt == "gptq"
             else torch.zeros(in_f, out_f // 8, dtype=torch.int32),
             "qzeros": torch.zeros(in_f // 32, out_f // 8, dtype=torch.int32),
             "scales": torch.ones(in_f // 32, out_f, dtype=torch.float16)}
    parts.update(change)
    tensors.update({f"{Q_PROJ}.{k}": v for k, v in parts.items()})
    save_file(tensors, str(folder / "model.safetensors"))
    quant = quant or ({"quant_method": "gptq", "bits": 4, "group_size": 32} if fmt == "gptq" else
                      {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True})
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3", "quantization_config": quant}))
    return folder


def opened(folder: Path, model, fmt: str):
    from quantatlas.quant.external.weights import open_artifact

    return open_artifact(ArtifactConfig(**{fmt: str(folder)}), model, "arms.x")


def packed_refusal(folder: Path, model, fmt: str) -> str:
    with pytest.raises(UserError) as e:
        opened(folder, model, fmt)
    assert e.value.field == "arms.x.artifact"
    return one_line(e)


@pytest.mark.parametrize("fmt,value", [("gptq", -1.0), ("awq", 0.0)])
def test_the_packed_folder_helper_writes_a_readable_checkpoint(tmp_path, fmt, value):
    # the refusals below are each about the one thing their folder changes; q = z = 0 stored decodes to
    # 1 * (0 - (0 + 1)) in GPTQ v1 (its zero points are stored less one), 1 * (0 - 0) in AWQ
    model = tiny_qwen3()
    opened(packed_folder(tmp_path / "p", model, fmt), model, fmt).load_into(model)
    assert torch.equal(model.get_submodule(Q_PROJ).weight, torch.full((128, 64), value))


@pytest.mark.parametrize("fmt,change,message", [
    ("gptq", {"qzeros": torch.zeros(2, 16, dtype=torch.float32)},
     f"tensor {Q_PROJ}.qzeros is F32, not int32 (packed zero points)"),         # was a ValueError at load time
    ("awq", {"qzeros": torch.zeros(2, 16, dtype=torch.float32)},
     f"tensor {Q_PROJ}.qzeros is F32, not int32 (packed zero points)"),
    ("gptq", {"g_idx": torch.zeros(0, dtype=torch.int32)},                       # was a RuntimeError (min of [])
     f"tensor {Q_PROJ}.g_idx: [0], not one group of 2 for each of 64 inputs"),
    ("gptq", {"g_idx": torch.full((64,), float("nan"))},                         # was a ValueError (int of nan)
     f"tensor {Q_PROJ}.g_idx is F32, not integer group indices"),
    ("gptq", {"g_idx": torch.full((64,), 2, dtype=torch.int32)},
     f"tensor {Q_PROJ}.g_idx: [64] with values in [2, 2], not one group of 2 for each of 64 inputs"),
    ("gptq", {"qweight": torch.zeros(0, 128, dtype=torch.int32)},
     f"tensor {Q_PROJ}.qweight is I32 [0, 128], not int32 [in·4/32, out]"),
    ("awq", {"qweight": torch.zeros(64, 0, dtype=torch.int32)},
     f"tensor {Q_PROJ}.qweight is I32 [64, 0], not int32 [in, out/8]"),
])
def test_packed_tensors_that_do_not_fit_are_refused_when_opened(tmp_path, fmt, change, message):
    model = tiny_qwen3()
    folder = packed_folder(tmp_path / "p", model, fmt, **change)
    assert packed_refusal(folder, model, fmt).endswith(f": {message}")


def rewrite_header(path: Path, edit) -> None:
    """`path`'s safetensors header passed through `edit`, written back at the same length (data unmoved)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    path.write_bytes(raw[:8] + new + b" " * (n - len(new)) + raw[8 + n:])


@pytest.mark.parametrize("edit,reason", [
    # a dtype the package does not know, where nothing of ours reads the dtype (an fp tensor's name)
    (lambda h: h["model.norm.weight"].update(dtype="F61"), "invalid JSON in header: unknown variant `F61`"),
    # bytes that do not fit the shape: F32 [64] over the 128 bytes of F16 [64]
    (lambda h: h["model.norm.weight"].update(dtype="F32"), "invalid shape, data type, or offset for tensor"),
])
def test_a_header_entry_the_safetensors_package_refuses_is_refused_when_opened(tmp_path, edit, reason):
    # both were a SafetensorError traceback when the tensor was first read (loading the weights)
    model = tiny_qwen3()
    folder = packed_folder(tmp_path / "p", model, "gptq")
    rewrite_header(folder / "model.safetensors", edit)
    msg = packed_refusal(folder, model, "gptq")
    assert f": {folder / 'model.safetensors'}: not a readable safetensors file (Error while deserializing header: " \
           f"{reason}" in msg


def test_long_provenance_metadata_is_cut_not_a_traceback(tmp_path):
    # Provenance holds tool 200, version 100, scheme 500 characters: longer metadata was a ValidationError
    from quantatlas.quant.external.stored import read_listing

    model = tiny_qwen3()
    gptq = packed_folder(tmp_path / "g", model, "gptq", quant={"quant_method": "gptq", "bits": 4, "group_size": 32,
                                                               "meta": {"quantizer": ["t" * 300 + ":" + "9" * 300]}})
    prov = read_listing("gptq", gptq).provenance
    assert prov.tool == "t" * 197 + "..." and prov.version == "9" * 97 + "..."
    ct = folder_with_config(tmp_path / "ct", {"config.json": json.dumps({"quantization_config": {
        "quant_method": "compressed-tensors", "version": "1" * 150,
        "config_groups": {f"group_{i}": {"targets": [f"re:layers[.]{i}[.]"], "weights": W4G32} for i in range(20)}}})})
    prov = read_listing("compressed_tensors", ct).provenance
    assert len(prov.scheme) == 500 and prov.scheme.startswith("weights int4 group 32 sym; ") and \
        prov.scheme.endswith("...") and prov.version == "1" * 97 + "..."


def test_gguf_metadata_of_another_type_or_length_is_read_not_a_traceback(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from quantatlas.quant.external.stored import read_listing

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_array("general.file_type", [1, 2])                 # a list where llama.cpp writes a number: TypeError
    w.add_string("general.quantized_by", "x" * 500)          # past Provenance's 200 characters: ValidationError
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    prov = read_listing("gguf", path).provenance
    assert prov.scheme == "file type [1, 2]"
    assert prov.tool == ("GGUF, quantized by " + "x" * 500)[:197] + "..."


# ---- quantatlas reference train -----------------------------------------------------------------

@pytest.fixture
def no_training(monkeypatch):
    """Anything `train` would build or read first fails the test: a refusal must come before it."""
    import quantatlas.reference.train as train_module

    def computed(*a, **k):
        raise AssertionError("training started: the configuration should have been refused before")
    monkeypatch.setattr(train_module, "stdlib_tokens", computed)
    monkeypatch.setattr(train_module, "causal_lm_class", computed)
    return train_module


BAD_TRAIN = [
    ({"steps": 0}, "steps", "field steps: 0 is not a positive integer"),
    ({"steps": -5}, "steps", "field steps: -5 is not a positive integer"),
    ({"batch_size": 0}, "batch_size", "field batch_size: 0 is not a positive integer"),
    ({"seq_len": 0}, "seq_len", "field seq_len: 0 is not a positive integer"),
    ({"seq_len": -1}, "seq_len", "field seq_len: -1 is not a positive integer"),
    ({"seq_len": 1025}, "seq_len", "field seq_len: 1025 is more than the {arch} model's context "
                                   "(max_position_embeddings 1024)"),
    ({"val_tokens": 100, "seq_len": 128}, "val_tokens", "field val_tokens: 100 is fewer than seq_len 128 (validation "
                                                        "scores whole windows of seq_len tokens)"),
    ({"device": "nope"}, "device", "field device: 'nope' is not a torch device (cpu, cuda, cuda:1 ...)"),
    ({"device": "meta"}, "device", "field device: 'meta' holds no numbers to compute with"),
]


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen3_moe"])
@pytest.mark.parametrize("bad,field,message", BAD_TRAIN)
def test_train_refuses_a_bad_configuration_before_any_compute(no_training, arch, bad, field, message):
    cfg = no_training.TrainConfig(**bad)
    with pytest.raises(UserError) as e:
        no_training.train(cfg, Path("/nonexistent/never-written"), arch=arch)
    assert e.value.field == field and one_line(e) == message.format(arch=arch)


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen3_moe"])
def test_seq_len_up_to_the_models_context_is_accepted(arch):
    from quantatlas.reference.model import reference_config
    from quantatlas.reference.train import TrainConfig, check_config

    assert reference_config(arch).max_position_embeddings == 1024   # the embedded configs' context
    check_config(TrainConfig(seq_len=1024), arch)                   # the boundary itself trains
    check_config(TrainConfig(steps=1, batch_size=1, seq_len=16, val_tokens=32), arch)
    with pytest.raises(UserError, match="^field seq_len: 1025 "):
        check_config(TrainConfig(seq_len=1025), arch)


def test_a_device_torch_names_but_this_machine_lacks_is_refused(no_training):
    if torch.cuda.is_available():
        bad = f"cuda:{torch.cuda.device_count()}"    # one past the last GPU
    else:
        bad = "cuda"
    with pytest.raises(UserError) as e:
        no_training.train(no_training.TrainConfig(device=bad), arch="qwen3")
    assert e.value.field == "device" and one_line(e).startswith(f"field device: {bad!r} is not available here (")


@pytest.mark.parametrize("args,stderr", [
    (["--steps", "0"], "error: field steps: 0 is not a positive integer"),
    (["--batch-size", "-2"], "error: field batch_size: -2 is not a positive integer"),
    (["--seq-len", "0"], "error: field seq_len: 0 is not a positive integer"),
    (["--seq-len", "2048"], "error: field seq_len: 2048 is more than the qwen3 model's context "
                            "(max_position_embeddings 1024)"),
    (["--seq-len", "1025", "--arch", "qwen3_moe"], "error: field seq_len: 1025 is more than the qwen3_moe "
                                                   "model's context (max_position_embeddings 1024)"),
    (["--device", "nope"], "error: field device: 'nope' is not a torch device (cpu, cuda, cuda:1 ...)"),
    (["--device", "meta"], "error: field device: 'meta' holds no numbers to compute with"),
    (["--arch", "mixtral"], "error: field arch: 'mixtral' is not one of qwen3, llama, qwen3_moe"),
])
def test_the_train_command_refuses_in_one_line_without_training(tmp_path, monkeypatch, args, stderr):
    import quantatlas.reference.train as train_module

    def fake_train(*a, **k):
        raise AssertionError("train was called: the option should have been refused before")
    monkeypatch.setattr(train_module, "train", fake_train)
    r = CliRunner().invoke(app, ["reference", "train", *args, "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert r.stderr.strip() == stderr
    assert not (tmp_path / "out").exists()


def test_the_train_command_passes_good_options_through(tmp_path, monkeypatch):
    import quantatlas.reference.train as train_module

    seen = {}

    def fake_train(cfg, out_dir=None, progress=None, arch="qwen3"):
        seen.update(cfg=cfg, arch=arch)
        return {"validation_bits_per_byte": 2.0, "train_seconds": 0.0}
    monkeypatch.setattr(train_module, "train", fake_train)
    r = CliRunner().invoke(app, ["reference", "train", "--steps", "1", "--batch-size", "1", "--seq-len", "1024",
                                 "--arch", "llama", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert (seen["cfg"].steps, seen["cfg"].batch_size, seen["cfg"].seq_len, seen["arch"]) == (1, 1, 1024, "llama")


# ---- bench/gaussian_mse.py: --codecs and --trellis-L ------------------------------------------------

@pytest.fixture
def bench(monkeypatch):
    """bench/gaussian_mse.py as a module, with its sampling and measuring replaced by failures: the
    argument checks must refuse before either runs."""
    path = Path(__file__).resolve().parents[1] / "bench" / "gaussian_mse.py"
    spec = importlib.util.spec_from_file_location("gaussian_mse_bench_errors", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)     # dataclasses look their module up there
    spec.loader.exec_module(module)

    def computed(*a, **k):
        raise AssertionError("the bench sampled or measured: the arguments should have been refused before")
    monkeypatch.setattr(module, "samples_for", computed)
    monkeypatch.setattr(module, "run_all", computed)
    return module


@pytest.mark.parametrize("args,message", [
    (["--trellis-L", "x"], "error: --trellis-L: comma-separated integers, got 'x'"),
    (["--trellis-L", "12,sixteen"], "error: --trellis-L: comma-separated integers, got '12,sixteen'"),
    (["--trellis-L", "12.5"], "error: --trellis-L: comma-separated integers, got '12.5'"),
    (["--trellis-L", "0"], "error: --trellis-L: each L must be 2..16 (the trellis's state bits), got [0]"),
    (["--trellis-L", "12,40"], "error: --trellis-L: each L must be 2..16 (the trellis's state bits), got [40]"),
    (["--codecs", "q8_0,"], "error: --codecs: an empty codec name in 'q8_0,'"),
    (["--codecs", "nope"], "error: --codecs: no runs for nope (codecs here: "),
    (["--codecs", "q8_0,zzz,aaa"], "error: --codecs: no runs for aaa, zzz (codecs here: "),
])
def test_the_gaussian_bench_refuses_bad_arguments_before_running(bench, tmp_path, capsys, args, message):
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        bench.main([*args, "--out", str(out)])
    assert e.value.code == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if "error:" in l]
    assert len(lines) == 1 and message in lines[0], lines
    if "no runs" in message:   # the codecs it offers are the ones it has
        assert "q8_0" in lines[0] and "trellis" in lines[0]
    assert not out.exists()


# ---- an override whose match hits no tensor of the model -----------------------------------------------

def arm_of(arm: dict):
    from quantatlas.spec import parse_spec

    return parse_spec({"title": "t", "arms": {"a": arm}}).arms["a"]


def never_calibrated():
    from quantatlas.quant.pipeline import Calibration

    def load():
        raise AssertionError("the calibration stream was read: the override should have been refused at planning")
    return Calibration(load=load, samples=2, seq_len=16)


MOE_ROLES = "embed, q, k, v, o, q_norm, k_norm, expert_gate, expert_up, expert_down, router, norm, head"


@pytest.mark.parametrize("match", ["down", "gate", "up"])
def test_a_dense_role_on_a_mixture_of_experts_is_refused_at_planning(match):
    from quantatlas.context import RunContext
    from quantatlas.quant.pipeline import quantize

    arm = arm_of({"solver": "gptq", "codec": {"uniform": {"bits": 4, "group": 16}},
                  "overrides": [{"match": "q", "codec": None}, {"match": match, "codec": "q8_0"}]})
    with pytest.raises(UserError) as e:
        quantize(loaded(tiny_moe(), "tiny-moe"), arm, never_calibrated(), RunContext(0), where="arms.a")
    assert e.value.field == "arms.a.overrides.1.match"
    assert one_line(e) == (f"arms.a.overrides.1.match: {match!r} (a role) matches no tensor of model 'tiny-moe', "
                           f"whose roles are {MOE_ROLES}: the override would change nothing")


def test_a_run_refuses_the_override_before_the_reference_logits(monkeypatch):
    import quantatlas.runner
    from quantatlas.runner import run_spec

    def evaluated(*a, **k):
        raise AssertionError("the reference logits were computed: the override should have been refused before")
    monkeypatch.setattr(quantatlas.runner, "reference_logprobs", evaluated)
    spec = {"title": "t", "data": {"eval": {"tokens": 512, "ctx": 64}, "calib": {"samples": 2, "seq_len": 32}},
            "arms": {"int4": {"codec": {"uniform": {"bits": 4, "group": 16}}},
                     "down8": {"codec": {"uniform": {"bits": 4, "group": 16}},
                               "overrides": [{"match": r"mlp\.down_proj", "codec": "q8_0"}]}}}
    with pytest.raises(UserError) as e:
        run_spec(spec, loaded=loaded(tiny_moe(), "tiny-moe"), ledger=False, log=lambda m: None, device="cpu")
    assert e.value.field == "arms.down8.overrides.0.match"
    assert one_line(e).startswith("arms.down8.overrides.0.match: 'mlp\\\\.down_proj' (a regex searched in the "
                                  "module names) matches no tensor of model 'tiny-moe', whose roles are embed, ")


def test_an_overrides_tiled_codec_that_does_not_fill_a_matrix_is_refused_naming_the_override():
    """The head's 258 rows do not fill 16-row trellis tiles: the field is the override that gave it that codec."""
    from quantatlas.runner import Sweep

    spec = {"title": "t", "model": "reference", "seeds": [0], "data": {"eval": {"tokens": 2048, "ctx": 256}},
            "arms": {"a": {"codec": {"uniform": {"bits": 4}}, "include_head": True,
                           "overrides": [{"match": "lm_head", "codec": {"trellis": {"bits": 2, "L": 8,
                                                                                    "tile_rows": 16}}}]}}}
    with pytest.raises(UserError) as e:
        Sweep(spec, ledger=False, log=lambda m: None, device="cpu")
    assert e.value.field == "arms.a.overrides.0.codec.tile_rows"
    assert one_line(e) == ("arms.a.overrides.0.codec.tile_rows: lm_head: trellis tiles of 16 rows × 16 columns "
                           "need a matrix whose rows are a multiple of 16; got 258 rows")


@pytest.mark.parametrize("arm, field, words", [
    ({"codec": {"uniform": {"bits": 4, "group": 7}}}, "arms.a.codec",
     "arms.a.codec: model.layers.0.self_attn.q_proj: uniform: 256 columns are not a multiple of group size 7"),
    ({"codec": {"uniform": {"bits": 4, "group": 128}},
      "overrides": [{"match": "down", "codec": {"gptvq": {"bits": 2, "dim": 2, "group": 512}}}]},
     "arms.a.overrides.0.codec", "arms.a.overrides.0.codec: model.layers.0.mlp.down_proj: gptvq: "),
    ({"codec": {"e8p": {"bits": 2, "group": 1000}}}, "arms.a.codec", "e8p: 256 columns are not a multiple of"),
    ({"codec": {"uniform": {"bits": 4, "group": 128}}, "allocate": {"candidates": [{"uniform": {"bits": 3, "group": 7}}],
                                                                    "target": {"bits_per_weight": 3.5}}},
     "arms.a.allocate.candidates.0", "arms.a.allocate.candidates.0: model.layers.0.self_attn.q_proj: uniform: 256 "),
    ({"kv": {"k": {"uniform": {"bits": 4, "group": 48}}}}, "arms.a.kv.k",
     "arms.a.kv.k: uniform: 64 columns are not a multiple of group size 48 (rows of 64 values with token granularity)"),
])
def test_a_codec_group_that_does_not_divide_a_matrix_is_refused_before_any_compute(monkeypatch, arm, field, words):
    """A group (or block) width that some matrix's columns (or a KV cache row) are not a multiple of used to stop
    the run mid-way, after the reference logits and calibration: it is refused with the arm, naming the field
    and the matrix."""
    import quantatlas.runner
    from quantatlas.runner import run_spec

    def evaluated(*a, **k):
        raise AssertionError("the reference logits were computed: the codec should have been refused before")
    monkeypatch.setattr(quantatlas.runner, "reference_logprobs", evaluated)
    spec = {"title": "t", "model": "reference", "seeds": [0], "data": {"eval": {"tokens": 512, "ctx": 64}},
            "arms": {"ok": {"codec": {"uniform": {"bits": 4, "group": 128}}}, "a": arm}}
    with pytest.raises(UserError) as e:
        run_spec(spec, ledger=False, log=lambda m: None, device="cpu")
    assert e.value.field == field
    assert words in one_line(e)


def test_a_moe_block_on_a_dense_model_is_refused_before_any_compute(monkeypatch):
    import quantatlas.runner
    from quantatlas.runner import run_spec

    def evaluated(*a, **k):
        raise AssertionError("the reference logits were computed: moe: should have been refused before")
    monkeypatch.setattr(quantatlas.runner, "reference_logprobs", evaluated)
    spec = {"title": "t", "model": "reference", "data": {"eval": {"tokens": 512, "ctx": 64}},
            "arms": {"a": {"solver": "gptq", "codec": {"uniform": {"bits": 4}}, "moe": {"starved": "fp16"}}}}
    with pytest.raises(UserError) as e:
        run_spec(spec, ledger=False, log=lambda m: None, device="cpu")
    assert e.value.field == "arms.a.moe"
    assert one_line(e) == "arms.a.moe: reference has no mixture-of-experts blocks to calibrate"


@pytest.mark.parametrize("arm, field, words", [
    ({"codec": None, "recovery": {"method": "block_ap", "steps": 2}}, "arms.a.recovery",
     "recovery: block_ap tunes quantized weights, and the arm quantizes none"),
    ({"codec": {"e8p": {"bits": 2}}, "recovery": {"method": "pv_lite", "steps": 2}}, "arms.a.recovery",
     "recovery: pv_lite moves the codes of uniform; codec is e8p (use kd_ste)"),
    ({"codec": {"uniform": {"bits": 2, "group": 128}}, "overrides": [{"match": "down", "codec": {"trellis": {"bits": 2}}}],
      "recovery": {"method": "pv_tuning", "steps": 2}}, "arms.a.recovery",
     "pv_tuning moves the codes of uniform, e8p, d4, e8, aqlm; overrides.0.codec is trellis"),
    ({"codec": {"e8p": {"bits": 2}}, "overrides": [{"match": "up", "codec": "q8_0"}],
      "recovery": {"method": "kd_ste", "steps": 2}}, "arms.a.recovery.train",
     "arms.a.recovery.train: scales needs a pack with a per-row/group fp16 `scale`; codec q8_0 stores ['blocks']"),
    ({"codec": {"mx": {"element": "fp4_e2m1"}}, "recovery": {"method": "kd_ste", "steps": 2}}, "arms.a.recovery.train",
     "codec mx stores ['codes', 'scales'] (use train: weights)"),
    ({"solver": "gptq", "solver_options": {"incoherence": True}, "codec": {"uniform": {"bits": 4, "group": 128}},
      "ttt": {"params": "scales"}}, "arms.a.ttt", "incoherence packs keep their scales in a rotated basis"),
    ({"codec": {"uniform": {"bits": 4, "group": 128}}, "overrides": [{"match": "q", "codec": "q8_0"}],
      "ttt": {"params": "scales"}}, "arms.a.ttt.params",
     "arms.a.ttt.params: scales: model.layers.0.self_attn.q_proj's codec q8_0 stores no per-row/group fp16 scale"),
    ({"codec": {"gguf": "Q8_0"}, "act": "llamacpp_cpu", "ttt": {"params": "lora"}}, "arms.a.ttt",
     "act: llamacpp_cpu computes its dot products as llama.cpp does, with no gradient"),
    ({"codec": {"nvfp4": {}}, "act": "llamacpp_cpu"}, "arms.a.act.scheme",
     "llamacpp_cpu needs llama.cpp weight types; model.layers.0.self_attn.q_proj uses codec 'nvfp4'"),
])
def test_a_recovery_ttt_or_act_that_cannot_take_the_arms_packs_is_refused_before_any_compute(monkeypatch, arm, field,
                                                                                            words):
    """These were found by mutating committed arms (a codec, an override, a recovery block taken from another
    arm): each stopped the run after its weights were quantized, or (no codec at all) with an AttributeError."""
    import quantatlas.runner
    from quantatlas.runner import run_spec

    def evaluated(*a, **k):
        raise AssertionError("the reference logits were computed: the arm should have been refused before")
    monkeypatch.setattr(quantatlas.runner, "reference_logprobs", evaluated)
    spec = {"title": "t", "model": "reference", "data": {"eval": {"tokens": 512, "ctx": 64}}, "arms": {"a": arm}}
    with pytest.raises(UserError) as e:
        run_spec(spec, ledger=False, log=lambda m: None, device="cpu")
    assert e.value.field == field and words in one_line(e)


def test_planning_itself_refuses_it_where_quantize_model_is_called_directly():
    from quantatlas.quant.quantize import quantize_model
    from quantatlas.quant.recipe import build_recipe

    model = tiny_qwen3()
    recipe = build_recipe(arm_of({"codec": "q8_0", "overrides": [{"match": "expert_down", "codec": None}]}),
                          "arms.a")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(UserError) as e:
        quantize_model(model, recipe, None, 0)
    assert e.value.field == "arms.a.overrides.0.match"
    assert one_line(e).startswith("arms.a.overrides.0.match: 'expert_down' (a role) matches no tensor of model "
                                  "'Qwen3ForCausalLM', whose roles are embed, q, k, v, o, q_norm, k_norm, ")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())   # nothing was quantized


def test_tensors_the_arm_does_not_quantize_are_named_as_such():
    from quantatlas.context import RunContext
    from quantatlas.quant.pipeline import quantize

    lm = loaded(tiny_qwen3(), "tiny")
    with pytest.raises(UserError) as e:   # the head is quantized only with include_head
        quantize(lm, arm_of({"codec": "q4_0", "overrides": [{"match": "head", "codec": "q8_0"}]}),
                 never_calibrated(), RunContext(0), where="arms.a")
    assert one_line(e) == ("arms.a.overrides.0.match: 'head' hits only head of model 'tiny', which this arm does not "
                           "quantize (the head needs include_head: true): the override would change nothing")
    with pytest.raises(UserError) as e:   # a llama.cpp mixture quantizes no norm vector
        quantize(lm, arm_of({"codec": {"gguf": "Q4_K_M"}, "overrides": [{"match": "norm", "codec": "q8_0"}]}),
                 never_calibrated(), RunContext(0), where="arms.b")
    assert e.value.field == "arms.b.overrides.0.match"
    assert one_line(e) == ("arms.b.overrides.0.match: 'norm' hits only norm of model 'tiny', which this arm does not "
                           "quantize: the override would change nothing")


def test_overrides_that_hit_plan_as_before():
    from quantatlas.quant.quantize import tensors_to_quantize
    from quantatlas.quant.recipe import build_recipe

    experts_down = {f"model.layers.{layer}.mlp.experts.{e}.down_proj" for layer in (0, 1) for e in range(4)}
    cases = [(tiny_moe(), {"codec": "q4_0", "overrides": [{"match": "expert_down", "codec": "q8_0"},
                                                          {"match": r"layers\.1\..*experts\.3\.up_proj",
                                                           "codec": None}]},
              experts_down | {"model.layers.1.mlp.experts.3.up_proj"}),
             (tiny_qwen3(), {"codec": "q4_0", "include_head": True,
                             "overrides": [{"match": "down", "codec": "q8_0"}, {"match": "head", "codec": "q8_0"},
                                           {"match": "k_norm", "codec": "q8_0"}]},
              {"model.layers.0.mlp.down_proj", "lm_head", "model.layers.0.self_attn.k_norm"})]
    for model, arm, expected in cases:
        recipe = build_recipe(arm_of(arm), "arms.a")
        plans = recipe.plan(tensors_to_quantize(model, recipe), model)
        default = {p.name: None if p.role in ("router", "norm", "q_norm", "k_norm") else recipe.codec for p in plans}
        assert {p.name for p in plans if p.codec is not default[p.name]} == expected
        recipe.check_overrides(tensors_to_quantize(model, recipe), model)   # no refusal


def test_the_command_line_refuses_a_dense_role_on_reference_moe_at_its_spec_line(tmp_path):
    from quantatlas.reference.model import reference_weights

    if not reference_weights("reference-moe").exists():
        pytest.skip("reference-moe's checkpoint is not committed here")
    spec = tmp_path / "spec.yaml"
    spec.write_text("title: t\nmodel: reference-moe\narms:\n  int4: {codec: q4_0}\n  down8:\n    codec: q4_0\n"
                    "    overrides:\n      - {match: down, codec: q8_0}\n")
    r = CliRunner().invoke(app, ["run", str(spec), "--quiet", "--db", f"sqlite:///{tmp_path / 'a.db'}"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert r.stderr.strip().splitlines() == [
        f"error: {spec}:8: arms.down8.overrides.0.match: 'down' (a role) matches no tensor of model 'reference-moe', "
        "whose roles are embed, q, k, v, o, q_norm, k_norm, expert_gate, expert_up, expert_down, router, norm, head: "
        "the override would change nothing"]
    assert not (tmp_path / "a.db").exists()   # refused before the ledger was opened
