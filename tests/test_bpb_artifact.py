"""Bits per byte (eval/bpb.py) and the artifact file and its cap (eval/bits.py, spec `artifact:`),
against computations written here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import zstandard

from quantatlas import runner
from quantatlas.eval.bits import artifact_of, cap_check, load_artifact
from quantatlas.eval.bpb import bits_per_byte, scored_bytes
from quantatlas.eval.windows import make_eval_set
from quantatlas.measure import quantize_arm
from quantatlas.quant.config import build
from quantatlas.spec import SpecError, parse_spec

QUIET = dict(ledger=False, compress=False, log=lambda m: None)


def _spec(arms, **extra):
    return parse_spec({"title": "t", "data": {"eval": {"tokens": 2048, "ctx": 128}, "calib": {"samples": 4,
                       "seq_len": 64}}, "arms": arms, **extra})


def _direct_bpb(model, tiny_reference, spec):
    """Code length in bits of every scored byte token / number of scored byte tokens, by a plain loop."""
    ev = spec.data.eval
    es = make_eval_set(tiny_reference.text_tokens(ev.source, "eval"), ev.tokens, ev.ctx, ev.score)
    bits, n_bytes = 0.0, 0
    with torch.no_grad():
        for w in es.windows:
            logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
            for pos in range(es.first, es.ctx - 1):
                y = int(w[pos + 1])
                bits += -float(logp[pos, y]) / math.log(2)
                n_bytes += y < 256  # BOS (256) and EOS (257) are no text
    return bits / n_bytes, n_bytes


def test_bpb_matches_a_direct_computation(tiny_reference):
    spec = _spec({"fp16": {"codec": None}, "int3": {"codec": {"uniform": {"bits": 3, "group": 32, "scale": "absmax"}}}})
    doc = runner.run_spec(spec, loaded=tiny_reference, **QUIET)
    base_direct, n_bytes = _direct_bpb(tiny_reference.model, tiny_reference, spec)
    assert doc["eval_bytes_scored"] == n_bytes <= doc["eval_tokens_scored"]
    fp = doc["arms"]["fp16"]["seeds"]["0"]
    assert fp["bpb"] == pytest.approx(base_direct, rel=1e-6) and fp["bpb_base"] == pytest.approx(base_direct, rel=1e-6)
    assert fp["delta_bpb"] == 0.0
    q = quantize_arm(tiny_reference, spec, "int3", 0).model
    q_direct, _ = _direct_bpb(q, tiny_reference, spec)
    r = doc["arms"]["int3"]["seeds"]["0"]
    assert r["bpb"] == pytest.approx(q_direct, rel=1e-6) and r["bpb_base"] == pytest.approx(base_direct, rel=1e-6)
    assert r["delta_bpb"] == pytest.approx(q_direct - base_direct, rel=1e-5, abs=1e-9) and r["delta_bpb"] != 0
    assert "Δbpb" in runner.format_table(doc)


class _Utf8Tokenizer:
    """Token i is the i-th string of a small table; decode joins them (some are multi-byte)."""
    table = ["a", "é", "日本", " ", "<eos>"]
    eos_token_id = 4

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.table[i] for i in ids if not (skip_special_tokens and i == self.eos_token_id))


def test_scored_bytes_of_a_tokenizer_count_utf8_text_and_skip_special_tokens():
    targets = np.array([0, 1, 2, 4, 3, 3, 1, 0])            # two windows of 4 scored tokens
    # window 1: "a" + "é" + "日本" = 1 + 2 + 6 bytes; window 2: "  é" + "a" = 1 + 1 + 2 + 1
    assert scored_bytes(targets, 2, _Utf8Tokenizer()) == 9 + 5
    assert scored_bytes(np.array([1, 2, 256, 255, 257]), 1) == 3
    assert bits_per_byte(np.array([math.log(2)] * 4), 2) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        bits_per_byte(np.zeros(3), 0)


def test_artifact_file_loads_back_and_decodes_to_the_model(tiny_reference, tmp_path):
    spec = _spec({"int4": {"codec": {"uniform": {"bits": 4, "group": 32}}}})
    qm = quantize_arm(tiny_reference, spec, "int4", 0)
    model, packed = qm.model, qm.packed
    art = artifact_of(model, packed)
    path = tmp_path / "model.qat"
    size = art.write(path, seed=0)
    assert size == path.stat().st_size
    loaded, seed = load_artifact(path.read_bytes())
    assert seed == 0 and set(loaded.packed) == set(packed) and set(loaded.rest) == set(art.rest)
    params = dict(model.named_parameters())
    for name, p in loaded.packed.items():
        codec = build("codec", {p.codec: p.config})
        torch.testing.assert_close(codec.decode(p), params[name].detach().float(), rtol=0, atol=1e-6)
    for name, t in loaded.rest.items():
        assert t.dtype == torch.float16 and torch.equal(t, params[name].detach().half())
    with pytest.raises(ValueError, match="magic"):
        load_artifact(b"nope" + path.read_bytes())


def test_cap_check_is_the_real_compressed_file_size(tiny_reference, tmp_path):
    arms = {"int8": {"codec": {"uniform": {"bits": 8, "group": 32}}},
            "int3": {"codec": {"uniform": {"bits": 3, "group": 32}}}}
    sizes = {}
    for name in arms:
        qm = quantize_arm(tiny_reference, _spec(arms), name, 0)
        model, packed = qm.model, qm.packed
        path = tmp_path / f"{name}.qat"
        artifact_of(model, packed).write(path, seed=0)
        sizes[name] = len(zstandard.ZstdCompressor(level=22).compress(path.read_bytes()))
        blob = path.read_bytes()
        assert cap_check(blob, sizes[name], "zstd-22") == {"artifact_bytes": sizes[name], "artifact_cap": sizes[name],
                                                           "over_cap": 0.0}
        assert cap_check(blob, sizes[name] - 1, "zstd-22")["over_cap"] == 1.0
    assert sizes["int3"] < sizes["int8"]
    cap = (sizes["int3"] + sizes["int8"]) // 2
    doc = runner.run_spec(_spec(arms, artifact={"max_bytes": cap}), loaded=tiny_reference, **QUIET)
    r8, r3 = (doc["arms"][a]["seeds"]["0"] for a in ("int8", "int3"))
    assert (r8["artifact_bytes"], r8["over_cap"]) == (sizes["int8"], 1.0)
    assert (r3["artifact_bytes"], r3["over_cap"]) == (sizes["int3"], 0.0)
    table = runner.format_table(doc)
    line8 = next(line for line in table.splitlines() if line.startswith("int8"))
    line3 = next(line for line in table.splitlines() if line.startswith("int3"))
    assert "OVER" in line8 and "OVER" not in line3


def test_artifact_cap_is_typed_in_the_spec():
    s = _spec({"a": {"codec": None}}, artifact={"max_bytes": 16000000, "compressor": "brotli-11"})
    assert s.artifact.max_bytes == 16000000 and s.artifact.compressor == "brotli-11"
    assert "artifact" not in _spec({"a": {"codec": None}}).model_dump(exclude_defaults=True)
    with pytest.raises(SpecError, match=r"artifact\.compressor.*xz"):
        _spec({"a": {"codec": None}}, artifact={"max_bytes": 10, "compressor": "xz"})
    with pytest.raises(SpecError, match=r"artifact\.max_bytes"):
        _spec({"a": {"codec": None}}, artifact={"max_bytes": 0})
