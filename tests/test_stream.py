"""Layer streaming (quantatlas/models/stream.py): a tiny sharded HF folder read one decoder layer at
a time gives the in-memory model's logits, the same GPTQ codes and the same runner results."""
import copy
import json

import numpy as np
import pytest
import torch

from quantatlas.eval.windows import make_eval_set, scored_logits
from quantatlas.models.load import load_model
from quantatlas.quant.streamed import quantize_streamed
from quantatlas.models.stream import (ShardReader, StreamedModel, StreamError, load_packed,
                                      should_stream, stream_mode)
from quantatlas.quant.quantize import quantize_model
from quantatlas.quant.recipe import build_recipe
from quantatlas.spec import Arm

VOCAB = 300


def _save_tiny(folder, family: str, dtype, tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # a less flat output distribution than the default init
        for n, p in model.named_parameters():
            if "norm" in n:  # norms away from 1, so a wrong or missing norm shows
                p.add_(0.1 * torch.randn_like(p))
    model = model.to(dtype)
    model.save_pretrained(folder, max_shard_size="40KB")
    return model


@pytest.fixture(scope="module")
def qwen_fp16(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3_fp16_untied")
    _save_tiny(d, "qwen3", torch.float16, tied=False)
    return d


@pytest.fixture(scope="module")
def llama_bf16_tied(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama_bf16_tied")
    _save_tiny(d, "llama", torch.bfloat16, tied=True, seed=1)
    return d


def _eval_set(n_windows=3, ctx=48, seed=0):
    toks = np.random.default_rng(seed).integers(0, VOCAB, n_windows * ctx)
    return make_eval_set(toks, n_windows * ctx, ctx)


def _calib(seed=1):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, VOCAB, (6, 40)))


def test_shard_reader_is_the_saved_tensors(qwen_fp16):
    from safetensors.torch import load_file

    index = json.loads((qwen_fp16 / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3  # really sharded
    reader = ShardReader([qwen_fp16])
    assert set(reader.entries) == set(index["weight_map"])
    for name, file in list(index["weight_map"].items())[:8]:
        want = load_file(qwen_fp16 / file)[name]
        got = reader.tensor(name)
        assert got.dtype == want.dtype == torch.float16 and torch.equal(got, want)


@pytest.mark.parametrize("folder", ["qwen_fp16", "llama_bf16_tied"])
def test_streamed_logits_equal_in_memory(folder, request):
    d = request.getfixturevalue(folder)
    lm = load_model(str(d), stream=False)
    sm = StreamedModel(d)
    assert all(p.is_meta for p in sm.model.parameters())
    es = _eval_set()
    want = torch.cat([x for _, x in scored_logits(lm.model, es, 2, "cpu")])
    got = torch.cat([x for _, x in sm.scored_logits(es, 2, chunk=128)])  # head in 3 row chunks
    assert got.shape == want.shape == (es.n_scored, VOCAB)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (sm.head_name == sm.embed_name) == (folder == "llama_bf16_tied")


@pytest.mark.parametrize("arm", [
    dict(solver="gptq", codec={"uniform": {"bits": 3, "group": 32}}),
    dict(solver="gptaq", codec={"uniform": {"bits": 3, "group": 32}}, propagation="parallel",
         overrides=[{"match": "down", "codec": "q8_0", "solver": "rtn"}]),
])
def test_streamed_gptq_equals_in_memory(qwen_fp16, tmp_path, arm):
    lm = load_model(str(qwen_fp16), stream=False)
    model = copy.deepcopy(lm.model)
    calib = _calib()
    packed = quantize_model(model, build_recipe(Arm(**arm)), calib, 0)
    sm = StreamedModel(qwen_fp16)
    summary = quantize_streamed(sm, build_recipe(Arm(**arm)), calib, 0, tmp_path / "out")  # batches of 8 as in memory
    got = load_packed(tmp_path / "out")
    assert set(got) == set(packed) and len(packed) == 2 * 7
    for name, p in packed.items():
        assert got[name].codec == p.codec and got[name].shape == p.shape
        for key, t in p.data.items():
            assert torch.equal(got[name].data[key], t), (name, key)
    # the written layers are the in-memory quantized weights, and they give its logits
    reader = ShardReader([tmp_path / "out"])
    state = model.state_dict()
    for name in [n for n in reader.entries if n.startswith("model.layers.") and "::" not in n]:
        assert torch.equal(reader.tensor(name), state[name]), name
    es = _eval_set(seed=2)
    want = torch.cat([x for _, x in scored_logits(model, es, 2, "cpu")])
    got_logits = torch.cat([x for _, x in sm.over(tmp_path / "out").scored_logits(es, 2)])
    torch.testing.assert_close(got_logits, want, rtol=1e-5, atol=1e-5)
    q_params = sum(p.shape[0] * p.shape[1] for p in packed.values())
    assert summary["quantized_params"] == q_params
    assert summary["bits_per_weight"] == pytest.approx(8 * sum(p.nbytes for p in packed.values()) / q_params)


def _spec(folder, arms):
    return {"title": "stream", "model": str(folder), "seeds": [0],
            "data": {"eval": {"tokens": 3 * 48, "ctx": 48, "source": str(folder / "eval.txt")},
                     "calib": {"samples": 4, "seq_len": 32, "source": str(folder / "eval.txt")}},
            "arms": arms}


def test_runner_streamed_equals_in_memory(llama_bf16_tied, tmp_path, monkeypatch):
    from quantatlas.runner import run_spec

    monkeypatch.setenv("QUANTATLAS_CACHE", str(tmp_path / "cache"))
    text = "".join(chr(32 + (i * 7919) % 90) for i in range(4000))
    (llama_bf16_tied / "eval.txt").write_text(text)  # no tokenizer: bytes are tokens (< VOCAB)
    arms = {"fp16": {"codec": None},
            "gptq": {"solver": "gptq", "codec": {"uniform": {"bits": 3, "group": 32}}, "include_head": True}}
    spec = _spec(llama_bf16_tied, arms)
    quiet = dict(ledger=False, compress=False, log=lambda m: None, device="cpu")
    mem = run_spec(spec, loaded=load_model(str(llama_bf16_tied), stream=False), **quiet)
    lm = load_model(str(llama_bf16_tied), stream=True)
    assert lm.backend == "stream" and lm.n_params == mem["n_params"]
    monkeypatch.setenv("QUANTATLAS_CACHE", str(tmp_path / "cache2"))  # reference logits streamed too
    st = run_spec(spec, loaded=lm, **quiet)
    assert st["eval_fingerprint"] == mem["eval_fingerprint"]
    for arm in arms:
        a, b = mem["arms"][arm]["seeds"]["0"], st["arms"][arm]["seeds"]["0"]
        for k in ("bits_per_weight", "bits_per_param", "bytes_packed"):
            assert b[k] == a[k], (arm, k)
        assert b["kld_mean"] == pytest.approx(a["kld_mean"], rel=1e-3, abs=1e-6), arm
        assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-4), arm
    assert st["arms"]["fp16"]["seeds"]["0"]["kld_mean"] < 1e-9 < st["arms"]["gptq"]["seeds"]["0"]["kld_mean"]
    import gc

    gc.collect()  # the quantized layers' temporary folders go with their models
    assert (tmp_path / "cache2" / "stream").is_dir() and not list((tmp_path / "cache2" / "stream").iterdir())


def test_streaming_refuses_whole_model_steps(qwen_fp16, tmp_path):
    from quantatlas.runner import run_spec

    (qwen_fp16 / "eval.txt").write_text("abc def " * 100)
    lm = load_model(str(qwen_fp16), stream=True)
    spec = _spec(qwen_fp16, {"rot": {"codec": {"uniform": {"bits": 4}}, "transforms": [{"hadamard": {}}]}})
    with pytest.raises(StreamError, match=r"arms\.rot\.transforms: transforms need the whole model; set QUANTATLAS_STREAM=0"):
        run_spec(spec, loaded=lm, ledger=False, compress=False, log=lambda m: None, device="cpu")


def test_stream_choice(qwen_fp16, monkeypatch):
    monkeypatch.setenv("QUANTATLAS_STREAM", "1")
    assert stream_mode() is True and stream_mode(False) is False
    assert load_model(str(qwen_fp16)).backend == "stream"
    monkeypatch.setenv("QUANTATLAS_STREAM", "auto")
    assert stream_mode() is None
    monkeypatch.setenv("QUANTATLAS_STREAM", "sometimes")
    with pytest.raises(StreamError, match="QUANTATLAS_STREAM: expected 1, 0 or auto, got 'sometimes'"):
        stream_mode()
    monkeypatch.setenv("QUANTATLAS_STREAM", "auto")
    assert should_stream(qwen_fp16) is False  # a few hundred kB against the machine's memory
    assert should_stream(qwen_fp16, fraction=1e-12) is True
    assert load_model(str(qwen_fp16)).backend == "memory"


def test_kv_and_act_steps_act_in_streamed_evaluation(qwen_fp16, tmp_path, monkeypatch):
    from quantatlas.runner import run_spec

    (qwen_fp16 / "eval.txt").write_text("".join(chr(32 + (i * 7919) % 90) for i in range(2000)))
    arm = {"codec": {"uniform": {"bits": 4, "group": 32}}, "act": {"codec": {"uniform": {"bits": 6, "group": None}}},
           "kv": {"k": {"uniform": {"bits": 4, "group": 16}}, "v": {"uniform": {"bits": 3, "group": 16}}}}
    spec = _spec(qwen_fp16, {"rt": arm, "w": {"codec": {"uniform": {"bits": 4, "group": 32}}}})
    quiet = dict(ledger=False, compress=False, log=lambda m: None, device="cpu")
    monkeypatch.setenv("QUANTATLAS_CACHE", str(tmp_path / "a"))
    mem = run_spec(spec, loaded=load_model(str(qwen_fp16), stream=False), **quiet)["arms"]
    monkeypatch.setenv("QUANTATLAS_CACHE", str(tmp_path / "b"))
    st = run_spec(spec, loaded=load_model(str(qwen_fp16), stream=True), **quiet)["arms"]
    a, b = mem["rt"]["seeds"]["0"], st["rt"]["seeds"]["0"]
    for k in ("kv_bits", "act_bits", "bits_per_param"):
        assert b[k] == a[k], k
    assert b["kld_mean"] == pytest.approx(a["kld_mean"], rel=1e-4)
    assert b["kld_mean"] > st["w"]["seeds"]["0"]["kld_mean"]  # the hooks did act on the streamed layers


def test_a_failing_solver_leaves_the_weights_as_they_were(qwen_fp16, monkeypatch):
    """A Linear's own weight is released while a solver works on its copy; when the solver raises,
    the weight is put back (the model stays usable), and a finished solve leaves Ŵ as a Parameter."""
    import sys

    gptq_module = sys.modules["quantatlas.quant.solvers.gptq"]
    model = load_model(str(qwen_fp16), stream=False).model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []

    def boom(self, W, stats, codec):
        calls.append(W.shape)
        if len(calls) == 2:
            raise RuntimeError("solver failed")
        return original(self, W, stats, codec)

    original = gptq_module.GPTQ.solve
    monkeypatch.setattr(gptq_module.GPTQ, "solve", boom)
    with pytest.raises(RuntimeError, match="solver failed"):
        quantize_model(model, build_recipe(Arm(solver="gptq", codec={"uniform": {"bits": 3, "group": 32}})), _calib(), 0)
    after = dict(model.named_parameters())
    first = "model.layers.0.self_attn.q_proj.weight"   # solved before the failure
    failed = "model.layers.0.self_attn.k_proj.weight"
    assert isinstance(after[first], torch.nn.Parameter) and after[first].shape == before[first].shape
    assert not torch.equal(after[first], before[first])
    assert torch.equal(after[failed], before[failed])
    assert all(torch.equal(after[n], before[n]) for n in before if n not in (first,))


def test_unreadable_shards_and_impossible_streaming_are_one_line_errors(qwen_fp16, tmp_path, monkeypatch):
    import shutil

    from quantatlas.models import ModelLoadError

    bad = tmp_path / "bad"
    shutil.copytree(qwen_fp16, bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:5])                      # truncated
    with pytest.raises(StreamError, match=f"{shard.name}: not a readable safetensors file"):
        ShardReader([bad])
    (bad / "model.safetensors.index.json").write_text("{}")       # an index without a weight_map
    with pytest.raises(StreamError, match="not a safetensors index with a weight_map"):
        ShardReader([bad])
    with pytest.raises(ModelLoadError, match="layer streaming runs on the CPU, not on cuda"):
        load_model(str(qwen_fp16), device="cuda", stream=True)
    with pytest.raises(ModelLoadError, match="not a torch device"):
        load_model(str(qwen_fp16), device="cdua", stream=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(qwen_fp16 / "config.json", bin_dir / "config.json")
    (bin_dir / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"layer streaming reads \*\.safetensors weights"):
        load_model(str(bin_dir), stream=True)


def test_a_dtype_streaming_cannot_read_is_named(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4, 4).to(torch.float8_e4m3fn)}, str(tmp_path / "m.safetensors"))
    reader = ShardReader([tmp_path])            # headers parse: the automatic rule still works
    with pytest.raises(StreamError, match="tensor 'w' is F8_E4M3, which layer streaming does not read"):
        reader.tensor("w")
