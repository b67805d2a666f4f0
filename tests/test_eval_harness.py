"""Eval windows, the reference-logit cache, and bits/bytes counted from storage."""
import brotli
import numpy as np
import pytest
import torch
import zstandard

from quantatlas.eval.bits import artifact_of
from quantatlas.eval.windows import EvalDataError, make_eval_set, reference_logprobs
from quantatlas.quant.codecs import make_codec


def test_windows_and_scored_positions():
    toks = np.arange(1000) % 97
    es = make_eval_set(toks, 1000, 128)
    assert es.windows.shape == (7, 128)                      # 896 tokens used, no partial window
    assert es.first == 64 and es.scored_per_window == 63     # llama.cpp: n_ctx - 1 - n_ctx/2
    t = es.targets().reshape(7, 63)
    assert torch.equal(t[2], torch.from_numpy(toks[2 * 128 + 65: 3 * 128]))
    assert make_eval_set(toks, 1000, 128, "all").scored_per_window == 127
    assert make_eval_set(toks, 1000, 128).fingerprint != make_eval_set(toks, 1000, 128, "all").fingerprint
    assert make_eval_set(toks, 1000, 128).fingerprint != make_eval_set(toks[1:], 1000, 128, up_to=True).fingerprint


def test_shorter_than_one_window_is_an_error():
    with pytest.raises(EvalDataError, match="100 tokens available is shorter than one window of ctx=512") as e:
        make_eval_set(np.zeros(100, dtype=np.int64), 4096, 512)
    assert e.value.field == "data.eval"  # the spec field the CLI points at


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 8)
        self.out = torch.nn.Linear(8, 11)
        self.calls = 0

    def forward(self, x):
        self.calls += 1

        class O:
            pass
        o = O()
        o.logits = self.out(torch.tanh(self.emb(x)).cumsum(1))
        return o


def test_reference_logprobs_cached_once():
    torch.manual_seed(0)
    m = Tiny()
    es = make_eval_set(np.arange(640) % 11, 640, 64)
    a = reference_logprobs(m, "h1", es, "cpu", batch=4)
    calls = m.calls
    b = reference_logprobs(m, "h1", es, "cpu", batch=4)
    assert m.calls == calls                                   # read from disk, not recomputed
    assert a.shape == (es.n_scored, 11) and np.array_equal(np.asarray(a), np.asarray(b))
    with torch.no_grad():
        direct = torch.log_softmax(m(es.windows).logits[:, es.first:-1], -1).reshape(-1, 11).numpy()
    np.testing.assert_allclose(np.asarray(a), direct, atol=1e-6)


def test_artifact_counts_stored_bytes_and_compresses_losslessly():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(50, 64), torch.nn.Linear(64, 128), torch.nn.Linear(128, 64))
    m[2].bias = None
    tied = torch.nn.Linear(64, 50, bias=False)
    tied.weight = m[0].weight                                 # counted once
    m.append(tied)
    codec = make_codec("uniform", {"bits": 4, "group": 64})
    packed = {"1.weight": codec.encode(m[1].weight), "2.weight": codec.encode(m[2].weight)}
    art = artifact_of(m, packed)
    sizes = art.measure()
    q_params = 2 * 64 * 128
    rest = 50 * 64 + 128                                      # embedding (tied head once) + bias
    assert art.quantized_params == q_params and art.total_params == q_params + rest
    assert sizes["bits_per_weight"] == 4 + 16 / 64
    assert sizes["bytes_packed"] == q_params * (4 + 16 / 64) / 8 + 2 * rest
    assert sizes["bits_per_param"] == pytest.approx(8 * sizes["bytes_packed"] / (q_params + rest))
    blob = art.to_bytes()
    assert zstandard.ZstdDecompressor().decompress(zstandard.ZstdCompressor(level=22).compress(blob)) == blob
    assert sizes["bytes_zstd"] == len(zstandard.ZstdCompressor(level=22).compress(blob))
    assert sizes["bytes_brotli"] == len(brotli.compress(blob, quality=11)) < len(blob)
