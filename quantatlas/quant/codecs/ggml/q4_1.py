"""Q4_1: blocks of 32 weights: fp16 d, fp16 m, 16 bytes of nibbles (20 bytes, 5 bits per weight).

Value of code q (0..15): q * d + m. Nibble order as Q4_0 (byte j: weight j low, weight j+16 high).

quantize_row_q4_1_ref (no imatrix): min/max of the block, d = (max - min) / 15,
q = min(15, (int8)((x - min)/d + 0.5)) with fp32 d; stored d = fp16(d), m = fp16(min).
quantize_row_q4_1_impl (imatrix qw): weights qw_j * sqrt(sigma2 + x_j^2), sigma2 = sum(x^2)/n over
the whole row, make_qkx3_quants(nmax = 15, rmin = -0.9, rdelta = 0.05, nstep = 36): the best of
37 trial scales, each refit as least-squares (scale, min <= 0); codes kept as found.
"""
from __future__ import annotations

from quantatlas._lazy import torch

from quantatlas.quant.codecs.ggml.block_codec import (
    BlockCodec, BlockFit, bytes_fp16, fp16_bytes, nibbles,
)
from quantatlas.quant.codecs.ggml.cfloat import c_max, c_min, fdiv, nearest_int, to_fp16, trunc_int
from quantatlas.quant.codecs.ggml.q4_0 import imatrix_weights
from quantatlas.quant.codecs.ggml.search import make_qkx3_quants


class Q4_1(BlockCodec):
    name = "q4_1"
    group_size = 32
    type_size = 20
    nmax = 15  # codes 0 .. nmax
    uses_row_sigma2 = True

    def fit_blocks(self, x, qw, sigma2):
        if qw is None:
            xmin, xmax = c_min(x), c_max(x)
            d = fdiv(xmax - xmin, float(self.nmax))
            inv_d = torch.where(d != 0, fdiv(1.0, d), torch.zeros_like(d))
            fit = BlockFit({"d": to_fp16(d), "m": to_fp16(xmin)}, None, {"id": inv_d, "min": xmin})
            fit.codes = self.rule_codes(x, fit, 0)
            return fit
        weights = imatrix_weights(x, qw, sigma2)
        scale, the_min, codes, iscale, rmin, valid = make_qkx3_quants(x, self.nmax, weights, -0.9, 0.05, 36, False)
        return BlockFit({"d": to_fp16(scale), "m": to_fp16(-the_min)}, codes,
                        {"iscale": iscale, "min": rmin, "valid": valid})

    def rule_codes(self, x, fit, col):
        r = fit.rule
        if "id" in r:  # (int)((x - min)*id + 0.5)
            return trunc_int((x - r["min"][:, None]) * r["id"][:, None] + 0.5).clamp(0, self.nmax)
        v = r["iscale"][:, None] * (x - r["min"][:, None])
        l = nearest_int(torch.where(v < self.nmax, v, torch.full_like(v, self.nmax)))
        l = torch.where(v > 0, l, torch.zeros_like(l))
        return torch.where(r["valid"][:, None], l, fit.codes[:, col:col + x.shape[1]])

    def values(self, codes, fields, col):
        return codes.float() * fields["d"].float()[:, None] + fields["m"].float()[:, None]

    def to_bytes(self, codes, fields):
        return torch.cat([fp16_bytes(fields["d"]), fp16_bytes(fields["m"]),
                          nibbles(codes[:, :16], codes[:, 16:])], 1)

    def from_bytes(self, blocks):
        qs = blocks[:, 4:20].to(torch.int32)
        return torch.cat([qs & 0xF, qs >> 4], 1), {"d": bytes_fp16(blocks[:, :2]), "m": bytes_fp16(blocks[:, 2:4])}
