"""The embedded reference model: corpus split, architecture, committed checkpoint and card."""
import json

import numpy as np
import pytest
import torch

from quantatlas.reference import corpus, splits
from quantatlas.reference.model import CHECKPOINT_DIR, load_reference, reference_config


def test_split_is_deterministic_disjoint_and_roughly_90_5_5():
    files = {s: set(corpus.corpus_files(s)) for s in corpus.SPLITS}
    assert not (files["train"] & files["eval"]) and not (files["train"] & files["validation"])
    assert not (files["validation"] & files["eval"])
    n = sum(len(f) for f in files.values())
    assert 0.85 < len(files["train"]) / n < 0.95 and len(files["eval"]) > 10
    # the split of a path depends on that path alone
    assert corpus.split_of("json/decoder.py") == corpus.split_of("json/decoder.py")
    root = corpus.stdlib_root()
    for p in list(files["eval"])[:5]:
        assert corpus.split_of(p.relative_to(root).as_posix()) == "eval"


def test_token_stream_is_bytes_with_bos_eos():
    toks = corpus.stdlib_tokens("eval")       # the live standard library (what training reads for train)
    first = corpus.corpus_files("eval")[0].read_bytes()
    assert toks[0] == corpus.BOS and toks[len(first) + 1] == corpus.EOS
    assert bytes(toks[1:len(first) + 1].astype(np.uint8)) == first
    assert toks.max() < corpus.VOCAB_SIZE
    fp = corpus.eval_fingerprint(toks[:4096], 512)
    assert fp == corpus.eval_fingerprint(toks[:4096].copy(), 512) != corpus.eval_fingerprint(toks[1:4097], 512)


def test_architecture_is_qwen3_bytes_and_in_budget():
    cfg = reference_config()
    assert cfg.model_type == "qwen3" and cfg.vocab_size == 258 and cfg.max_position_embeddings >= 512
    from transformers import Qwen3ForCausalLM
    n = sum(p.numel() for p in Qwen3ForCausalLM(cfg).parameters())
    assert 4_000_000 <= n <= 10_000_000


@pytest.mark.skipif(not (CHECKPOINT_DIR / "model.safetensors").exists(), reason="checkpoint not trained")
def test_committed_checkpoint_and_card():
    weights = CHECKPOINT_DIR / "model.safetensors"
    assert weights.stat().st_size <= 25 * 2 ** 20
    card = json.loads((CHECKPOINT_DIR / "card.json").read_text())
    model = load_reference()
    assert any("q_norm" in n for n, _ in model.named_parameters())
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    # the card's validation bits per byte is exactly what the stored weights give on the fixed
    # validation split shipped with the package (the same tokens on every Python)
    from quantatlas.reference import data
    from quantatlas.reference.train import bits_per_byte
    assert card["validation_split_sha256"] == data.manifest()["files"]["validation"]["sha256"]
    val = splits.fixed_tokens("validation", card["train"]["val_tokens"] + 1)
    assert np.array_equal(val, splits.corpus_tokens("validation", card["train"]["val_tokens"] + 1))
    bpb = bits_per_byte(model, val, card["train"]["seq_len"], "cpu")
    assert bpb == pytest.approx(card["validation_bits_per_byte"], abs=2e-4)
    assert bpb < 4.0  # far better than a uniform byte model (8 bits)


def test_a_missing_checkpoint_is_a_one_line_error_at_the_model_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import quantatlas.reference.model as reference_model
    from quantatlas.cli import app

    monkeypatch.setattr(reference_model, "CHECKPOINT_DIR", tmp_path / "nothing")
    with pytest.raises(reference_model.MissingCheckpointError) as e:
        load_reference()
    assert e.value.field == "model"
    spec = tmp_path / "spec.yaml"
    spec.write_text("title: t\nmodel: reference\narms:\n  fp16: {codec: null}\n")
    out = CliRunner().invoke(app, ["run", str(spec), "--quiet", "--json", str(tmp_path / "r.json"),
                                   "--db", f"sqlite:///{tmp_path / 'a.db'}"])
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert out.stderr.strip() == (f"error: {spec}:2: field model: model 'reference': {tmp_path / 'nothing'}/"
                                  "model.safetensors is missing; train it with `quantatlas reference train`")
