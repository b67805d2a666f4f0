"""A new codec family is one file: its config class and its codec. This file is that file for a toy
sign codec (w ↦ ±scale per row and group, 1 bit per weight + an fp16 scale), and runs it through
the spec, RTN, GPTQ, the runner and the GGUF export's refusal without touching any other file."""
from __future__ import annotations

import pytest
import torch
from pydantic import Field

from quantatlas.quant.codecs.base import Codec, Packed, Quantized, pack_bits, unpack_bits
from quantatlas.quant.config import CodecConfig


# ---- the family: one config class, one codec ---------------------------------------------------
class ToySignConfig(CodecConfig):
    name = "toy_sign"
    group: int = Field(32, gt=0)

    def build(self):
        return ToySign(self)


class ToySign(Codec):
    name = "toy_sign"

    def __init__(self, cfg: ToySignConfig):
        super().__init__(cfg)
        self.group_size = cfg.group

    def fit(self, w, importance=None):
        return w.float().abs().mean(1).half().float()          # the L1-optimal magnitude, fp16

    def quantize(self, w, params, col=0):
        codes = (w >= 0).to(torch.int64)
        return Quantized((2 * codes - 1).float() * params[:, None], codes)

    def pack(self, codes, params):
        rows, cols = codes.shape
        self.group_of(cols)
        return Packed(self.name, self.config(), (rows, cols),
                      {"codes": pack_bits(codes, 1), "scale": torch.stack(params, 1).half()})

    def decode(self, packed):
        rows, cols = packed.shape
        g = self.group_of(cols)
        signs = 2 * unpack_bits(packed.data["codes"], 1, rows * cols).reshape(rows, cols // g, g).float() - 1
        return (signs * packed.data["scale"].float()[..., None]).reshape(rows, cols)


# ---- it works everywhere a codec goes ----------------------------------------------------------
def _direct(w, g):
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], g):
            x = w[r, c:c + g]
            s = float(torch.tensor(float(x.abs().mean())).half())
            out[r, c:c + g] = torch.where(x >= 0, s, -s)
    return out


def test_spec_builds_and_rtn_matches_direct():
    from quantatlas.quant.solvers import rtn
    from quantatlas.spec import SpecError, parse_spec

    spec = parse_spec({"title": "t", "arms": {"a": {"codec": {"toy_sign": {"group": 16}}}}})
    codec = spec.arms["a"].codec.build()
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    w_hat, packed = rtn(w, codec)
    assert torch.equal(w_hat, _direct(w, 16))
    assert packed.bits_per_weight == 1 + 16 / 16
    with pytest.raises(SpecError, match=r"arms\.a\.codec\.toy_sign\.group: Input should be greater than 0"):
        parse_spec({"title": "t", "arms": {"a": {"codec": {"toy_sign": {"group": 0}}}}})


def test_gptq_takes_the_new_codec():
    from quantatlas.quant.codecs import make_codec
    from quantatlas.quant.solvers import gptq, rtn

    g = torch.Generator().manual_seed(1)
    X = torch.randn(1024, 64, generator=g) @ (torch.eye(64) + 0.3 * torch.randn(64, 64, generator=g))
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(16, 64, generator=g)
    codec = make_codec("toy_sign", {"group": 32})
    W_hat, packed, info = gptq(W, H, codec)
    assert torch.equal(codec.decode(packed), W_hat)

    def proxy(Q):
        D = Q - W
        return float(((D @ H) * D).sum())
    assert info["proxy_loss"] < proxy(rtn(W, codec)[0])


def test_runner_runs_it_and_gguf_export_refuses_it(tmp_path, tiny_reference):
    from quantatlas.export import write_gguf
    from quantatlas.measure import quantize_arm
    from quantatlas.runner import run_spec
    from quantatlas.spec import parse_spec

    spec = parse_spec({"title": "toy", "data": {"eval": {"tokens": 2048, "ctx": 128}, "calib": {"samples": 4,
                                                                                                 "seq_len": 128}},
                       "control": "rtn", "arms": {"rtn": {"codec": {"toy_sign": {}}},
                                                  "gptq": {"solver": "gptq", "codec": {"toy_sign": {}}}}})
    doc = run_spec(spec, ledger=False, loaded=tiny_reference, compress=False, log=lambda m: None)
    rtn_kld = doc["arms"]["rtn"]["seeds"]["0"]["kld_mean"]
    gptq_kld = doc["arms"]["gptq"]["seeds"]["0"]["kld_mean"]
    assert doc["arms"]["rtn"]["seeds"]["0"]["bits_per_weight"] == pytest.approx(1 + 16 / 32)
    assert 0 < gptq_kld < rtn_kld
    qm = quantize_arm(tiny_reference, spec, "rtn", 0)
    model, packed = qm.model, qm.packed
    with pytest.raises(ValueError, match="uses codec 'toy_sign', which has no GGUF type"):
        write_gguf(tmp_path / "toy.gguf", model, packed)
