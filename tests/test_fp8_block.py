"""The fp8 codec's granularities (channel, tensor, 128×128 blocks) and its E5M2 element, against direct
computations with torch's float8 casts; the default keeps its identity and its numbers."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from quantatlas.quant.codecs import make_codec
from quantatlas.quant.config import ConfigError, parse_config

DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def _cast(y: torch.Tensor, fmt: str) -> torch.Tensor:
    """torch's float8 round trip, saturated first (torch's cast does not saturate E5M2)."""
    m = torch.finfo(DTYPES[fmt]).max
    return y.clamp(-m, m).to(DTYPES[fmt]).float()


def _weights(rows=200, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[3, 7] = 1.5                      # an outlier in the first tile
    w[150:, 128:] *= 1e-3              # a tile far below the others
    return w


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_block_granularity_equals_a_tile_by_tile_computation(fmt):
    w = _weights()                                         # 200 rows: a last partial tile of 72 rows
    codec = make_codec("fp8", {"granularity": "block", "format": fmt})
    packed = codec.encode(w)
    m = torch.finfo(DTYPES[fmt]).max
    want = torch.empty_like(w)
    scales = torch.empty(2, 2)
    for i, r in enumerate(range(0, 200, 128)):
        for j, c in enumerate(range(0, 256, 128)):
            tile = w[r:r + 128, c:c + 128]
            s = tile.abs().max() / m
            scales[i, j] = s
            want[r:r + 128, c:c + 128] = _cast(tile / s, fmt) * s
    assert torch.equal(packed.data["scale"], scales)
    assert torch.equal(codec.decode(packed), want)
    assert torch.equal(packed.data["codes"].view(DTYPES[fmt]).float(), _cast(w / scales.repeat_interleave(128, 0)[
        :200].repeat_interleave(128, 1), fmt))
    assert packed.bits_per_weight == 8 + 32 * 4 / (200 * 256)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_tensor_and_channel_granularity(fmt):
    w = _weights(64, 128, seed=1)
    m = torch.finfo(DTYPES[fmt]).max
    tensor = make_codec("fp8", {"granularity": "tensor", "format": fmt})
    s = w.abs().max() / m
    packed = tensor.encode(w)
    assert torch.equal(packed.data["scale"], s.reshape(1))
    assert torch.equal(tensor.decode(packed), _cast(w / s, fmt) * s)
    assert packed.bits_per_weight == 8 + 32 / (64 * 128)
    channel = make_codec("fp8", {"format": fmt})
    sr = w.abs().amax(1, keepdim=True) / m
    assert torch.equal(channel.fake_quantize(w), _cast(w / sr, fmt) * sr)


def test_e5m2_element_equals_ml_dtypes():
    from quantatlas.quant.codecs.minifloat import ELEMENTS

    f = ELEMENTS["fp8_e5m2"]
    y = (np.random.default_rng(0).standard_normal(50000) * 10.0 ** np.random.default_rng(1).uniform(-8, 5, 50000))
    y = np.clip(y.astype(np.float32), -57344, 57344)
    assert np.array_equal(f.round(torch.from_numpy(y)).numpy(), y.astype(ml_dtypes.float8_e5m2).astype(np.float32))


def test_default_fp8_keeps_its_identity_and_numbers():
    cfg = parse_config("codec", "fp8")
    assert cfg.options() == {"format": "e4m3", "group": None, "clip": 1.0}       # as stored before
    assert cfg.options(True) == {}
    explicit = parse_config("codec", {"fp8": {"granularity": "channel", "block": 128}})
    assert explicit.options() == cfg.options() and explicit.options(True) == {}
    w = _weights(32, 128, seed=2)
    s = (w.abs().amax(1) / 448).clamp_min(1e-30)
    assert torch.equal(make_codec("fp8").fake_quantize(w), (w / s[:, None]).to(torch.float8_e4m3fn).float() * s[:, None])


def test_block_granularity_through_gptq_decodes_to_what_the_solver_returns():
    from quantatlas.quant.solvers.gptq import gptq

    g = torch.Generator().manual_seed(3)
    w = torch.randn(256, 256, generator=g) * 0.05
    x = torch.randn(512, 256, generator=g)
    H = 2 * x.T @ x / 512
    codec = make_codec("fp8", {"granularity": "block", "format": "e5m2"})
    w_hat, packed, info = gptq(w, H, codec, act_order=True, static_groups=True)
    assert torch.equal(codec.decode(packed), w_hat)
    rtn = codec.fake_quantize(w)
    assert info["proxy_loss"] < float(((rtn - w) @ H * (rtn - w)).sum())


@pytest.mark.parametrize("options,field", [({"granularity": "block", "group": 64}, "group"),
                                           ({"format": "e3m4"}, "format"), ({"granularity": "row"}, "granularity")])
def test_bad_options_name_their_field(options, field):
    with pytest.raises(ConfigError, match=field):
        make_codec("fp8", options)
