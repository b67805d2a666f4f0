"""Q4_0: blocks of 32 weights, fp16 d then 16 bytes of nibbles (18 bytes, 4.5 bits per weight).

Value of code q (0..15): (q - 8) * d. Byte j holds weight j (low nibble) and weight j+16 (high).

quantize_row_q4_0_ref (no imatrix): max = the x of largest |x|, d = max / -8 (so the extreme
lands on code 0), q = min(15, (int8)(x/d + 8.5)) with the fp32 d; stored d = fp16(d).
quantize_row_q4_0_impl (imatrix qw): weights qw_j * sqrt(sigma2 + x_j^2) with
sigma2 = sum(x^2)/n over the whole row, then make_qx_quants(nmax = 8): the best of 19 trial
scales by weighted least squares; its codes are kept as they are (no re-rounding with fp16 d).
"""
from __future__ import annotations

from quantatlas._lazy import torch

from quantatlas.quant.codecs.ggml.block_codec import (
    BlockCodec, BlockFit, bytes_fp16, fp16_bytes, nibbles,
)
from quantatlas.quant.codecs.ggml.cfloat import c_absmax, fdiv, nearest_int, seq_sum, sqrtf, to_fp16, trunc_int
from quantatlas.quant.codecs.ggml.search import make_qx_quants


def imatrix_weights(x, qw, sigma2):
    """llama.cpp's qw_j * sqrt(sigma2 + x_j^2); sigma2 [B] (a solver's lone group: its own mean)."""
    if sigma2 is None:
        sigma2 = fdiv(seq_sum(x * x), float(x.shape[1]))
    return qw * sqrtf(sigma2[:, None] + x * x)


class Q4_0(BlockCodec):
    name = "q4_0"
    group_size = 32
    type_size = 18
    nmax = 8  # codes 0 .. 2*nmax-1, zero at nmax
    uses_row_sigma2 = True

    def fit_blocks(self, x, qw, sigma2):
        if qw is None:
            _, xmax = c_absmax(x)
            d = fdiv(xmax, float(-self.nmax))
            inv_d = torch.where(d != 0, fdiv(1.0, d), torch.zeros_like(d))
            fit = BlockFit({"d": to_fp16(d)}, None, {"id": inv_d})
            fit.codes = self.rule_codes(x, fit, 0)
            return fit
        d, codes, iscale, valid = make_qx_quants(x, self.nmax, imatrix_weights(x, qw, sigma2))
        return BlockFit({"d": to_fp16(d)}, codes, {"iscale": iscale, "valid": valid})

    def rule_codes(self, x, fit, col):
        top = 2 * self.nmax - 1
        if "id" in fit.rule:  # (int8_t)(x*id + nmax + 0.5), capped at the top code
            return trunc_int(x * fit.rule["id"][:, None] + (self.nmax + 0.5)).clamp(0, top)
        l = nearest_int(fit.rule["iscale"][:, None] * x).clamp(-self.nmax, self.nmax - 1) + self.nmax
        return torch.where(fit.rule["valid"][:, None], l, fit.codes[:, col:col + x.shape[1]])

    def values(self, codes, fields, col):
        return (codes - self.nmax).float() * fields["d"].float()[:, None]

    def to_bytes(self, codes, fields):
        return torch.cat([fp16_bytes(fields["d"]), nibbles(codes[:, :16], codes[:, 16:])], 1)

    def from_bytes(self, blocks):
        qs = blocks[:, 2:18].to(torch.int32)
        return torch.cat([qs & 0xF, qs >> 4], 1), {"d": bytes_fp16(blocks[:, :2])}
