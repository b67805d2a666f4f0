"""Real model paths, offline: local HF folders with sharded safetensors (bf16 and fp16, tied and untied
heads), a local tokenizer for text data (`data.eval.source: file.txt`), and `hf:org/name` through the
hub client (a local snapshot standing in for the download)."""
import json

import numpy as np
import pytest
import torch

from quantatlas.models.load import ModelLoadError, load_model

LINES = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
         "all that glitters is not gold", "the early bird catches the worm"]


def _tokenizer():
    """A word-level tokenizer trained on a few lines, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(LINES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def _folder(root, family: str, dtype, tied: bool, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied)
    model = (Qwen3ForCausalLM(Qwen3Config(head_dim=8, **common)) if family == "qwen3"
             else LlamaForCausalLM(LlamaConfig(**common)))
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    model = model.to(dtype)
    model.save_pretrained(root, max_shard_size="20KB")
    _tokenizer().save_pretrained(root)
    (root / "text.txt").write_text("\n".join(LINES * 30))
    return model


CASES = [("llama", torch.bfloat16, True), ("llama", torch.float16, False),
         ("qwen3", torch.bfloat16, False), ("qwen3", torch.float16, True)]


@pytest.mark.parametrize("family,dtype,tied", CASES)
def test_sharded_folder_loads_as_saved(tmp_path, family, dtype, tied):
    saved = _folder(tmp_path, family, dtype, tied, seed=len(family))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)
    lm = load_model(str(tmp_path), stream=False)
    got = lm.model.state_dict()
    for name, t in saved.state_dict().items():  # the stored bf16/fp16 values, exactly, in fp32
        assert got[name].dtype == torch.float32 and torch.equal(got[name], t.float()), name
    assert (lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()) == tied
    n_saved = sum(p.numel() for p in saved.parameters())  # a tied head counted once
    assert lm.n_params == n_saved
    streamed = load_model(str(tmp_path), stream=True)
    assert streamed.n_params == n_saved and streamed.model_hash == lm.model_hash
    assert lm.tokenizer is not None and lm.tokenizer.eos_token == "[EOS]"


def test_text_file_is_tokenized_with_the_folder_tokenizer(tmp_path):
    _folder(tmp_path, "qwen3", torch.float16, False, seed=0)
    lm = load_model(str(tmp_path), stream=False)
    text = (tmp_path / "text.txt").read_text()
    ids = lm.text_tokens(str(tmp_path / "text.txt"), "eval")
    words = text.split()
    vocab = _tokenizer().get_vocab()
    # word-level: one id per whitespace word, then the EOS separator
    assert ids.tolist() == [vocab[w] for w in words] + [vocab["[EOS]"]]
    with pytest.raises(ModelLoadError, match="nope.txt"):
        lm.text_tokens(str(tmp_path / "nope.txt"), "eval")


@pytest.mark.parametrize("stream", [False, True])
def test_run_spec_on_a_local_folder_with_text_data(tmp_path, monkeypatch, stream):
    from quantatlas.runner import run_spec

    _folder(tmp_path, "llama", torch.bfloat16, True, seed=3)
    monkeypatch.setenv("QUANTATLAS_STREAM", "1" if stream else "0")
    text = str(tmp_path / "text.txt")
    spec = {"title": "local folder", "model": str(tmp_path), "seeds": [0],
            "data": {"eval": {"tokens": 4 * 32, "ctx": 32, "source": text},
                     "calib": {"samples": 4, "seq_len": 16, "source": text}},
            "arms": {"fp16": {"codec": None}, "gptq": {"solver": "gptq", "codec": {"uniform": {"bits": 3, "group": 32}}}}}
    doc = run_spec(spec, ledger=False, compress=False, log=lambda m: None, device="cpu")
    assert doc["eval_tokens_scored"] == 4 * 15
    # bits per byte counts the UTF-8 bytes of the decoded scored words (eval/bpb.py)
    assert doc["eval_bytes_scored"] > doc["eval_tokens_scored"]
    fp, q = doc["arms"]["fp16"]["seeds"]["0"], doc["arms"]["gptq"]["seeds"]["0"]
    assert fp["kld_mean"] < 1e-9 < q["kld_mean"] and fp["bits_per_weight"] == 16.0
    assert q["bits_per_weight"] == pytest.approx(3 + 16 / 32)  # 3-bit codes + one fp16 scale per 32 weights
    assert np.isfinite(q["ppl"]) and q["ppl"] > 1


def test_hub_id_goes_through_the_hub_client(tmp_path, monkeypatch):
    import huggingface_hub

    _folder(tmp_path, "qwen3", torch.float16, False, seed=5)
    asked = []

    def snapshot(repo, allow_patterns=None, **kw):
        asked.append((repo, tuple(allow_patterns or ())))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    lm = load_model("hf:someorg/tiny-qwen3", stream=False)
    assert asked[0][0] == "someorg/tiny-qwen3" and "*.safetensors" in asked[0][1]
    assert lm.source == "hf:someorg/tiny-qwen3" and lm.tokenizer is not None

    def offline(repo, **kw):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelLoadError, match=r"hf:someorg/missing.*hub \(OSError\)"):
        load_model("hf:someorg/missing")
    with pytest.raises(ModelLoadError, match="not a hub id"):
        load_model("./no/such/folder")


def test_hub_dataset_source_is_one_line_without_datasets(tmp_path, monkeypatch):
    import sys

    _folder(tmp_path, "qwen3", torch.float16, False, seed=0)
    lm = load_model(str(tmp_path), stream=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ModelLoadError, match=r"data source 'hf:org/corpus'.*datasets"):
        lm.text_tokens("hf:org/corpus", "eval")


def test_hub_dataset_source_reads_the_text_column(tmp_path, monkeypatch):
    import sys
    import types

    _folder(tmp_path, "qwen3", torch.float16, False, seed=0)
    lm = load_model(str(tmp_path), stream=False)
    asked = []

    class Split(dict):
        column_names = ["text"]

    def load_dataset(name, config=None, split=None):
        asked.append((name, config, split))
        if split == "test":
            raise ValueError("no test split")
        return Split(text=[LINES[0], "", LINES[1]] if split == "validation" else [LINES[2]])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    vocab = _tokenizer().get_vocab()
    ids = lm.text_tokens("hf:org/corpus:raw", "eval")  # no test split: validation; empty rows dropped
    assert asked == [("org/corpus", "raw", "test"), ("org/corpus", "raw", "validation")]
    eos = vocab["[EOS]"]
    assert ids.tolist() == [vocab[w] for w in LINES[0].split()] + [eos] + [vocab[w] for w in LINES[1].split()] + [eos]
    assert lm.text_tokens("hf:org/corpus", "train").tolist() == [vocab[w] for w in LINES[2].split()] + [eos]
    assert asked[-1] == ("org/corpus", None, "train")


def test_hub_text_for_a_model_without_tokenizer_is_a_one_line_error(tiny_reference):
    with pytest.raises(ModelLoadError, match="has no tokenizer, and hub text needs one"):
        tiny_reference.text_tokens("hf:someorg/some-dataset", "eval")
