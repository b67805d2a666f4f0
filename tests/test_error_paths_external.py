"""User mistakes refused in one line, naming the file, field and value, before any compute: malformed
external artifacts (safetensors headers, configs that are not JSON objects, an unknown compressed-tensors
format), `quantatlas reference train`'s options (device, sizes, a seq_len past the model's context),
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
    (safetensors_bytes(HEADER[:10], len(HEADER), b""), "not a readable safetensors file (Unterminated string"),
    (safetensors_bytes(HEADER, 1 << 40), f"not a readable safetensors file (header of {1 << 40} bytes)"),
    (safetensors_bytes(b"notjson!"), "not a readable safetensors file (Expecting value"),
    (safetensors_bytes(b"[1, 2]"), "not a readable safetensors file (its header is not a JSON object)"),
    (safetensors_bytes(b'"w"'), "not a readable safetensors file (its header is not a JSON object)"),
    (safetensors_bytes(b'{"w": {"dtype": "F32"}}'), "tensor w: not a safetensors header entry (dtype, shape, "
                                                    "data_offsets): KeyError"),
    (safetensors_bytes(b'{"w": {"dtype": "F32", "shape": "ab", "data_offsets": [0, 8]}}'),
     "tensor w: not a safetensors header entry"),
    (safetensors_bytes(HEADER, data=b"\0" * 3), "tensor w is cut short (5 of its 8 bytes missing)"),  # data cut
])
def test_a_malformed_safetensors_file_is_refused_naming_the_file(tmp_path, blob, reason):
    folder = gptq_folder(tmp_path / "g", blob)
    msg = refused_artifact(folder)
    assert f"{folder / 'model.safetensors'}: {reason}" in msg


def test_a_header_length_past_the_end_of_the_file_is_refused(tmp_path):
    # the length says 1000 more bytes than the file holds: either the header JSON is cut (not JSON), or,
    # where what is there parses, its tensors lie past the end of the file
    for i, blob in enumerate([safetensors_bytes(HEADER[:-1], len(HEADER) + 1000, b""),
                              safetensors_bytes(HEADER, len(HEADER) + 1000, b"")]):
        folder = gptq_folder(tmp_path / f"g{i}", blob)
        msg = refused_artifact(folder)
        assert f"{folder / 'model.safetensors'}: " in msg
        assert ("not a readable safetensors file" in msg) if i == 0 else ("tensor w is cut short" in msg)


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


def test_a_quantization_config_that_is_not_an_object_is_refused(tmp_path):
    # quantization_config: "gptq" (a string) is no config: nothing in it is read, and the arm is refused
    # for the quant_method it then lacks, naming the folder and the field
    folder = folder_with_config(tmp_path / "a", {"config.json": json.dumps({"model_type": "qwen3",
                                                                            "quantization_config": "gptq"})})
    msg = refused_artifact(folder, "gptq")
    assert f"{folder}: a GPTQ (HF checkpoint) artifact needs quantization_config.quant_method 'gptq'" in msg
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
    ({"device": "meta"}, "device", "field device: 'meta' holds no numbers to train"),
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
    (["--device", "meta"], "error: field device: 'meta' holds no numbers to train"),
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
    if "--codecs" in args:   # the codecs it offers are the ones it has
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
