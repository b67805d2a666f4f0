"""The 2:4 sparsity codec (quant/codecs/sparse24.py) against a direct loop written here."""
from __future__ import annotations

import pytest
import torch

from quantatlas.quant.config import build
from quantatlas.spec import SpecError, parse_spec


def _direct(w, bits, g):
    """Per row and group: keep the 2 largest |w| of each 4 columns, symmetric grid, fp16 scale from the kept max."""
    hi = (1 << (bits - 1)) - 1
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], g):
            x = w[r, c0:c0 + g].clone()
            for t in range(0, g, 4):
                order = sorted(range(4), key=lambda i: -abs(float(x[t + i])))
                for i in order[2:]:
                    x[t + i] = 0.0
            s = float(torch.tensor(float(x.abs().max()) / hi).half())
            for j in range(g):
                if x[j] != 0:
                    out[r, c0 + j] = s * max(-hi - 1, min(hi, round(float(x[j]) / s)))
    return out


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_sparse24_matches_a_direct_loop_and_counts_its_bits(bits):
    torch.manual_seed(bits)
    w = torch.randn(6, 32)
    codec = build("codec", {"sparse24": {"bits": bits, "group": 16}})
    packed = codec.encode(w)
    w_hat = codec.decode(packed)
    torch.testing.assert_close(w_hat, _direct(w, bits, 16), rtol=0, atol=1e-6)
    tiles = (w_hat.reshape(6, 8, 4) != 0).sum(-1)
    assert int(tiles.max()) <= 2
    assert packed.bits_per_weight == (2 * bits + 4) / 4 + 16 / 16
    torch.testing.assert_close(codec.fake_quantize(w), w_hat)


def test_sparse24_under_gptq_is_2_of_4_and_decodes_to_its_output():
    from quantatlas.quant.solvers.gptq import gptq

    torch.manual_seed(0)
    w, x = torch.randn(8, 64), torch.randn(256, 64)
    codec = build("codec", {"sparse24": {"bits": 4, "group": 32, "clip": "hessian"}})
    w_hat, packed, _ = gptq(w, x.T @ x, codec, block_size=16)
    torch.testing.assert_close(codec.decode(packed), w_hat, rtol=0, atol=1e-6)
    assert int((w_hat.reshape(8, 16, 4) != 0).sum(-1).max()) <= 2
    rtn = codec.decode(codec.encode(w))
    err = lambda a: float(((a - w) @ x.T).pow(2).sum())  # noqa: E731
    assert err(w_hat) < err(rtn)                          # GPTQ's point: lower output error


def test_sparse24_config_errors_name_the_field():
    with pytest.raises(SpecError, match="group"):
        parse_spec({"title": "t", "arms": {"a": {"codec": {"sparse24": {"group": 30}}}}})
