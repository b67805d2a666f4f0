"""GGUF export, with the `gguf` package's reader and dequantizer as the oracle."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from quantatlas.export import GGML_TYPES, llama_permute, write_gguf  # noqa: E402
from quantatlas.models.roles import get_weight, quantizable  # noqa: E402
from quantatlas.quant.codecs import codec_names, make_codec  # noqa: E402


def _qwen3(tied=False, hidden=256, n_layers=2):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=258, hidden_size=hidden, intermediate_size=512, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=hidden // 4,
                      max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0,
                      bos_token_id=256, eos_token_id=257, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a wrong tensor cannot pass by accident
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def _llama(n_layers=1):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=258, hidden_size=256, intermediate_size=512, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                      rms_norm_eps=1e-5, bos_token_id=256, eos_token_id=257, tie_word_embeddings=False)
    torch.manual_seed(1)
    return LlamaForCausalLM(cfg).eval()


def _read(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def _field(r, key):
    return r.fields[key].contents()


def _dequantized(t) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32)


def _bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _expected_names(n_layers, output=True):
    names = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if output else set())
    for i in range(n_layers):
        names |= {f"blk.{i}.{t}.weight" for t in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm",
                                                   "attn_k_norm", "attn_norm", "ffn_norm", "ffn_gate", "ffn_up",
                                                   "ffn_down")}
    return names


def test_q8_0_export_reads_back_exactly(tmp_path):
    model = _qwen3()
    codec = make_codec("q8_0")
    roles = {t.name + ".weight": t for t in quantizable(model, include_head=True)}
    packed = {name: codec.encode(get_weight(t)) for name, t in roles.items()}
    path = tmp_path / "m.gguf"
    written = write_gguf(path, model, packed, ftype="Q8_0")
    r, tensors = _read(path)

    c = model.config
    assert _field(r, "general.architecture") == "qwen3"
    assert _field(r, "general.file_type") == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert _field(r, "general.quantization_version") == 2
    expected_kv = {"qwen3.block_count": 2, "qwen3.context_length": 1024, "qwen3.embedding_length": 256,
                   "qwen3.feed_forward_length": 512, "qwen3.attention.head_count": 4,
                   "qwen3.attention.head_count_kv": 1, "qwen3.attention.key_length": 64,
                   "qwen3.attention.value_length": 64}
    for k, v in expected_kv.items():
        assert _field(r, k) == v, k
    assert _field(r, "qwen3.rope.freq_base") == pytest.approx(10000.0)
    assert _field(r, "qwen3.attention.layer_norm_rms_epsilon") == np.float32(c.rms_norm_eps)

    assert set(tensors) == _expected_names(2) == set(written)
    mods = dict(model.named_modules())
    for name, p in packed.items():
        gname = {"lm_head.weight": "output.weight"}.get(name)
        if gname is None:
            layer = name.split(".")[2]
            short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                     "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[name.split(".")[-2]]
            gname = f"blk.{layer}.{short}.weight"
        t = tensors[gname]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        rows, cols = p.shape
        assert list(t.shape) == [cols, rows]  # GGUF stores ggml's ne: reversed
        assert _bitwise_equal(_dequantized(t), codec.decode(p).numpy()), gname
        assert not np.array_equal(_dequantized(t), get_weight(roles[name]).numpy())  # quantized, not the fp weights
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == gguf.GGMLQuantizationType.F16 and list(emb.shape) == [256, 258]
    assert np.array_equal(np.asarray(emb.data), mods["model.embed_tokens"].weight.detach().half().numpy())
    for gname, mname in [("output_norm.weight", "model.norm"),
                         ("blk.1.attn_q_norm.weight", "model.layers.1.self_attn.q_norm"),
                         ("blk.0.ffn_norm.weight", "model.layers.0.post_attention_layernorm")]:
        t = tensors[gname]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(np.asarray(t.data), mods[mname].weight.detach().numpy())


@pytest.mark.parametrize("type_name", GGML_TYPES)
def test_every_ggml_codec_dequantizes_to_our_decode(tmp_path, type_name):
    if type_name not in codec_names():
        pytest.skip(f"codec {type_name} is not implemented yet")
    model = _qwen3(n_layers=1)
    codec = make_codec(type_name)
    target = next(t for t in quantizable(model) if t.name.endswith("k_proj"))  # [64, 256]: small, fast
    w = get_weight(target) * torch.linspace(0.01, 3.0, 256)  # uneven columns, exercises the scales
    g = torch.Generator().manual_seed(3)
    imp = torch.rand(256, generator=g) + 0.05
    packed = {target.name + ".weight": codec.encode(w, imp)}
    path = tmp_path / f"{type_name}.gguf"
    write_gguf(path, model, packed)
    _, tensors = _read(path)
    t = tensors["blk.0.attn_k.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType[type_name.upper()]
    assert list(t.shape) == [256, 64]
    assert np.array_equal(np.asarray(t.data), packed[target.name + ".weight"].data["blocks"].numpy())
    assert _bitwise_equal(_dequantized(t), codec.decode(packed[target.name + ".weight"]).numpy())


def _rope_rows(n_head: int, head_dim: int) -> list[int]:
    """GGUF row r of a llama q/k matrix is HF row rows[r]: ggml rotates pairs (2j, 2j+1) of each head,
    HF rotates (j, j + head_dim/2)."""
    rows = []
    for h in range(n_head):
        for j in range(head_dim // 2):
            rows += [h * head_dim + j, h * head_dim + j + head_dim // 2]
    return rows


def test_llama_q_k_rows_are_permuted_as_the_converter_does(tmp_path):
    model = _llama()
    roles = {t.role: t for t in quantizable(model)}
    q8 = make_codec("q8_0")
    packed = {roles["q"].name + ".weight": q8.encode(get_weight(roles["q"]))}
    path = tmp_path / "llama.gguf"
    write_gguf(path, model, packed)
    r, tensors = _read(path)
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "llama.vocab_size") == 258 and _field(r, "llama.rope.dimension_count") == 64

    q_rows, k_rows = _rope_rows(4, 64), _rope_rows(2, 64)
    deq_q = _dequantized(tensors["blk.0.attn_q.weight"])
    assert _bitwise_equal(deq_q, q8.decode(packed[roles["q"].name + ".weight"]).numpy()[q_rows])
    k = np.asarray(tensors["blk.0.attn_k.weight"].data)
    assert np.array_equal(k, get_weight(roles["k"]).half().numpy()[k_rows])
    v = np.asarray(tensors["blk.0.attn_v.weight"].data)  # v is not permuted
    assert np.array_equal(v, get_weight(roles["v"]).half().numpy())


@pytest.mark.parametrize("type_name", ["q8_0", "q4_k"])
def test_permuting_quantized_rows_equals_quantizing_permuted_rows(type_name):
    if type_name not in codec_names():
        pytest.skip(f"codec {type_name} is not implemented yet")
    codec = make_codec(type_name)
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(4))
    rows = _rope_rows(2, 64)
    assert np.array_equal(llama_permute(np.arange(128), 4, 2), np.array(rows))
    assert torch.equal(codec.encode(w[rows]).data["blocks"], codec.encode(w).data["blocks"][rows])


def test_tied_head_is_written_once_as_token_embd(tmp_path):
    model = _qwen3(tied=True, n_layers=1)
    head = next(t for t in quantizable(model, include_head=True) if t.role == "head")
    q8 = make_codec("q8_0")
    packed = {"lm_head.weight": q8.encode(get_weight(head))}
    path = tmp_path / "tied.gguf"
    write_gguf(path, model, packed)
    _, tensors = _read(path)
    assert set(tensors) == _expected_names(1, output=False)
    t = tensors["token_embd.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0 and list(t.shape) == [256, 258]
    assert _bitwise_equal(_dequantized(t), q8.decode(packed["lm_head.weight"]).numpy())


def test_byte_vocabulary(tmp_path):
    model = _qwen3(n_layers=1)
    path = tmp_path / "vocab.gguf"
    write_gguf(path, model, {})
    r, _ = _read(path)
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and len(tokens) == 258
    # GPT-2's byte spelling: printable ASCII is itself, space -> U+0120, newline -> U+010A, byte 0 -> U+0100
    assert tokens[ord("A")] == "A" and tokens[ord("~")] == "~"
    assert tokens[0x20] == "\u0120" and tokens[0x0A] == "\u010a" and tokens[0] == "\u0100"
    assert len(set(tokens)) == 258
    types = _field(r, "tokenizer.ggml.token_type")
    assert list(types[:256]) == [gguf.TokenType.NORMAL] * 256 and list(types[256:]) == [gguf.TokenType.CONTROL] * 2
    assert _field(r, "tokenizer.ggml.bos_token_id") == 256 and _field(r, "tokenizer.ggml.eos_token_id") == 257
    assert not _field(r, "tokenizer.ggml.add_bos_token")  # our eval windows carry no BOS
    assert _field(r, "general.file_type") == 1  # nothing quantized: MOSTLY_F16
    merges = _field(r, "tokenizer.ggml.merges")
    assert all(" " in m and all(len(part) > 1 for part in m.split(" ")) for m in merges)  # can never fire


def test_hf_bpe_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from gguf.vocab import bytes_to_unicode

    spell = bytes_to_unicode()
    vocab = {spell[b]: b for b in range(256)}
    vocab["ab"] = 256
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<|endoftext|>")
    model = _qwen3(n_layers=1)
    assert tok.eos_token_id == 257
    path = tmp_path / "bpe.gguf"
    write_gguf(path, model, {}, tokenizer=tok)
    r, _ = _read(path)
    assert _field(r, "tokenizer.ggml.pre") == "qwen2"
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert tokens[256] == "ab" and tokens[257] == "<|endoftext|>" and tokens[ord("a")] == "a"
    assert _field(r, "tokenizer.ggml.merges") == ["a b"]
    assert _field(r, "tokenizer.ggml.token_type")[257] == gguf.TokenType.CONTROL
    assert _field(r, "tokenizer.ggml.eos_token_id") == 257


def test_refusals(tmp_path):
    model = _qwen3(n_layers=1)
    k = next(t for t in quantizable(model) if t.name.endswith("k_proj"))
    uniform = make_codec("uniform", {"bits": 4, "group": 128}).encode(get_weight(k))
    with pytest.raises(ValueError, match=r"k_proj\.weight.*uniform"):
        write_gguf(tmp_path / "u.gguf", model, {k.name + ".weight": uniform})
    with pytest.raises(ValueError, match="not parameters"):
        write_gguf(tmp_path / "x.gguf", model, {"model.nonexistent.weight": uniform})
    with pytest.raises(ValueError, match="gpt2"):
        write_gguf(tmp_path / "a.gguf", model, {}, arch_hint="gpt2")
    wrong = make_codec("q8_0").encode(torch.zeros(64, 512))
    with pytest.raises(ValueError, match="shape"):
        write_gguf(tmp_path / "s.gguf", model, {k.name + ".weight": wrong})


def test_mixture_with_imatrix_exports_the_planned_types(tmp_path):
    from quantatlas.export import gguf_tensor_names
    from quantatlas.models.roles import find_roles
    from quantatlas.quant.gguf_mix import GGUFMixture
    from quantatlas.quant.imatrix import compute_imatrix

    model = _qwen3(hidden=64, n_layers=1)  # 64-wide rows: Q4_K -> Q5_0, attn_v Q6_K -> Q8_0; down stays Q6_K
    mix = GGUFMixture("Q4_K_M", imatrix=True)
    if any(t not in codec_names() for t in ("q5_0", "q6_k")):
        pytest.skip("q5_0/q6_k codecs are not implemented yet")
    im = compute_imatrix(model, torch.randint(0, 258, (2, 32), generator=torch.Generator().manual_seed(5)))
    plan = mix.plan(model)
    packed, codecs = {}, {}
    for t in find_roles(model):
        codec = GGUFMixture.codec_of(plan[t.name])
        if codec is not None:
            imp = im.importance(t.name) if mix.uses_importance(t) else None
            packed[t.name + ".weight"] = codec.encode(get_weight(t), imp)
            codecs[t.name + ".weight"] = codec
    assert {p.codec for p in packed.values()} == {"q5_0", "q8_0", "q6_k"}
    path = tmp_path / "q4_k_m.gguf"
    write_gguf(path, model, packed, ftype="Q4_K_M")
    r, tensors = _read(path)
    assert _field(r, "general.file_type") == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    for pname, gname in gguf_tensor_names(model).items():
        typ = plan[pname.removesuffix(".weight")]
        assert tensors[gname].tensor_type == gguf.GGMLQuantizationType[typ.upper()], gname
        if pname in packed:
            assert _bitwise_equal(_dequantized(tensors[gname]), codecs[pname].decode(packed[pname]).numpy()), gname
